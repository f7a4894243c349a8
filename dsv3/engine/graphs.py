"""The decode step at fixed row counts: CUDA graphs and torch.compile of the main forward and the MTP drafter.

Notable features:
- Decode-only steps are padded up to a bucket of rows (1, 2, 4, 8, then multiples of 16; times 1 + drafts when
  speculating, so that a bucket holds whole sequences of a greedy speculative step) and run one fixed-shape
  function per bucket; padding rows write to the scratch block and are masked out of the expert load, and their
  outputs are never read.
- CUDA graphs: a decode step launches hundreds of small kernels; replaying a captured graph launches them all in
  one call. Capture is lazy: a bucket is captured the first time a step of its size runs (after two warm-up runs on
  a side stream, which compile the Triton kernel and set up cuBLAS); warm-up and capture recompute exactly what the
  replay then writes, so capturing mid-generation is harmless.
- Steps with prompt rows (a short prompt, or a chunk of one, with decode rows or without) of up to 128 rows run
  as graphs too, in buckets of 16 to 128 rows past the decode ones: their rows are decode rows to the model, each
  attending over the cache it has just written (absorbed attention), so a prompt's first step replays one graph
  instead of launching ~1,000 eager kernels (20-30 ms of time to first token for the `small` model). These buckets
  are not compiled: a compilation per bucket would cost more than it saves.
- torch.compile (`compile=True`): each decode bucket's function is compiled whole (fullgraph=True, dynamic=False), which
  fuses the chains of small elementwise kernels (norms with their fp32 casts, rope, gate scoring, silu * up,
  residual adds) into a few; the compiled function is then captured like the eager one. Without CUDA graphs (the
  CPU) the buckets still apply and the compiled functions run directly.
- Steps whose requests are all plain greedy run main forward and argmax (speculating, also the drafter and its
  argmax) as one function that leaves the next step's rows in the input buffer, so the engine can replay it again
  at once; other speculative steps run the main function, verify on the host, then the drafter's.
- All functions share one set of static input buffers (rows, block tables of the full table width, next-token
  ids), so each step costs two host-to-device copies before the replay; captured graphs share one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.tuning import pdl_enabled
from .attention import LEN, Step
from .runner import HostRows, ModelRunner

Key = tuple[str, int]  # (kind of step, bucket)
PREFILL_SIZES = (16, 32, 64, 128)  # buckets past the decode ones, for steps with prompt rows (see the docstring)


def buckets(max_rows: int) -> list[int]:
    sizes = {n for n in (1, 2, 4, 8) if n < max_rows} | set(range(16, max_rows, 16)) | {max_rows}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_rows: int, width: int, capture: bool = True, compile: bool = False,
                 drafts: int = 0):
        self.runner = runner
        self.drafts = drafts  # drafts per sequence of a greedy speculative step (0: the engine does not speculate)
        self.width = width
        self.capture = capture
        self.compile = compile
        self.backend = "inductor"  # torch.compile's backend (the tests trace with "aot_eager", which is quicker)
        # A greedy speculative step lays each sequence out as 1 + drafts rows: buckets hold whole sequences.
        group = 1 + drafts
        self.sizes = [group * n for n in buckets(-(-max_rows // group))]
        self.decode_rows = self.sizes[-1]  # the largest decode bucket; larger ones are not compiled
        self.sizes += [n for n in PREFILL_SIZES if n > self.decode_rows]
        dev, most = runner.device, self.sizes[-1]
        self.rows = torch.zeros(most, 6, dtype=torch.int64, device=dev)
        self.rows[:, LEN] = 1
        self.tables = torch.zeros(most, width, dtype=torch.int64, device=dev)
        self.next_ids = torch.zeros(most, dtype=torch.int64, device=dev)
        self.fns: dict[Key, Callable] = {}  # the function of each step kind and bucket, compiled or not
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Key, tuple] = {}  # each function's latest outputs (the static ones of a captured graph)
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
        """Run the forward for host rows already padded to a bucket -> (logits, hidden, expert load). Prompt rows
        run as decode rows do (absorbed attention over the cache, which each row writes first)."""
        return self.run(("main", self._load_inputs(host)))

    def mtp(self, size: int, next_ids: torch.Tensor) -> torch.Tensor:
        """Run the drafter over the rows of the last `main` call of this size -> MTP logits [size, V]."""
        self.next_ids[: next_ids.shape[0]].copy_(next_ids, non_blocking=True)
        return self.run(("mtp", size))[0]

    def greedy(self, host: HostRows | None, size: int, speculative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run `ModelRunner.greedy_step` of this bucket as one function, speculating with `self.drafts` drafts per
        sequence or not: over `host`'s rows, or with host None over the rows the previous greedy step of this bucket
        left for its successor. -> (argmaxes (and drafts) [1 or 2, size], routing)"""
        if host is not None:
            self._load_inputs(host)
        return self.run(("greedy_speculative" if speculative else "greedy", size))

    def step_fn(self, key: Key) -> Callable[..., tuple]:
        """The plain (uncompiled) function of a step kind and bucket, reading the static input buffers."""
        kind, size = key
        step, runner = self._step(size), self.runner
        if kind == "main":
            def fn():
                hidden, load = runner.forward(step)
                return runner.logits(hidden), hidden, load
        elif kind == "mtp":
            next_ids = self.next_ids[:size]

            def fn(hidden):  # the main function's hidden state output of this bucket
                return (runner.logits(runner.forward_mtp(step, hidden, next_ids)),)
        elif kind in ("greedy", "greedy_speculative"):
            drafts = self.drafts if kind == "greedy_speculative" else 0

            def fn():
                return runner.greedy_step(step, drafts)
        else:
            raise ValueError(f"unknown decode step kind {kind!r}")
        return fn

    def run(self, key: Key) -> tuple:
        args = (self.outputs[("main", key[1])][1],) if key[0] == "mtp" else ()
        if key in self.fns:
            if self.capture:
                self.graphs[key].replay()
            else:
                self.outputs[key] = self.fns[key](*args)
            return self.outputs[key]
        fn = self.step_fn(key)
        if self.compile and key[1] <= self.decode_rows:
            # inductor's kernels launch as dsv3's decode kernels do (programmatic dependent launch on Hopper): 16b
            # decode at batch 1 measured +15% with both, +8% with inductor's alone (docs/benchmarks.md).
            pdl = self.backend == "inductor" and pdl_enabled(self.runner.device)
            options = {"triton.enable_pdl": True} if pdl else None
            fn = torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False, options=options)
        self.fns[key] = fn
        # Every bucket is one more graph of the same Python function: lift dynamo's limit on graphs per function
        # (8 by default, past which it would run the larger buckets eagerly) to twice the buckets, room for a second
        # engine in the process.
        limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.sizes))
        with torch._dynamo.config.patch(recompile_limit=limit):
            if self.capture:
                # A greedy step rewrites its input rows (`ModelRunner.greedy_step`): each warm-up run starts from
                # the rows this step was called with, and so does the replay.
                rows = self.rows.clone()
                self.graphs[key], self.outputs[key] = self._capture(fn, args, lambda: self.rows.copy_(rows))
                self.graphs[key].replay()
            else:
                self.outputs[key] = fn(*args)
        return self.outputs[key]

    def _capture(self, fn, args: tuple, reset: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, tuple]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # the first call compiles, when compiling
                reset()
                fn(*args)
            reset()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(*args)
        self.pool = graph.pool()
        return graph, outputs
