"""SwiGLU for training (`ops.swiglu`): the backward reference against autograd's gradient of silu(gate) * up, the
autograd function inside a model under torch.compile, the Triton backward against the reference under Triton's
interpreter (a subprocess) and on a GPU at the `1b` shapes."""

import os

import pytest
import torch
import torch.nn.functional as F

from dsv3.ops import swiglu as sw
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _operands(rows: int, inter: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype)  # gates well into silu's curved part
    grad = torch.randn(rows, inter, generator=gen).to(dtype)
    return h.to(device), grad.to(device)


def test_backward_reference_is_autograds_gradient():
    h, grad = _operands(5, 12, torch.float64)
    leaf = h.clone().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad)
    torch.testing.assert_close(sw.swiglu_backward_reference(grad, h), leaf.grad)
    # The autograd function: the same value, and the same gradient (CPU: its reference backward).
    mine = h.clone().requires_grad_()
    out = sw.swiglu(mine)
    torch.testing.assert_close(out, F.silu(h[:, :12]) * h[:, 12:])
    out.backward(grad)
    torch.testing.assert_close(mine.grad, leaf.grad)


def test_compiled_mlp_gets_the_gradients_of_eager_silu_times_up():
    from dsv3.model import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 24)
    x = torch.randn(3, 5, 16)
    torch.compile(mlp, backend="aot_eager")(x).square().sum().backward()
    got = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).square().sum().backward()
    for a, p in zip(got, mlp.parameters()):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, p.grad)


@on_cpu_under_the_interpreter(sw.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


def _check(rows: int, inter: int, dtype: torch.dtype, device: str):
    h, grad = _operands(rows, inter, dtype, device)
    got = sw.swiglu_backward(grad, h)
    want = sw.swiglu_backward_reference(grad, h)
    assert got.dtype == h.dtype and got.shape == h.shape
    # bf16: the same fp32 value rounded once, up to the last bits of exp
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, inter", [(11, 40), (3, 5000)])
def test_kernel_matches_reference(dtype, rows, inter):
    # 40 columns: several rows per program, masked columns; 5000: more than one program across a row
    _check(rows, inter, dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available() or sw.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("rows, inter", [(589824, 512), (98304, 1024), (8191, 2816)])
def test_gpu_matches_reference_at_the_1b_shapes(rows, inter):
    _check(rows, inter, torch.bfloat16, "cuda")
