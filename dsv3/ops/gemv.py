"""y = x W^T for a few rows (Triton), beside its PyTorch reference: the linear layers of a decode step, which read
a weight to produce a handful of rows.

At a handful of rows the cost of a linear layer is reading its weight. The kernel reads it once along its
contiguous reduction dim: a program computes a tile of outputs of one row, and the rows' programs for one weight
tile run together, so the weight comes from HBM once and from L2 for the other rows.

- FP8 checkpoints (`Fp8WeightLinear`): the e4m3 weight as stored, each weight scaled by its 128x128 block's scale
  as it is loaded, against bf16 activations (W8A16, as the fused expert kernels of `moe_decode` do). One launch
  where the FP8 GEMM path (`fp8_gemm.gemm`, as prefill uses it) spends one quantising the activations and runs a
  GEMM tiled for many rows. Always on where it applies.
- MLA's absorbed decode attention (`head_cols`, `head_rows`): the query through W_UK and the output through W_UV,
  per head, read in place from `kv_b_proj`'s weight. They are per-head matrix products of a few rows, which cuBLAS
  runs as batched GEMMs of ~3.5 us each on the 16b model (two per layer, 0.19 ms a token). W_UV's rows are
  contiguous along the reduction, so the GEMV serves it, one head per program; W_UK reduces along its rows, so
  `head_cols` loads [rows, columns] tiles along its contiguous columns and sums down them. Off unless
  DSV3_GEMV_HEADS=1 until a GPU run shows them faster than cuBLAS.

The same kernel for the plain projections of a decode step (the shared q/kv_a buffer, q_b, o_proj, the dense
MLP, the router's fp32 logits) in place of cuBLAS's M = 1 GEMMs was measured and removed: on the 16b model at
batch 1 the decode step ran at 0.954x cuBLAS's tokens/s, launched with programmatic dependent launch
(docs/benchmarks.md, session 14).

Under torch.compile the kernels are the opaque custom ops `dsv3::gemv`, `dsv3::gemv_head_rows` and
`dsv3::gemv_head_cols`.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor

from ..fp8 import BLOCK, dequantize_blocks
from .tuning import INTERPRET, autotuned, fixed_meta, gemv_configs, pdl_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear and the FP8 GEMM path (or its emulation) serve
    triton = None

MAX_ROWS = 4  # rows up to which a decode step takes the GEMV: each more row re-reads the weight from L2
HEADS = os.environ.get("DSV3_GEMV_HEADS", "0") == "1"  # MLA's absorbed per-head products too; see above
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def applies(x: torch.Tensor) -> bool:
    """Whether x [M, K] takes the GEMV: few rows of a float dtype, Triton on CUDA (or its interpreter), no autograd."""
    return (triton is not None and (x.is_cuda or INTERPRET) and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype in _DTYPES and not torch.is_grad_enabled() and not isinstance(x, DTensor))


def _plain(weight: torch.Tensor) -> bool:
    return weight.dtype in _DTYPES and weight.is_contiguous() and not isinstance(weight, DTensor)


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
    # One "head" of n rows: every program's x row is row m's, the weight's rows are 0..n-1.
    _launch_rows(x, w, w_scale_inv, y, x.stride(0), 0, k, kp, n, n, 0)
    return y


def _launch_rows(x, w, w_scale_inv, y, stride_x, x_head, k, kp, n, head_n, w_head) -> None:
    # y [M, N]: y[m, h * head_n + i] = x[m, h * x_head: +k] . w row (h * w_head + i), i < head_n
    if head_n != n and head_n % _SMALLEST_ROWS:
        raise ValueError(f"per-head gemv: {head_n} rows a head is not a multiple of the smallest tile")
    scales = w if w_scale_inv is None else w_scale_inv  # unread when unscaled
    _gemv_kernel[lambda meta: (y.shape[0], triton.cdiv(n, meta["BLOCK_N"]))](
        x, w, scales, y, stride_x, x_head, n, k, kp, head_n, w_head, SCALED=w_scale_inv is not None,
        **fixed_meta(_whole_heads(_CONFIGS, {"HEAD_N": head_n, "N": n})), **pdl_meta(x.device))


def head_rows_reference(x: torch.Tensor, w: torch.Tensor, first: int, stride: int, n: int) -> torch.Tensor:
    # x: [M, H, K]; w: [H * stride, K], head h's rows from h * stride + first -> [M, H, n]: x[m, h] . those n rows
    heads = w.view(x.shape[1], stride, w.shape[1])[:, first:first + n]  # [H, n, K]
    return torch.einsum("mhk,hnk->mhn", x.float(), heads.float()).to(x.dtype)


def head_cols_reference(x: torch.Tensor, w: torch.Tensor, first: int, stride: int) -> torch.Tensor:
    # x: [M, H, J]; w: [H * stride, C], head h's rows from h * stride + first -> [M, H, C]: x[m, h] times those J rows
    heads = w.view(x.shape[1], stride, w.shape[1])[:, first:first + x.shape[2]]  # [H, J, C]
    return torch.einsum("mhj,hjc->mhc", x.float(), heads.float()).to(x.dtype)


def takes_heads(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `head_rows` / `head_cols` serve x [M, H, .] against w: DSV3_GEMV_HEADS=1, `applies` to one head's
    rows, and a plain contiguous weight."""
    return HEADS and applies(x[:, 0]) and _plain(w)


