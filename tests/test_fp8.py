"""The FP8 recipe on the CPU: the quantisation format against tile-by-tile hand computations and rounding bounds,
the emulated FP8 layers against fp64, a tiny model trained in emulated FP8 against bf16, and the bf16-moment
AdamW against torch's."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsv3
from dsv3.fp8 import (AMAX_FLOOR, FP8_MAX, dequantize_blocks, dequantize_weight_blocks, quantize_blocks,
                      quantize_weight_blocks)
from dsv3.fp8_train import AdamW, Fp8Experts, Fp8Linear, apply_fp8, clip_and_step, make_adamw
from dsv3.model import Experts, Routing
from dsv3.ops import fp8_gemm as ops

TILES = [(1, 128), (128, 1), (128, 128)]


def _scale_by_hand(x: torch.Tensor, rows: int, cols: int, pow2: bool) -> torch.Tensor:
    """Tile scales with Python loops and frexp, independent of quantize_blocks' reshapes and bit tricks."""
    m, k = x.shape
    out = torch.empty(math.ceil(m / rows), math.ceil(k / cols))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = max(x[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].abs().max().item(), AMAX_FLOOR)
            s = float(torch.tensor(amax, dtype=torch.float32) / FP8_MAX)
            if pow2:
                mant, exp = math.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
                s = s if mant == 0.5 else 2.0 ** exp
            out[i, j] = s
    return out


def _expand(scale: torch.Tensor, rows: int, cols: int, m: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:m, :k]


@pytest.mark.parametrize("rows,cols", TILES)
@pytest.mark.parametrize("pow2", [False, True])
def test_scales_and_round_trip_bound_per_tile(rows, cols, pow2):
    x = torch.randn(200, 300) * torch.logspace(-3, 2, 300)  # channels spanning five decades, as outliers do
    x[7, 11] = 0.0
    q, s = quantize_blocks(x, rows, cols, pow2)
    torch.testing.assert_close(s, _scale_by_hand(x, rows, cols, pow2), rtol=0, atol=0)
    back = dequantize_blocks(q, s)[:200, :300]
    s_el = _expand(s, rows, cols, 200, 300)
    # E4M3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal (|x/s| < 2^-6)
    # by half the subnormal spacing, 2^-10 in units of the scale.
    bound = torch.maximum(x.abs() * 2.0 ** -4, s_el * 2.0 ** -10) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    if not pow2:  # each tile's largest element lands on +-448 exactly
        at_max = (x.abs() / s_el - FP8_MAX).abs() < 1e-3
        torch.testing.assert_close(back[at_max], x[at_max], rtol=1e-6, atol=0)
        assert at_max.sum() >= s.numel()  # every tile holds real data here


@pytest.mark.parametrize("shape", [(1, 7), (129, 128), (3, 200, 130)])
def test_padding_of_awkward_sizes(shape):
    x = torch.randn(shape)
    for rows, cols in TILES:
        q, s = quantize_blocks(x, rows, cols)
        m, k = shape[-2:]
        assert q.shape[-2:] == (math.ceil(m / rows) * rows, math.ceil(k / cols) * cols)
        assert s.shape[-2:] == (math.ceil(m / rows), math.ceil(k / cols))
        assert (q[..., m:, :].float() == 0).all() and (q[..., :, k:].float() == 0).all()
        err = (dequantize_blocks(q, s)[..., :m, :k] - x).norm() / x.norm()
        assert err < 0.05


def test_power_of_two_scales_are_ue8m0():
    x = torch.randn(64, 384) * 3
    _, s = quantize_blocks(x, 1, 128, pow2=True)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()
    amax = x.unflatten(1, (3, 128)).abs().amax(-1)
    assert ((amax / s > FP8_MAX / 2) & (amax / s <= FP8_MAX)).all()  # rounded up, never by more than 2x
    if hasattr(torch, "float8_e8m0fnu"):
        assert torch.equal(s.to(torch.float8_e8m0fnu).float(), s)


