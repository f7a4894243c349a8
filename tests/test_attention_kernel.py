"""MLA's training attention (`ops.attention`): the reference against a hand-written softmax attention, the Triton
forward and backward against the reference under Triton's interpreter (a subprocess) and on a GPU at the `1b` and
671B head sizes, from strided views as MLA's projections make them."""

import os

import pytest
import torch

from dsv3.ops import attention as attn
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _pieces(b: int, t: int, h: int, dn: int, dr: int, dv: int, dtype: torch.dtype, device: str = "cpu"):
    # views of the projections' outputs, as MLA takes them: q [B, T, H * (Dn + Dr)], kv [B, T, H * (Dn + Dv)]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, t, h * (dn + dr), generator=gen).to(device, dtype).requires_grad_()
    kv = torch.randn(b, t, h * (dn + dv), generator=gen).to(device, dtype).requires_grad_()
    k_pe = torch.randn(b, t, dr, generator=gen).to(device, dtype).requires_grad_()
    grad_o = torch.randn(b, t, h, dv, generator=gen).to(device, dtype)

    def split():
        q_nope, q_pe = q.unflatten(-1, (h, dn + dr)).split([dn, dr], dim=-1)
        return q_nope, q_pe, kv.unflatten(-1, (h, dn + dv)), k_pe

    return split, (q, kv, k_pe), grad_o


def _run(fn, split, leaves, grad_o, scale):
    out = fn(*split(), scale)
    return out, torch.autograd.grad(out, leaves, grad_o)


def test_reference_is_causal_softmax_attention():
    split, leaves, grad_o = _pieces(2, 7, 3, 4, 2, 5, torch.float64)
    q_nope, q_pe, kv, k_pe = split()
    k_nope, v = kv.split([4, 5], dim=-1)
    scores = (torch.einsum("bihd,bjhd->bhij", q_nope, k_nope) + torch.einsum("bihd,bjd->bhij", q_pe, k_pe)) * 0.7
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    torch.testing.assert_close(attn.mla_causal_attention_reference(*split(), 0.7), want)
    # head sizes that are not powers of two take the reference everywhere
    torch.testing.assert_close(attn.mla_causal_attention(*split(), 0.7), want)


def _check(b, t, h, dn, dr, dv, dtype, device, tol):
    split, leaves, grad_o = _pieces(b, t, h, dn, dr, dv, dtype, device)
    got, got_g = _run(attn.mla_causal_attention, split, leaves, grad_o, 0.3)
    want, want_g = _run(attn.mla_causal_attention_reference, split, leaves, grad_o, 0.3)
    assert got.shape == (b, t, h, dv) and got.dtype == dtype
    for a, w in zip((got, *got_g), (want, *want_g)):
        assert a.shape == w.shape and a.dtype == w.dtype
        torch.testing.assert_close(a.float(), w.float(), rtol=tol, atol=tol * w.float().abs().max().item())


@on_cpu_under_the_interpreter(attn.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel_matches_reference and not gpu", timeout=300)


@interpreted
@pytest.mark.parametrize("b, t, h, dn, dr, dv", [(2, 37, 3, 16, 16, 32), (1, 150, 2, 64, 32, 64)])
def test_kernel_matches_reference(b, t, h, dn, dr, dv):
    # 37 rows: one partial block; 150: several key and query blocks, the diagonal's and the off-diagonal loops
    _check(b, t, h, dn, dr, dv, torch.float32, "cpu", 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or attn.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("b, t, h, dn, dr, dv", [(2, 2048, 16, 64, 32, 64), (1, 1000, 4, 128, 64, 128),
                                                 (3, 77, 2, 64, 32, 64)])
def test_gpu_kernel_matches_reference(b, t, h, dn, dr, dv):
    # bf16 against cuDNN's (or flash) attention: both round the probabilities to bf16 for their products
    _check(b, t, h, dn, dr, dv, torch.bfloat16, "cuda", 2e-2)
