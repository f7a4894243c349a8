"""The engine's GPU paths against their references: the Triton MLA decode kernel, CUDA graphs (of the eager and of
the torch.compile'd step), speculation in bf16. Skipped without CUDA; on the H200:
`python -m pytest tests/test_gpu_engine.py`."""

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.engine import Engine, SamplingParams
from dsv3.model import build_model
from dsv3.ops.mla_decode import mla_decode_reference, mla_decode_triton, triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")


@pytest.mark.parametrize("m,h,c,r,bs,width,seqs", [
    (1, 16, 512, 64, 64, 128, 1),  # 16b shapes at batch 1, a table of 8192 tokens
    (64, 16, 256, 32, 64, 8, 64),  # 1b shapes at batch 64
    (7, 128, 512, 64, 64, 3, 4),  # DeepSeek-V3's 128 heads, rows sharing sequences (speculative verification)
    (3, 5, 40, 24, 16, 5, 2),  # awkward sizes: 5 heads, C = 40, R = 24
    (2, 4, 16, 8, 4, 9, 2),  # tiles smaller than tl.dot's 16
])
def test_triton_decode_matches_reference_bf16(m, h, c, r, bs, width, seqs):
    gen = torch.Generator(device="cuda").manual_seed(m)
    pages = seqs * width + 1
    kv = torch.randn(pages, bs, c + r, device="cuda", generator=gen).bfloat16()
    tables = torch.stack([torch.randperm(pages, device="cuda", generator=gen)[:width] for _ in range(seqs)])
    seq = torch.randint(0, seqs, (m,), device="cuda", generator=gen)
    lengths = torch.randint(1, width * bs + 1, (m,), device="cuda", generator=gen)
    lengths[0] = 1
    q = torch.randn(m, h, c, device="cuda", generator=gen).bfloat16()
    q_pe = torch.randn(m, h, r, device="cuda", generator=gen).bfloat16()
    w_uv = (torch.randn(h, 2 * c, c, device="cuda", generator=gen) / c ** 0.5).bfloat16()[:, c:]  # [H, v = C, C]
    scale = (c + r) ** -0.5
    ref = mla_decode_reference(q.float(), q_pe.float(), kv.float(), tables, seq, lengths, scale, w_uv.float())
    out = mla_decode_triton(q, q_pe, kv, tables, seq, lengths, scale, w_uv).float()
    assert (out - ref).abs().max() < 2e-2 * ref.abs().max()


def _model():
    cfg = dsv3.ModelConfig.preset("tiny", initializer_range=0.05)
    return build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0).eval()


def _check_greedy_against_full_forward(model, prompts, completions, tol=0.1, flips=1 / 16):
    """Every emitted token is (up to bf16 noise) the argmax of a full forward over the text before it. A fraction
    `flips` of the positions may miss by more: in a random bf16 model a routing near-tie that the full forward
    resolves the other way moves that position's logits by a few tenths (0.34 measured on the H200, the same with
    every engine path)."""
    gaps = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(ids)[0, len(p) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(c.token_ids, device="cuda")[:, None])[:, 0]
        gaps.append(logits.amax(-1) - chosen)
    gaps = torch.cat(gaps)
    assert (gaps >= tol).sum() <= len(gaps) * flips and gaps.max() < 1.0, gaps


# speculative with logprobs: the main and drafter graphs replay apart, with verification on the host between them;
# plain greedy speculative steps run both in one graph.
@pytest.mark.parametrize("speculative,logprobs", [(False, None), (True, None), (True, 2)])
def test_cuda_graphs_and_triton_track_the_full_forward(speculative, logprobs):
    model = _model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 40, 17, 90, 5)]
    # Different lengths: the batch shrinks as requests finish, so several graph buckets run.
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=logprobs)
              for n in (24, 8, 16, 24, 4)]
    engine = Engine(model, max_batch_size=8, block_size=16, num_blocks=64, speculative=speculative)
    assert engine.graphs is not None and engine.runner.use_triton
    fast = engine.generate(prompts, params)
    _check_greedy_against_full_forward(model, prompts, fast)
    eager = Engine(model, max_batch_size=8, block_size=16, num_blocks=64, cuda_graphs=False, decode_kernel="torch",
                   speculative=speculative).generate(prompts, params)
    # A random model's logits are nearly flat, so in bf16 the two paths may take different near-tied tokens and
    # then continue different texts: hold each path to the full forward rather than to the other.
    _check_greedy_against_full_forward(model, prompts, eager)
    assert len(engine.graphs.graphs) >= 2  # several buckets were captured as the batch shrank