def test_zero_and_huge_tiles_stay_finite():
    x = torch.zeros(4, 256)
    x[1, 128:] = 1e30
    q, s = quantize_blocks(x, 1, 128)
    assert s[0, 0] == pytest.approx(AMAX_FLOOR / FP8_MAX) and (q[0].float() == 0).all()
    assert torch.isfinite(dequantize_blocks(q, s)).all()
    assert dequantize_blocks(q, s)[1, 200] == pytest.approx(1e30, rel=1e-6)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="matrix"):
        quantize_blocks(torch.randn(10), 1, 128)
    q, _ = quantize_blocks(torch.randn(4, 256), 1, 128)
    with pytest.raises(ValueError, match="does not tile"):
        dequantize_blocks(q, torch.ones(4, 3))


def test_checkpoint_format_is_the_padded_blocks_cropped():
    w = torch.randn(200, 330)
    q, s = quantize_weight_blocks(w)
    qp, sp = quantize_blocks(w, 128, 128)
    assert q.shape == (200, 330) and torch.equal(s, sp)
    assert torch.equal(q.float(), qp[:200, :330].float())
    torch.testing.assert_close(dequantize_weight_blocks(q, s, torch.float32), dequantize_blocks(qp, sp)[:200, :330])


def test_row_tiles_never_straddle_groups():
    offs = torch.tensor([0, 5, 5, 170, 300], dtype=torch.int32)  # experts 0 and 2 empty
    t = ops.row_tiles(300, offs)
    assert t.count == 3 + 5 - 1  # ceil(300 / 128) + G - 1
    real = [(s, e, g) for s, e, g in zip(t.start.tolist(), t.end.tolist(), t.group.tolist()) if e > s]
    assert real == [(0, 5, 1), (5, 133, 3), (133, 170, 3), (170, 298, 4), (298, 300, 4)]
    assert t.first.tolist() == [0, 0, 1, 1, 3, 5]
    dense = ops.row_tiles(300)
    assert list(zip(dense.start.tolist(), dense.end.tolist())) == [(0, 128), (128, 256), (256, 300)]


def test_token_tiles_restart_at_each_group():
    x = torch.randn(300, 200)
    offs = torch.tensor([0, 5, 5, 170, 300], dtype=torch.int32)
    tiles = ops.row_tiles(300, offs)
    a = ops.quantize_act_reference(x, tiles)
    q, s = quantize_blocks(x, 1, 128)
    assert torch.equal(a.q.float(), q.float()) and torch.equal(a.s, s) and a.s.stride() == (1, 300)
    first, bounds = tiles.first.tolist(), [0] + offs.tolist()
    for g in range(5):
        qg, sg = quantize_blocks(x[bounds[g]:bounds[g + 1]], 128, 1)  # this expert's tokens on their own
        cols = slice(first[g] * 128, first[g + 1] * 128)
        assert torch.equal(a.qt[:200, cols].float(), qg.t().float())
        assert torch.equal(a.st[first[g]:first[g + 1], :200], sg)
    assert (a.qt[200:].float() == 0).all()  # channels padded to 256


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_emulated_fp8_linear_against_fp64():
    torch.manual_seed(0)
    ref = nn.Linear(200, 300, bias=True)
    with torch.no_grad():
        ref.weight.normal_(0, 0.05)
        ref.bias.normal_(0, 0.1)
    fp8 = apply_fp8(copy.deepcopy(ref), emulate=True)
    assert isinstance(fp8, Fp8Linear)
    x = torch.randn(3, 70, 200) * torch.logspace(-1, 1, 200)
    dy = torch.randn(3, 70, 300)
    grads = {}
    for name, mod, dtype in [("fp8", fp8, torch.float32), ("fp64", ref.double(), torch.float64)]:
        xi = x.to(dtype, copy=True).requires_grad_()
        y = mod(xi)
        y.backward(dy.to(dtype))
        grads[name] = (y, xi.grad, mod.weight.grad, mod.bias.grad)
    for got, want in zip(grads["fp8"][:3], grads["fp64"][:3]):
        assert 1e-3 < _rel(got, want) < 0.06  # FP8's rounding shows, within its tolerance
    assert _rel(grads["fp8"][3], grads["fp64"][3]) < 1e-6  # the bias gradient is no GEMM: exact
    # The recipe's tiles exactly: Fprop on 1x128 x 128x128, Dgrad on 1x128 dY, Wgrad on 128x1 dY and X.
    x2, dy2, w = x.reshape(-1, 200), dy.reshape(-1, 300), ref.weight.detach().float()
    deq = lambda t, r, c: dequantize_blocks(*quantize_blocks(t, r, c)).double()  # noqa: E731
    y = deq(x2, 1, 128)[:, :200] @ deq(w, 128, 128)[:300, :200].t() + ref.bias.detach()
    dx = deq(dy2, 1, 128)[:, :300] @ deq(w, 128, 128)[:300, :200]
    dw = deq(dy2, 128, 1)[:210].t() @ deq(x2, 128, 1)[:210]
    for got, want in [(grads["fp8"][0].reshape(-1, 300), y), (grads["fp8"][1].reshape(-1, 200), dx),
                      (grads["fp8"][2], dw)]:
        assert _rel(got, want) < 1e-6


