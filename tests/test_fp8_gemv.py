"""The W8A16 GEMV of FP8 serving at decode batch sizes (`ops.fp8_gemv`): its reference against the block-scaled
weight expanded by hand, the kernel against the reference under Triton's interpreter (a subprocess, as Triton reads
TRITON_INTERPRET when kernels are defined) and on a GPU, and `Fp8WeightLinear` taking it for few rows."""

import os

import pytest
import torch

from dsv3.fp8 import quantize_blocks
from dsv3.ops import fp8_gemv as gemv
from tests.conftest import rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _weight(n: int, k: int, seed: int = 0, device: str = "cpu"):
    # An FP8 checkpoint weight [n, k] as Fp8WeightLinear holds it: e4m3 padded to whole 128x128 blocks, with scales
    # that differ block to block (rows of different magnitude).
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]
    q, s = quantize_blocks(w, 128, 128)
    return q.to(device), s.to(device), w


def test_reference_is_the_block_scaled_product():
    q, s, w = _weight(200, 300)
    x = torch.randn(3, 300).bfloat16()
    scales = s.repeat_interleave(128, 0).repeat_interleave(128, 1)  # one scale per weight
    want = x.float() @ (q.float() * scales)[:200, :300].t()
    torch.testing.assert_close(gemv.fp8_gemv_reference(x, q, s, 200), want.bfloat16())
    assert ((want - x.float() @ w.t()).norm() / want.norm()) < 0.05  # and e4m3's error on the weight is small


def _check(device: str) -> None:
    for n, k, m in [(200, 300, 1), (256, 384, 4), (576, 2048, 2), (1, 129, 3)]:
        q, s, _ = _weight(n, k, seed=n + k, device=device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().to(device)
        got = gemv.fp8_gemv(x, q, s, n)
        want = gemv.fp8_gemv_reference(x, q, s, n)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item())


@interpreted
def test_kernel_matches_reference_interpreted():
    _check("cpu")


@interpreted
def test_fp8_linear_takes_the_gemv_for_few_rows_interpreted():
    from dsv3.fp8_infer import Fp8WeightLinear

    q, s, _ = _weight(200, 300)
    layer = Fp8WeightLinear(300, 200, None, emulate=False, device=torch.device("cpu"))
    layer.weight.copy_(q)
    layer.weight_scale_inv.copy_(s)
    x = torch.randn(2, 1, 300).bfloat16()
    with torch.no_grad():
        assert gemv.applies(x.flatten(0, 1)) and not gemv.applies(torch.zeros(gemv.MAX_ROWS + 1, 300).bfloat16())
        torch.testing.assert_close(layer(x).float(), gemv.fp8_gemv_reference(x.flatten(0, 1), q, s, 200)
                                   .view(2, 1, 200).float(), rtol=1e-2, atol=1e-2)
    assert not gemv.applies(x.flatten(0, 1))  # with autograd on, the GEMM path


@pytest.mark.skipif(INTERPRETED or gemv.triton is None, reason="this is the subprocess, or no triton")
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "interpreted")


@pytest.mark.skipif(not torch.cuda.is_available() or gemv.triton is None, reason="needs CUDA and triton")
def test_kernel_matches_reference_on_the_gpu():
    _check("cuda")


@pytest.mark.skipif(gemv.triton is None, reason="needs triton")
def test_bad_weights_are_named():
    q, s, _ = _weight(200, 300)
    x = torch.randn(1, 300).bfloat16()
    with pytest.raises(ValueError, match="not a padded block-scaled"):
        gemv.fp8_gemv(x, q, s[:1], 200)
    with pytest.raises(ValueError, match="contiguous"):
        gemv.fp8_gemv(x, q.t(), s, 200)
