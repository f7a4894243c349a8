"""`dsv3 cost`: the GPU-hours and dollars of training a configuration on a number of tokens.

Notable features:
- One relation, GPU-hours = tokens x training FLOPs per token / (MFU x peak FLOP/s x 3600), solved for whichever
  of MFU, GPU-hours or tokens/s per GPU is unknown: give one (`--mfu`, `--gpu-hours`, `--tokens-per-sec-per-gpu`)
  and the others follow, so the report's 180K GPU-hours per trillion tokens turns into the MFU it implies.
- Training FLOPs per token come from `info.model_stats`: 3 x forward, attention at the sequence length included,
  MTP included when the config has it.
- Token and hour counts read like people write them: 14.8T, 469B, 180K, 1e9, 2_000_000.
- Peak defaults to 989 TFLOP/s, the dense bf16 peak of an H800 / H100 SXM; `--fp8` doubles it (the FP8 peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .info import add_model_args, config_from_args, human_count, human_flops, model_stats

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
H800_BF16_TFLOPS = 989.0


def parse_count(text: str) -> float:
    """'14.8T' -> 1.48e13; suffixes K, M, B (or G), T in either case; plain numbers and 1e9 too."""
    s = str(text).strip().replace(",", "")
    scale = 1.0
    if s and s[-1].upper() in SUFFIXES:
        scale, s = SUFFIXES[s[-1].upper()], s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a count (examples: 14.8T, 100M, 180K, 1e9)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a count must be a positive finite number, got {text!r}")
    return value


def parse_tokens(text: str) -> int:
    return round(parse_count(text))


@dataclass(frozen=True)
class Cost:
    tokens: int
    flops_per_token: float
    total_flops: float
    peak_flops: float  # per GPU, FLOP/s
    mfu: float
    tokens_per_sec_per_gpu: float
    gpu_hours: float
    dollars: float
    days: float | None  # wall clock on `gpus` GPUs, when given


def training_cost(flops_per_token: float, tokens: float, peak_tflops: float = H800_BF16_TFLOPS, *,
                  mfu: float | None = None, gpu_hours: float | None = None,
                  tokens_per_sec_per_gpu: float | None = None, price_per_gpu_hour: float = 2.0,
                  gpus: int | None = None) -> Cost:
    """The cost of `tokens` training tokens; exactly one of mfu, gpu_hours, tokens_per_sec_per_gpu is given."""
    given = {name: v for name, v in (("mfu", mfu), ("gpu_hours", gpu_hours),
                                     ("tokens_per_sec_per_gpu", tokens_per_sec_per_gpu)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of mfu, gpu_hours, tokens_per_sec_per_gpu (got {list(given) or 'none'})")
    positive = {"flops_per_token": flops_per_token, "tokens": tokens, "peak_tflops": peak_tflops, **given}
    for name, v in positive.items():
        if not v > 0:  # NaN fails too
            raise ValueError(f"{name} must be positive, got {v}")
    if mfu is not None and mfu > 1:
        raise ValueError(f"mfu is a fraction of the peak and cannot exceed 1, got {mfu}")
    if price_per_gpu_hour < 0:
        raise ValueError(f"price per GPU-hour must be >= 0, got {price_per_gpu_hour}")
    if gpus is not None and gpus <= 0:
        raise ValueError(f"gpus must be positive, got {gpus}")
    peak = peak_tflops * 1e12
    total = tokens * flops_per_token
    if mfu is not None:
        gpu_hours = total / (mfu * peak * 3600)
    elif tokens_per_sec_per_gpu is not None:
        gpu_hours = tokens / (tokens_per_sec_per_gpu * 3600)
    mfu = total / (gpu_hours * 3600 * peak)
    return Cost(tokens=round(tokens), flops_per_token=flops_per_token, total_flops=total, peak_flops=peak, mfu=mfu,
                tokens_per_sec_per_gpu=tokens / (gpu_hours * 3600), gpu_hours=gpu_hours,
                dollars=gpu_hours * price_per_gpu_hour, days=gpu_hours / gpus / 24 if gpus else None)


def _amount(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_cost(c: Cost, title: str) -> str:
    rows = [
        ("tokens", human_count(c.tokens)),
        ("training FLOPs per token", human_flops(c.flops_per_token)),
        ("total FLOPs", f"{c.total_flops:.3e}"),
        ("peak per GPU", f"{c.peak_flops / 1e12:g} TFLOP/s"),
        ("MFU", f"{100 * c.mfu:.2f}%"),
        ("tokens/s per GPU", f"{c.tokens_per_sec_per_gpu:,.0f}"),
        ("GPU-hours", _amount(c.gpu_hours)),
        ("GPU-hours per 1T tokens", _amount(c.gpu_hours * 1e12 / c.tokens)),
        ("cost", f"${_amount(c.dollars)}"),
    ]
    if c.days is not None:
        rows.append(("wall clock", f"{c.days:,.1f} days"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join([title, *(f"{k:<{width}}{v}" for k, v in rows)])


def register(sub) -> None:
    p = sub.add_parser("cost", help="GPU-hours and dollars to train a configuration on N tokens")
    add_model_args(p)
    p.add_argument("--tokens", required=True, help="training tokens, e.g. 14.8T, 469B, 1e12")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--mfu", type=float, help="model FLOPs utilisation, a fraction of the peak (0.4)")
    how.add_argument("--tokens-per-sec-per-gpu", type=float, help="measured training throughput per GPU")
    how.add_argument("--gpu-hours", help="GPU-hours spent (e.g. 180K): prints the MFU they imply")
    p.add_argument("--peak-tflops", type=float, default=H800_BF16_TFLOPS,
                   help="dense peak per GPU in TFLOP/s (989: H800/H100 SXM bf16)")
    p.add_argument("--fp8", action="store_true", help="take twice the peak (the FP8 tensor-core rate)")
    p.add_argument("--gpu-hour-price", type=float, default=2.0, help="dollars per GPU-hour (2.0)")
    p.add_argument("--gpus", type=int, help="GPUs in the cluster, for the wall-clock time")

    def run(args) -> int:
        cfg, source = config_from_args(args)
        stats = model_stats(cfg, args.seq_len)
        cost = training_cost(
            stats.train_flops_per_token, parse_tokens(args.tokens), args.peak_tflops * (2 if args.fp8 else 1),
            mfu=args.mfu, tokens_per_sec_per_gpu=args.tokens_per_sec_per_gpu,
            gpu_hours=parse_count(args.gpu_hours) if args.gpu_hours is not None else None,
            price_per_gpu_hour=args.gpu_hour_price, gpus=args.gpus)
        print(format_cost(cost, f"{source}, seq {args.seq_len}"))
        return 0

    p.set_defaults(func=run)