def test_emulated_fp8_linear_empty_input_and_autocast():
    lin = apply_fp8(nn.Linear(64, 48), emulate=True)
    x = torch.zeros(0, 64, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad.shape == (0, 64) and (lin.weight.grad == 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(torch.randn(5, 64)).dtype == torch.bfloat16  # as nn.Linear under autocast


def test_emulated_fp8_experts_against_fp64():
    torch.manual_seed(1)
    n_exp, dim, inter, k, n_tok = 6, 200, 72, 2, 150
    ref = Experts(n_exp, dim, inter)
    with torch.no_grad():
        ref.gate_up_proj.normal_(0, 0.05)
        ref.down_proj.normal_(0, 0.05)
    fp8 = apply_fp8(copy.deepcopy(ref), emulate=True)
    assert isinstance(fp8, Fp8Experts)
    indices = torch.stack([torch.randperm(n_exp - 1)[:k] for _ in range(n_tok)])  # the last expert gets nothing
    routing = Routing(torch.rand(n_tok, k), indices, torch.rand(n_tok, n_exp))
    x = torch.randn(n_tok, dim)
    dy = torch.randn(n_tok, dim)
    out = {}
    for name, mod, dtype in [("fp8", fp8, torch.float32), ("fp64", ref.double(), torch.float64)]:
        xi = x.to(dtype, copy=True).requires_grad_()
        y, counts = mod(xi, Routing(routing.weights.to(dtype), routing.indices, routing.scores))
        y.backward(dy.to(dtype))
        out[name] = (y, xi.grad, mod.gate_up_proj.grad, mod.down_proj.grad)
        assert counts[-1] == 0
    for got, want in zip(out["fp8"], out["fp64"]):
        assert 1e-3 < _rel(got, want) < 0.08
    assert (out["fp8"][2][-1] == 0).all() and (out["fp8"][3][-1] == 0).all()


@pytest.mark.parametrize("kind", ["linear", "experts"])
def test_compiled_fp8_layers_are_one_graph_with_eager_numerics(kind):
    # Under torch.compile the FP8 layers are custom ops (dsv3::fp8_matmul and its backward), opaque to dynamo: no
    # graph break. The aot_eager backend runs the surrounding ops as eager does, so the compiled layer must give
    # the eager autograd function's outputs and gradients exactly.
    torch.manual_seed(2)
    if kind == "linear":
        ref = apply_fp8(nn.Linear(200, 300, bias=False), emulate=True)
        args = (torch.randn(70, 200),)
        params = lambda m: [m.weight]  # noqa: E731
    else:
        ref = apply_fp8(Experts(6, 200, 72), emulate=True)
        with torch.no_grad():
            ref.gate_up_proj.normal_(0, 0.05)
            ref.down_proj.normal_(0, 0.05)
        indices = torch.stack([torch.randperm(6)[:2] for _ in range(150)])
        args = (torch.randn(150, 200), Routing(torch.rand(150, 2), indices, torch.rand(150, 6)))
        params = lambda m: [m.gate_up_proj, m.down_proj]  # noqa: E731
    comp = copy.deepcopy(ref)
    if kind == "linear":
        assert torch._dynamo.explain(comp)(*args).graph_break_count == 0
    results = []
    for mod, fn in [(ref, ref), (comp, torch.compile(comp, backend="aot_eager", fullgraph=kind == "linear"))]:
        x = args[0].clone().requires_grad_()
        y = fn(x, *args[1:])
        y = y if kind == "linear" else y[0]
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(3)))
        results.append([y, x.grad] + [p.grad for p in params(mod)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_fp8_model_under_autocast_is_one_graph_with_eager_gradients():
    # The trainer's setting (bf16 autocast) on a whole model: dynamo captures it in one graph, and with the eager
    # backend (the captured graph run op by op) the loss and every gradient equal the uncompiled model's. Under
    # aot_eager they would not: AOTAutograd's own backward of the bf16 ops sums in another order, and FP8
    # requantisation turns such ulps into visible differences.
    cfg = dsv3.ModelConfig.preset("tiny")
    model = apply_fp8(dsv3.build_model(cfg, seed=0), emulate=True)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))

    def loss(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fn(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    assert torch._dynamo.explain(twin)(ids[:, :-1]).graph_break_count == 0
    eager, compiled = loss(model), loss(torch.compile(twin, backend="eager"))
    eager.backward()
    compiled.backward()
    assert torch.equal(eager, compiled)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("offs", [None, [0, 70, 70, 150]])
def test_fp8_custom_ops_fakes_match_what_they_return(offs):
    # The shapes torch.compile plans with (the ops' fake kernels) against the emulated ops' results.
    torch.manual_seed(3)
    groups = 1 if offs is None else len(offs)
    offs = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    x, w, dy = torch.randn(150, 200), torch.randn(groups, 72, 200), torch.randn(150, 72)
    q, qt, ws = torch.ops.dsv3.fp8_quantize_weight(w, False, True)
    check = dict(test_utils="test_faketensor")
    torch.library.opcheck(torch.ops.dsv3.fp8_quantize_weight, (w, False, True), **check)
    for keep in (True, False):
        torch.library.opcheck(torch.ops.dsv3.fp8_matmul, (x, w, q, qt, ws, offs, keep, False, True, torch.float32),
                              **check)
    _, xqt, xst = torch.ops.dsv3.fp8_matmul(x, w, q, qt, ws, offs, True, False, True, torch.float32)
    for need_x, need_w in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.dsv3.fp8_matmul_backward, (dy, xqt, xst, qt, ws, offs, 200, groups, need_x,
                                                                   need_w, False, True, torch.float32, torch.float32),
                              **check)


def test_apply_fp8_swaps_the_recipe_modules_only():
    cfg = dsv3.ModelConfig.preset("tiny")
    model = dsv3.build_model(cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    with pytest.warns(UserWarning, match="FP8 kernels cannot run here.*emulated"):
        apply_fp8(model)
    assert {id(p) for p in model.parameters()} == params
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8Experts))}
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert fp8_names >= linear_names - {"lm_head"} and "lm_head" not in fp8_names
    assert "layers.0.self_attn.kv_b_proj" in fp8_names and "layers.0.mlp.down_proj" in fp8_names
    assert "layers.1.mlp.experts" in fp8_names and "layers.1.mlp.shared_experts.up_proj" in fp8_names
    assert "mtp.0.eh_proj" in fp8_names
    assert type(model.layers[1].mlp.gate).__name__ == "Gate" and type(model.embed_tokens) is nn.Embedding
    with pytest.raises(RuntimeError, match="emulate=True"):
        apply_fp8(dsv3.build_model(cfg, seed=0), emulate=False)


