"""One MoE layer's training pass, forward and backward: dsv3's `MoE` against transformers' DeepseekV3MoE, same
weights, same tokens, in one run.

    python -m benchmarks.moe_train --preset 1b --tokens 16384 --compile --profile

Why: the routed experts' dispatch, SwiGLU and combine are the largest block of the `1b` training step's kernels
that are not GEMMs or attention (docs/benchmarks.md, sessions 19-20), and a full training row compiles for a minute
or two. One layer compiles in seconds, so work on those kernels can be timed here first.

Both layers run as the trainer runs them: fp32 weights under bf16 autocast, an fp32 input [tokens, hidden] that
wants a gradient, a fixed output gradient. transformers' experts use `experts_implementation` ("grouped_mm" by
default, its fastest). Reported: milliseconds per forward + backward, the ratio, how far each layer's output and
gradients under autocast are from the same pass in fp32 (relative norm of the difference; in fp32 the two layers
agree to rounding), the MaxVio of the routing the random weights give, and with `--profile` dsv3's kernels of one
pass by summed device time.
"""

from __future__ import annotations

import argparse

import torch

import dsv3
from benchmarks.common import hf_config, kernel_profile, save_results, time_fn
from dsv3.balance import max_violation
from dsv3.model import MoE


def layers(cfg: dsv3.ModelConfig, impl: str, device: torch.device, seed: int = 0):
    """dsv3's MoE and transformers' DeepseekV3MoE of cfg with the same random weights (their parameter names and
    layouts are the same), fp32 on device."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    ours = MoE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.initializer_range)
        ours.gate.e_score_correction_bias.zero_()
    hf_cfg = hf_config(cfg)
    hf_cfg._experts_implementation = impl  # what from_pretrained's experts_implementation sets
    theirs = DeepseekV3MoE(hf_cfg)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device), theirs.to(device)


def pass_fn(layer, x: torch.Tensor, dy: torch.Tensor, autocast: bool = True):
    """A forward and backward pass of layer on x (fp32, wanting a gradient), under bf16 autocast on x's device."""

    def run():
        x.grad = None  # as a training step starts: no gradients to accumulate into
        layer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x.unsqueeze(0)).squeeze(0)
        y.backward(dy)
        return y

    return run


def outputs_and_grads(layer, x: torch.Tensor, dy: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """One pass's output and the gradients of its input and of the experts' weights."""
    y = pass_fn(layer, x, dy, autocast)()
    return [y.detach(), x.grad.clone(), layer.experts.gate_up_proj.grad.clone(), layer.experts.down_proj.grad.clone()]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--tokens", type=int, default=16384, help="tokens in the pass (16,384: `1b` at batch 8 x 2,048)")
    p.add_argument("--hf-impl", default="grouped_mm", help="transformers' experts_implementation")
    p.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    p.add_argument("--profile", action="store_true", help="list dsv3's kernels of one pass (CUDA)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dsv3.ModelConfig.preset(args.preset)
    ours, theirs = layers(cfg, args.hf_impl, device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, cfg.hidden_size, device=device, generator=gen).requires_grad_()
    dy = torch.randn(args.tokens, cfg.hidden_size, device=device, generator=gen)
    results: dict = {"preset": args.preset, "tokens": args.tokens, "hf_impl": args.hf_impl, "device": str(device)}

    # Agreement, eager: each layer under autocast against the fp32 pass (the same for both layers up to rounding).
    reference = outputs_and_grads(ours, x, dy, autocast=False)
    results["fp32_output_relative_difference"] = relative(outputs_and_grads(theirs, x, dy, False)[0], reference[0])
    for name, layer in (("dsv3", ours), ("hf", theirs)):
        got = outputs_and_grads(layer, x, dy, autocast=True)
        for what, a, b in zip(("output", "grad_input", "grad_gate_up", "grad_down"), got, reference):
            results[f"{name}_{what}_vs_fp32"] = relative(a, b)
    results["maxvio"] = max_violation(ours.load)

    rows = [("dsv3", ours, False), ("hf", theirs, False)]
    if args.compile:
        rows += [("dsv3_compiled", ours, True), ("hf_compiled", theirs, True)]
    for key, layer, compiled in rows:
        run = pass_fn(torch.compile(layer) if compiled else layer, x, dy)
        try:
            results[f"{key}_ms"] = time_fn(run, device, warmup=3, iters=args.iters) * 1e3
        except Exception as e:  # transformers' layer may not compile; the row says why, the others still run
            results[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        print(f"{key}: {results[f'{key}_ms']:.3f} ms per forward + backward", flush=True)
        if args.profile and key.startswith("dsv3") and device.type == "cuda":
            results[f"{key}_profile"] = kernel_profile(run, device, top=25)
    for suffix in ("", "_compiled"):
        if f"dsv3{suffix}_ms" in results and f"hf{suffix}_ms" in results:
            results[f"ratio{suffix}"] = results[f"hf{suffix}_ms"] / results[f"dsv3{suffix}_ms"]
    save_results(f"moe_train_{args.preset}", results)


if __name__ == "__main__":
    main()
