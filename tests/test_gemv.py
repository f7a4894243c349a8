"""The decode GEMV (`ops.gemv`): its reference against the block-scaled weight expanded by hand, the kernel against
the reference under Triton's interpreter (a subprocess, as Triton reads TRITON_INTERPRET when kernels are defined)
and on a GPU, for FP8 block-scaled (W8A16), bf16 and fp32-row weights; `Fp8WeightLinear` taking it for few rows;
and the per-head GEMVs of MLA's absorbed attention (DSV3_GEMV_HEADS=1) in the engine, eager and compiled."""

import os

import pytest
import torch

from dsv3.fp8 import quantize_blocks
from dsv3.ops import gemv
from tests.conftest import rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _weight(n: int, k: int, seed: int = 0, device: str = "cpu"):
    # An FP8 checkpoint weight [n, k] as Fp8WeightLinear holds it: e4m3 padded to whole 128x128 blocks, with scales
    # that differ block to block (rows of different magnitude).
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]
    q, s = quantize_blocks(w, 128, 128)
    return q.to(device), s.to(device), w.to(device)


def test_reference_is_the_block_scaled_product():
    q, s, w = _weight(200, 300)
    x = torch.randn(3, 300).bfloat16()
    scales = s.repeat_interleave(128, 0).repeat_interleave(128, 1)  # one scale per weight
    want = x.float() @ (q.float() * scales)[:200, :300].t()
    torch.testing.assert_close(gemv.gemv_reference(x, q, s, 200), want.bfloat16())
    assert ((want - x.float() @ w.t()).norm() / want.norm()) < 0.05  # and e4m3's error on the weight is small
    torch.testing.assert_close(gemv.gemv_reference(x, w.bfloat16(), None, 200), (x @ w.bfloat16().t()))