def head_rows(x: torch.Tensor, w: torch.Tensor, first: int, stride: int, n: int) -> torch.Tensor:
    """As head_rows_reference, in one launch (MLA's output through W_UV: x the attention's latent output)."""
    if torch.compiler.is_compiling():
        return torch.ops.dsv3.gemv_head_rows(x, w, first, stride, n)
    return _head_rows(x, w, first, stride, n)


def head_cols(x: torch.Tensor, w: torch.Tensor, first: int, stride: int) -> torch.Tensor:
    """As head_cols_reference, in one launch (MLA's query through W_UK: x the query's no-rope part)."""
    if torch.compiler.is_compiling():
        return torch.ops.dsv3.gemv_head_cols(x, w, first, stride)
    return _head_cols(x, w, first, stride)


def _check_heads(x: torch.Tensor, w: torch.Tensor, first: int, stride: int, used: int) -> None:
    if not (w.is_contiguous() and x.stride(2) == 1):
        raise ValueError("per-head gemv wants a contiguous weight and x with contiguous head rows")
    if w.shape[0] != x.shape[1] * stride or first + used > stride:
        raise ValueError(f"per-head gemv: weight {tuple(w.shape)} is not {x.shape[1]} heads of {stride} rows with "
                         f"rows {first}..{first + used - 1} in each")


def _head_rows(x: torch.Tensor, w: torch.Tensor, first: int, stride: int, n: int) -> torch.Tensor:
    m, h, k = x.shape
    _check_heads(x, w, first, stride, n)
    if k != w.shape[1]:
        raise ValueError(f"per-head gemv: x rows of {k} against weight rows of {w.shape[1]}")
    y = x.new_empty(m, h, n)
    _launch_rows(x, w[first:], None, y, x.stride(0), x.stride(1), k, k, h * n, n, stride)
    return y


def _head_cols(x: torch.Tensor, w: torch.Tensor, first: int, stride: int) -> torch.Tensor:
    m, h, j = x.shape
    _check_heads(x, w, first, stride, j)
    c = w.shape[1]
    y = x.new_empty(m, h, c)
    _head_cols_kernel[lambda meta: (m * h, triton.cdiv(c, meta["BLOCK_C"]))](
        x, w[first:], y, x.stride(0), x.stride(1), h, j, c, stride, **fixed_meta(_COLS_CONFIGS), **pdl_meta(x.device))
    return y


@torch.library.custom_op("dsv3::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor | None, n: int) -> torch.Tensor:
    return _gemv(x, w, w_scale_inv, n)


@_gemv_op.register_fake
def _(x, w, w_scale_inv, n):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("dsv3::gemv_head_rows", mutates_args=())
def _head_rows_op(x: torch.Tensor, w: torch.Tensor, first: int, stride: int, n: int) -> torch.Tensor:
    return _head_rows(x, w, first, stride, n)


@_head_rows_op.register_fake
def _(x, w, first, stride, n):
    return x.new_empty(x.shape[0], x.shape[1], n)


@torch.library.custom_op("dsv3::gemv_head_cols", mutates_args=())
def _head_cols_op(x: torch.Tensor, w: torch.Tensor, first: int, stride: int) -> torch.Tensor:
    return _head_cols(x, w, first, stride)


@_head_cols_op.register_fake
def _(x, w, first, stride):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[1])


