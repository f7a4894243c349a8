"""Linear layers at decode batch sizes: cuBLAS (`F.linear`) against the Triton GEMV of `ops.gemv`, in CUDA graphs.

    python -m benchmarks.gemv                          # the 16b preset's linear layers at 1, 2, 4 and 8 rows
    python -m benchmarks.gemv --preset 1b --rows 1 8

For each linear shape of the preset (attention projections, the dense MLP, the head), and for the absorbed
attention's two per-head products (cuBLAS batched GEMMs against the batched GEMVs), a graph multiplies x by
distinct random weights of that shape, at least 512 MB of them in a row (more than the H200's L2, so every product
reads its weight from HBM, as in a decode step), and is replayed `--iters` times. GB/s counts the weight bytes
read per product over its time; `max_abs_diff` checks the two agree (bf16).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dsv3
from benchmarks.common import save_results
from benchmarks.decode import copy_bandwidth
from benchmarks.moe_decode import graph_us_per_layer
from dsv3.ops import gemv


def linear_shapes(cfg: dsv3.ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the preset's plain linear layers (the experts have their own kernels)."""
    h, d = cfg.num_attention_heads, cfg.hidden_size
    shapes = {"q_proj": (h * cfg.qk_head_dim, d)} if cfg.q_lora_rank is None else {
        "q_a_proj": (cfg.q_lora_rank, d), "q_b_proj": (h * cfg.qk_head_dim, cfg.q_lora_rank)}
    shapes.update({"kv_a_proj_with_mqa": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d),
                   "o_proj": (d, h * cfg.v_head_dim), "dense gate/up_proj": (cfg.intermediate_size, d),
                   "dense down_proj": (d, cfg.intermediate_size), "lm_head": (cfg.vocab_size, d)})
    return shapes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="16b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--iters", type=int, default=30, help="graph replays timed")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA graphs: it needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = dsv3.ModelConfig.preset(args.preset)
    gen = torch.Generator(dev).manual_seed(0)
    results = {"preset": args.preset, "iters": args.iters, "copy_gbps": round(copy_bandwidth(dev) / 1e9), "runs": []}
    for name, (n, k) in linear_shapes(cfg).items():
        count = max(2, -(-(512 << 20) // (2 * n * k)))
        weights = [torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) / k ** 0.5
                   for _ in range(count)]
        for m in args.rows:
            if m > gemv.MAX_ROWS:
                continue
            x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
            with torch.no_grad():
                cublas_us, want = graph_us_per_layer(lambda w, x: F.linear(x, w), weights, x, args.iters)
                gemv_us, got = graph_us_per_layer(lambda w, x: gemv.linear(x, w), weights, x, args.iters)
            record(results, name, (n, k), m, cublas_us, gemv_us, 2 * n * k, want, got)
        del weights
    # The absorbed attention's per-head products, on views of kv_b_proj's weight [H, nope + v, C] as in decoding.
    h, nope, v, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    count = max(2, -(-(512 << 20) // (2 * h * (nope + v) * c)))
    weights = [torch.randn(h, nope + v, c, device=dev, generator=gen, dtype=torch.bfloat16) / c ** 0.5
               for _ in range(count)]
    # name -> (x's width, weight bytes read, cuBLAS path, GEMV path); x [M, H, width]
    products = {
        "W_UK (query into the latent)": (nope, 2 * h * nope * c, lambda w, x: _bmm(x, w[:, :nope]),
                                         lambda w, x: gemv.bmm_nn(x, w[:, :nope])),
        "W_UV (latent out to heads)": (c, 2 * h * v * c, lambda w, x: _bmm(x, w[:, nope:].transpose(1, 2)),
                                       lambda w, x: gemv.bmm_nt(x, w[:, nope:])),
    }
    for name, (width, read, plain, fast) in products.items():
        for m in [r for r in args.rows if r <= gemv.MAX_ROWS]:
            x = torch.randn(m, h, width, device=dev, generator=gen, dtype=torch.bfloat16)
            with torch.no_grad():
                cublas_us, want = graph_us_per_layer(plain, weights, x, args.iters)
                gemv_us, got = graph_us_per_layer(fast, weights, x, args.iters)
            record(results, name, (h, width, c), m, cublas_us, gemv_us, read, want, got)
    save_results(f"gemv_{args.preset}", results)


def _bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: [M, H, J], w: [H, J, C] -> [M, H, C], as the engine's cuBLAS path computes it
    return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)


def record(results: dict, name: str, shape: tuple, m: int, cublas_us: float, gemv_us: float, read: int,
           want: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    run = {"layer": name, "shape": list(shape), "rows": m, "cublas_us": round(cublas_us, 2),
           "gemv_us": round(gemv_us, 2), "speedup": round(cublas_us / gemv_us, 2),
           "cublas_gbps": round(read / cublas_us / 1e3), "gemv_gbps": round(read / gemv_us / 1e3),
           "max_abs_diff": max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got))}
    print(f"{name} {list(shape)} rows={m}: cuBLAS {run['cublas_us']} us ({run['cublas_gbps']} GB/s), "
          f"GEMV {run['gemv_us']} us ({run['gemv_gbps']} GB/s), x{run['speedup']}", flush=True)
    results["runs"].append(run)


if __name__ == "__main__":
    main()
