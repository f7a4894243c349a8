"""The compiled decode step against the eager engine, the Triton decode custom op, the precomputed rope table, and
the kernel-count script.

Compiling needs bf16 weights (torch._grouped_mm traces in bf16 only), so these models are bf16 on the CPU. The quick
tests trace the engine's decode functions with dynamo's aot_eager backend: whole graphs (fullgraph=True fails on any
break), functionalised cache writes, the graph run eagerly. The engine's own backend, inductor, takes a minute or
more per graph on two CPU cores: that test runs only when DSV3_SLOW_TESTS=1 is set.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dsv3
from dsv3.engine import Engine, SamplingParams
from dsv3.model import build_model
from dsv3.ops.mla_decode import triton
from tests.conftest import skip_if_interpreter_broken

ROOT = Path(__file__).resolve().parents[1]
CFG = dsv3.ModelConfig.preset("tiny", num_hidden_layers=2)


@functools.cache
def bf16_model() -> dsv3.Transformer:
    return build_model(CFG, seed=0, dtype=torch.bfloat16).eval()


def prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


# The three kinds of decode function: speculative greedy steps run one fused function; with logprobs the main
# function and the drafter's run apart (the main one is also what plain decoding runs).
@pytest.mark.parametrize("logprobs,kinds", [(None, {"greedy_speculative"}), (2, {"main", "mtp"})])
def test_compiled_steps_trace_whole_and_match_eager(logprobs, kinds):
    model = bf16_model()
    ps = prompts([5, 11], seed=1)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=logprobs)
    eager = Engine(model, max_batch_size=2, block_size=4, num_blocks=32, speculative=True).generate(ps, params)
    engine = Engine(model, max_batch_size=2, block_size=4, num_blocks=32, speculative=True, compile=True)
    counter = CompileCounterWithBackend("aot_eager")  # counts the graphs dynamo hands to the backend
    engine.graphs.backend = counter
    compiled = engine.generate(ps, params)
    decode = [kind for kind, size in engine.graphs.fns if size <= engine.graphs.decode_rows]
    assert set(decode) == kinds
    assert counter.frame_count == len(decode)  # one whole graph per decode function, none run eagerly
    # The prompts' first step ran its rows as decode rows in a larger bucket, uncompiled: main and drafter.
    assert {key for key in engine.graphs.fns if key[1] > engine.graphs.decode_rows} == {("main", 16), ("mtp", 16)}
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    if logprobs:
        got = torch.tensor([lp.logprob for c in compiled for lp in c.logprobs])
        want = torch.tensor([lp.logprob for c in eager for lp in c.logprobs])
        # bf16: the prompts' step runs absorbed attention in the compiled engine, expanded in the eager one.
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0)
    assert engine.metrics()["compiled"] and not engine.metrics()["cuda_graphs"]


@pytest.mark.parametrize("speculative,drafts", [(False, 1), (True, 1), (True, 2)])
def test_compiled_greedy_bursts_over_padded_buckets_match_single_steps(speculative, drafts):
    # Three sequences fill a bucket of four (of 4, 8 or 12 rows) with padding rows, which each step's rewrite of its
    # rows for the next one must leave alone; the steps of a burst replay one compiled function.
    model = bf16_model()
    ps = prompts([5, 11, 3], seed=2)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 9, 14)]

    def run(multi_step):
        engine = Engine(model, block_size=4, num_blocks=48, speculative=speculative, compile=True,
                        num_speculative_tokens=drafts, multi_step=multi_step)
        engine.graphs.backend = "aot_eager"
        out = engine.generate(ps, params)
        assert engine.metrics()["cache_blocks_used"] == 0
        return [c.token_ids for c in out], engine.graphs

    single, _ = run(1)
    burst, graphs = run(8)
    assert burst == single
    assert ("greedy_speculative" if speculative else "greedy") in {kind for kind, _ in graphs.fns}


@pytest.mark.skipif(os.environ.get("DSV3_SLOW_TESTS") != "1", reason="inductor on the CPU: set DSV3_SLOW_TESTS=1")
def test_inductor_compiled_engine_tracks_the_full_forward_and_writes_the_cache_in_place():
    from torch._inductor.utils import run_and_get_code

    model = bf16_model()
    ps = prompts([5, 11], seed=2)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    engine = Engine(model, max_batch_size=2, block_size=4, num_blocks=40, compile=True)
    compiled, codes = run_and_get_code(engine.generate, ps, params)
    # Inductor keeps fp32 intermediates where eager bf16 rounds, so a near tie may go either way: hold every token
    # and logprob to a full forward over the text before it, within 0.02 (the logprobs differ by up to 0.008; at 12
    # of the 20 positions the full forward's runner-up is more than 0.02 behind, so a wrong token fails there).
    for p, c in zip(ps, compiled):
        with torch.no_grad():
            lp = model(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].float().log_softmax(-1)
        chosen = lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert (lp.amax(-1) - chosen).max() < 0.02
        torch.testing.assert_close(torch.tensor([x.logprob for x in c.logprobs]), chosen, atol=0.02, rtol=0)
    # A cache write that is not done in place copies whole layers: a loop over a layer's 41 * 4 * 48 elements.
    layer_numel = engine.cache.layer(0).numel()
    assert codes and not any(str(layer_numel) in code for code in codes)


OP_CHECK = """
import torch
import dsv3
from dsv3.engine.attention import Step, mla_attention
from dsv3.model import MLA, build_model
from dsv3.ops.mla_decode import mla_decode_reference
from tests.test_engine_attention import _random_decode_inputs, _w_uv