if triton is not None:
    from .moe_decode import scaled_rows_dot
    from .tuning import pdl_prologue

    @triton.jit
    def _gemv_kernel(X, W, WS, Y, stride_x, X_HEAD, N, K, KP, HEAD_N, W_HEAD, SCALED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # Program (row, tile): outputs [tile * BLOCK_N, +BLOCK_N) of row `row` of Y [M, N], in heads of HEAD_N
        # outputs: head h reads x's [h * X_HEAD, +K) and the weight rows from h * W_HEAD (a plain GEMV is one head
        # of N; per-head tiles never straddle heads, which the launch's configurations ensure). W rows are KP
        # apart (padded for FP8, whose scale rows are KP / 128 apart; the padding is zeros and K masks it anyway).
        pdl_prologue(PDL)
        row = tl.program_id(0)
        start = tl.program_id(1) * BLOCK_N
        head = start // HEAD_N
        local = start - head * HEAD_N + tl.arange(0, BLOCK_N)  # rows within the head
        rows = head * HEAD_N + local
        rmask = (local < HEAD_N) & (rows < N)
        w_rows = head * W_HEAD + local
        out = scaled_rows_dot(X + row * stride_x + head * X_HEAD, W + w_rows[:, None].to(tl.int64) * KP,
                              WS + (w_rows // 128)[:, None] * (KP // 128), rmask, K, SCALED, BLOCK_N, BLOCK_K)
        tl.store(Y + row * N + rows, out.to(Y.dtype.element_ty), mask=rmask)

    @triton.jit
    def _head_cols_kernel(X, W, Y, stride_xm, stride_xh, H, J, C, W_HEAD, BLOCK_J: tl.constexpr,
                          BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        # Program (row * H + head, tile): Y[row, head, tile's C columns] = sum_j x[row, head, j] W[head * W_HEAD + j].
        # W's rows are C long and contiguous: [BLOCK_J, BLOCK_C] tiles along them, summed down the rows at the end.
        pdl_prologue(PDL)
        pid = tl.program_id(0)
        row = pid // H
        head = pid % H
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, J, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            jmask = js < J
            x = tl.load(X + row * stride_xm + head * stride_xh + js, mask=jmask, other=0.0).to(tl.float32)
            w = tl.load(W + (head * W_HEAD + js)[:, None].to(tl.int64) * C + cols[None, :],
                        mask=jmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += w * x[:, None]
        tl.store(Y + pid * C + cols, tl.sum(acc, axis=0).to(Y.dtype.element_ty), mask=cmask)

    def _whole_heads(configs: list, args: dict) -> list:
        # per-head launches take the tiles that divide a head (the launcher checks the smallest does); a plain
        # GEMV (one head of N) takes any
        return [c for c in configs if args["HEAD_N"] == args["N"] or args["HEAD_N"] % c.kwargs["BLOCK_N"] == 0]

    _CONFIGS = gemv_configs("BLOCK_N", "BLOCK_K")
    _SMALLEST_ROWS = min(c.kwargs["BLOCK_N"] for c in _CONFIGS)
    _gemv_kernel = autotuned(_CONFIGS, ["N", "K", "HEAD_N"], prune=_whole_heads)(_gemv_kernel)
    # (rows, columns, warps, stages): W_UK of the 16b model is 16 heads of [128, 512] bf16, 2 MB
    _COLS_CONFIGS = [triton.Config({"BLOCK_J": j, "BLOCK_C": c}, num_warps=w, num_stages=st)
                     for j, c, w, st in [(32, 64, 4, 3), (16, 128, 4, 3), (64, 32, 4, 3), (32, 32, 2, 4),
                                         (64, 64, 8, 2), (16, 64, 2, 4)]]
    _head_cols_kernel = autotuned(_COLS_CONFIGS, ["H", "J", "C"])(_head_cols_kernel)
