"""MLA's training attention, forward and backward, one layer: dsv3's Triton kernel against scaled_dot_product_attention.

    python -m benchmarks.attention --preset 1b --batch 8 --seq 2048

MLA's value heads are narrower than its query/key heads (64 against 96 in `1b`, 128 against 192 in 671B). The rows,
each from the pieces MLA's projections make (q [B, T, H * (Dn + Dr)], kv_b's output [B, T, H * (Dn + Dv)], k_pe
[B, T, Dr]) to the output in o_proj's layout and back to their gradients:
- `padded`: q and k concatenated, v padded with zeros to the query's size and the output cut back, through
  scaled_dot_product_attention: what transformers' DeepseekV3 does for flash attention 2;
- `sdpa`: the same without the padding (cuDNN's attention on Hopper takes the two sizes): dsv3 until session 24, now
  `ops.attention.mla_causal_attention_reference`;
- `dsv3`: `ops.attention.mla_causal_attention`, the Triton kernels that read the pieces where they lie.
It prints milliseconds per forward + backward, TFLOP/s (forward 2 x B x H x T(T+1)/2 x (Dqk + Dv), backward twice
that, as the MFU count has it), the ratios, and the largest differences of dsv3's output and gradients from the
`sdpa` row's, relative to the largest value.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dsv3
from benchmarks.common import machine, save_results, time_fn
from dsv3.ops import attention as kernels
from dsv3.ops.attention import mla_causal_attention, mla_causal_attention_reference


def padded_attention(q_nope, q_pe, kv, k_pe, scale: float) -> torch.Tensor:
    heads, dn = q_nope.shape[2], q_nope.shape[-1]
    k_nope, v = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    dv = v.shape[-1]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1).transpose(1, 2)
    v = F.pad(v, (0, q.shape[-1] - dv)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :dv].transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = dsv3.ModelConfig.preset(args.preset)
    b, t, h = args.batch, args.seq, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()

    # the projections' outputs, and the views MLA takes of them
    q, kv, k_pe = rand(b, t, h * (dn + dr)), rand(b, t, h * (dn + dv)), rand(b, t, dr)
    grad_o = torch.randn(b, t, h, dv, generator=gen, device=device, dtype=torch.bfloat16)

    def step(attn):
        def run():
            q_nope, q_pe = q.unflatten(-1, (h, dn + dr)).split([dn, dr], dim=-1)
            out = attn(q_nope, q_pe, kv.unflatten(-1, (h, dn + dv)), k_pe, cfg.softmax_scale)
            return out, torch.autograd.grad(out, (q, kv, k_pe), grad_o)
        return run

    flops = 3 * 2 * b * h * t * (t + 1) / 2 * (dn + dr + dv)
    results: dict = {"preset": args.preset, "batch": b, "seq": t, "heads": h, "qk_head_dim": dn + dr,
                     "v_head_dim": dv, "tflop": flops / 1e12, "machine": machine()}
    rows = (("padded", padded_attention), ("sdpa", mla_causal_attention_reference), ("dsv3", mla_causal_attention))
    for name, attn in rows:
        ms = 1e3 * time_fn(step(attn), device, iters=args.iters)
        results[f"{name}_ms"], results[f"{name}_tflops"] = ms, flops / ms / 1e9
        print(f"{name}: {ms:.3f} ms forward + backward, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    for peer in ("padded", "sdpa"):
        results[f"dsv3_vs_{peer}"] = results[f"{peer}_ms"] / results["dsv3_ms"]
        print(f"dsv3 is {results[f'dsv3_vs_{peer}']:.2f}x {peer}", flush=True)
    (want, want_g), (got, got_g) = step(mla_causal_attention_reference)(), step(mla_causal_attention)()
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    results["output_rel_diff"] = rel(got, want)
    results["grad_rel_diffs"] = {n: rel(a, w) for n, a, w in zip(("q", "kv", "k_pe"), got_g, want_g)}
    print(f"dsv3 against sdpa: output {results['output_rel_diff']:.2e}, gradients {results['grad_rel_diffs']}",
          flush=True)
    results["configs"] = {name: str(getattr(getattr(kernels, name), "best_config", None))
                          for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel")}
    print(f"autotuned: {results['configs']}", flush=True)
    save_results(f"attention_{args.preset}", results)


if __name__ == "__main__":
    main()
