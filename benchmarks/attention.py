"""MLA's training attention, forward and backward: value heads at their own size vs padded to the query's.

    python -m benchmarks.attention --preset 1b --batch 8 --seq 2048

MLA's value heads are narrower than its query/key heads (64 against 96 in `1b`, 128 against 192 in 671B). The peer
is the padded form: v padded with zeros to the query's size and the output cut back, which transformers'
DeepseekV3 does for flash attention 2 and dsv3 did until session 19. dsv3's `causal_attention` hands the two sizes
to scaled_dot_product_attention as they are (cuDNN's attention on Hopper). The run prints milliseconds per forward +
backward of one layer's attention under the default dispatch, the differences between the two forms' outputs and
gradients, and which backends take the unpadded form.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dsv3
from benchmarks.common import save_results, time_fn
from dsv3.model import causal_attention


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    dv = v.shape[-1]
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - dv)), is_causal=True, scale=scale)[..., :dv]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = dsv3.ModelConfig.preset(args.preset)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, cfg.num_attention_heads, args.seq)

    def rand(dim: int) -> torch.Tensor:
        return torch.randn(*shape, dim, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()

    q, k, v = rand(cfg.qk_head_dim), rand(cfg.qk_head_dim), rand(cfg.v_head_dim)
    grad_out = torch.randn(*shape, cfg.v_head_dim, generator=gen, device=device, dtype=torch.bfloat16)

    def step(attn):
        def run():
            out = attn(q, k, v, cfg.softmax_scale)
            return out, torch.autograd.grad(out, (q, k, v), grad_out)
        return run

    results: dict = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "heads": cfg.num_attention_heads,
                     "qk_head_dim": cfg.qk_head_dim, "v_head_dim": cfg.v_head_dim}
    for name, attn in (("padded", padded_attention), ("dsv3", causal_attention)):
        results[f"{name}_ms"] = 1e3 * time_fn(step(attn), device, iters=args.iters)
        print(f"{name}: {results[f'{name}_ms']:.3f} ms forward + backward", flush=True)
    results["speedup"] = results["padded_ms"] / results["dsv3_ms"]
    (want, want_g), (got, got_g) = step(padded_attention)(), step(causal_attention)()
    results["max_output_diff"] = (got - want).abs().max().item()
    results["max_grad_rel_diff"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got_g, want_g))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                results[f"unpadded_{backend.name.lower()}_ms"] = 1e3 * time_fn(step(causal_attention), device,
                                                                             iters=args.iters)
        except RuntimeError as e:  # the backend refuses unequal head sizes
            results[f"unpadded_{backend.name.lower()}_ms"] = f"refused: {str(e)[:120]}"
    print(f"dsv3 is {results['speedup']:.2f}x the padded form", flush=True)
    save_results(f"attention_{args.preset}", results)


if __name__ == "__main__":
    main()
