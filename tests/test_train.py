"""Training: balancing against hand computations, MTP targets, exact resume, divergence handling, schedules."""

import json
import math

import pytest
import torch

import dsv3
from tests.conftest import shakespeare_dataset
from dsv3.prepare import prepare
from dsv3.balance import balance_loss, max_violation, update_bias
from dsv3.model import MoE, Routing
from dsv3.schedule import LRSchedule, batch_size_at
from dsv3.loss import head_cross_entropy
from dsv3.train import (TrainConfig, Trainer, TrainingDiverged, load_train_config, mtp_terms,
                        padded_vocab_size)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shakespeare_dataset(tmp_path_factory, n_files=6, val_fraction=0.2)


def _tc(dataset, out, **kw):
    base = dict(preset="tiny", data=str(dataset), out=str(out), seq_len=64, micro_batch=4, batch_size=8,
                max_steps=20, lr=3e-3, warmup_steps=3, log_interval=1, eval_interval=1000, eval_batches=2,
                save_interval=1000, seed=0)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_bias_update_balances_a_skewed_router():
    cfg = dsv3.ModelConfig.preset("tiny", n_group=1, topk_group=1)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.02)
    with torch.no_grad():
        moe.gate.weight[:3] += 0.3  # three experts favoured by every token
    x = torch.randn(512, cfg.hidden_size).abs()
    moe(x)
    before = max_violation(moe.load)
    for _ in range(300):
        moe(x)
        update_bias([moe], [moe.load], gamma=0.01)
    moe(x)
    assert before > 1.5 and max_violation(moe.load) < 0.5 * before


