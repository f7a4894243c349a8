"""`dsv3 quickstart`: the whole pipeline on a 2-core CPU in minutes, with nothing to download.

1. Corpus: the Python standard library's own .py files on this machine, tokenised by a byte-level BPE of the tiny
   preset's vocabulary size trained on them (`dsv3 prepare`), validation split by file.
2. Training: the `tiny` preset (MLA, MoE with a shared expert and group-limited noaux_tc routing, MTP depth 1)
   with auxiliary-loss-free balancing. The bias update speed is raised from the report's 0.001 to 0.01: the report
   spreads its balancing over 15T tokens, this run has a few million.
3. The model lands in HF format under runs/quickstart/model with its tokenizer; samples come from the engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .prepare import prepare, stdlib_sources
from .train import TrainConfig, Trainer

PROMPTS = ["def ", "import os\n", "class Config:\n    def __init__(self"]


def quickstart(out: str | Path = "runs/quickstart", steps: int = 500, seed: int = 0, progress: bool = True) -> dict:
    out = Path(out)
    data = out / "data"
    t0 = time.perf_counter()
    if not (data / "index.json").is_file():
        sources = stdlib_sources()
        print(f"[1/3] corpus: {len(sources)} standard-library files -> {data}")
        prepare(sources, data, vocab_size=2048, val_fraction=0.02, workers=2, seed=seed)
    else:
        print(f"[1/3] corpus: reusing {data}")
    tc = TrainConfig(preset="tiny", data=str(data), out=str(out), seq_len=256, micro_batch=16, batch_size=16,
                     max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=30, bias_update_speed=0.01,
                     eval_interval=max(steps // 4, 1), eval_batches=8, save_interval=steps, log_interval=10,
                     keep_checkpoints=1, seed=seed)
    print(f"[2/3] training the tiny DeepSeek-V3 for {steps} steps of {tc.batch_size * tc.seq_len} tokens")
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, not an append to an old one
    Trainer(tc, progress=progress).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    summary = {
        "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"],
        "maxvio_first": _mean(train[0]["maxvio"]), "maxvio_last": _mean(train[-1]["maxvio"]),
        "val_loss": val[-1]["val_loss"], "val_bpb": val[-1]["val_bpb"],
        "val_mtp_acc": val[-1].get("val_mtp_acc"), "model": str(out / "model"),
    }
    print(f"      loss {summary['loss_first']:.2f} -> {summary['loss_last']:.2f}; MaxVio (mean over MoE layers) "
          f"{summary['maxvio_first']:.2f} -> {summary['maxvio_last']:.2f}; validation {summary['val_bpb']:.3f} "
          f"bits/byte, MTP top-1 accuracy {summary['val_mtp_acc'][0]:.1%}")
    print(f"[3/3] samples from {out / 'model'} (temperature 0.8, top-p 0.95):")
    for prompt, text in zip(PROMPTS, sample(out / "model", PROMPTS, seed=seed)):
        print("-" * 60 + f"\n{prompt}{text}")
    print("-" * 60 + f"\ndone in {time.perf_counter() - t0:.0f} s. Charts: dsv3 plot {out}")
    summary["seconds"] = time.perf_counter() - t0
    return summary


def sample(model_dir: Path, prompts: list[str], seed: int = 0, max_tokens: int = 80) -> list[str]:
    from .checkpoint import load_model
    from .engine import Engine, SamplingParams
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(model_dir)
    engine = Engine(load_model(model_dir), max_batch_size=len(prompts))
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed + i)
              for i in range(len(prompts))]
    done = engine.generate([tokenizer.encode(p) for p in prompts], params)
    return [tokenizer.decode(c.token_ids, skip_special=True) for c in done]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="prepare a corpus, train a tiny DeepSeek-V3 on the CPU, sample from it")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: quickstart(args.out, args.steps, args.seed) and 0)
