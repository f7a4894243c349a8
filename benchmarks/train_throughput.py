"""Training throughput: dsv3's trainer step vs transformers' DeepseekV3ForCausalLM on the same config and batch.

    python -m benchmarks.train_throughput --preset 1b --batch 8 --seq 2048

Both train from fp32 master weights under bf16 autocast with AdamW (betas 0.9/0.95, weight decay 0.1) and grad
clipping at 1.0, on the same random-token batches: transformers with torch's fused AdamW (fp32 moments), dsv3 with
its trainer's (bf16 moments, as in the report; `--fp32-moments` gives it torch's too). dsv3 runs its own `Trainer`
pieces (loss with the sequence-wise balance term, the auxiliary-loss-free bias update after each step); MTP is off
in the head-to-head row (transformers has no MTP) and timed separately. `--fp8` also times dsv3 with the report's
FP8 recipe (`apply_fp8`: fine-grained FP8 GEMMs for every linear layer and expert) against its own bf16 row. MFU
uses dsv3's FLOP count (`dsv3.info`) and the bf16 dense peak of the GPU.

By default both start from random weights of `--preset` and see random tokens. At random init the router sends most
of a sequence's tokens to the same few experts (MaxVio up to ~10 on `1b`), which no trained model does for long.
`--model DIR` starts both from a trained checkpoint (router biases included) and `--data DIR` times on a prepared
dataset's text; on `1b` after 300 steps the speed was the same within 1% (docs/benchmarks.md, session 20). Each
dsv3 row records the MaxVio of its last step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import dsv3
from benchmarks.common import GpuMonitor, hf_config, kernel_profile, save_results
from dsv3.balance import balance_loss, max_violation, update_bias
from dsv3.info import model_stats
from dsv3.loader import TokenDataset, iter_eval_batches
from dsv3.loss import head_cross_entropy
from dsv3.fp8_train import apply_fp8, clip_and_step, make_adamw
from dsv3.train import adamw_param_groups, mtp_terms, peak_bf16_flops


def _optimizer(model, bf16_moments: bool):
    # the trainer's: dsv3's AdamW with bf16 moments (one Triton pass per parameter), or torch's fused one
    return make_adamw(adamw_param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), bf16_moments=bf16_moments)


def _time_steps(step, n_warmup: int, n_steps: int) -> tuple[float, dict | None]:
    """(seconds per step, the GPU's clock and power over the timed steps)"""
    for _ in range(n_warmup):
        step()
    torch.cuda.synchronize()
    with GpuMonitor(torch.device("cuda")) as gpu:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / n_steps
    return seconds, gpu.summary()


def timed_batches(cfg, batch: int, seq: int, data: str | None) -> list[torch.Tensor]:
    """Four [batch, seq + 1] token batches: random tokens, or the first windows of a prepared dataset's train split."""
    if data is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        return [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen) for _ in range(4)]
    dataset = TokenDataset(data, "train")
    if dataset.vocab_size > cfg.vocab_size:
        raise SystemExit(f"--data {data} has a vocabulary of {dataset.vocab_size}, the model {cfg.vocab_size}")
    batches = list(iter_eval_batches(dataset, batch, seq, max_batches=4))
    if len(batches) < 4 or batches[-1].shape[0] < batch:
        raise SystemExit(f"--data {data}: its train split holds fewer than 4 batches of {batch} x {seq + 1} tokens")
    return batches