def train_losses(cfg, data: torch.Tensor, precision: str, steps: int, device: str = "cpu") -> torch.Tensor:
    """Losses of a short MTP training run in fp32, bf16 or FP8 (emulated on the CPU, real kernels on a GPU)."""
    model = dsv3.build_model(cfg, device=device, seed=0)
    if precision == "fp8":
        apply_fp8(model, emulate=device == "cpu")
    # bf16 and FP8 both keep the report's bf16 moments, so the FP8 run differs from the bf16 one by its GEMMs alone
    opt = make_adamw(model.parameters(), lr=3e-3, weight_decay=0.0, bf16_moments=precision != "fp32")
    losses = []
    for step in range(steps):
        batch = data[step % len(data)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "fp32"):  # as the trainer runs
            out = model(batch[:, :-1], mtp=True)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss = loss + 0.3 * F.cross_entropy(out.mtp_logits[0][:, :-1].float().flatten(0, 1), batch[:, 2:].flatten())
        loss.backward()
        clip_and_step(opt, model.parameters(), 1.0)  # the trainer's: clipping inside dsv3's AdamW
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


def test_tiny_model_trains_in_emulated_fp8_and_tracks_bf16():
    cfg = dsv3.ModelConfig.preset("tiny", vocab_size=512)
    data = torch.randint(0, 512, (2, 4, 49), generator=torch.Generator().manual_seed(0))  # two batches in turn
    runs = {p: train_losses(cfg, data, p, steps=24) for p in ("fp32", "bf16", "fp8")}
    for losses in runs.values():
        assert losses[-1] < 0.3 * losses[0]
    # The yardstick is bf16's own distance from fp32 on the same run: FP8 may stray from bf16 about as much.
    fp8_gap = (runs["fp8"] - runs["bf16"]).abs().mean()
    bf16_gap = (runs["fp32"] - runs["bf16"]).abs().mean()
    assert fp8_gap < 2 * bf16_gap + 0.05, (runs, fp8_gap, bf16_gap)


