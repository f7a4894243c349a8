"""The decode GEMV (`ops.gemv`) against F.linear: on the CPU through Triton's interpreter (a subprocess, as Triton
chooses between interpreter and compiler when a kernel is defined), on a GPU compiled."""

import os

import pytest
import torch

from dsv3.ops import gemv
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernel = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                            reason="runs in test_under_the_triton_interpreter's subprocess, or on a GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@on_cpu_under_the_interpreter(gemv.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


@kernel
@pytest.mark.parametrize("m,n,k", [(1, 3648, 2048), (3, 100, 200), (4, 37, 4096), (2, 5, 16384)])
@torch.no_grad()
def test_kernel_matches_linear(m, n, k):
    # Widths that are not powers of two (masked tiles), an output count that is not a multiple of the rows a
    # program holds, the widest K, and x rows that are strided (a column slice, as the engine's may be).
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k + 8, generator=gen)[:, 4:k + 4].to(DEVICE, torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, torch.bfloat16)
    assert gemv.applies(x, w)
    want = (x.float() @ w.float().t()).bfloat16()
    torch.testing.assert_close(gemv.gemv_triton(x, w), want, atol=1e-2, rtol=1e-2)


@kernel
def test_op_fake_matches_the_kernel():
    x, w = torch.randn(2, 64).bfloat16().to(DEVICE), torch.randn(24, 64).bfloat16().to(DEVICE)
    torch.library.opcheck(torch.ops.dsv3.gemv, (x, w), test_utils=("test_schema", "test_faketensor"))


@torch.no_grad()
def test_applies_only_where_it_should():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    on_device = gemv.triton is not None and INTERPRETED
    assert gemv.applies(torch.zeros(4, 64, dtype=torch.bfloat16), w) == on_device
    assert not gemv.applies(torch.zeros(5, 64, dtype=torch.bfloat16), w)  # too many rows
    assert not gemv.applies(torch.zeros(1, 64), w.float())  # fp32
    assert not gemv.applies(torch.zeros(1, 64, dtype=torch.bfloat16), w.t().contiguous().t())  # strided weight
    with torch.enable_grad():
        assert not gemv.applies(torch.zeros(1, 64, dtype=torch.bfloat16), w)  # no backward
