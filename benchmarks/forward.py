"""Forward throughput: dsv3 vs transformers' DeepseekV3ForCausalLM on the same weights, in one run.

    python benchmarks/forward.py --preset 1b --batch 8 --seq 2048

Builds a random dsv3 model, saves it in HF format, loads it into transformers, checks both give the same logits,
then times a forward pass (no grad, logits included) of each and prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import dsv3
from benchmarks.common import save_results, time_fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time dsv3 under torch.compile")
    args = p.parse_args()

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = dsv3.ModelConfig.preset(args.preset)
    model = dsv3.build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    results: dict = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                     "params": model.num_params()}

    with tempfile.TemporaryDirectory() as tmp:
        dsv3.save_model(model, tmp)
        with torch.no_grad():
            ours = model(ids[:1])
            t_ours = time_fn(lambda: model(ids), device, iters=args.iters)
        results["dsv3_tokens_per_s"] = tokens / t_ours
        if args.compile:
            compiled = torch.compile(model)
            with torch.no_grad():
                t_c = time_fn(lambda: compiled(ids), device, iters=args.iters)
            results["dsv3_compiled_tokens_per_s"] = tokens / t_c

        for impl in ("eager", "grouped_mm"):
            try:
                hf = transformers.AutoModelForCausalLM.from_pretrained(
                    tmp, dtype=dtype, attn_implementation="sdpa", experts_implementation=impl).to(device).eval()
            except (TypeError, ValueError) as e:
                results[f"hf_{impl}_error"] = str(e)[:200]
                continue
            with torch.no_grad():
                theirs = hf(ids[:1]).logits
                diff = (theirs.float() - ours.float()).abs().max().item()
                t_hf = time_fn(lambda m=hf: m(ids), device, iters=args.iters)
            results[f"hf_{impl}_tokens_per_s"] = tokens / t_hf
            results[f"hf_{impl}_max_logit_diff"] = diff
            results[f"ratio_vs_hf_{impl}"] = t_hf / t_ours
            del hf
            torch.cuda.empty_cache() if device.type == "cuda" else None
    results["logit_scale"] = ours.float().abs().max().item()
    save_results(f"forward_{args.preset}", results)


if __name__ == "__main__":
    main()
