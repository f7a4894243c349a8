"""How many kernels one decode step launches: the aten ops of the eager step, the kernel calls of the compiled one.

    python -m benchmarks.decode_kernels --preset 1b --batch 1                # eager census (CPU or CUDA)
    python -m benchmarks.decode_kernels --preset 1b --batch 1 --compile      # and the torch.compile'd step
    python -m benchmarks.decode_kernels --preset 16b --compile --trace       # and its CUDA graph's kernel timeline
    python -m benchmarks.decode_kernels --preset small --compile --trace --speculative   # the MTP speculative step

The step is the function the engine's CUDA graph captures for a bucket of `batch` greedy decode rows: the two input
copies, the main forward over the paged cache at `--context` cached tokens, the head, the argmax, the next step's
rows and the expert load. It is counted
three ways:
- aten census (any device): a TorchDispatchMode records every aten op the eager step dispatches, per region
  (embedding and rope, each layer, head). Views and allocations launch nothing and are listed apart; every other op
  is about one kernel. The Triton MLA decode kernel (CUDA) is no aten op: add one kernel per layer there.
- compiled calls (--compile, any device): the wrapper inductor generates for the step, its calls counted by kind
  (fused kernels it generated, extern GEMMs, aten fallbacks, custom ops such as the Triton MLA decode).
- device kernels (CUDA only): what the profiler sees on the GPU for one step, eager and compiled, with their summed
  device time (what a graph replay of the step costs without launch gaps) and the kernels that take most of it.
- graph timeline (--trace, CUDA only): the step captured in a CUDA graph as the engine runs it, one replay under
  the profiler: every kernel in launch order with its start and duration, the replay's span (first start to last
  end: the step's real device time) against the summed kernel time, and the idle gaps between kernels. Kernels
  launched with programmatic dependent launch overlap their predecessor's tail, so their durations sum to more
  than the span they cover.
`--speculative` counts the speculative step of greedy requests instead (`ModelRunner.greedy_step`): each
sequence feeds its last token and a draft (`--speculative-tokens K`: K drafts), and the step runs the main forward,
the verification, the drafter (chained K - 1 more times) and their argmaxes.
Weights are random (drawn on the device); the counts do not depend on them, nor on the context length.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3
from benchmarks.common import kernel_profile, save_results
from benchmarks.decode import random_model
from dsv3.engine import Engine, SamplingParams
from dsv3.engine.cache import blocks_for
from dsv3.engine.graphs import DecodeGraphs
from dsv3.engine.request import Request
from dsv3.engine.runner import HostRows, Work, rows_for

BLOCK_SIZE = 64
ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided"}


def launches_nothing(func: torch._ops.OpOverload) -> bool:
    """Views (every output aliases an input, nothing written) and bare allocations run no kernel."""
    if func.overloadpacket.__name__ in ALLOCATIONS or func.overloadpacket.__name__ == "_unsafe_view":
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class Census(TorchDispatchMode):
    """Counts the aten ops dispatched under it, by region (set by module hooks) and by op name."""

    def __init__(self):
        super().__init__()
        self.region = "embedding, rope"
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.free: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.free if launches_nothing(func) else self.ops)[self.region][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def enter(self, region: str):
        def hook(module, args, kwargs=None):
            self.region = region
        return hook


def decode_inputs(engine: Engine, graphs: DecodeGraphs, batch: int, context: int, fed: int = 1) -> HostRows:
    """The rows of one decode step of `batch` sequences with `context` tokens cached (the cache holds zeros), each
    feeding `fed` tokens (2: its last token and a draft)."""
    gen = torch.Generator().manual_seed(0)
    works = []
    for i in range(batch):
        prompt = torch.randint(0, engine.cfg.vocab_size, (context + fed,), generator=gen).tolist()
        req = Request(f"r{i}", prompt, SamplingParams(max_tokens=1, temperature=0), frozenset())
        if not engine.cache.reserve(req.blocks, context + fed):
            raise ValueError(f"the cache holds too few blocks for {batch} sequences of {context + fed} tokens")
        works.append(Work(req, prompt[context:], context, decode=True))
    return rows_for(works, engine.cache, pad_to=graphs.bucket(batch * fed), width=graphs.width)


def step_of(graphs: DecodeGraphs, speculative: bool):
    """The step function counted: the engine's greedy decode step (`ModelRunner.greedy_step`), plain or speculative.
    Each call loads its input rows afresh, so the rows it rewrites for the next step are never fed on."""
    return lambda host: graphs.greedy(host, host.rows.shape[0], speculative)


def census(engine: Engine, step, host: HostRows) -> dict:
    with torch.no_grad():
        # One step first: on CUDA the first call autotunes the Triton kernels, whose trial runs zero their outputs
        # (46,587 zero_ calls in a census of a cold 1b speculative step).
        step(host)
    mode = Census()
    model = engine.model
    hooks = [layer.register_forward_pre_hook(mode.enter(f"layer {i}")) for i, layer in enumerate(model.layers)]
    hooks.append(model.norm.register_forward_pre_hook(mode.enter("norm, head, expert load")))
    try:
        with torch.no_grad(), mode:
            step(host)
    finally:
        for h in hooks:
            h.remove()
    per_region = {r: sum(c.values()) for r, c in mode.ops.items()}
    total = collections.Counter()
    for c in mode.ops.values():
        total.update(c)
    return {"aten_ops": sum(total.values()), "aten_ops_by_region": per_region,
            "top_ops": dict(total.most_common(25)),
            "views_and_allocations": sum(sum(c.values()) for c in mode.free.values()),
            "ops_by_layer_kind": {name: dict(mode.ops[name].most_common()) for name in _layer_examples(engine)}}


def _layer_examples(engine: Engine) -> list[str]:
    """The first dense and the first MoE layer: every other layer of its kind runs the same ops."""
    cfg = engine.cfg
    dense = next((i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)), None)
    moe = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), None)
    return [f"layer {i}" for i in (dense, moe) if i is not None]


# A statement of the wrapper that launches something, perhaps assigning its result: a generated Triton (`.run(`) or
# C++ (`cpp_fused...(`) kernel, an extern kernel (GEMMs), a custom or aten op.
CALL = re.compile(r"^\s+(?:[\w, ]+ = )?(?:(\w+)\.run\(|(cpp_fused\w*)\(|extern_kernels\.(\w+)\(|"
                  r"(torch\.ops\.\w+\.\w+)|aten\.(\w+))")


def compiled_calls(code: str) -> dict:
    """Kernel calls in the `call` function of inductor's generated wrapper, by kind."""
    body = code[code.index("def call(self, args)"):]
    kinds = collections.Counter()
    for line in body.splitlines():
        m = CALL.match(line)
        if m:
            generated, cpp, extern, op, aten = m.groups()
            if generated or cpp:
                kinds["generated kernels"] += 1
            elif extern:
                kinds[f"extern {extern}"] += 1
            else:
                kinds[op or f"aten.{aten}"] += 1
    return {"kernel_calls": sum(kinds.values()), "by_kind": dict(kinds.most_common())}


