"""The MoE decode kernels (`ops.moe_decode`): their PyTorch references against the model's Gate and MoE, the
Triton kernels against the references on the CPU through Triton's interpreter, and on a GPU the model's fused MoE
path against its grouped-GEMM path (eagerly, in a CUDA graph and compiled).

Triton chooses between interpreter and compiler when a kernel is defined, so `test_under_the_triton_interpreter`
reruns this file's kernel tests in a subprocess with TRITON_INTERPRET=1. Gate logits are drawn at unit scale so that
no two scores tie (sigmoid saturates to exactly 1.0 in fp32 past ~17): tie-breaking is then not under test.
"""

import os

import pytest
import torch

import dsv3
from dsv3.model import Gate, MoE
from dsv3.ops import moe_decode
from dsv3.fp8 import FP8, quantize_weight_blocks
from dsv3.ops.moe_decode import RouteSpec, experts_reference, route_reference
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Overrides of the tiny preset (16 experts in 4 groups, keep 2, top-4, noaux_tc, normalised, scale 2.5).
ROUTINGS = {
    "noaux_tc 4 groups": {},
    "noaux_tc no groups": dict(n_group=1, topk_group=1),
    # groups and k that are not powers of two: padded tiles in the kernel
    "noaux_tc 3 groups of 8, top-6, unnormalised": dict(n_routed_experts=24, n_group=3, topk_group=2,
                                                         num_experts_per_tok=6, norm_topk_prob=False),
    "noaux_tc 4 groups of 6, keep 3, top-5": dict(n_routed_experts=24, n_group=4, topk_group=3, num_experts_per_tok=5),
    "group_limited_greedy softmax": dict(topk_method="group_limited_greedy", scoring_func="softmax",
                                         norm_topk_prob=False, routed_scaling_factor=1.0),
    "greedy softmax": dict(topk_method="greedy", scoring_func="softmax", num_experts_per_tok=3),
}


def random_gate(cfg: dsv3.ModelConfig, gen: torch.Generator) -> Gate:
    """A gate with unit-scale logits and mostly negative biases, drawn from gen."""
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) / cfg.hidden_size ** 0.5)
        if gate.e_score_correction_bias is not None:
            # Mostly negative: a dropped group filled with 0 instead of -inf would win against these choices.
            gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.5 - 1.0)
    return gate


def _route_inputs(name: str, t: int, seed: int = 0) -> tuple[Gate, torch.Tensor]:
    gate = random_gate(dsv3.ModelConfig.preset("tiny", **ROUTINGS[name]), torch.Generator().manual_seed(seed))
    x = torch.randn(t, gate.cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    return gate, x


@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_reference_matches_gate(name, t):
    gate, x = _route_inputs(name, t)
    expected = gate(x)
    weights, indices, scores, counts = route_reference(gate.logits(x), gate.e_score_correction_bias,
                                                       RouteSpec.from_config(gate.cfg))
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(weights, expected.weights)
    torch.testing.assert_close(scores, expected.scores)
    assert torch.equal(counts, torch.bincount(expected.indices.flatten(), minlength=gate.cfg.n_routed_experts))


def _experts_inputs(t: int, e: int, d: int, inter: int, k: int, n_shared: int = 0, dtype=torch.float32,
                    seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(e, 2 * inter, d, generator=gen) * 0.1).to(dtype)
    down = (torch.randn(e, d, inter, generator=gen) * 0.1).to(dtype)
    x = torch.randn(t, d, generator=gen).to(dtype)
    indices = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    if t > 1:  # tokens 0 and 1 have two experts in common
        common = indices[0, :2].tolist()
        rest = [i for i in torch.randperm(e, generator=gen).tolist() if i not in common]
        indices[1] = torch.tensor(rest[:1] + common[::-1] + rest[1:k - 2])
    weights = torch.rand(t, k, generator=gen)
    s = n_shared * inter  # the shared MLP's width, nn.Linear layouts
    shared = tuple((torch.randn(shape, generator=gen) * 0.1).to(dtype) for shape in ((s, d), (s, d), (d, s)))
    return x, gate_up, down, weights, indices, shared if n_shared else None


@pytest.mark.parametrize("n_shared", [0, 1, 2])
@pytest.mark.parametrize("t", [1, 4])
def test_experts_reference_matches_moe(t, n_shared):
    # The model's general path in fp32 on the CPU: Gate, the grouped-GEMM Experts, plus the shared MLP.
    cfg = dsv3.ModelConfig.preset("tiny", n_shared_experts=n_shared)
    torch.manual_seed(t)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, cfg.hidden_size ** -0.5)
        x = torch.randn(t, cfg.hidden_size)
        routing = moe.gate(x)
        got = experts_reference(x, moe.experts.gate_up_proj, moe.experts.down_proj, routing.weights,
                                routing.indices, moe.shared_weights())
        torch.testing.assert_close(got, moe(x), atol=1e-5, rtol=1e-5)


