"""Autotuned Triton kernels that also run under Triton's interpreter (the CPU tests), which cannot time
configurations: there a kernel keeps its first configuration, passed at launch by `fixed_meta`. Also the GEMV
tile choices of the decode expert kernels, and programmatic dependent launch for the decode step's kernels.

Programmatic dependent launch (Hopper): a kernel launched with it may be scheduled while the kernel before it
drains, which hides its launch latency, the gap between the ~20 short kernels of each decode layer. Each such kernel
begins with `pdl_prologue(PDL)`: wait until the previous kernel has finished and its writes are visible, before any
load or store, then let the next kernel launch. On for Hopper and newer GPUs (16b decode at batch 1: +15% tokens/s
with inductor's kernels launched the same way, docs/benchmarks.md); DSV3_PDL=0 turns it off. Never under the
interpreter, before sm_90, or where Triton lacks the grid-dependency ops.
"""

from __future__ import annotations

import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no triton, or one without grid dependency control
    gdc_wait = None

PDL = os.environ.get("DSV3_PDL", "1") != "0" and not INTERPRET and gdc_wait is not None

if gdc_wait is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

elif triton is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        pass


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (see the module docstring)."""
    return PDL and device.type == "cuda" and _capability(device.index) >= (9, 0)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_meta(device: torch.device) -> dict:
    """Launch arguments, on `device`, of a kernel that begins with `pdl_prologue(PDL)`."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


def autotuned(configs: list, key: list[str]):
    """triton.autotune(configs, key) on a GPU; under the interpreter the kernel as it is."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        return triton.autotune(configs, key=key)(kernel)

    return wrap


def fixed_meta(configs: list) -> dict:
    """Launch arguments of the first configuration under the interpreter; nothing where autotuning chooses."""
    return {**configs[0].kwargs, "num_warps": configs[0].num_warps} if INTERPRET else {}


# GEMV tiles (rows, reduction width, warps, stages) for Hopper bandwidth (H200, 132 SMs): a weight tile of 4-8K
# elements per loop step (8 bf16 per 16-byte load and thread), a few hundred programs at T = 1 for the 16b shapes
# (D 2048, I 1408). The decode kernels (`moe_decode`, `fp8_gemv`) choose among them; on the H200 the expert kernels
# took (4, 1024, 4, 3) for gate/up and (16, 128, 4, 6) for down at T = 1 (2026-11-29).
GEMV_TILES = [(16, 256, 4, 3), (8, 512, 4, 3), (32, 256, 8, 3), (16, 512, 8, 2), (32, 128, 4, 4), (4, 1024, 4, 3),
              (8, 256, 2, 4), (64, 128, 8, 4), (32, 512, 8, 3), (8, 1024, 8, 2), (16, 128, 4, 6)]


def gemv_configs(rows: str, cols: str) -> list:
    """GEMV_TILES as triton.Configs of a kernel whose row and reduction block sizes are named `rows` and `cols`."""
    return [triton.Config({rows: r, cols: c}, num_warps=w, num_stages=st) for r, c, w, st in GEMV_TILES]