def dsv3_step_fn(model, batches, mtp: bool, accum: int, bf16_moments: bool):
    cfg = model.cfg
    opt = _optimizer(model, bf16_moments)
    moe = model.moe_layers()
    for m in moe:
        m.keep_routing = True
    it = iter(range(10**9))
    head = model.lm_head.weight

    def step():
        loads = None
        for _ in range(accum):
            batch = batches[next(it) % len(batches)]
            with torch.autocast("cuda", dtype=torch.bfloat16):  # the trainer's loss: the head applied in chunks
                out = model(batch[:, :-1], mtp=mtp, head=False)
                loss, _ = head_cross_entropy(out.hidden.flatten(0, 1), head, batch[:, 1:].flatten())
                if mtp:
                    loss = loss + 0.3 * mtp_terms(out.mtp_hidden, head, batch)[0][0]
            loss = loss + 1e-4 * sum(balance_loss(m.routing, batch.shape[0], cfg.n_routed_experts,
                                                  cfg.num_experts_per_tok) for m in moe)
            (loss / accum).backward()
            loads = [m.load for m in moe] if loads is None else [a + m.load for a, m in zip(loads, moe)]
        clip_and_step(opt, model.parameters(), 1.0)
        opt.zero_grad(set_to_none=True)
        update_bias(moe, loads, 1e-3)

    return step


def hf_model(cfg, impl: str, checkpoint: str | None):
    """transformers' DeepseekV3ForCausalLM of cfg (no MTP, which it lacks) with fp32 weights: the checkpoint's, or
    random ones; experts_implementation `impl`."""
    import transformers

    kw = dict(experts_implementation=impl, attn_implementation="sdpa")
    if checkpoint:
        return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                                 num_nextn_predict_layers=0, **kw)
    return transformers.DeepseekV3ForCausalLM._from_config(hf_config(cfg.replace(num_nextn_predict_layers=0)), **kw)


