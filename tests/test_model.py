"""Model pieces against plain hand computations: the router, the grouped expert GEMM, MTP causality, RoPE."""

import math

import pytest
import torch

import dsv3
from dsv3.model import Gate, Rotary, apply_rope, build_model
from dsv3.ops.grouped import grouped_mm, grouped_mm_reference


def _route_by_hand(scores, bias, cfg):
    """One token at a time, in plain Python: the DeepSeek-V3 noaux_tc rule as the report and the facts state it."""
    n_tok, n_exp = scores.shape
    per = n_exp // cfg.n_group
    weights, chosen = [], []
    for t in range(n_tok):
        s = scores[t].tolist()
        b = [s[e] + bias[e].item() for e in range(n_exp)]
        group_score = [sum(sorted(b[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(cfg.n_group)]
        keep = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        allowed = [e for e in range(n_exp) if e // per in keep]
        top = sorted(allowed, key=lambda e: -b[e])[:cfg.num_experts_per_tok]
        w = [s[e] for e in top]
        total = sum(w)
        weights.append([x / total * cfg.routed_scaling_factor for x in w])
        chosen.append(top)
    return weights, chosen


def test_noaux_tc_gate_matches_hand_rule():
    cfg = dsv3.ModelConfig.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    # Strongly negative biases: masked groups filled with 0 instead of -inf would win against them.
    gate.e_score_correction_bias.copy_(torch.linspace(-3, -1, 16))
    x = torch.randn(50, cfg.hidden_size)
    r = gate(x)
    scores = torch.sigmoid(x @ gate.weight.T)
    weights, chosen = _route_by_hand(scores, gate.e_score_correction_bias, cfg)
    for t in range(50):
        order = r.indices[t].argsort()
        assert r.indices[t][order].tolist() == sorted(chosen[t])
        by_expert = dict(zip(chosen[t], weights[t]))
        for e, w in zip(r.indices[t].tolist(), r.weights[t].tolist()):
            assert math.isclose(w, by_expert[e], rel_tol=1e-5)
    assert torch.allclose(r.weights.sum(-1), torch.full((50,), cfg.routed_scaling_factor))


def test_bias_selects_but_does_not_weight():
    cfg = dsv3.ModelConfig.preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(8, cfg.hidden_size)
    gate.e_score_correction_bias[5] = 10.0  # expert 5 wins every selection
    r = gate(x)
    assert (r.indices == 5).all()
    assert torch.allclose(r.weights[:, 0], torch.full((8,), cfg.routed_scaling_factor))  # normalised over k=1
    cfg2 = cfg.replace(norm_topk_prob=False, routed_scaling_factor=1.0)
    gate2 = Gate(cfg2)
    gate2.load_state_dict(gate.state_dict())
    r2 = gate2(x)
    assert torch.allclose(r2.weights[:, 0], torch.sigmoid(x @ gate.weight[5]))  # the unbiased score


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_gates_of_v2(method):
    cfg = dsv3.ModelConfig.preset("tiny", topk_method=method, scoring_func="softmax", norm_topk_prob=False,
                                  routed_scaling_factor=1.0, n_group=4, topk_group=1, num_experts_per_tok=2)
    gate = Gate(cfg)
    assert gate.e_score_correction_bias is None
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(30, cfg.hidden_size)
    r = gate(x)
    probs = torch.softmax(x @ gate.weight.T, dim=-1)
    if method == "greedy":
        expected = probs.topk(2, dim=-1)
    else:  # the best single group by its max score, then the top 2 inside it
        g = probs.view(30, 4, 4).amax(-1).argmax(-1)
        masked = torch.full_like(probs, -1.0)
        for t in range(30):
            masked[t, g[t] * 4:(g[t] + 1) * 4] = probs[t, g[t] * 4:(g[t] + 1) * 4]
        expected = masked.topk(2, dim=-1)
    assert torch.equal(r.indices.sort(-1).values, expected.indices.sort(-1).values)
    assert torch.allclose(r.weights.sort(-1).values, expected.values.sort(-1).values)


@pytest.mark.parametrize("sizes", [[0, 5, 0, 17, 1], [1], [3, 0, 0]])
def test_grouped_mm_matches_reference(sizes):
    x = torch.randn(sum(sizes), 24, requires_grad=True)
    w = torch.randn(len(sizes), 24, 40, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    fast = grouped_mm(x, w, offs)
    ref = grouped_mm_reference(x, w, offs)
    expect = torch.cat([x[o - n:o] @ w[g] for g, (n, o) in enumerate(zip(sizes, offs.tolist()))])
    assert torch.allclose(fast, expect, atol=1e-5) and torch.allclose(ref, expect, atol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), (x, w))
    g_ref = torch.autograd.grad(expect.square().sum(), (x, w))
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_experts_match_per_token_loop():
    # Forward and gradients (input, experts, gate) against the definition, one token and expert at a time.
    cfg = dsv3.ModelConfig.preset("tiny", n_shared_experts=0)
    model = build_model(cfg, seed=0)
    moe = model.layers[1].mlp
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    up = torch.randn(2, 9, cfg.hidden_size)
    y = moe(x)
    params = [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight]
    grads = torch.autograd.grad((y * up).sum(), params)
    flat = x.reshape(-1, cfg.hidden_size)
    r = moe.gate(flat)
    inter = cfg.moe_intermediate_size
    expect = []
    for t in range(flat.shape[0]):
        out = 0
        for w, e in zip(r.weights[t], r.indices[t]):
            gu = moe.experts.gate_up_proj[e] @ flat[t]
            h = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            out = out + w * (moe.experts.down_proj[e] @ h)
        expect.append(out)
    expect = torch.stack(expect)
    assert torch.allclose(y.reshape(-1, cfg.hidden_size), expect, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad((expect * up.reshape(expect.shape)).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert moe.load.sum() == flat.shape[0] * cfg.num_experts_per_tok
    assert torch.equal(moe.load, torch.bincount(r.indices.flatten(), minlength=cfg.n_routed_experts))


def test_mtp_depths_see_the_right_tokens():
    cfg = dsv3.ModelConfig.preset("tiny", num_nextn_predict_layers=2)
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    out = model(ids, mtp=True)
    assert len(out.mtp_logits) == 2 and out.mtp_logits[0].shape == (1, 20, cfg.vocab_size)
    assert torch.equal(out.logits, model(ids))
    i = 7
    for k in (1, 2):
        seen, unseen = ids.clone(), ids.clone()
        seen[0, i + k] = (ids[0, i + k] + 1) % cfg.vocab_size  # token i + k is depth k's input at position i
        unseen[0, i + k + 1] = (ids[0, i + k + 1] + 1) % cfg.vocab_size  # the token it predicts: never seen
        a = model(seen, mtp=True).mtp_logits[k - 1][0, i]
        b = model(unseen, mtp=True).mtp_logits[k - 1][0, i]
        assert not torch.allclose(a, out.mtp_logits[k - 1][0, i])
        assert torch.allclose(b, out.mtp_logits[k - 1][0, i], atol=1e-6)


def test_rope_interleaved_pairs_rotate_as_complex_numbers():
    cfg = dsv3.ModelConfig.preset("tiny", rope_scaling=None)
    rot = Rotary(cfg)
    pos = torch.arange(10)
    cos, sin = rot(pos)
    x = torch.randn(1, 10, 2, cfg.qk_rope_head_dim)
    out = apply_rope(x, cos[None], sin[None], interleave=True)
    # The reference: view adjacent pairs as complex numbers and multiply by e^{i pos freq}.
    z = torch.view_as_complex(x.view(1, 10, 2, -1, 2))
    angles = pos[:, None] * rot.inv_freq[None]
    zr = z * torch.polar(torch.ones_like(angles), angles)[None, :, None]
    half = cfg.qk_rope_head_dim // 2
    assert torch.allclose(out[..., :half], zr.real, atol=1e-5)
    assert torch.allclose(out[..., half:], zr.imag, atol=1e-5)


def test_yarn_frequencies_and_mscale():
    cfg = dsv3.ModelConfig.preset("671b")
    inv_freq, attn = dsv3.model.rope_inv_freq(cfg)
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    assert attn == 1.0  # mscale == mscale_all_dim
    assert torch.allclose(inv_freq[:5], base[:5])  # fast dims untouched
    assert torch.allclose(inv_freq[-3:], base[-3:] / 40)  # slow dims interpolated by the factor
    m = 0.1 * math.log(40) + 1
    assert math.isclose(cfg.softmax_scale, 192**-0.5 * m * m)


def test_training_step_under_bf16_autocast():
    # The GPU trainer's path (fp32 master weights, bf16 autocast), run through CPU autocast.
    cfg = dsv3.ModelConfig.preset("tiny")
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:, :-1], mtp=True)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # routing learns through the gate weights


@pytest.mark.parametrize("q_lora_rank", [None, 48])
def test_shared_input_weights_change_nothing_but_the_gemm_count(q_lora_rank):
    cfg = dsv3.ModelConfig.preset("tiny").replace(q_lora_rank=q_lora_rank)
    model, fresh = build_model(cfg, seed=0), build_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        before = model(ids, mtp=True)
    names = {k: v.clone() for k, v in model.state_dict().items()}
    model.share_input_weights()
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.input_weight is not None and mlp.input_weight is not None
    first = attn.q_proj if q_lora_rank is None else attn.q_a_proj
    assert first.weight.data_ptr() == attn.input_weight.data_ptr()  # views of the buffer, not copies
    buffers = attn.input_weight, mlp.input_weight
    model.share_input_weights()  # a second engine over the same model keeps the buffers (CUDA graphs read them)
    assert attn.input_weight is buffers[0] and mlp.input_weight is buffers[1]
    state = model.state_dict()
    assert state.keys() == names.keys() and all(torch.equal(state[k], v) for k, v in names.items())
    with torch.no_grad():
        after = model(ids, mtp=True)
    assert torch.allclose(after.logits, before.logits, atol=1e-5)
    assert torch.allclose(after.mtp_logits[0], before.mtp_logits[0], atol=1e-5)
    # An in-place load writes through to the shared buffers.
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(ids), fresh(ids), atol=1e-5)
    # With gradients the layers' own weights are concatenated in the graph, so every projection still learns.
    model(ids).sum().backward()
    assert first.weight.grad.abs().sum() > 0 and attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0
    assert mlp.gate_proj.weight.grad.abs().sum() > 0


def test_share_weight_leaves_other_layers_alone():
    plain, biased = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4)
    assert dsv3.model.share_weight(plain, biased) is None
    assert dsv3.model.share_weight(plain, torch.nn.Linear(6, 4, bias=False)) is None  # other input width
    assert dsv3.model.share_weight(plain, torch.nn.Linear(8, 3, bias=False).double()) is None
    assert dsv3.model.share_weight(plain, torch.nn.Linear(8, 3, bias=False)).shape == (7, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_moe_trains_like_eager_on_the_cpu(dtype):
    # `dsv3 train --compile true` on a CPU: in fp32 torch._grouped_mm cannot be traced (its meta kernel takes bf16
    # only), and in bf16 inductor's code for its backward gave NaN expert gradients (torch 2.13); compiled
    # training there takes the reference grouped GEMM, so the gradients are eager's up to rounding.
    cfg = dsv3.ModelConfig.preset("tiny")
    torch.manual_seed(0)
    moe = dsv3.model.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 64, cfg.hidden_size)
    grads = []
    # fp32 failed in tracing, which aot_eager does too; bf16's NaN came from inductor's generated code.
    for fn in (moe, torch.compile(moe, backend="inductor" if dtype == torch.bfloat16 else "aot_eager")):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fn(xi).float().sum().backward()
        grads.append([xi.grad] + [p.grad for p in moe.parameters()])
    for got, want in zip(grads[1], grads[0]):
        assert torch.isfinite(got).all()
        assert (got - want).norm() <= (1e-5 if dtype == torch.float32 else 2e-2) * want.norm()


def test_training_runs_sibling_projections_as_one_gemm_with_the_same_gradients():
    from dsv3.model import MLP, shared_linear

    torch.manual_seed(0)
    mlp = MLP(24, 40)
    x = torch.randn(7, 24, requires_grad=True)
    gate, up = shared_linear(x, None, mlp.gate_proj, mlp.up_proj).split([40, 40], dim=-1)
    (gate.square() + up).sum().backward()
    got = [x.grad, mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad]
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    (mlp.gate_proj(x).square() + mlp.up_proj(x)).sum().backward()
    for a, b in zip(got, [x.grad, mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad]):
        torch.testing.assert_close(a, b)
