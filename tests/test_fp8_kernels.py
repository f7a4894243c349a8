"""The FP8 Triton kernels against their PyTorch references, on the CPU through Triton's interpreter.

Triton chooses between interpreter and compiler when it is imported, so under a plain `pytest` run the one test
`test_kernels_under_the_interpreter` reruns this file in a subprocess with TRITON_INTERPRET=1, where the others
run. Skipped without Triton, and on CUDA machines (tests/test_fp8_gpu.py runs the compiled kernels there).

The interpreter rounds fp32 -> e4m3 wrongly next to powers of two (127.9 becomes 64, not 128), so the inputs are
built to need no rounding: e4m3 values times one power of two, quantised with power-of-two scales (or with tiles
whose amax is 448 times a power of two), which keeps every division exact. The GPU tests take arbitrary inputs.
"""

import copy
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("the GPU tests run the compiled kernels", allow_module_level=True)

from dsv3.fp8_train import Fp8Settings, apply_fp8  # noqa: E402
from dsv3.ops import fp8_gemm as ops  # noqa: E402
from tests.conftest import rerun_under_interpreter  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_under_the_interpreter's subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_under_the_interpreter():
    rerun_under_interpreter(__file__, allow_skips=True)


def _exact(*shape, exponent: int = -6) -> torch.Tensor:
    """e4m3-representable values times 2^exponent, with +-448 in every row and column of each 128x128 block."""
    q = (torch.rand(shape) * 896 - 448).to(torch.float8_e4m3fn).float()
    i, j = torch.meshgrid(torch.arange(shape[-2]), torch.arange(shape[-1]), indexing="ij")
    q[..., (i + j) % 128 == 0] = 448.0
    return q * 2.0 ** exponent


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.float(), b.float())


GROUPS = [None, [0, 5, 5, 170, 300], [300]]


@interpreted
@pytest.mark.parametrize("offs", GROUPS)
def test_quantize_act_kernel(offs):
    x = _exact(300, 200)
    x[17] = 0.0  # a zero token: the amax floor
    tiles = ops.row_tiles(300, None if offs is None else torch.tensor(offs, dtype=torch.int32))
    got, want = ops.quantize_act(x, tiles, pow2=True), ops.quantize_act_reference(x, tiles, pow2=True)
    for name in ("q", "s", "qt", "st"):
        assert _same(getattr(got, name), getattr(want, name)), name
    rows_only = ops.quantize_act(x, tiles, pow2=True, with_cols=False)
    assert rows_only.qt is None and _same(rows_only.q, want.q)


@interpreted
def test_quantize_act_kernel_amax_over_448_scales():
    x = _exact(256, 256, exponent=3)  # every tile's amax is 448 * 2^3: amax / 448 is exact without pow2
    tiles = ops.row_tiles(256)
    got, want = ops.quantize_act(x, tiles), ops.quantize_act_reference(x, tiles)
    for name in ("q", "s", "qt", "st"):
        assert _same(getattr(got, name), getattr(want, name)), name


@interpreted
@pytest.mark.parametrize("pow2", [True, False])
def test_quantize_weight_kernel(pow2):
    w = _exact(3, 256, 384)[:, :200, :300]  # cropped: partial blocks, still with 448 in each block for pow2=False
    w[1, :128, :128] = 0.0
    got, want = ops.quantize_weight(w, pow2), ops.quantize_weight_reference(w, pow2)
    for name in ("q", "qt", "s"):
        assert _same(getattr(got, name), getattr(want, name)), name
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # the same values through other strides
    assert _same(ops.quantize_weight(wt, pow2).q, want.q)


def _operands(m, k, n, g, offs):
    tiles = ops.row_tiles(m, None if offs is None else torch.tensor(offs, dtype=torch.int32))
    a = ops.quantize_act_reference(torch.randn(m, k), tiles)
    w = ops.quantize_weight_reference(torch.randn(g, n, k))
    return tiles, a, w


@interpreted
@pytest.mark.parametrize("offs", GROUPS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_kernel_fprop_and_dgrad(offs, out_dtype):
    g = 1 if offs is None else len(offs)
    tiles, a, w = _operands(300, 200, 150, g, offs)
    got = ops.gemm(a.q, a.s, w.q, w.s, tiles, 150, out_dtype)
    want = ops.gemm_reference(a.q, a.s, w.q, w.s, tiles, 150, out_dtype)
    torch.testing.assert_close(got, want, rtol=1e-5 if out_dtype == torch.float32 else 1e-2, atol=1e-4)
    dy = ops.quantize_act_reference(torch.randn(300, 150), tiles)
    got = ops.gemm(dy.q, dy.s, w.qt, w.s.transpose(1, 2), tiles, 200, torch.float32)
    want = ops.gemm_reference(dy.q, dy.s, w.qt, w.s.transpose(1, 2), tiles, 200, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@interpreted
@pytest.mark.parametrize("offs", GROUPS)
def test_wgrad_kernel(offs):
    g = 1 if offs is None else len(offs)
    tiles = ops.row_tiles(300, None if offs is None else torch.tensor(offs, dtype=torch.int32))
    dy = ops.quantize_act_reference(torch.randn(300, 150), tiles)
    x = ops.quantize_act_reference(torch.randn(300, 200), tiles)
    got, want = ops.wgrad(dy, x, tiles, 150, 200), ops.wgrad_reference(dy, x, tiles, 150, 200)
    assert got.shape == (g, 150, 200)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@interpreted
def test_fp8_linear_kernels_match_emulation():
    lin = nn.Linear(200, 150, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_exact(150, 200, exponent=-10))
    emu = apply_fp8(copy.deepcopy(lin), emulate=True, pow2_scales=True)
    fast = apply_fp8(copy.deepcopy(lin), emulate=True, pow2_scales=True)
    # apply_fp8 refuses the kernels on a CPU; under the interpreter they run
    fast.fp8 = Fp8Settings(emulate=False, pow2=True)
    x, dy = _exact(3, 70, 200), _exact(3, 70, 150, exponent=-3)
    results = []
    for mod in (fast, emu):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(dy)
        results.append((y, xi.grad, mod.weight.grad))
    for got, want in zip(*results):  # the same FP8 operands, summed in another order
        assert ((got - want).norm() / want.norm()).item() < 1e-6