def hf_step_fn(model, batches, accum: int):
    opt = _optimizer(model, bf16_moments=False)
    it = iter(range(10**9))

    def step():
        for _ in range(accum):
            batch = batches[next(it) % len(batches)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimiser step, for both (the optimiser's pass over every fp32 parameter "
                        "and its moments is then paid once per accum x batch x seq tokens)")
    p.add_argument("--compile", action="store_true", help="also time dsv3 under torch.compile")
    p.add_argument("--hf-impls", default="grouped_mm,eager")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--fp8", action="store_true", help="also time dsv3 with FP8 GEMMs (issue 4's end-to-end ratio)")
    p.add_argument("--fp32-moments", action="store_true",
                   help="dsv3 rows step torch's fused AdamW with fp32 moments instead of the trainer's bf16-moment "
                        "AdamW under bf16/FP8 (the report's; `benchmarks/adamw.py` times the two alone); "
                        "transformers always steps torch's")
    p.add_argument("--only", default="", help="comma-separated dsv3 rows to time (e.g. dsv3_compiled,"
                   "dsv3_fp8_compiled); default: every row the other flags enable")
    p.add_argument("--profile", default="",
                   help="comma-separated dsv3 rows (e.g. dsv3_mtp_compiled) whose GPU kernels of one step to list "
                        "by device time")
    p.add_argument("--model", default=None,
                   help="an HF-format checkpoint (e.g. a `dsv3 train` run's model folder) that both start from, "
                        "routing biases included, instead of random weights of --preset: a trained router spreads "
                        "tokens over the experts as random weights do not")
    p.add_argument("--data", default=None,
                   help="a `dsv3 prepare` folder: time on the first windows of its train split instead of random "
                        "tokens (its vocabulary must be the model's)")
    args = p.parse_args()

    device = torch.device("cuda")
    if args.model:
        if args.vocab:
            raise SystemExit("--vocab changes a preset's vocabulary; a --model checkpoint has its own")
        cfg = dsv3.ModelConfig.from_hf(args.model)
    else:
        cfg = dsv3.ModelConfig.preset(args.preset, **({"vocab_size": args.vocab} if args.vocab else {}))
    batches = [b.to(device) for b in timed_batches(cfg, args.batch, args.seq, args.data)]
    tokens = args.accum * args.batch * args.seq  # per optimiser step
    peak = peak_bf16_flops(device) or 989e12
    flops = {d: model_stats(cfg.replace(num_nextn_predict_layers=d), args.seq) for d in (0, 1)}
    fpt = {0: 3 * flops[0].fwd_flops_per_token, 1: flops[1].train_flops_per_token}
    results: dict = {"preset": None if args.model else args.preset, "model": args.model, "data": args.data,
                     "batch": args.batch, "seq": args.seq, "accum": args.accum,
                     "dsv3_bf16_moments": not args.fp32_moments,
                     "peak_tflops": peak / 1e12,
                     "train_flops_per_token": fpt}

    def record(key: str, timed: tuple[float, dict | None], flops_per_token: float) -> None:
        seconds, gpu = timed
        results[f"{key}_tokens_per_s"] = tokens / seconds
        results[f"{key}_mfu"] = tokens / seconds * flops_per_token / peak
        results[f"{key}_gpu"] = gpu
        clock = f" (SM {gpu['sm_mhz_mean']} MHz, {gpu['power_w_mean']:.0f} W)" if gpu else ""
        print(f"{key}: {tokens / seconds:,.0f} tokens/s, MFU {100 * results[f'{key}_mfu']:.1f}%{clock}", flush=True)

    # The peer first: its row is the one a cut-short run must not lose.
    for impl in filter(None, args.hf_impls.split(",")):
        try:
            hf = hf_model(cfg, impl, args.model).to(device)
        except (TypeError, ValueError) as e:
            results[f"hf_{impl}_error"] = str(e)[:200]
            continue
        hf.train()
        record(f"hf_{impl}", _time_steps(hf_step_fn(hf, batches, args.accum), 2, args.steps), fpt[0])
        del hf
        torch.cuda.empty_cache()
    variants = [("dsv3", 0, False, False), ("dsv3_mtp", 1, False, False)]
    if args.compile:
        variants += [("dsv3_compiled", 0, True, False), ("dsv3_mtp_compiled", 1, True, False)]
    if args.fp8:
        variants += [("dsv3_fp8", 0, False, True)] + ([("dsv3_fp8_compiled", 0, True, True)] if args.compile else [])
    only, profile = set(filter(None, args.only.split(","))), set(args.profile.split(","))
    if only - {v[0] for v in variants}:
        raise SystemExit(f"--only: unknown or not enabled rows {sorted(only - {v[0] for v in variants})}")
    for key, depth, compiled, fp8 in variants:
        if only and key not in only:
            continue
        if args.model:
            if depth > cfg.num_nextn_predict_layers:
                results[f"{key}_error"] = f"{args.model} has no MTP module"
                continue
            model = dsv3.load_model(args.model, device=device, dtype=torch.float32, mtp=depth > 0)
        else:
            model = dsv3.build_model(cfg.replace(num_nextn_predict_layers=depth), device=device, seed=0)
        if fp8:
            apply_fp8(model)
        model.train()
        run = torch.compile(model) if compiled else model
        step = dsv3_step_fn(run, batches, depth > 0, args.accum, not args.fp32_moments)
        record(key, _time_steps(step, 3 if compiled else 2, args.steps), fpt[depth])
        # How evenly the last step's tokens went over the experts: the grouped GEMMs' speed depends on it.
        results[f"{key}_maxvio"] = max(max_violation(m.load) for m in model.moe_layers())
        if key in profile:
            results[f"{key}_profile"] = kernel_profile(step, device, top=25)
        del model, run
        torch.cuda.empty_cache()

    for impl in filter(None, args.hf_impls.split(",")):
        if f"hf_{impl}_tokens_per_s" in results:
            for key in ("dsv3", "dsv3_compiled"):
                if f"{key}_tokens_per_s" in results:
                    results[f"ratio_{key}_vs_hf_{impl}"] = (results[f"{key}_tokens_per_s"]
                                                            / results[f"hf_{impl}_tokens_per_s"])
    for base in ("dsv3", "dsv3_compiled"):
        fp8 = base.replace("dsv3", "dsv3_fp8", 1)
        if f"{fp8}_tokens_per_s" in results and f"{base}_tokens_per_s" in results:
            results[f"ratio_{fp8}_vs_{base}"] = results[f"{fp8}_tokens_per_s"] / results[f"{base}_tokens_per_s"]
    save_results(f"train_throughput_{args.preset}", results)


if __name__ == "__main__":
    main()
