"""y = x W^T for a few rows (Triton), beside its PyTorch reference: the linear layers of a decode step, which read
a weight to produce a handful of rows.

At a handful of rows the cost of a linear layer is reading its weight. The kernel reads it once along its
contiguous reduction dim: a program computes a tile of outputs of one row, and the rows' programs for one weight
tile run together, so the weight comes from HBM once and from L2 for the other rows.

- FP8 checkpoints (`Fp8WeightLinear`): the e4m3 weight as stored, each weight scaled by its 128x128 block's scale
  as it is loaded, against bf16 activations (W8A16, as the fused expert kernels of `moe_decode` do). One launch
  where the FP8 GEMM path (`fp8_gemm.gemm`, as prefill uses it) spends one quantising the activations and runs a
  GEMM tiled for many rows. Always on where it applies.
- bf16/fp16/fp32 weights (`linear`, which the model's decode-time projections and the router's fp32 logits call):
  an alternative to cuBLAS's M = 1 GEMMs, which take ~6 us per small weight in a CUDA graph whoever runs them
  (docs/benchmarks.md, "Triton GEMVs ... removed"). With programmatic dependent launch (`tuning.pdl_meta`) a Triton
  kernel's launch overlaps the previous kernel's tail, which cuBLAS's launches here may not. Off unless DSV3_GEMV=1
  until measured on a GPU; off, `linear` is F.linear.

Under torch.compile the kernel is the opaque custom op `dsv3::gemv`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..fp8 import BLOCK, dequantize_blocks
from .tuning import INTERPRET, autotuned, fixed_meta, gemv_configs, pdl_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear and the FP8 GEMM path (or its emulation) serve
    triton = None

MAX_ROWS = 4  # rows up to which a decode step takes the GEMV: each more row re-reads the weight from L2
PLAIN = os.environ.get("DSV3_GEMV", "0") == "1"  # plain (unscaled) weights through the GEMV too; see above
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def applies(x: torch.Tensor) -> bool:
    """Whether x [M, K] takes the GEMV: few rows of a float dtype, Triton on CUDA (or its interpreter), no autograd."""
    return (triton is not None and (x.is_cuda or INTERPRET) and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype in _DTYPES and not torch.is_grad_enabled() and not isinstance(x, DTensor))


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs the GEMV: DSV3_GEMV=1, `applies` to x's rows, a plain contiguous weight."""
    return (PLAIN and applies(x.reshape(-1, x.shape[-1])) and weight.dtype in _DTYPES and weight.is_contiguous()
            and not isinstance(weight, DTensor))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight in x's dtype, bias), through the GEMV where `takes` (x: [..., K], weight [N, K]): the
    weight is read in its own dtype, the products summed in fp32, the result in x's dtype."""
    if not takes(x, weight):
        return F.linear(x, weight.to(x.dtype), bias)
    y = gemv(x.reshape(-1, x.shape[-1]), weight, None, weight.shape[0])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemv_reference(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor | None, n: int) -> torch.Tensor:
    # x: [M, K]; w: [N, K], or e4m3 [Np, Kp] (padded to whole blocks) with w_scale_inv [Np/128, Kp/128]
    # -> [M, n] in x's dtype, accumulated in fp32
    weight = w.float() if w_scale_inv is None else dequantize_blocks(w, w_scale_inv)
    return (x.float() @ weight[:n, : x.shape[1]].t()).to(x.dtype)


def gemv(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor | None, n: int) -> torch.Tensor:
    """As gemv_reference, in one kernel launch (see `applies` for where it serves)."""
    if torch.compiler.is_compiling():
        return torch.ops.dsv3.gemv(x, w, w_scale_inv, n)
    return _gemv(x, w, w_scale_inv, n)


def _gemv(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor | None, n: int) -> torch.Tensor:
    m, k = x.shape
    rows, kp = w.shape
    if not (w.is_contiguous() and x.stride(1) == 1 and (w_scale_inv is None or w_scale_inv.is_contiguous())):
        raise ValueError("gemv wants a contiguous weight and scale grid, and x with contiguous rows")
    if w_scale_inv is not None and (rows % BLOCK or kp % BLOCK or w_scale_inv.shape != (rows // BLOCK, kp // BLOCK)):
        raise ValueError(f"gemv: weight {tuple(w.shape)} with scales {tuple(w_scale_inv.shape)} is not a padded "
                         f"block-scaled matrix")
    if n > rows or k > kp:
        raise ValueError(f"gemv: x [{m}, {k}] and {n} outputs do not fit the weight {tuple(w.shape)}")
    y = x.new_empty(m, n)
    scales = w if w_scale_inv is None else w_scale_inv  # unread when unscaled
    _gemv_kernel[lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))](
        x, w, scales, y, x.stride(0), n, k, kp, SCALED=w_scale_inv is not None, **fixed_meta(_CONFIGS),
        **pdl_meta(x.device))
    return y


@torch.library.custom_op("dsv3::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor | None, n: int) -> torch.Tensor:
    return _gemv(x, w, w_scale_inv, n)


@_gemv_op.register_fake
def _(x, w, w_scale_inv, n):
    return x.new_empty(x.shape[0], n)


if triton is not None:
    from .moe_decode import scaled_rows_dot
    from .tuning import pdl_prologue

    @triton.jit
    def _gemv_kernel(X, W, WS, Y, stride_x, N, K, KP, SCALED: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # Program (row, tile): outputs [tile * BLOCK_N, +BLOCK_N) of one row of x. W rows are KP apart (padded for
        # FP8, whose scale rows are KP / 128 apart; the padding is zeros and K masks it anyway).
        pdl_prologue(PDL)
        row = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        out = scaled_rows_dot(X + row * stride_x, W + rows[:, None].to(tl.int64) * KP,
                              WS + (rows // 128)[:, None] * (KP // 128), rmask, K, SCALED, BLOCK_N, BLOCK_K)
        tl.store(Y + row * N + rows, out.to(Y.dtype.element_ty), mask=rmask)

    _CONFIGS = gemv_configs("BLOCK_N", "BLOCK_K")
    _gemv_kernel = autotuned(_CONFIGS, ["N", "K"])(_gemv_kernel)
