"""One optimiser step over a preset's parameters: torch's fused AdamW (fp32 moments, the peer) against dsv3's
AdamW with bf16 moments (the report's; one Triton pass per parameter, `dsv3/ops/adamw.py`) and that AdamW's foreach
reference, in one run. Bytes per fp32 parameter: fused 28 (parameter, gradient, two fp32 moments read; parameter
and moments written), dsv3 20.

    python -m benchmarks.adamw --preset 1b
"""

from __future__ import annotations

import argparse

import torch

import dsv3
from benchmarks.common import save_results, time_fn
from dsv3.fp8_train import AdamW
from dsv3.ops import adamw as ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = dsv3.build_model(dsv3.ModelConfig.preset(args.preset), device=device, seed=0)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    n = sum(q.numel() for q in params)
    results: dict = {"preset": args.preset, "parameters": n, "tensors": len(params)}
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    rows = {"torch_fused_fp32_moments": (torch.optim.AdamW(params, fused=device.type == "cuda", **kw), 28),
            "dsv3_bf16_moments": (AdamW(params, **kw), 20)}
    for key, (opt, bytes_per) in rows.items():
        seconds = time_fn(opt.step, device, warmup=2, iters=args.iters)
        results[f"{key}_ms"] = seconds * 1e3
        results[f"{key}_gbps"] = n * bytes_per / seconds / 1e9
        print(f"{key}: {seconds * 1e3:.2f} ms, {results[f'{key}_gbps']:,.0f} GB/s", flush=True)
    # The same bf16-moment AdamW through its foreach reference, which the kernel replaces.
    opt = rows["dsv3_bf16_moments"][0]
    states = [opt.state[q] for q in params]

    def reference():
        ops.adamw_step_reference_(params, [q.grad for q in params], [s["exp_avg"] for s in states],
                                  [s["exp_avg_sq"] for s in states], [s["step"] for s in states], kw["lr"],
                                  *kw["betas"], kw["eps"], kw["weight_decay"])

    results["dsv3_reference_ms"] = time_fn(reference, device, warmup=1, iters=args.iters) * 1e3
    print(f"dsv3 foreach reference: {results['dsv3_reference_ms']:.2f} ms", flush=True)
    results["ratio_dsv3_vs_torch_fused"] = results["torch_fused_fp32_moments_ms"] / results["dsv3_bf16_moments_ms"]
    results["ratio_dsv3_vs_reference"] = results["dsv3_reference_ms"] / results["dsv3_bf16_moments_ms"]
    save_results(f"adamw_{args.preset}", results)


if __name__ == "__main__":
    main()