def graph_timeline(step, host: HostRows, device: torch.device) -> dict:
    """One profiled replay of the step's CUDA graph: its kernels in order, (name, start, duration) in us."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):  # capture, then warm replays
            step(host)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(host)
        torch.cuda.synchronize(device)
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and "Memcpy" not in e.name),
                    key=lambda e: e.time_range.start)
    t0 = events[0].time_range.start
    end = max(e.time_range.end for e in events)
    gaps, reach = 0.0, t0
    for e in events:  # idle time: stretches no kernel covers
        gaps += max(0.0, e.time_range.start - reach)
        reach = max(reach, e.time_range.end)
    return {"kernels": len(events), "span_us": end - t0,
            "kernel_sum_us": sum(e.time_range.elapsed_us() for e in events), "idle_us": gaps,
            "timeline": [(e.name[:70], round(e.time_range.start - t0, 2), round(e.time_range.elapsed_us(), 2))
                         for e in events]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", help="a random model of this preset (1b)")
    p.add_argument("--batch", type=int, default=1, help="decode rows in the step (1)")
    p.add_argument("--context", type=int, default=128, help="cached tokens per sequence (128)")
    p.add_argument("--compile", action="store_true", help="also count the torch.compile'd step")
    p.add_argument("--trace", action="store_true",
                   help="CUDA: also the kernel timeline of one replay of the step's CUDA graph")
    p.add_argument("--device", default=None, help="cuda or cpu (cuda when available)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep this many layers (a 16b census on a CPU's memory: the counts are per layer)")
    p.add_argument("--speculative", action="store_true",
                   help="the greedy speculative step (last token and drafts per sequence, drafter included)")
    p.add_argument("--speculative-tokens", type=int, default=1,
                   help="drafts per sequence of the speculative step (past the first, the drafter chained)")
    args = p.parse_args()
    fed = 1 + args.speculative_tokens if args.speculative else 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dsv3.ModelConfig.preset(args.preset, **({} if args.layers is None else {"num_hidden_layers": args.layers}))
    t0 = time.perf_counter()
    model = random_model(cfg, device, torch.bfloat16)  # bf16 on any device: its casts are the GPU's kernels
    print(f"{args.preset}: random weights on {device} in {time.perf_counter() - t0:.0f} s", flush=True)
    per_seq = blocks_for(args.context + fed, BLOCK_SIZE)
    engine = Engine(model, max_batch_size=args.batch, block_size=BLOCK_SIZE, num_blocks=args.batch * per_seq,
                    max_seq_len=args.context + fed, cuda_graphs=False, speculative=args.speculative)
    width = blocks_for(engine.max_seq_len, BLOCK_SIZE)
    rows = args.batch * fed
    eager = DecodeGraphs(engine.runner, rows, width, capture=False, drafts=fed - 1)
    host = decode_inputs(engine, eager, args.batch, args.context, fed)
    results = {"preset": args.preset, "batch": args.batch, "context": args.context, "device": str(device),
               "speculative": args.speculative, "drafts": fed - 1, "layers": cfg.num_hidden_layers,
               "decode_kernel": engine.metrics()["decode_kernel"]}
    results["eager"] = census(engine, step_of(eager, args.speculative), host)
    if device.type == "cuda":
        with torch.no_grad():
            results["eager"]["device"] = kernel_profile(lambda: step_of(eager, args.speculative)(host), device)
    if args.compile:
        from torch._inductor.utils import run_and_get_code

        compiled = DecodeGraphs(engine.runner, rows, width, capture=False, compile=True, drafts=fed - 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            _, codes = run_and_get_code(step_of(compiled, args.speculative), host)
        wrapper = next(c for c in codes if "def call(self, args)" in c)
        results["compiled"] = {"compile_seconds": time.perf_counter() - t0, **compiled_calls(wrapper)}
        if args.trace:  # the generated code beside the timeline, to map its kernels to the model's ops
            out = Path(os.environ.get("OUT") or "runs/benchmarks")
            out.mkdir(parents=True, exist_ok=True)
            (out / f"decode_step_{args.preset}_b{args.batch}_inductor.py").write_text(wrapper)
        if device.type == "cuda":
            with torch.no_grad():
                results["compiled"]["device"] = kernel_profile(
                    lambda: step_of(compiled, args.speculative)(host), device)
    if args.trace and device.type == "cuda":
        graphs = DecodeGraphs(engine.runner, rows, width, capture=True, compile=args.compile, drafts=fed - 1)
        results["graph_timeline"] = graph_timeline(step_of(graphs, args.speculative), host, device)
    kind = "" if not args.speculative else "_speculative" + (f"{fed - 1}" if fed > 2 else "")
    save_results(f"decode_kernels_{args.preset}_b{args.batch}{kind}", results)


if __name__ == "__main__":
    main()
