"""A MoE layer at decode batch sizes: the general path (Gate.forward, Experts.forward over torch._grouped_mm, then
the shared experts' MLP) against the fused Triton kernels of `ops.moe_decode` (one routing launch, two GEMVs over
the chosen and the shared experts), both in CUDA graphs.

    python -m benchmarks.moe_decode                            # the 16b preset's MoE layer at T = 1, 2, 4, 8
    python -m benchmarks.moe_decode --preset 1b --tokens 1 8 16

Each graph runs `--layers` MoE layers of the preset in a row, each with its own random weights as in a decode step
(so a layer's experts are not still in L2 from the previous call), and is replayed `--iters` times; time per layer
is replay time over layers. Both paths include the fp32 gate GEMV and the shared experts. Bandwidth counts the
weights a layer must read at least, 3 * D * I * 2 bytes per distinct routed expert its T tokens chose and per shared
expert: the general path reads each once. The fused kernels read one expert per (token, expert) pair, shared
experts included, counted by `fused_read_gbps`; above T * K = E the model keeps the general path. Weights are
random, drawn on the device; `max_abs_diff` checks the two paths agree (bf16).
"""

from __future__ import annotations

import argparse

import torch

import dsv3
from benchmarks.common import save_results
from benchmarks.decode import copy_bandwidth
from dsv3.model import MoE
from dsv3.ops import moe_decode


def random_layers(cfg: dsv3.ModelConfig, n: int, device: torch.device) -> list[MoE]:
    gen = torch.Generator(device).manual_seed(0)
    layers = []
    for _ in range(n):
        with torch.device("meta"):
            moe = MoE(cfg)
        moe.to_empty(device=device).to(torch.bfloat16)
        moe.gate.float()  # fp32 gate and bias, as cast_model keeps them
        with torch.no_grad():
            # Gate logits of unit scale: a spread of routing decisions like a trained gate's.
            moe.gate.weight.normal_(0, cfg.hidden_size ** -0.5, generator=gen)
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.1, generator=gen)
            moe.experts.gate_up_proj.normal_(0, 0.02, generator=gen)
            moe.experts.down_proj.normal_(0, 0.02, generator=gen)
            for w in moe.shared_weights() or ():
                w.normal_(0, 0.02, generator=gen)
        layers.append(moe.eval())
    return layers


def grouped_path(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    return moe.general(x)[0]


def fused_path(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    return moe.fused(x)[0]


def graph_us_per_layer(path, layers: list[MoE], x: torch.Tensor, iters: int) -> tuple[float, list[torch.Tensor]]:
    """Microseconds per layer of a CUDA graph replaying `path` over every layer, and the graph's outputs."""
    def step():
        return [path(moe, x) for moe in layers]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles and autotunes, cuBLAS sets up
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * len(layers)), outs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="16b")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8], help="T: tokens per MoE call")
    p.add_argument("--layers", type=int, default=8, help="MoE layers (own weights) per graph replay")
    p.add_argument("--iters", type=int, default=50, help="graph replays timed")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA graphs: it needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = dsv3.ModelConfig.preset(args.preset)
    e, k, d, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    ns = cfg.n_shared_experts or 0
    expert_bytes = 3 * d * inter * 2  # gate, up and down of one expert in bf16
    layers = random_layers(cfg, args.layers, dev)
    results = {"preset": args.preset, "n_shared_experts": ns, "layers": args.layers, "iters": args.iters,
               "copy_gbps": round(copy_bandwidth(dev) / 1e9), "runs": []}
    for t in args.tokens:
        x = torch.randn(t, d, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(t))
        with torch.no_grad():
            distinct = sum(torch.unique(moe.gate(x).indices).numel() for moe in layers) / len(layers)
            grouped_us, grouped_out = graph_us_per_layer(grouped_path, layers, x, args.iters)
            fused_us, fused_out = graph_us_per_layer(fused_path, layers, x, args.iters)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grouped_out, fused_out))
        useful = (distinct + ns) * expert_bytes
        run = {"tokens": t, "fused_in_model": moe_decode.fits(t, k, e), "distinct_experts": distinct,
               "grouped_us": round(grouped_us, 1), "fused_us": round(fused_us, 1),
               "speedup": round(grouped_us / fused_us, 2),
               "grouped_gbps": round(useful / grouped_us / 1e3), "fused_gbps": round(useful / fused_us / 1e3),
               "fused_read_gbps": round(t * (k + ns) * expert_bytes / fused_us / 1e3),
               "max_abs_diff": diff, "output_abs_max": max(o.float().abs().max().item() for o in grouped_out)}
        print(f"T={t}: grouped {run['grouped_us']} us ({run['grouped_gbps']} GB/s), fused {run['fused_us']} us "
              f"({run['fused_gbps']} GB/s useful, {run['fused_read_gbps']} GB/s read), x{run['speedup']}")
        results["runs"].append(run)
    save_results("moe_decode", results)


if __name__ == "__main__":
    main()