def test_sequence_wise_loss_matches_hand_computation():
    b, t, e, k = 2, 5, 4, 2
    scores = torch.rand(b * t, e)
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(b * t)])
    routing = Routing(torch.ones(b * t, k), indices, scores)
    expected = 0.0
    for s in range(b):
        total = 0.0
        for i in range(e):
            f = e / (k * t) * sum(int(i in indices[s * t + j].tolist()) for j in range(t))
            p = sum((scores[s * t + j, i] / scores[s * t + j].sum()).item() for j in range(t)) / t
            total += f * p
        expected += total / b
    assert math.isclose(balance_loss(routing, b, e, k).item(), expected, rel_tol=1e-5)
    # per_sequence=False: the whole batch as one group (the classic auxiliary loss)
    whole = Routing(routing.weights, indices, scores)
    f = torch.zeros(e).index_add_(0, indices.flatten(), torch.ones(b * t * k)) * e / (k * b * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    assert math.isclose(balance_loss(whole, b, e, k, per_sequence=False).item(), (f * p).sum().item(), rel_tol=1e-5)


def test_mtp_targets_are_shifted_by_k_plus_one():
    t, v, d = 6, 11, 5
    batch = torch.randint(0, v, (1, t + 1))
    head = torch.randn(v, d)
    hidden = [torch.randn(1, t, d), torch.randn(1, t, d)]
    losses, accs = mtp_terms(hidden, head, batch)
    for k, (loss, h) in enumerate(zip(losses, hidden), start=1):
        logits = h[0] @ head.T
        terms = [-torch.log_softmax(logits[i], -1)[batch[0, i + k + 1]] for i in range(t - k)]
        assert math.isclose(loss.item(), torch.stack(terms).mean().item(), rel_tol=1e-5)
        hits = [int(logits[i].argmax() == batch[0, i + k + 1]) for i in range(t - k)]
        assert math.isclose(accs[k - 1].item(), sum(hits) / (t - k), rel_tol=1e-6)


def test_chunked_head_loss_matches_full_logits():
    hidden = torch.randn(37, 8, requires_grad=True)
    head = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[5] = -100
    loss, acc = head_cross_entropy(hidden, head, targets, chunk_tokens=10)
    ref = torch.nn.functional.cross_entropy(hidden @ head.T, targets, ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6)
    ga = torch.autograd.grad(loss, (hidden, head))
    gb = torch.autograd.grad(ref, (hidden, head))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ga, gb))
    mask = targets != -100
    assert math.isclose(acc.item(), ((hidden @ head.T).argmax(-1) == targets)[mask].float().mean().item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_head_loss_under_bf16_autocast_matches_autograd(device):
    # The trainer's setting: fp32 hidden states and head weight, bf16 autocast. The fused loss makes its gradients in
    # the forward pass; autograd through bf16 logits made fp32 is the reference. Under no_grad it makes none. On
    # CUDA the head weight's gradient is summed over chunks by cuBLAS into fp32 (`_add_product_`).
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(45, 16, generator=gen).to(device).requires_grad_()
    head = (0.3 * torch.randn(300, 16, generator=gen)).to(device).requires_grad_()
    targets = torch.randint(0, 300, (45,), generator=gen).to(device)
    targets[:4] = -100
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _ = head_cross_entropy(hidden, head, targets, chunk_tokens=16)
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, head).float(), targets)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(torch.autograd.grad(loss, (hidden, head)), torch.autograd.grad(ref, (hidden, head))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    with torch.no_grad():
        assert not head_cross_entropy(hidden, head, targets)[0].requires_grad


def test_exact_resume(dataset, tmp_path):
    straight = tmp_path / "straight"
    Trainer(_tc(dataset, straight), progress=False).train()
    first = tmp_path / "resumed"
    Trainer(_tc(dataset, first), progress=False).train(stop_at=10)
    # The resumed run keeps the checkpoint's model: a different --preset now does not change it.
    Trainer(_tc(dataset, first, preset="small"), resume=first / "checkpoints", progress=False).train()
    a, b = _losses(straight), _losses(first)
    assert len(a) == 20 and len(b) == 20
    assert a == b  # bit-identical at every step
    assert a[-1] < a[0] - 0.5  # and it learns


def test_non_finite_loss_stops_with_checkpoint_intact(dataset, tmp_path):
    out = tmp_path / "run"
    Trainer(_tc(dataset, out, max_steps=6), progress=False).train(stop_at=2)
    trainer = Trainer(_tc(dataset, out, max_steps=6), resume=out / "checkpoints", progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* step 2.*step-00000002"):
        trainer.train()
    # the optimiser never applied the bad step, and the checkpoint still loads whole
    assert torch.equal(trainer.model.layers[0].self_attn.o_proj.weight, before["layers.0.self_attn.o_proj.weight"])
    dsv3.load_model(out / "checkpoints" / "step-00000002" / "model")


def test_aux_loss_mode_and_keep_last_k(dataset, tmp_path):
    out = tmp_path / "aux"
    last = Trainer(_tc(dataset, out, balance="aux_loss", max_steps=6, save_interval=2, keep_checkpoints=2,
                       eval_interval=3, mtp_depth=0), progress=False).train()
    assert last["balance_loss"] > 0 and "val_loss" in last and "val_bpb" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    biases = [m.mlp.gate.e_score_correction_bias for m in dsv3.load_model(out / "model").layers[1:]]
    assert all(torch.count_nonzero(b) == 0 for b in biases)  # no bias updates in the aux-loss ablation
    assert (out / "model" / "tokenizer.json").is_file()


def test_schedules():
    s = LRSchedule.report_shape(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=148)
    assert s(0) == pytest.approx(0.1) and s(9) == 1.0 and s(50) == 1.0
    assert s(s.stable_until) == 1.0 and s(s.decay_until) == 0.1 and s(147) == 0.1
    mid = (s.stable_until + s.decay_until) // 2
    assert 0.4 < s(mid) < 0.7
    assert batch_size_at(0, 4, 20, 1000, multiple=4) == 4
    assert batch_size_at(500, 4, 20, 1000, multiple=4) == 12
    assert batch_size_at(5000, 4, 20, 1000, multiple=4) == 20


def test_config_file_and_errors(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "small"\nmax_steps = 7\n')
    tc = load_train_config(f, {"max_steps": 9, "lr": None})
    assert tc.preset == "small" and tc.max_steps == 9
    f.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_train_config(f, {})
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        TrainConfig(micro_batch=3, batch_size=8)
    with pytest.raises(ValueError, match="--data"):
        Trainer(TrainConfig(), progress=False)


def test_plot(dataset, tmp_path):
    from dsv3.cli import main

    out = tmp_path / "run"
    Trainer(_tc(dataset, out, max_steps=4, eval_interval=2), progress=False).train()
    assert main(["plot", str(out)]) == 0
    for name in ("loss.png", "maxvio.png", "mtp_accuracy.png", "lr.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_fp8_precision_trains_emulated_on_the_cpu(dataset, tmp_path):
    with pytest.warns(UserWarning, match="emulat"):
        trainer = Trainer(_tc(dataset, tmp_path / "fp8", precision="fp8", max_steps=8), progress=False)
    assert type(trainer.optimizer).__module__ == "dsv3.fp8_train"  # the report's bf16 AdamW moments
    trainer.train()
    losses = _losses(tmp_path / "fp8")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_vocabulary_is_padded_to_a_multiple_of_128(tok_dir, shared_data, tmp_path):
    # DeepSeek-V3's tokenizer has 128,815 tokens; a head of that many rows has no aligned tensor-core GEMM.
    assert [padded_vocab_size(n) for n in (512, 513, 128_815)] == [512, 640, 128_896]
    src = tmp_path / "src"
    src.mkdir()
    text = (shared_data / "corpus" / "shakespeare.txt").read_text(encoding="utf-8")
    for i in range(4):
        (src / f"part{i}.txt").write_text(text[i * 20_000:(i + 1) * 20_000], encoding="utf-8")
    prepare([src], tmp_path / "ds", tokenizer=tok_dir / "tokenizer.json", val_fraction=0.25, workers=1)
    trainer = Trainer(_tc(tmp_path / "ds", tmp_path / "run", max_steps=2, micro_batch=2, batch_size=2), progress=False)
    assert trainer.train_data.vocab_size == 128_815 and trainer.cfg.vocab_size == 128_896
    trainer.train()
    assert dsv3.ModelConfig.from_hf(tmp_path / "run" / "model").vocab_size == 128_896


def test_init_from_a_checkpoint(dataset, tmp_path):
    Trainer(_tc(dataset, tmp_path / "a", max_steps=2), progress=False).train()
    source = dsv3.load_model(tmp_path / "a" / "model", dtype=torch.float32)
    # The checkpoint's config sets the shapes (the preset is ignored); its weights are the start, MTP included.
    trainer = Trainer(_tc(dataset, tmp_path / "b", preset="small", init_from=str(tmp_path / "a" / "model")),
                      progress=False)
    assert trainer.cfg.hidden_size == source.cfg.hidden_size
    for name, want in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], want), name
    # Without MTP, and with more MTP depths than it has (the new one fresh).
    assert Trainer(_tc(dataset, tmp_path / "c", init_from=str(tmp_path / "a" / "model"), mtp_depth=0),
                   progress=False).cfg.num_nextn_predict_layers == 0
    deeper = Trainer(_tc(dataset, tmp_path / "d", init_from=str(tmp_path / "a" / "model"), mtp_depth=2),
                     progress=False).model
    assert torch.equal(deeper.mtp[0].eh_proj.weight, source.mtp[0].eh_proj.weight)
    # A vocabulary smaller than the data's is refused, by name.
    small = tmp_path / "small_vocab"
    dsv3.save_model(dsv3.build_model(source.cfg.replace(vocab_size=256), seed=0), small)
    with pytest.raises(ValueError, match="vocabulary of 256"):
        Trainer(_tc(dataset, tmp_path / "e", init_from=str(small)), progress=False)
    with pytest.raises(ValueError, match="not both"):
        Trainer(_tc(dataset, tmp_path / "f", init_from=str(small), model_config=str(small)), progress=False)


def test_moments_are_bf16_under_mixed_precision_and_fp32_in_fp32(dataset, tmp_path):
    # The report's bf16 moments under bf16 (and FP8) precision; fp32 training keeps torch's fp32 ones; the flag wins.
    def optimizer(**kw):
        return Trainer(_tc(dataset, tmp_path / "_".join(map(str, kw.values())), max_steps=1, **kw),
                       progress=False).optimizer

    assert type(optimizer(precision="bf16")).__module__ == "dsv3.fp8_train"
    assert type(optimizer(precision="fp32")) is torch.optim.AdamW
    assert type(optimizer(precision="bf16", bf16_moments=False)) is torch.optim.AdamW


def test_throughput_benchmark_step_accumulates_micro_batches(monkeypatch):
    # benchmarks/train_throughput.py's dsv3 step, on the CPU: with accum 2 one call runs two micro-batches, one
    # optimiser step and one bias update from the two batches' summed expert loads.
    from benchmarks import train_throughput

    cfg = dsv3.ModelConfig.preset("tiny")
    model = dsv3.build_model(cfg, seed=0)
    batches = [torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    updates = []
    monkeypatch.setattr(train_throughput, "update_bias", lambda layers, loads, gamma: updates.append(loads))
    train_throughput.dsv3_step_fn(model, batches, mtp=True, accum=2, bf16_moments=True)()
    tokens = sum(b[:, :-1].numel() for b in batches)
    assert len(updates) == 1 and all(int(load.sum()) == tokens * cfg.num_experts_per_tok for load in updates[0])
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "e_score" not in n)


def test_throughput_benchmark_times_prepared_text(dataset):
    # --data: the four timed batches are the train split's first windows, in order; a vocabulary larger than the
    # model's, or too few windows, is refused by name.
    from benchmarks import train_throughput
    from dsv3.loader import TokenDataset

    cfg = dsv3.ModelConfig.preset("tiny")
    batches = train_throughput.timed_batches(cfg, 2, 16, str(dataset))
    assert [tuple(b.shape) for b in batches] == [(2, 17)] * 4
    first = TokenDataset(dataset, "train").tokens(0, 17)
    assert batches[0][0].tolist() == first.tolist()
    with pytest.raises(SystemExit, match="vocabulary"):
        train_throughput.timed_batches(cfg.replace(vocab_size=16), 2, 16, str(dataset))
    with pytest.raises(SystemExit, match="fewer than 4 batches"):
        train_throughput.timed_batches(cfg, 10**6, 16, str(dataset))
    random = train_throughput.timed_batches(cfg, 2, 16, None)
    assert len(random) == 4 and all(int(b.max()) < cfg.vocab_size for b in random)