def _check(device: str) -> None:
    for n, k, m in [(200, 300, 1), (256, 384, 4), (576, 2048, 2), (1, 129, 3)]:
        q, s, w = _weight(n, k, seed=n + k, device=device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
        # FP8 against bf16 rows; bf16 against bf16; the router's fp32 rows against its bf16 weight
        for xs, ws, scales in [(x.bfloat16(), q, s), (x.bfloat16(), w.bfloat16(), None), (x, w.bfloat16(), None)]:
            got = gemv.gemv(xs, ws, scales, n)
            want = gemv.gemv_reference(xs, ws, scales, n)
            assert got.shape == (m, n) and got.dtype == xs.dtype
            tol = 1e-5 if xs.dtype == torch.float32 else 1e-2  # fp32 sums in another order; bf16 output rounding
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


def test_head_references_are_the_absorbed_attention_products():
    # kv_b_proj's weight [H * (nope + v), C] holds per head nope rows of W_UK, then v rows of W_UV
    h, nope, v, c, m = 3, 8, 4, 16, 2
    w = torch.randn(h * (nope + v), c)
    q_nope, o_lat = torch.randn(m, h, nope), torch.randn(m, h, c)
    per_head = w.view(h, nope + v, c)
    want_q = torch.stack([q_nope[:, i] @ per_head[i, :nope] for i in range(h)], dim=1)  # [M, H, C]
    want_o = torch.stack([o_lat[:, i] @ per_head[i, nope:].t() for i in range(h)], dim=1)  # [M, H, v]
    torch.testing.assert_close(gemv.head_cols_reference(q_nope, w, 0, nope + v), want_q)
    torch.testing.assert_close(gemv.head_rows_reference(o_lat, w, nope, nope + v, v), want_o)


def _check_heads(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    # (heads, nope, v, C, rows): C not a multiple of the column tiles; v = 8, a head smaller than most row tiles
    for h, nope, v, c, m in [(4, 32, 32, 64, 1), (2, 16, 8, 48, 3), (16, 128, 128, 512, 2)]:
        w = torch.randn(h * (nope + v), c, generator=gen).bfloat16().to(device)
        q = torch.randn(m, h, nope + 16, generator=gen).bfloat16().to(device)[..., :nope]  # a strided view, as MLA's
        o = torch.randn(m, h, c, generator=gen).bfloat16().to(device)
        for got, want in [(gemv.head_cols(q, w, 0, nope + v), gemv.head_cols_reference(q, w, 0, nope + v)),
                          (gemv.head_rows(o, w, nope, nope + v, v), gemv.head_rows_reference(o, w, nope, nope + v, v))]:
            assert got.shape == want.shape and got.dtype == torch.bfloat16
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * scale)


@interpreted
def test_kernel_matches_reference_interpreted():
    _check("cpu")
    _check_heads("cpu")


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
        torch.testing.assert_close(layer(x).float(), gemv.gemv_reference(x.flatten(0, 1), q, s, 200)
                                   .view(2, 1, 200).float(), rtol=1e-2, atol=1e-2)
    assert not gemv.applies(x.flatten(0, 1))  # with autograd on, the GEMM path


@interpreted
def test_engine_greedy_tokens_are_unchanged_by_the_switch_interpreted(monkeypatch):
    # The engine's decode steps (one row each here) with the absorbed attention's per-head products through the
    # GEMVs give the tokens cuBLAS's batched products give.
    from dsv3.config import ModelConfig
    from dsv3.engine import Engine, SamplingParams
    from dsv3.model import build_model

    model = build_model(ModelConfig.preset("tiny")).eval()
    prompts, params = [[5, 9, 2, 7]], [SamplingParams(max_tokens=6, temperature=0.0)]
    want = [c.token_ids for c in Engine(model, max_batch_size=1).generate(prompts, params)]
    heads = []
    monkeypatch.setattr(gemv, "HEADS", True)
    monkeypatch.setattr(gemv, "_head_cols", lambda *a, _run=gemv._head_cols: heads.append("W_UK") or _run(*a))
    monkeypatch.setattr(gemv, "_head_rows", lambda *a, _run=gemv._head_rows: heads.append("W_UV") or _run(*a))
    got = [c.token_ids for c in Engine(model, max_batch_size=1).generate(prompts, params)]
    assert got == want and {"W_UK", "W_UV"} <= set(heads)


@interpreted
def test_compiled_decode_steps_trace_whole_with_the_switch_interpreted(monkeypatch):
    # With the switch on, the compiled decode steps (as the 16b benchmark runs them) are still one graph per
    # function, the GEMVs inside as custom ops, and give the eager engine's tokens (bf16, as compiling needs).
    from torch._dynamo.testing import CompileCounterWithBackend

    from dsv3.config import ModelConfig
    from dsv3.engine import Engine, SamplingParams
    from dsv3.model import build_model

    model = build_model(ModelConfig.preset("tiny", num_hidden_layers=2), dtype=torch.bfloat16).eval()
    prompts = [[5, 9, 2, 7, 1], [3, 8, 6]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [c.token_ids for c in Engine(model, max_batch_size=2, speculative=True).generate(prompts, params)]
    monkeypatch.setattr(gemv, "HEADS", True)
    engine = Engine(model, max_batch_size=2, speculative=True, compile=True)
    counter = CompileCounterWithBackend("aot_eager")
    engine.graphs.backend = counter
    ops = []
    monkeypatch.setattr(gemv, "_head_rows", lambda *a, _run=gemv._head_rows: ops.append(a[0].shape) or _run(*a))
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert counter.frame_count == len(engine.graphs.fns) and ops  # whole graphs, and the kernels ran inside them
    assert got == want


@interpreted
def test_custom_op_matches_its_fake_interpreted():
    # (opcheck's schema test perturbs the inputs, which the CPU cannot do to e4m3 tensors: the bf16 form.)
    _, _, w = _weight(256, 384)
    x = torch.randn(2, 384).bfloat16()
    torch.library.opcheck(torch.ops.dsv3.gemv, (x, w.bfloat16(), None, 200))
    kv_b, q, o = torch.randn(4 * 48, 64).bfloat16(), torch.randn(2, 4, 32).bfloat16(), torch.randn(2, 4, 64).bfloat16()
    torch.library.opcheck(torch.ops.dsv3.gemv_head_cols, (q, kv_b, 0, 48))
    torch.library.opcheck(torch.ops.dsv3.gemv_head_rows, (o, kv_b, 32, 48, 16))


@pytest.mark.skipif(INTERPRETED or gemv.triton is None, reason="this is the subprocess, or no triton")
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "interpreted")


@pytest.mark.skipif(not torch.cuda.is_available() or gemv.triton is None, reason="needs CUDA and triton")
def test_kernel_matches_reference_on_the_gpu():
    _check("cuda")
    _check_heads("cuda")


@pytest.mark.skipif(gemv.triton is None, reason="needs triton")
def test_bad_weights_are_named():
    q, s, _ = _weight(200, 300)
    x = torch.randn(1, 300).bfloat16()
    with pytest.raises(ValueError, match="not a padded block-scaled"):
        gemv.gemv(x, q, s[:1], 200)
    with pytest.raises(ValueError, match="contiguous"):
        gemv.gemv(x, q.t(), s, 200)
    with pytest.raises(ValueError, match="do not fit"):
        gemv.gemv(x, q[:128, :256].contiguous(), s[:1, :2].contiguous(), 200)
    w = torch.randn(4 * 48, 64).bfloat16()
    with pytest.raises(ValueError, match="not 4 heads of 40 rows"):
        gemv.head_rows(torch.randn(1, 4, 64).bfloat16(), w, 32, 40, 16)
    with pytest.raises(ValueError, match="multiple of the smallest tile"):
        gemv.head_rows(torch.randn(1, 4, 64).bfloat16(), w, 32, 48, 6)
