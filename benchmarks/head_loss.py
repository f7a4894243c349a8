"""The output head's cross-entropy, forward and backward: dsv3's fused chunked loss vs the usual PyTorch loss.

    python -m benchmarks.head_loss                       # DeepSeek-V3's 129K vocabulary and the 16K of the ablations

The peer is what transformers' DeepseekV3ForCausalLM trains with: the whole [tokens, vocab] logits from one head
matmul under bf16 autocast, made fp32, through F.cross_entropy and autograd. dsv3's `head_cross_entropy` makes the
loss and its gradient chunk by chunk (`dsv3/loss.py`, `ops/cross_entropy.py`). Both start from fp32 hidden states and
an fp32 head weight, as in training; the table gives milliseconds per forward + backward, the peak memory above the
inputs, and the loss and gradient differences between the two.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import save_results, time_fn
from dsv3.loss import head_cross_entropy


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets)


def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return head_cross_entropy(hidden, weight, targets)[0]


def measure(loss_fn, hidden, weight, targets, device) -> dict:
    def step():
        loss = loss_fn(hidden, weight, targets)
        grads = torch.autograd.grad(loss, (hidden, weight))
        return loss, grads

    seconds = time_fn(step, device, warmup=2, iters=5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, grads = step()
    torch.cuda.synchronize()
    return {"ms": seconds * 1e3, "peak_extra_GB": (torch.cuda.max_memory_allocated() - base) / 1e9,
            "loss": loss.item(), "grads": grads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, nargs="+", default=[129280, 16384])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/head_loss.py needs a CUDA GPU")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    results: dict = {"tokens": args.tokens, "hidden": args.hidden, "runs": []}
    for vocab in args.vocab:
        hidden = torch.randn(args.tokens, args.hidden, device=device, generator=gen, requires_grad=True)
        weight = (0.02 * torch.randn(vocab, args.hidden, device=device, generator=gen)).requires_grad_()
        targets = torch.randint(0, vocab, (args.tokens,), device=device, generator=gen)
        plain = measure(plain_loss, hidden, weight, targets, device)
        fused = measure(fused_loss, hidden, weight, targets, device)
        row = {"vocab": vocab, "plain_ms": plain["ms"], "dsv3_ms": fused["ms"], "speedup": plain["ms"] / fused["ms"],
               "plain_peak_extra_GB": plain["peak_extra_GB"], "dsv3_peak_extra_GB": fused["peak_extra_GB"],
               "loss_difference": abs(plain["loss"] - fused["loss"])}
        for name, a, b in zip(("hidden", "weight"), plain["grads"], fused["grads"]):
            row[f"grad_{name}_relative_difference"] = ((a - b).norm() / a.norm()).item()
        results["runs"].append(row)
        print(row, flush=True)
        del hidden, weight, plain, fused
        torch.cuda.empty_cache()
    save_results("head_loss", results)


if __name__ == "__main__":
    main()