def test_adamw_matches_torch_and_keeps_bf16_moments():
    torch.manual_seed(0)
    init = [torch.randn(30, 20), torch.randn(20)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]

    def run(make):
        params = [nn.Parameter(p.clone()) for p in init]
        opt = make([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        return params, opt

    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    want, _ = run(lambda groups: torch.optim.AdamW(groups, foreach=False, **kw))
    fp32, _ = run(lambda groups: AdamW(groups, moment_dtype=torch.float32, **kw))
    bf16, opt = run(lambda groups: make_adamw(groups, bf16_moments=True, **kw))
    for a, b in zip(fp32, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b, p0 in zip(bf16, want, init):
        drift = ((a - b).norm() / (b - p0).norm()).item()
        assert 0 < drift < 0.02  # the moments' bf16 rounding shows, slightly
    state = opt.state[bf16[0]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert isinstance(make_adamw([nn.Parameter(torch.ones(2))], lr=1e-3), torch.optim.AdamW)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipping, and a norm under the bound (factor 1)
def test_clip_and_step_is_torch_clipping_then_the_step(max_norm):
    # dsv3's AdamW takes the clipping factor into its update instead of scaling the gradients first: the same
    # parameters bit for bit, the same returned norm, and the gradients left as they were.
    torch.manual_seed(0)
    init = [torch.randn(30, 20), torch.randn(20)]
    grads = [torch.randn_like(p) for p in init]
    for make in (lambda ps: AdamW(ps, lr=1e-2, moment_dtype=torch.float32), lambda ps: make_adamw(ps, lr=1e-2)):
        want = [nn.Parameter(p.clone()) for p in init]
        for p, g in zip(want, grads):
            p.grad = g.clone()
        want_norm = torch.nn.utils.clip_grad_norm_(want, max_norm)
        make(want).step()
        got = [nn.Parameter(p.clone()) for p in init]
        for p, g in zip(got, grads):
            p.grad = g.clone()
        opt = make(got)
        norm = clip_and_step(opt, got, max_norm)
        assert torch.equal(norm, want_norm)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        if isinstance(opt, AdamW):
            assert all(torch.equal(p.grad, g) for p, g in zip(got, grads))
    assert (want_norm > max_norm) == (max_norm == 0.5)


def test_bf16_moments_survive_a_state_dict_round_trip():
    # Resume: torch's loader would cast the moments to the fp32 parameters' dtype; a run resumed after step 2 must
    # keep bf16 moments and end bitwise where the straight run does.
    torch.manual_seed(0)
    init = torch.randn(30, 20)
    grads = [torch.randn_like(init) for _ in range(4)]

    def steps(param, opt, gs):
        for g in gs:
            param.grad = g.clone()
            opt.step()

    straight = nn.Parameter(init.clone())
    steps(straight, make_adamw([straight], lr=1e-2, bf16_moments=True), grads)
    resumed = nn.Parameter(init.clone())
    first = make_adamw([resumed], lr=1e-2, bf16_moments=True)
    steps(resumed, first, grads[:2])
    second = make_adamw([resumed], lr=1e-2, bf16_moments=True)
    second.load_state_dict(first.state_dict())
    assert second.state[resumed]["exp_avg"].dtype == torch.bfloat16
    steps(resumed, second, grads[2:])
    assert torch.equal(resumed, straight)
