"""The decode GEMVs (`ops.gemv`): the Triton kernels against F.linear and einsum on the CPU through Triton's
interpreter (awkward sizes, bias, several K slices, the absorbed attention's strided per-head views), when the model
takes them, and on a GPU eagerly, compiled and in a decode-sized forward.

Triton chooses between interpreter and compiler when a kernel is defined, so `test_under_the_triton_interpreter`
reruns this file's kernel tests in a subprocess with TRITON_INTERPRET=1.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsv3
from dsv3.model import build_model, linear
from dsv3.ops import gemv
from tests.conftest import rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or gemv.triton is None, reason="needs CUDA and triton")

# (rows, N, K, bias): a 16b kv_a_proj at batch 1 (split into 8 slices of K), an odd K with a bias, 8 rows of a tiny
# layer, a bias over 4 slices, and a K that is no multiple of the 64-wide slices.
SHAPES = [(1, 576, 2048, False), (3, 100, 300, True), (8, 7, 40, True), (2, 64, 1024, True), (1, 48, 1000, False)]


def _inputs(m, n, k, bias, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, keyword="kernel")


@interpreted
@pytest.mark.parametrize("m,n,k,bias", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_linear(m, n, k, bias, dtype):
    x, w, b = _inputs(m, n, k, bias, dtype)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = gemv.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def _absorbed_weights(h, nope, v, c, dtype, device="cpu"):
    # kv_b_proj's weight viewed per head as the decode attention does: W_UK [H, nope, C], W_UV [H, v, C] (views)
    w = torch.randn(h * (nope + v), c, generator=torch.Generator().manual_seed(h)).to(device, dtype) / c ** 0.5
    w = w.view(h, nope + v, c)
    return w[:, :nope], w[:, nope:]


# (rows, heads, nope, v, C): the 16b's heads at batch 1, speculative rows of the 1b, awkward sizes
ABSORBED = [(1, 16, 128, 128, 512), (2, 16, 64, 64, 256), (3, 5, 40, 24, 72)]


@interpreted
@pytest.mark.parametrize("m,h,nope,v,c", ABSORBED)
def test_kernels_match_the_absorbed_products(m, h, nope, v, c):
    w_uk, w_uv = _absorbed_weights(h, nope, v, c, torch.bfloat16)
    gen = torch.Generator().manual_seed(m)
    q_nope = torch.randn(m, h, nope, generator=gen).bfloat16()
    o_lat = torch.randn(m, h, c, generator=gen).bfloat16()
    q_lat = gemv.bmm_nn(q_nope, w_uk)  # [M, H, C]
    out = gemv.bmm_nt(o_lat, w_uv)  # [M, H, v]
    torch.testing.assert_close(q_lat.float(), gemv.bmm_nn_reference(q_nope.float(), w_uk.float()),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), gemv.bmm_nt_reference(o_lat.float(), w_uv.float()), rtol=1e-2, atol=1e-2)


def test_slices_cover_k_once():
    for n, k in [(576, 2048), (100, 300), (7, 40), (64, 1024), (48, 1000), (102400, 2048), (2048, 10944)]:
        splits, width = gemv._splits(n, k, torch.device("cpu"))
        assert width % 64 == 0 and (splits - 1) * width < k <= splits * width
    assert gemv._splits(576, 2048, torch.device("cpu"))[0] > 1  # narrow outputs split K
    assert gemv._splits(102400, 2048, torch.device("cpu"))[0] == 1  # the head does not


def test_linear_falls_back_where_the_gemv_does_not_apply():
    layer = nn.Linear(16, 8).bfloat16()
    x = torch.randn(1, 16).bfloat16()
    with torch.no_grad():
        assert not gemv.applies(x, layer.weight)  # a CPU tensor: F.linear
        torch.testing.assert_close(linear(layer, x), layer(x))
    with torch.no_grad():
        assert not gemv.applies(torch.randn(9, 16).bfloat16(), layer.weight)  # more rows than MAX_ROWS


# ---- on the GPU ----------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("m,n,k,bias", SHAPES + [(1, 3072, 2048, False), (4, 102400, 2048, False)])
def test_gpu_gemv_eager_and_compiled(m, n, k, bias):
    x, w, b = _inputs(m, n, k, bias, torch.bfloat16, "cuda")
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    with torch.no_grad():
        assert gemv.applies(x, w)
        got = gemv.linear(x, w, b)
        compiled = torch.compile(lambda x: gemv.linear(x, w, b) * 2, fullgraph=True)(x)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(compiled.float(), 2 * got.float(), rtol=1e-2, atol=1e-2)


@gpu
@pytest.mark.parametrize("m,h,nope,v,c", ABSORBED)
def test_gpu_absorbed_products_eager_and_compiled(m, h, nope, v, c):
    w_uk, w_uv = _absorbed_weights(h, nope, v, c, torch.bfloat16, "cuda")
    q_nope = torch.randn(m, h, nope, device="cuda").bfloat16()
    o_lat = torch.randn(m, h, c, device="cuda").bfloat16()
    with torch.no_grad():
        assert gemv.applies(q_nope, w_uk) and gemv.applies(o_lat, w_uv)
        got = gemv.bmm_nn(q_nope, w_uk), gemv.bmm_nt(o_lat, w_uv)
        compiled = torch.compile(lambda q, o: (gemv.bmm_nn(q, w_uk), gemv.bmm_nt(o, w_uv)), fullgraph=True)(
            q_nope, o_lat)
    want = gemv.bmm_nn_reference(q_nope.float(), w_uk.float()), gemv.bmm_nt_reference(o_lat.float(), w_uv.float())
    for a, b, w in zip(got, compiled, want):
        torch.testing.assert_close(a.float(), w, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2)


@gpu
def test_gpu_decode_with_and_without_the_gemv():
    # The model's decode-sized forward takes the kernel in every plain linear layer; its logits match F.linear's.
    cfg = dsv3.ModelConfig.preset("tiny", initializer_range=0.05)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")
    with torch.no_grad():
        fast = model(ids).float()
        gemv.use_kernel = False
        try:
            plain = model(ids).float()
        finally:
            gemv.use_kernel = True
    assert (fast - plain).abs().max() < 0.05 * plain.abs().max()
