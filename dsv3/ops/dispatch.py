"""The MoE dispatch for training: K copies of each token's row, in expert order.

`dispatch(x, where, k)`: x [N, D] are the tokens, where [N*K] gives, token by token, the row of the output each of its
K slots goes to (a permutation). Returns xs [N*K, D] with xs[where[n*K + j]] = x[n]. Indexing x by each output row's
token (a gather) reads every token K times, and at 1b's batch 48 x (200 MB) is far larger than L2, so those are
reads from memory; `dispatch_rows` reads each token once and writes its K copies (Triton on CUDA, the PyTorch
reference elsewhere). The backward is the sum of each token's K gradient rows, taken in a fixed order (reproducible,
where indexing's own backward would scatter-add with atomics).
"""

from __future__ import annotations

import torch

from .tuning import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def dispatch(x: torch.Tensor, where: torch.Tensor, k: int) -> torch.Tensor:
    # x: [N, D], where: [N*K] int64 -> [N*K, D] in expert order
    return _Dispatch.apply(x, where, k)


def dispatch_rows_reference(x: torch.Tensor, where: torch.Tensor, k: int) -> torch.Tensor:
    xs = torch.empty(where.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    xs[where] = x.repeat_interleave(k, dim=0)
    return xs


def dispatch_rows(x: torch.Tensor, where: torch.Tensor, k: int) -> torch.Tensor:
    if triton is not None and (x.is_cuda or INTERPRET):
        return torch.ops.dsv3.moe_dispatch(x, where, k)
    return dispatch_rows_reference(x, where, k)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, where, k):
        ctx.save_for_backward(where)
        ctx.k = k
        return dispatch_rows(x.contiguous(), where, k)

    @staticmethod
    def backward(ctx, grad):
        (where,) = ctx.saved_tensors
        rows = grad[where]  # [N*K, D] token order
        return (rows.unflatten(0, (-1, ctx.k)).sum(1) if ctx.k > 1 else rows), None, None


@torch.library.custom_op("dsv3::moe_dispatch", mutates_args=())
def _dispatch_op(x: torch.Tensor, where: torch.Tensor, k: int) -> torch.Tensor:
    n, d = x.shape
    xs = x.new_empty(n * k, d)
    if n:
        block = triton.next_power_of_2(d)
        _dispatch_kernel[(n,)](x, where, xs, d, K=k, BLOCK_D=block, num_warps=4 if block <= 2048 else 8)
    return xs


@_dispatch_op.register_fake
def _(x, where, k):
    return x.new_empty(x.shape[0] * k, x.shape[1])


if triton is not None:

    @triton.jit
    def _dispatch_kernel(x_ptr, where_ptr, xs_ptr, d, K: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)  # one token: its row is read once for its K copies
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < d
        row = tl.load(x_ptr + n * d + cols, mask=in_row)
        for j in tl.static_range(K):
            dest = tl.load(where_ptr + n * K + j).to(tl.int64)
            tl.store(xs_ptr + dest * d + cols, row, mask=in_row)
