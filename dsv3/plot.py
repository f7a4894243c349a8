"""`dsv3 plot RUN_DIR...`: PNG charts of training runs from their metrics.jsonl.

Charts: training and validation loss, MaxVio per MoE layer (training and validation), MTP top-1 accuracy per depth,
and the learning rate. Several run folders on one command overlay their curves, which is how the ablations in
docs/experiments.md are drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run folder."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} a `dsv3 train` output folder?")
    train, val = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not JSON") from None
        (val if "val_loss" in record else train).append(record)
    # A resumed run appends: keep the last record of each step.
    return _last_per_step(train), _last_per_step(val)


def _last_per_step(records: list[dict]) -> list[dict]:
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def plot_runs(runs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write loss.png, maxvio.png, mtp_accuracy.png and lr.png; returns the files written."""
    runs = [Path(r) for r in runs]
    out = Path(out) if out else runs[0]
    out.mkdir(parents=True, exist_ok=True)
    data = {r.name if len(runs) > 1 else "": read_metrics(r) for r in runs}
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (train, val) in data.items():
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=f"{label} train".strip(), alpha=0.6)
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label=f"{label} validation".strip())
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="Loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (train, val) in data.items():
        if train and train[0].get("maxvio"):
            for layer in range(len(train[0]["maxvio"])):
                ax.plot([r["tokens"] for r in train], [r["maxvio"][layer] for r in train], alpha=0.5,
                        label=f"{label} MoE layer {layer}".strip() if len(data) == 1 else None)
            mean = [sum(r["maxvio"]) / len(r["maxvio"]) for r in train]
            ax.plot([r["tokens"] for r in train], mean, "k-" if len(data) == 1 else "-", linewidth=2,
                    label=f"{label} mean over layers".strip())
        if val and val[0].get("val_maxvio"):
            ax.plot([r["tokens"] for r in val], [sum(r["val_maxvio"]) / len(r["val_maxvio"]) for r in val], "s--",
                    label=f"{label} validation mean".strip())
    ax.set(xlabel="tokens", ylabel="MaxVio = max load / mean load - 1", title="Expert load imbalance")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.legend(fontsize=7, ncol=2)
    save(fig, "maxvio.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (train, val) in data.items():
        if train and train[0].get("mtp_acc"):
            for k in range(len(train[0]["mtp_acc"])):
                ax.plot([r["tokens"] for r in train], [r["mtp_acc"][k] for r in train], alpha=0.6,
                        label=f"{label} train depth {k + 1}".strip())
        if val and val[0].get("val_mtp_acc"):
            for k in range(len(val[0]["val_mtp_acc"])):
                ax.plot([r["tokens"] for r in val], [r["val_mtp_acc"][k] for r in val], "o-",
                        label=f"{label} validation depth {k + 1}".strip())
    ax.set(xlabel="tokens", ylabel="top-1 accuracy", title="MTP accuracy (what a drafter would get right)")
    ax.legend(fontsize=8)
    save(fig, "mtp_accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    for label, (train, _) in data.items():
        ax.plot([r["step"] for r in train], [r["lr"] for r in train], label=label or None)
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    save(fig, "lr.png")
    return written


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw PNG charts of one or more training runs")
    p.add_argument("runs", nargs="+", help="run folders written by `dsv3 train`")
    p.add_argument("--out", help="folder for the PNGs (default: the first run folder)")

    def run(args) -> int:
        for path in plot_runs(args.runs, args.out):
            print(path)
        return 0

    p.set_defaults(func=run)
