"""FP8 GEMMs with DeepSeek-V3's fine-grained scaling vs cuBLAS bf16, at DeepSeek-V3's shapes; and, with --e2e, a
training step of a preset in FP8 vs bf16.

    python benchmarks/fp8_gemm.py                       # the GEMM table
    python benchmarks/fp8_gemm.py --e2e --preset 1b     # training throughput, bf16 vs fp8

For each shape Y[M, N] = X[M, K] W[N, K]^T with X in bf16 and W an fp32 master weight:
- bf16: torch.mm on bf16 operands (cuBLAS), the weight cast beforehand;
- fp8: the FP8 GEMM alone on operands quantised beforehand (cuBLASLt or Triton, as dsv3 would pick), and
  fp8+quant with the activation's quantisation included (the weight's is cached across micro-batches);
- train: forward + backward of the layer (3 GEMMs) as the trainer runs it, bf16 nn.Linear under autocast vs
  Fp8Linear with every quantisation included, the weight's too (a fresh weight version each step);
- the relative error of each output against fp32 on the same inputs.
Expert shapes also run grouped (--experts experts sharing the tokens evenly): torch._grouped_mm bf16 vs the FP8
grouped kernel. TFLOP/s count 2MNK per GEMM. Results go to $OUT/fp8_gemm.json (or runs/benchmarks).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import dsv3
from benchmarks.common import save_results, time_fn
from dsv3.fp8_train import apply_fp8, make_adamw
from dsv3.info import model_stats
from dsv3.ops import fp8_gemm as ops

# (name, K, N): DeepSeek-V3 671B's projections
EXPERT_SHAPES = [("expert gate/up 7168->2048", 7168, 2048), ("expert down 2048->7168", 2048, 7168)]
DENSE_SHAPES = [("dense up 7168->18432", 7168, 18432), ("dense down 18432->7168", 18432, 7168)]
MLA_SHAPES = [("mla q_a 7168->1536", 7168, 1536), ("mla q_b 1536->24576", 1536, 24576),
              ("mla kv_a 7168->576", 7168, 576), ("mla kv_b 512->32768", 512, 32768),
              ("mla o 16384->7168", 16384, 7168)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def bench_dense(name: str, m: int, k: int, n: int, dev: torch.device, iters: int) -> dict:
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    w = torch.randn(n, k, device=dev) * k ** -0.5
    ref = x.float() @ w.t()
    wb = w.to(torch.bfloat16)
    tiles = ops.row_tiles(m, None, dev)
    wq = ops.quantize_weight(w[None])
    xq = ops.quantize_act(x, tiles, with_cols=False)
    fp8 = lambda: ops.gemm(xq.q, xq.s, wq.q, wq.s, tiles, n, torch.bfloat16)  # noqa: E731

    def fp8_quant():
        a = ops.quantize_act(x, tiles, with_cols=False)
        return ops.gemm(a.q, a.s, wq.q, wq.s, tiles, n, torch.bfloat16)

    flops = 2 * m * n * k
    t_bf16, t_fp8, t_fp8q = (time_fn(f, dev, iters=iters) for f in (lambda: x @ wb.t(), fp8, fp8_quant))
    backend = "cublas" if m % 16 == 0 and ops.cublas_block_scaled(dev) else "triton"
    row = {"shape": name, "M": m, "K": k, "N": n, "fp8_backend": backend,
           "bf16_tflops": flops / t_bf16 / 1e12, "fp8_tflops": flops / t_fp8 / 1e12,
           "fp8_quant_tflops": flops / t_fp8q / 1e12, "speedup_fp8_quant": t_bf16 / t_fp8q,
           "bf16_rel_err": _rel(x @ wb.t(), ref), "fp8_rel_err": _rel(fp8_quant(), ref)}
    if backend == "cublas":
        t_tri = time_fn(lambda: ops.gemm_triton(xq.q, xq.s, wq.q, wq.s, tiles, n, torch.bfloat16), dev, iters=iters)
        row["fp8_triton_tflops"] = flops / t_tri / 1e12
    row.update(bench_train(m, k, n, dev, iters))
    return row


def bench_train(m: int, k: int, n: int, dev: torch.device, iters: int) -> dict:
    lin = nn.Linear(k, n, bias=False, device=dev)
    fp8 = apply_fp8(copy.deepcopy(lin))
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def step(mod, new_weight):
        if new_weight:
            with torch.no_grad():
                mod.weight.add_(0)  # a new version, as after an optimiser step: the weight is quantised again
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x)
        y.backward(dy)
        mod.weight.grad = x.grad = None

    t_bf16 = time_fn(lambda: step(lin, False), dev, iters=iters)
    t_fp8 = time_fn(lambda: step(fp8, True), dev, iters=iters)
    flops = 6 * m * n * k
    return {"train_bf16_tflops": flops / t_bf16 / 1e12, "train_fp8_tflops": flops / t_fp8 / 1e12,
            "train_speedup": t_bf16 / t_fp8}


def bench_grouped(name: str, m: int, k: int, n: int, experts: int, dev: torch.device, iters: int) -> dict:
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    w = torch.randn(experts, n, k, device=dev) * k ** -0.5
    counts = torch.full((experts,), m // experts)
    counts[: m % experts] += 1
    offs = counts.cumsum(0).to(torch.int32).to(dev)
    ref = torch.cat([x[s:e].float() @ w[g].t() for g, (s, e) in
                     enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    wb = w.to(torch.bfloat16).transpose(1, 2)  # [E, K, N] as Experts passes it
    tiles = ops.row_tiles(m, offs, dev)
    wq = ops.quantize_weight(w)

    def fp8_quant():
        a = ops.quantize_act(x, tiles, with_cols=False)
        return ops.gemm(a.q, a.s, wq.q, wq.s, tiles, n, torch.bfloat16)

    bf16 = lambda: torch._grouped_mm(x, wb, offs=offs)  # noqa: E731
    flops = 2 * m * n * k
    t_bf16, t_fp8 = time_fn(bf16, dev, iters=iters), time_fn(fp8_quant, dev, iters=iters)
    return {"shape": name + f" grouped x{experts}", "M": m, "K": k, "N": n, "fp8_backend": "triton",
            "bf16_tflops": flops / t_bf16 / 1e12, "fp8_quant_tflops": flops / t_fp8 / 1e12,
            "speedup_fp8_quant": t_bf16 / t_fp8, "bf16_rel_err": _rel(bf16(), ref),
            "fp8_rel_err": _rel(fp8_quant(), ref)}


def bench_e2e(preset: str, batch: int, seq: int, steps: int, dev: torch.device) -> dict:
    """Training throughput of `preset` on random tokens: AdamW step included, bf16 autocast vs FP8."""
    cfg = dsv3.ModelConfig.preset(preset)
    stats = model_stats(cfg, seq)
    head = 2 * cfg.hidden_size * cfg.vocab_size * (1 + cfg.num_nextn_predict_layers)
    attn = stats.attn_flops_per_token * (1 + cfg.num_nextn_predict_layers / cfg.num_hidden_layers)
    total = stats.fwd_flops_per_token + stats.mtp_fwd_flops_per_token
    out = {"preset": preset, "batch": batch, "seq": seq,
           "fp8_gemm_flop_share": (total - head - attn) / total, "head_flop_share": head / total}
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    for precision in ("bf16", "fp8"):
        model = dsv3.build_model(cfg, device=dev, seed=0)
        if precision == "fp8":
            apply_fp8(model)
        opt = make_adamw(model.parameters(), lr=1e-4, bf16_moments=precision == "fp8")
        seconds, loss = _time_steps(model, opt, ids, steps)
        out[f"{precision}_tokens_per_s"] = batch * seq / seconds
        out[f"{precision}_loss"] = loss
        out[f"{precision}_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        model = opt = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["speedup"] = out["fp8_tokens_per_s"] / out["bf16_tokens_per_s"]
    return out


def _time_steps(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds per training step (forward with MTP, backward, AdamW) after 3 warm-up steps, and the last loss."""
    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res = model(ids[:, :-1], mtp=True)
        loss = F.cross_entropy(res.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        mtp = res.mtp_logits[0][:, :-1].float().flatten(0, 1)
        loss = loss + 0.3 * F.cross_entropy(mtp, ids[:, 2:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, loss.item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="M for the GEMM table")
    p.add_argument("--experts", type=int, default=8, help="experts sharing the tokens in the grouped runs")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--e2e", action="store_true", help="time training steps of --preset instead of GEMMs")
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    if args.e2e:
        save_results(f"fp8_train_{args.preset}", bench_e2e(args.preset, args.batch, args.seq, args.steps, dev))
        return
    rows = []
    for name, k, n in EXPERT_SHAPES + DENSE_SHAPES + MLA_SHAPES:
        for m in args.tokens:
            rows.append(bench_dense(name, m, k, n, dev, args.iters))
            print(rows[-1], flush=True)
    for name, k, n in EXPERT_SHAPES:
        for m in args.tokens:
            rows.append(bench_grouped(name, m, k, n, args.experts, dev, args.iters))
            print(rows[-1], flush=True)
    save_results("fp8_gemm", {"rows": rows})


if __name__ == "__main__":
    main()
