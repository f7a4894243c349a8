"""The MoE combine (`ops.combine`): its backward reference against autograd's gradient of the forward, the Triton
backward against the reference under Triton's interpreter (a subprocess) and on a GPU at the `1b` shapes."""

import os

import pytest
import torch

from dsv3.ops import combine as cb
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _operands(n: int, k: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ys = torch.randn(n * k, d, generator=gen).to(dtype)
    where = torch.randperm(n * k, generator=gen)  # slot (token, j) -> its row in expert order
    weights = torch.rand(n, k, generator=gen)
    grad = torch.randn(n, d, generator=gen).to(dtype)
    return [t.to(device) for t in (ys, where, weights, grad)]


def test_backward_reference_is_autograds_gradient():
    ys, where, weights, grad = _operands(7, 3, 10, torch.float64)
    y, w = ys.clone().requires_grad_(), weights.double().requires_grad_()
    out = cb.combine_reference(y, where, w)
    want = (ys[where].unflatten(0, (7, 3)) * weights.double().unsqueeze(-1)).sum(1)
    torch.testing.assert_close(out, want)
    out.backward(grad)
    d_ys, d_w = cb.combine_backward_reference(grad, ys, where, weights.double())
    torch.testing.assert_close(d_ys, y.grad)
    torch.testing.assert_close(d_w.double(), w.grad)
    # The autograd function gives the same (CPU: its reference backward).
    y2, w2 = ys.clone().requires_grad_(), weights.double().requires_grad_()
    cb.combine(y2, where, w2).backward(grad)
    torch.testing.assert_close(y2.grad, y.grad)
    torch.testing.assert_close(w2.grad, w.grad)


@on_cpu_under_the_interpreter(cb.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


def _check(n: int, k: int, d: int, dtype: torch.dtype, device: str):
    ys, where, weights, grad = _operands(n, k, d, dtype, device)
    d_ys, d_w = cb.combine_backward(grad, ys, where, weights)
    want_ys, want_w = cb.combine_backward_reference(grad, ys, where, weights)
    assert d_ys.dtype == ys.dtype and d_w.dtype == torch.float32
    # bf16: the weight and the product are each rounded to bf16 (by the interpreter, not always to nearest)
    torch.testing.assert_close(d_ys.float(), want_ys.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)
    torch.testing.assert_close(d_w, want_w, rtol=1e-4, atol=1e-4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    _check(9, 3, 200, dtype, "cpu")  # a row width that is not a power of two: masked columns


@pytest.mark.skipif(not torch.cuda.is_available() or cb.triton is None, reason="needs CUDA and triton")
def test_gpu_matches_reference_at_the_1b_shapes():
    _check(4096, 6, 1024, torch.bfloat16, "cuda")
