"""Autotuned Triton kernels that also run under Triton's interpreter (the CPU tests), which cannot time
configurations: there a kernel keeps its first configuration, passed at launch by `fixed_meta`. Also the GEMV
tile choices of the decode expert kernels."""

from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def autotuned(configs: list, key: list[str]):
    """triton.autotune(configs, key) on a GPU; under the interpreter the kernel as it is."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        import triton

        return triton.autotune(configs, key=key)(kernel)

    return wrap


def fixed_meta(configs: list) -> dict:
    """Launch arguments of the first configuration under the interpreter; nothing where autotuning chooses."""
    return {**configs[0].kwargs, "num_warps": configs[0].num_warps} if INTERPRET else {}


# GEMV tiles (rows, reduction width, warps, stages), guesses for Hopper bandwidth (H200, 132 SMs) untuned on
# hardware: a weight tile of 4-8K elements per loop step (8 bf16 per 16-byte load and thread), a few hundred
# programs at T = 1 for the 16b shapes (D 2048, I 1408). The expert kernels (`moe_decode`) choose among them.
GEMV_TILES = [(16, 256, 4, 3), (8, 512, 4, 3), (32, 256, 8, 3), (16, 512, 8, 2), (32, 128, 4, 4), (4, 1024, 4, 3),
              (8, 256, 2, 4), (64, 128, 8, 4), (32, 512, 8, 3), (8, 1024, 8, 2), (16, 128, 4, 6)]


def gemv_configs(rows: str, cols: str) -> list:
    """GEMV_TILES as triton.Configs of a kernel whose row and reduction block sizes are named `rows` and `cols`."""
    import triton

    return [triton.Config({rows: r, cols: c}, num_warps=w, num_stages=st) for r, c, w, st in GEMV_TILES]
