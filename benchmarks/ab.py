"""Two builds of dsv3 against each other on one device: one benchmark command run over each source tree in turn,
the order alternating from round to round (A B, then B A, ...) so that warm-up, clocks and the machine's drift fall
on both builds alike, then each build's median of one result field and their ratio.

    git archive OLD dsv3 benchmarks | tar -x -C /tmp/old      # a tree: a folder holding dsv3/ and benchmarks/
    python -m benchmarks.ab --trees /tmp/old . --rounds 2 --field runs.0.dsv3_decode_tokens_per_s -- \\
        benchmarks.decode --preset 16b --batch 1 --no-hf --new-tokens 128 --compile --repeats 3

Why: between two device machines the same 16b decode build measured 7% apart, and on one GPU the build run
second has come out ahead of the one run first (docs/benchmarks.md, session 16), so a comparison is only worth its
rows when both builds ran on the same GPU in both orders. Each run is `python -m MODULE ARGS` with the tree as
working directory and first on the import path, and its own $OUT; the field is read from the JSON the run wrote
there (a dotted path, numbers indexing lists). Results: `ab_<module>.json` under $OUT, every run's value included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import save_results


def field(data, path: str):
    """The value at a dotted path of JSON data: keys, or indices into lists."""
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def run_once(tree: Path, command: list[str], path: str, timeout: float) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "OUT": out}
        done = subprocess.run([sys.executable, "-m", *command], cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed in {tree} (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results = sorted(Path(out).glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not results:
            raise SystemExit(f"{' '.join(command)} in {tree} wrote no JSON results under $OUT")
        return float(field(json.loads(results[-1].read_text()), path))


def compare(trees: list[Path], command: list[str], path: str, rounds: int, timeout: float) -> dict:
    values: dict[int, list[float]] = {0: [], 1: []}
    order_run = []
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            values[i].append(run_once(trees[i], command, path, timeout))
            order_run.append(i)
            print(f"round {r + 1}: {'AB'[i]} {trees[i]}: {values[i][-1]:.4g}", flush=True)
    medians = [statistics.median(values[i]) for i in (0, 1)]
    return {"command": command, "field": path, "rounds": rounds, "order": "".join("AB"[i] for i in order_run),
            "trees": [str(t) for t in trees], "values": [values[0], values[1]], "medians": medians,
            "ratio_b_over_a": medians[1] / medians[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"), help="two source trees")
    p.add_argument("--field", required=True, help="dotted path of the compared number in the run's JSON")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running both builds (2: A B B A)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE ARGS...: the benchmark to run")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("give the benchmark after --, e.g. -- benchmarks.decode --preset 16b --no-hf")
    for tree in args.trees:
        if not (tree / "dsv3").is_dir():
            raise SystemExit(f"{tree} holds no dsv3/ package: a tree is a folder with dsv3/ and benchmarks/")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    trees = [t.resolve() for t in args.trees]
    results = compare(trees, command, args.field, args.rounds, args.timeout)
    save_results(f"ab_{command[0].rsplit('.', 1)[-1]}", results)
    print(f"A {results['medians'][0]:.4g}  B {results['medians'][1]:.4g}  B/A {results['ratio_b_over_a']:.4f}")


if __name__ == "__main__":
    main()
