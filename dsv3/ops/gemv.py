"""y = x W^T for a decode step's few rows against a bf16 weight whose rows fit in registers (Triton), beside the plain
`F.linear` it stands for: the attention's input and output projections at batch 1-4.

A program holds BLOCK_N whole rows of W (32 KB) in registers, and it loads them *before* it waits for the kernel
that produces x (programmatic dependent launch): the weights never change during a step, so their read overlaps
the end of the previous kernel (MLA's merge before o_proj, the norm before the q/kv projection) instead of
following it. Then each row of x is one load from L2 and a reduction. Without the early read this kernel lost to
cuBLAS's GEMV (session 14, `fp8_gemv`'s note); the early read is what only a kernel launched with PDL can do.

Under torch.compile the kernel is the custom op `dsv3::gemv`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tuning import INTERPRET, pdl_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear serves
    triton = None

MAX_ROWS = 4  # rows up to which a decode GEMV serves (this one and `fp8_gemv`): each more row re-reads the weights
TILE = 16384  # weight elements a program holds: 32 KB of bf16, 64 registers a thread at 4 warps
MAX_K = TILE  # at least one whole row per program


def decode_rows(x: torch.Tensor) -> bool:
    """Whether x [M, K] is what the decode GEMVs take: at most MAX_ROWS bf16/fp16 rows, Triton on CUDA (or its
    interpreter), no autograd (they have no backward)."""
    return (triton is not None and (x.is_cuda or INTERPRET) and 0 < x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled())


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [M, K] @ weight [N, K]^T takes this GEMV: `decode_rows`, and a contiguous weight of x's dtype no
    wider than MAX_K."""
    return decode_rows(x) and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape[1] <= MAX_K


def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gemv_reference in one launch; see `applies` for where it serves."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not weight.is_contiguous() or x.stride(1) != 1 or k > MAX_K:
        raise ValueError(f"gemv wants x [M, K] with contiguous rows and a contiguous weight [N, K], K <= {MAX_K}; got "
                         f"x {list(x.shape)}, weight {list(weight.shape)}")
    block_k = triton.next_power_of_2(k)
    block_n = TILE // block_k
    y = x.new_empty(m, n)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, y, m, n, k, x.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=4, **pdl_meta(x.device))
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight^T through the Triton kernel (the custom op under torch.compile)."""
    return torch.ops.dsv3.gemv(x, weight) if torch.compiler.is_compiling() else gemv_triton(x, weight)


@torch.library.custom_op("dsv3::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gemv_triton(x, weight)


@_gemv_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


if triton is not None:
    from .tuning import pdl_prologue

    @triton.jit
    def _gemv_kernel(X, W, Y, M, N, K, stride_x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # Program p: outputs [p * BLOCK_N, +BLOCK_N) of every row of x, from whole rows of W held in registers.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < N
        cmask = cols < K
        # The weights do not depend on the previous kernel: read them before waiting for it.
        w = tl.load(W + rows[:, None].to(tl.int64) * K + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_K]
        pdl_prologue(PDL)
        for m in range(M):
            x = tl.load(X + m * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            tl.store(Y + m * N + rows, y.to(Y.dtype.element_ty), mask=rmask)