gen = torch.Generator().manual_seed(0)
args = (*_random_decode_inputs(3, 20, 48, 24, 8, 3, 2, gen), 0.2, _w_uv(20, 10, 48, gen))
torch.library.opcheck(torch.ops.dsv3.mla_decode_triton, args)
err = (torch.ops.dsv3.mla_decode_triton(*args) - mla_decode_reference(*args)).abs().max().item()
assert err < 1e-4, err

# Absorbed attention traced whole with the Triton kernel as the custom op, against the reference path.
cfg = dsv3.ModelConfig.preset("tiny")
mla = build_model(cfg.replace(initializer_range=0.1), seed=0).layers[0].self_attn
torch.manual_seed(0)
x = torch.randn(1, 3, cfg.hidden_size)
cos, sin = build_model(cfg).rotary(torch.tensor([5, 2, 7]))
tables = torch.tensor([[1, 2], [3, 0]])  # blocks of 4 tokens
rows = torch.tensor([[0, pos, int(tables[seq, pos // 4]) * 4 + pos % 4, pos + 1, 1, seq]
                     for pos, seq in ((5, 0), (2, 1), (7, 0))])


def attend(use_triton, kv):
    return mla_attention(mla, x, cos[None], sin[None], kv, Step(rows, tables, 3, [], use_triton))


kv = torch.randn(4, 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
with torch.no_grad():
    want = attend(False, kv.clone())
    got = torch.compile(lambda kv: attend(True, kv), backend="aot_eager", fullgraph=True)(kv)
assert (got - want).abs().max().item() < 1e-4
print("ok")
"""


@pytest.mark.skipif(triton is None, reason="needs the triton package (its interpreter runs the kernel on the CPU)")
def test_triton_decode_custom_op_in_interpreter():
    # TRITON_INTERPRET is read when kernels are defined, so the check runs in a fresh interpreter.
    skip_if_interpreter_broken()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", OP_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_rope_table_matches_the_rotary_module():
    model = build_model(dsv3.ModelConfig.preset("tiny"), seed=0)  # YaRN-scaled, so the table carries the mscale
    engine = Engine(model, max_seq_len=300, block_size=4, num_blocks=8)
    positions = torch.tensor([0, 1, 17, 299, 4])
    cos, sin = model.rotary(positions)
    assert engine.runner.rope.shape == (300, CFG.qk_rope_head_dim)
    torch.testing.assert_close(engine.runner.rope[positions], torch.cat([cos, sin], -1), atol=1e-6, rtol=0)


def test_compile_needs_bf16_experts():
    with pytest.raises(ValueError, match="compile=True needs bf16 experts"):
        Engine(build_model(CFG, seed=0), block_size=4, num_blocks=8, compile=True)


def test_kernel_count_script_on_the_tiny_preset(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.decode_kernels", "--preset", "tiny", "--context", "16",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    eager = json.loads((tmp_path / "decode_kernels_tiny_b1.json").read_text())["eager"]
    regions = eager["aten_ops_by_region"]
    assert sum(regions.values()) == eager["aten_ops"]
    cfg = dsv3.ModelConfig.preset("tiny")  # layer 0 dense, layers 1 and 2 MoE
    assert regions["layer 1"] == regions["layer 2"]
    dense, moe = eager["ops_by_layer_kind"]["layer 0"], eager["ops_by_layer_kind"]["layer 1"]
    # By hand: q_a with kv_a (one shared weight), q_b and o projections, then gate with up (shared) and down (dense
    # MLP or shared expert), and in a MoE layer the router's linear; two absorbed bmm plus the three einsums of the
    # reference decode attention.
    assert dense["mm"] == 5 and moe["mm"] == 6 and moe["_grouped_mm"] == 2
    assert dense["bmm"] == moe["bmm"] == 5
    assert dense["index_put_"] == 1  # the cache write
    assert regions["embedding, rope"] == 4  # two input copies, the embedding, the rope-table gather
    assert cfg.num_hidden_layers == 3 and set(regions) == {"embedding, rope", "layer 0", "layer 1", "layer 2",
                                                          "norm, head, expert load"}


def test_kernel_count_script_counts_the_speculative_step(tmp_path):
    # Two rows per sequence (last token and draft), and after the main model's head the drafter: a whole MoE block
    # more, plus its own norms, projection, head and the two argmaxes.
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for extra in ([], ["--speculative"], ["--speculative", "--speculative-tokens", "2"]):
        done = subprocess.run([sys.executable, "-m", "benchmarks.decode_kernels", "--preset", "tiny", "--context",
                               "16", "--device", "cpu", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    plain = json.loads((tmp_path / "decode_kernels_tiny_b1.json").read_text())
    spec = json.loads((tmp_path / "decode_kernels_tiny_b1_speculative.json").read_text())
    assert spec["speculative"] and not plain["speculative"]
    tail = "norm, head, expert load"
    assert (spec["eager"]["aten_ops_by_region"][tail]
            > plain["eager"]["aten_ops_by_region"][tail] + plain["eager"]["aten_ops_by_region"]["layer 1"])
    # Two drafts: the drafter runs once more, chained on its own output (another MoE block and head).
    spec2 = json.loads((tmp_path / "decode_kernels_tiny_b1_speculative2.json").read_text())
    assert spec2["drafts"] == 2 and (spec2["eager"]["aten_ops_by_region"][tail]
                                     > spec["eager"]["aten_ops_by_region"][tail]
                                     + plain["eager"]["aten_ops_by_region"]["layer 1"])
