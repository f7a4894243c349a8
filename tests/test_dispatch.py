"""The MoE dispatch (`ops.dispatch`): the reference against indexing by each output row's token, its gradient
against autograd's, the Triton kernel against the reference under Triton's interpreter (a subprocess) and on a GPU
at the `1b` shapes."""

import os

import pytest
import torch

from dsv3.ops import dispatch as dp
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _operands(n: int, k: int, d: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(dtype)
    where = torch.randperm(n * k, generator=gen)  # slot (token, j) -> its row in expert order
    return x.to(device), where.to(device)


def test_reference_and_gradient_match_indexing():
    n, k = 7, 3
    x, where = _operands(n, k, 10, torch.float64)
    token_of_row = torch.empty_like(where)
    token_of_row[where] = torch.arange(n * k) // k  # output row -> its token
    want = x[token_of_row]
    torch.testing.assert_close(dp.dispatch_rows_reference(x, where, k), want)
    grad = torch.randn(n * k, 10, dtype=torch.float64)
    leaf, mine = x.clone().requires_grad_(), x.clone().requires_grad_()
    leaf[token_of_row].backward(grad)
    out = dp.dispatch(mine, where, k)
    torch.testing.assert_close(out, want)
    out.backward(grad)
    torch.testing.assert_close(mine.grad, leaf.grad)


@on_cpu_under_the_interpreter(dp.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


def _check(n: int, k: int, d: int, dtype: torch.dtype, device: str):
    x, where = _operands(n, k, d, dtype, device)
    got = dp.dispatch_rows(x, where, k)
    assert got.dtype == x.dtype
    assert torch.equal(got, dp.dispatch_rows_reference(x, where, k))  # copies: exact


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    _check(9, 3, 200, dtype, "cpu")  # a row width that is not a power of two: masked columns


@pytest.mark.skipif(not torch.cuda.is_available() or dp.triton is None, reason="needs CUDA and triton")
def test_gpu_matches_reference_at_the_1b_shapes():
    _check(98304, 6, 1024, torch.bfloat16, "cuda")
