"""The MLA prepare step (`ops.mla_prepare`): its reference against the model's own projections, norm and ropes, and
the Triton kernel against the reference, on the CPU through Triton's interpreter (a subprocess, as Triton chooses
between interpreter and compiler when a kernel is defined) or on a GPU compiled."""

import os

import pytest
import torch

import dsv3
from dsv3.model import MLA, build_model
from dsv3.ops import mla_prepare
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernel = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                            reason="runs in test_under_the_triton_interpreter's subprocess, or on a GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("interleave", [False, True])
@torch.no_grad()
def test_reference_matches_the_model(interleave):
    cfg = dsv3.ModelConfig.preset("tiny", rope_interleave=interleave)
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    t = 7
    x = torch.randn(1, t, cfg.hidden_size)
    cos, sin = build_model(cfg).rotary(torch.arange(t) + 3)
    q_nope, q_pe, c_kv, k_pe = mla.project(x, cos[None], sin[None])
    q, kv = mla.projections(x)
    w_uk = mla.kv_b_proj.weight.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)[:, :cfg.qk_nope_head_dim]
    cache = torch.zeros(5, 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    slots = torch.tensor([9, 2, 17, 0, 5, 19, 12])
    q_lat, got_pe = mla_prepare.prepare_reference(q[0], kv[0], w_uk, mla.kv_a_layernorm.weight,
                                                  mla.kv_a_layernorm.eps, cos, sin, interleave, cache, slots, 4)
    torch.testing.assert_close(got_pe, q_pe[0])
    torch.testing.assert_close(cache.view(-1, cache.shape[-1])[slots], torch.cat([c_kv, k_pe], -1)[0])
    torch.testing.assert_close(q_lat, torch.einsum("mhn,hnc->mhc", q_nope[0, :4], w_uk))


@on_cpu_under_the_interpreter(mla_prepare.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


def _inputs(m, h, nope, c, r, dtype, gen):
    # q and kv as column slices of one projection output, W_UK a view of kv_b_proj's weight and the slots a strided
    # column: the engine's layouts, made on the device in `dtype` before slicing so that they stay views
    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    q, kv = draw(m, h * (nope + r) + c + r).split([h * (nope + r), c + r], dim=-1)
    w_uk = (draw(h, nope + 5, c) / nope ** 0.5)[:, :nope]
    angles = torch.rand(m, r // 2, generator=gen) * 20
    cos, sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE).chunk(2, dim=-1)  # the engine's fp32 table
    slots = torch.stack([torch.randperm(16 * 8, generator=gen)[:m], torch.zeros(m, dtype=torch.long)], 1)
    norm_weight = 1 + 0.1 * draw(c)
    cache = torch.zeros(16, 8, c + r, device=DEVICE, dtype=dtype)
    return q, kv, w_uk, norm_weight, 1e-6, cos, sin, cache, slots.to(DEVICE)[:, 0]


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("m,lat_rows,h,nope,c,r", [(1, 1, 4, 32, 64, 16), (5, 3, 3, 24, 40, 12),
                                                   (30, 0, 2, 16, 128, 8), (70, 66, 2, 16, 96, 8)])
def test_kernel_matches_reference(m, lat_rows, h, nope, c, r, interleave, dtype):
    # Non-power-of-two head, latent and rope widths (masked tiles), prefill rows without a latent query, and two
    # row blocks (70 rows).
    q, kv, w_uk, nw, eps, cos, sin, cache, slots = _inputs(m, h, nope, c, r, dtype, torch.Generator().manual_seed(m))
    ref_cache, got_cache = cache.clone(), cache.clone()
    want = mla_prepare.prepare_reference(q, kv, w_uk, nw, eps, cos, sin, interleave, ref_cache, slots, lat_rows)
    got = mla_prepare.prepare_triton(q, kv, w_uk, nw, eps, cos, sin, interleave, got_cache, slots, lat_rows)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], want[1], **tol)  # q_pe
    torch.testing.assert_close(got_cache, ref_cache, **tol)
    lat_tol = dict(atol=5e-3, rtol=5e-3) if dtype == torch.float32 else tol  # tf32 products on a GPU
    torch.testing.assert_close(got[0], want[0], **lat_tol)  # q_lat


@kernel
def test_op_fake_matches_the_kernel():
    import dsv3.engine.attention  # noqa: F401  (registers dsv3::mla_prepare)

    q, kv, w_uk, nw, eps, cos, sin, cache, slots = _inputs(5, 3, 24, 40, 12, torch.float32,
                                                           torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.dsv3.mla_prepare, (q, kv, w_uk, nw, eps, cos, sin, False, cache, slots, 3),
                          test_utils=("test_schema", "test_faketensor"))