# ---- the Triton kernels, under the interpreter ---------------------------------------------------------------------
@on_cpu_under_the_interpreter(moe_decode.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


@interpreted
@pytest.mark.parametrize("t", [1, 5, 10])  # decode batches: the fused kernel routes them in one program
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_gate_route_kernel(name, t):
    # The gate's product in the kernel, then the routing in the program that arrives last; run twice, as the
    # arrival counter must be back at zero for the next launch.
    gate, x = _route_inputs(name, t, seed=t)
    args = (x.bfloat16(), gate.weight, gate.e_score_correction_bias, RouteSpec.from_config(gate.cfg))
    want = moe_decode.gate_route_reference(*args)
    for _ in range(2):
        got = moe_decode.gate_route_triton(*args)
        assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])  # indices, counts
        torch.testing.assert_close(got[0], want[0])  # weights
        torch.testing.assert_close(got[2], want[2])  # scores


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,inter", [(96, 80), (200, 144)])  # neither a multiple of the tiles
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_experts_kernel(n_shared, t, d, inter, dtype):
    args = _experts_inputs(t, e=16, d=d, inter=inter, k=4, n_shared=n_shared, dtype=dtype, seed=t)
    got, want = moe_decode.experts_triton(*args), experts_reference(*args)
    assert got.dtype == dtype and got.shape == (t, d)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # h is rounded to bf16 between the kernels: a rounding flip there moves the output by a few ulps
        torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=2e-2)