@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_step_in_cuda_graphs_tracks_the_full_forward(speculative):
    from torch._inductor.utils import run_and_get_code

    model = _model()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 40)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (16, 6)]  # two buckets run
    engine = Engine(model, max_batch_size=2, block_size=16, num_blocks=64, speculative=speculative, compile=True)
    assert engine.graphs.capture and engine.graphs.compile and engine.runner.use_triton
    out, codes = run_and_get_code(engine.generate, prompts, params)
    _check_greedy_against_full_forward(model, prompts, out)
    assert len(engine.graphs.graphs) >= 2
    # The cache writes are in place: no kernel runs over a whole cache layer (65 * 16 * 48 elements).
    layer_numel = engine.cache.layer(0).numel()
    assert codes and not any(str(layer_numel) in code for code in codes)


def test_fp8_checkpoint_serves_through_fp8_gemms(tmp_path):
    from dsv3.fp8_infer import Fp8WeightExperts, Fp8WeightLinear, _fp8_product
    from dsv3.ops.fp8_gemm import fp8_unsupported_reason, row_tiles

    if reason := fp8_unsupported_reason(torch.device("cuda")):
        pytest.skip(reason)
    dsv3.save_model(_model(), tmp_path / "fp8", fp8=True)
    model = dsv3.load_model(tmp_path / "fp8", device="cuda")  # FP8 checkpoint, FP8 GPU: FP8 GEMMs by default
    layers = [m for m in model.modules() if isinstance(m, Fp8WeightLinear)]
    assert layers and not any(m.emulate for m in layers)
    # Each layer's FP8 GEMM equals its emulation (quantise, dequantise, matmul) up to summation order. Whole-model
    # logits are compared on the CPU in fp32 (tests/test_fp8_infer.py): in bf16 a random tiny model's routing
    # near-ties turn the quantisation noise into different experts (measured: 10-15% logit differences between
    # the FP8 GEMMs, their emulation and the dequantised model alike, with every layer within 0.1% of emulation).
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            x = torch.randn(40, layer.in_features, generator=gen).cuda().bfloat16()
            got = layer(x).float()
            layer.emulate = True
            want = layer(x).float()
            layer.emulate = False
            assert ((got - want).norm() / want.norm()).item() < 5e-3
        # The routed experts likewise, each grouped FP8 GEMM on the same input both ways (experts with no rows
        # included). Their chain is not compared whole: the intermediate is quantised to e4m3 again, and bf16
        # rounding differences between the two gate/up results can flip its roundings (the chain: 0.88% apart on
        # the H200).
        experts = [m for m in model.modules() if isinstance(m, Fp8WeightExperts)]
        assert experts and not any(m.emulate for m in experts)
        n_exp = model.cfg.n_routed_experts
        tiles = row_tiles(37, torch.linspace(0, 37, n_exp).round().int().cuda())
        for m in experts:
            ip = m.gate_up_proj.shape[1] // 2
            xs = torch.randn(37, m.dim, generator=gen).cuda().bfloat16()
            got, want = (_fp8_product(xs, m.gate_up_proj, m.gate_up_proj_scale_inv, tiles, 2 * ip, emulate)
                         for emulate in (False, True))
            assert ((got - want).float().norm() / want.float().norm()).item() < 5e-3
            h = F.silu(want[:, : m.inter]) * want[:, ip: ip + m.inter]  # [37, I]
            got, want = (_fp8_product(h, m.down_proj, m.down_proj_scale_inv, tiles, m.dim, emulate)
                         for emulate in (False, True))
            assert ((got - want).float().norm() / want.float().norm()).item() < 5e-3
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 40)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (16, 6)]
    engine = Engine(model, max_batch_size=2, block_size=16, num_blocks=64)
    assert engine.graphs is not None
    # Two roundings of the experts, so more near-ties flip: the engine's steps (the prompts' step too, as a graph)
    # run the fused expert kernels (FP8 weights against bf16 activations), the full forward the grouped FP8 GEMM,
    # which also quantises the activations to e4m3 (3 of 22 positions measured on the H200, by 0.12, 0.20 and 0.40;
    # 2 while the prompts' step ran the grouped GEMM as the full forward does).
    _check_greedy_against_full_forward(model, prompts, engine.generate(prompts, params), flips=1 / 6)


def test_seeded_sampling_reproduces_on_the_gpu():
    model = _model()
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    runs = [Engine(model, max_batch_size=4, num_blocks=32).generate([[1, 2, 3]], p)[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1]
