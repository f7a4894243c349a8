"""y = x W^T for a few rows of bf16 activations against an FP8 checkpoint's block-scaled weight (Triton), beside its
PyTorch reference: FP8 serving's linear layers at decode batch sizes.

At a handful of rows the FP8 GEMM path (`fp8_gemm.gemm`, as prefill uses it) spends a launch quantising the
activations and runs a GEMM tiled for many rows, for a product whose cost is reading the weight. This GEMV reads the
e4m3 weight once (half the bytes of bf16), scales each weight by its 128x128 block's scale as it loads it, and
keeps the activations in bf16 (W8A16, as the fused expert kernels of `moe_decode` do): one launch per layer. A
program computes a tile of outputs of one row, over the weight's contiguous reduction dim; the rows' programs for
one weight tile run together, so the weight comes from HBM once and from L2 for the other rows.

The same kernel for bf16 weights (a decode step's projections and router, and MLA's absorbed per-head products)
lost to cuBLAS on the 16b model even with programmatic dependent launch (0.94-1.01x, docs/benchmarks.md, session
14), so only FP8 checkpoints take it; bf16 attention projections take `ops.gemv`, which reads its weights before
it waits for the previous kernel.
"""

from __future__ import annotations

import torch

from ..fp8 import BLOCK, dequantize_blocks
from .gemv import MAX_ROWS, decode_rows  # noqa: F401 (MAX_ROWS: the row limit this GEMV serves up to)
from .tuning import autotuned, fixed_meta, gemv_configs, pdl_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the FP8 GEMM path (or its emulation) serves
    triton = None


def applies(x: torch.Tensor) -> bool:
    """Whether x [M, K] takes the GEMV: the decode rows of `gemv.decode_rows` (at most MAX_ROWS)."""
    return decode_rows(x)


def fp8_gemv_reference(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, n: int) -> torch.Tensor:
    # x: [M, K]; w: e4m3 [Np, Kp] (padded to whole blocks), w_scale_inv: [Np/128, Kp/128] -> [M, n] in x's dtype
    weight = dequantize_blocks(w, w_scale_inv)[:n, : x.shape[1]]  # fp32
    return (x.float() @ weight.t()).to(x.dtype)


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, n: int) -> torch.Tensor:
    """As fp8_gemv_reference, in one kernel launch (see `applies` for where it serves)."""
    m, k = x.shape
    np_, kp = w.shape
    if not (w.is_contiguous() and w_scale_inv.is_contiguous() and x.stride(1) == 1):
        raise ValueError("fp8_gemv wants a contiguous weight and scale grid, and x with contiguous rows")
    if np_ % BLOCK or kp % BLOCK or w_scale_inv.shape != (np_ // BLOCK, kp // BLOCK) or n > np_ or k > kp:
        raise ValueError(f"fp8_gemv: weight {tuple(w.shape)} with scales {tuple(w_scale_inv.shape)} is not a padded "
                         f"block-scaled [{n}, {k}] matrix")
    y = x.new_empty(m, n)
    _fp8_gemv_kernel[lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))](
        x, w, w_scale_inv, y, x.stride(0), n, k, kp, **fixed_meta(_CONFIGS), **pdl_meta(x.device))
    return y


if triton is not None:
    from .moe_decode import scaled_rows_dot
    from .tuning import pdl_prologue

    @triton.jit
    def _fp8_gemv_kernel(X, W, WS, Y, stride_x, N, K, KP, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
        # Program (row, tile): outputs [tile * BLOCK_N, +BLOCK_N) of one row of x. W rows are KP apart (padded),
        # their scale rows KP / 128 apart; the padding is zeros and K masks it anyway.
        pdl_prologue(PDL)
        row = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        out = scaled_rows_dot(X + row * stride_x, W + rows[:, None].to(tl.int64) * KP,
                              WS + (rows // 128)[:, None] * (KP // 128), rmask, K, True, BLOCK_N, BLOCK_K)
        tl.store(Y + row * N + rows, out.to(Y.dtype.element_ty), mask=rmask)

    _CONFIGS = gemv_configs("BLOCK_N", "BLOCK_K")
    _fp8_gemv_kernel = autotuned(_CONFIGS, ["N", "K"])(_fp8_gemv_kernel)