def fp8_stacks(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, moe_decode.Fp8Experts]:
    """bf16-layout experts [E, 2I, D], [E, D, I] as an FP8 checkpoint serves them: e4m3 stacks [E, 2Ip, Dp] (gate
    rows at 0, up rows at Ip) and [E, Dp, Ip] with each expert's 128x128 block scales."""
    e, two_i, d = gate_up.shape
    inter = two_i // 2
    ip, dp = -(-inter // 128) * 128, -(-d // 128) * 128
    gu, gu_s = torch.zeros(e, 2 * ip, dp, dtype=FP8), torch.ones(e, 2 * ip // 128, dp // 128)
    dn, dn_s = torch.zeros(e, dp, ip, dtype=FP8), torch.ones(e, dp // 128, ip // 128)
    for i in range(e):
        for part, w in enumerate((gate_up[i, :inter], gate_up[i, inter:])):
            q, scale = quantize_weight_blocks(w.float())
            gu[i, part * ip:part * ip + inter, :d] = q
            gu_s[i, part * ip // 128:(part + 1) * ip // 128] = scale
        q, scale = quantize_weight_blocks(down[i].float())
        dn[i, :d, :inter], dn_s[i] = q, scale
    return gu, dn, moe_decode.Fp8Experts(gu_s, dn_s, inter)


@interpreted
@pytest.mark.parametrize("d,inter", [(96, 80), (200, 144)])  # padded to 128 and 256
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("n_shared", [0, 2])
def test_fp8_experts_kernel(n_shared, t, d, inter):
    # FP8 routed experts (shared experts bf16): the kernels scale each weight by its block's scale as they read it.
    x, gate_up, down, weights, indices, shared = _experts_inputs(t, e=16, d=d, inter=inter, k=4,
                                                                 n_shared=n_shared, dtype=torch.bfloat16, seed=t)
    gu, dn, fp8 = fp8_stacks(gate_up, down)
    got = moe_decode.experts_triton(x, gu, dn, weights, indices, shared, fp8)
    want = experts_reference(x, gu, dn, weights, indices, shared, fp8)
    assert got.dtype == torch.bfloat16 and got.shape == (t, d)
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=2e-2)
    exact = experts_reference(x, gate_up, down, weights, indices, shared).float()
    assert ((got.float() - exact).norm() / exact.norm()).item() < 0.1  # e4m3 weights, bf16 activations


def _layer_inputs(n_shared: int, t: int = 5, dtype=torch.float32, fp8: bool = False):
    """A routing case and experts of its width: (x, gate, gate weight, spec, gate_up, down, shared, FP8 scales)."""
    gate, x = _route_inputs("noaux_tc 4 groups", t)
    _, gate_up, down, _, _, shared = _experts_inputs(t, e=16, d=gate.cfg.hidden_size, inter=48, k=4,
                                                     n_shared=n_shared, dtype=dtype)
    stacks = None
    if fp8:
        gate_up, down, stacks = fp8_stacks(gate_up, down)
    return x.to(dtype), gate, RouteSpec.from_config(gate.cfg), gate_up, down, shared, stacks


@interpreted
@torch.no_grad()
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("t", [1, 5])
def test_layer_matches_the_references(t, n_shared):
    # Routing then experts, the shared MLP's programs launched first (and, compiled, before their wait).
    x, gate, spec, gate_up, down, shared, _ = _layer_inputs(n_shared, t)
    bias = gate.e_score_correction_bias
    y, weights, indices, scores, counts = moe_decode.layer(x, gate.weight, bias, spec, gate_up, down, shared)
    want = route_reference(gate.logits(x), bias, spec)
    assert torch.equal(indices, want[1]) and torch.equal(counts, want[3])
    torch.testing.assert_close(weights, want[0])
    torch.testing.assert_close(scores, want[2])
    torch.testing.assert_close(y, experts_reference(x, gate_up, down, want[0], want[1], shared), atol=1e-5,
                               rtol=1e-5)


@interpreted
@torch.no_grad()
@pytest.mark.parametrize("n_shared", [0, 2])
def test_kernel_custom_ops_compile(n_shared):
    # torch.compile sees the custom op (shapes from its fake kernel) and runs the kernels behind it.
    x, gate, spec, gate_up, down, shared, _ = _layer_inputs(n_shared)
    bias = gate.e_score_correction_bias

    def layer(x):
        y, _, _, _, counts = moe_decode.layer(x, gate.weight, bias, spec, gate_up, down, shared)
        return y, counts

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, counts = compiled(x)
    weights, indices, _, expected_counts = route_reference(gate.logits(x), bias, spec)
    torch.testing.assert_close(y, experts_reference(x, gate_up, down, weights, indices, shared), atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(counts, expected_counts)


@interpreted
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_select_op_fake_matches_the_kernel(name):
    # The shapes torch.compile plans with for the routing op against what the kernel returns.
    gate, x = _route_inputs(name, 5)
    spec, logits, bias = RouteSpec.from_config(gate.cfg), gate.logits(x), gate.e_score_correction_bias
    torch.library.opcheck(torch.ops.dsv3.moe_select, (logits.sigmoid(), bias, spec.top_k, spec.n_group,
                                                      spec.topk_group, spec.group_top2), test_utils="test_faketensor")


@interpreted
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n_shared", [0, 2])
def test_layer_op_fake_matches_the_kernels(n_shared, fp8):
    # The shapes torch.compile plans with (the op's fake kernel) against what the kernels return.
    x, gate, spec, gate_up, down, shared, stacks = _layer_inputs(n_shared, 3, torch.bfloat16, fp8)
    scales = (None, None, 0) if stacks is None else (stacks.gate_up_scale_inv, stacks.down_scale_inv, stacks.inter)
    torch.library.opcheck(torch.ops.dsv3.moe_layer,
                          (x, gate.weight, gate.e_score_correction_bias, spec.top_k, spec.n_group, spec.topk_group,
                           spec.group_top2, spec.softmax, spec.norm, spec.scale, gate_up, down,
                           *(shared or (None,) * 3), *scales),
                          test_utils="test_faketensor")  # opcheck's other checks do arithmetic e4m3 lacks on a CPU


# ---- the model's MoE on the GPU ----------------------------------------------------------------------------------
def _gpu_moe(cfg: dsv3.ModelConfig) -> MoE:
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, cfg.hidden_size ** -0.5 if p is moe.gate.weight else 0.02)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    moe.to(torch.bfloat16)
    moe.gate.float()  # as cast_model keeps it
    return moe


@gpu
@pytest.mark.parametrize("n_shared", [0, 1, 2])  # the 16b preset has 2 shared experts, V3 671B 1
def test_gpu_fused_moe_matches_grouped_path(n_shared):
    cfg = dsv3.ModelConfig.preset("16b", n_shared_experts=n_shared)
    moe = _gpu_moe(cfg)
    moe.keep_routing = True
    for t in (1, 2, 4, 8, 11):  # 11 * 6 > 64 experts: the grouped path
        x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            assert moe.decode_path(x) == (t <= 10)
            y, routing, load = moe(x), moe.routing, moe.load
            expected = moe.gate(x)
            y_ref, load_ref = moe.experts(x, expected)
            if n_shared:  # the fused path runs the shared experts inside its expert kernels
                y_ref = y_ref + moe.shared_experts(x)
        assert torch.equal(routing.indices, expected.indices)
        torch.testing.assert_close(routing.weights, expected.weights)
        assert torch.equal(load, load_ref)
        torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2 * y_ref.abs().max().item(), rtol=2e-2)


@gpu
def test_gpu_fused_moe_in_a_cuda_graph_and_compiled():
    cfg = dsv3.ModelConfig.preset("16b")
    moe = _gpu_moe(cfg).eval()
    static = torch.randn(4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    fresh = torch.randn(4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = moe(fresh)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: autotuning times configurations
            moe(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(static)
        static.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, expected)
        compiled = torch.compile(moe, fullgraph=True, dynamic=False)
        # Outside the custom ops Inductor compiles the gate's fp32 GEMV its own way: equal up to rounding, not
        # necessarily bit for bit like the graph replay above.
        torch.testing.assert_close(compiled(fresh).float(), expected.float(),
                                   atol=2e-2 * expected.abs().max().item(), rtol=2e-2)


@gpu
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_fp8_experts_match_the_reference(t):
    # The 16b's expert shapes (D 2048, I 1408 -> 1536 padded) from FP8 stacks, two bf16 shared experts, compiled
    # kernels against the dequantised reference.
    args = _experts_inputs(t, e=64, d=2048, inter=1408, k=6, n_shared=2, dtype=torch.bfloat16, seed=t)
    x, gate_up, down, weights, indices, shared = (a.cuda() if a is not None and not isinstance(a, tuple)
                                                  else a for a in args)
    shared = tuple(w.cuda() for w in shared)
    gu, dn, fp8 = fp8_stacks(gate_up.cpu(), down.cpu())
    fp8 = moe_decode.Fp8Experts(fp8.gate_up_scale_inv.cuda(), fp8.down_scale_inv.cuda(), fp8.inter)
    got = moe_decode.experts_triton(x, gu.cuda(), dn.cuda(), weights, indices, shared, fp8)
    want = experts_reference(x, gu.cuda(), dn.cuda(), weights, indices, shared, fp8)
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=2e-2)
