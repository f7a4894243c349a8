"""Shared helpers for the benchmarks: timing on the device, machine facts, and a results file under $OUT."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of fn() after warm-up, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class GpuMonitor:
    """SM clock and board power of the current CUDA device while the block runs, sampled by nvidia-smi every 200 ms.

    H200s under long GEMMs run at their power limit (700 W) and lower their SM clock to stay under it, each chip by
    its own amount: the same build's tokens/s differed by up to ~4% between GPUs (docs/benchmarks.md, session 23),
    so each timed row records what its GPU ran at. `summary()` is None where nvidia-smi is missing."""

    def __init__(self, device: torch.device):
        self.samples: list[tuple[float, float, float]] = []  # (SM MHz, W, limit W)
        self.proc, self.cmd = None, None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.cmd = ["nvidia-smi", "-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", "-lms", "200",
                        "--query-gpu=clocks.sm,power.draw,power.limit", "--format=csv,noheader,nounits"]

    def __enter__(self):
        if self.cmd is not None:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(tuple(float(x) for x in line.split(",")))
            except ValueError:  # "[N/A]" fields
                pass

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=5)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        mhz, watts, limit = zip(*self.samples)
        return {"sm_mhz_mean": round(sum(mhz) / len(mhz)), "sm_mhz_min": round(min(mhz)),
                "power_w_mean": round(sum(watts) / len(watts), 1), "power_limit_w": limit[-1], "samples": len(mhz)}


def kernel_profile(fn, device: torch.device, top: int = 15) -> dict:
    """The GPU kernels (and copies) of one call of fn, after a warm-up call: their count, summed device time, and
    the `top` names by summed time with their launch counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in events:
        name = e.name[:90]
        us[name] = us.get(name, 0.0) + e.time_range.elapsed_us()
        calls[name] = calls.get(name, 0) + 1
    ranked = sorted(us, key=us.get, reverse=True)[:top]
    return {"kernels": len(events), "device_us": sum(us.values()),
            "top_kernels_by_time": {n: {"us": round(us[n], 1), "calls": calls[n]} for n in ranked}}


def hf_config(cfg):
    """transformers' DeepseekV3Config of a dsv3 ModelConfig (the peer's model of the same shapes)."""
    import transformers

    return transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")})


def machine() -> dict:
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def save_results(name: str, results: dict) -> None:
    """Print the results as JSON and keep a copy under $OUT (the device tool's folder) or ./runs/benchmarks."""
    out = Path(os.environ.get("OUT") or "runs/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **results}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
