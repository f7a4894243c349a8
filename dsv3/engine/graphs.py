"""CUDA graphs of the decode step: the main forward and the MTP drafter's, captured once per padded row count.

Notable features:
- A decode step launches hundreds of small kernels; replaying a captured graph launches them all in one call.
- Row counts are padded up to a bucket (1, 2, 4, 8, then multiples of 16); padding rows write to the scratch
  block and are masked out of the expert load, and their outputs are never read.
- Speculative steps whose requests are all plain greedy run main forward, verification argmax and drafter as one
  graph with a single host sync; other speculative steps replay the main graph, verify on the host, then the
  drafter's graph.
- All graphs share one memory pool and one set of static input buffers (rows, block tables of the full table width,
  next-token ids), so each step costs two host-to-device copies before the replay.
- Capture is lazy: a bucket is captured the first time a step of its size runs (after two warm-up runs on a side
  stream, which compile the Triton kernel and set up cuBLAS); warm-up and capture recompute exactly what the replay
  then writes, so capturing mid-generation is harmless.
"""

from __future__ import annotations

import torch

from .attention import LEN, Step
from .runner import HostRows, ModelRunner


def buckets(max_rows: int) -> list[int]:
    sizes = {n for n in (1, 2, 4, 8) if n < max_rows} | set(range(16, max_rows, 16)) | {max_rows}
    return sorted(sizes)


class CudaGraphs:
    def __init__(self, runner: ModelRunner, max_rows: int, width: int):
        self.runner = runner
        self.width = width
        self.sizes = buckets(max_rows)
        dev = runner.device
        self.rows = torch.zeros(max_rows, 6, dtype=torch.int64, device=dev)
        self.rows[:, LEN] = 1
        self.tables = torch.zeros(max_rows, width, dtype=torch.int64, device=dev)
        self.next_ids = torch.zeros(max_rows, dtype=torch.int64, device=dev)
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def _step(self, size: int) -> Step:
        return Step(self.rows[:size], self.tables, size, [], self.runner.use_triton)

    def _load_inputs(self, host: HostRows) -> int:
        size = host.rows.shape[0]
        self.rows[:size].copy_(host.rows, non_blocking=True)
        self.tables[: host.tables.shape[0]].copy_(host.tables, non_blocking=True)
        return size

    def main(self, host: HostRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replay the decode forward for host rows already padded to a bucket -> (logits, hidden, expert load)."""
        size = self._load_inputs(host)

        def fn():
            hidden, load = self.runner.forward(self._step(size))
            return self.runner.logits(hidden), hidden, load

        return self._replay(("main", size), fn)

    def mtp(self, size: int, next_ids: torch.Tensor) -> torch.Tensor:
        """Replay the drafter over the rows of the last `main` call of this size -> MTP logits [size, V]."""
        self.next_ids[: next_ids.shape[0]].copy_(next_ids, non_blocking=True)
        hidden = self.graphs[("main", size)][1][1]  # the main graph's static hidden-state output

        def fn():
            return (self.runner.logits(self.runner.forward_mtp(self._step(size), hidden, self.next_ids[:size])),)

        return self._replay(("mtp", size), fn)[0]

    def greedy_speculative(self, host: HostRows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay `ModelRunner.greedy_speculative` (main forward, drafter and both argmaxes) as one graph."""
        size = self._load_inputs(host)
        return self._replay(("greedy_speculative", size), lambda: self.runner.greedy_speculative(self._step(size)))

    def _replay(self, key: tuple[str, int], fn) -> tuple:
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn)
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs

    def _capture(self, fn) -> tuple[torch.cuda.CUDAGraph, tuple]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        self.pool = graph.pool()
        return graph, outputs

