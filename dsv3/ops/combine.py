"""The MoE combine for training: each token's K expert outputs, weighted and summed, with a one-pass backward.

`combine(ys, where, weights)`: ys [N*K, D] are the experts' outputs in expert order, where [N*K] gives, token by
token, the row of ys each of its K slots went to, weights [N, K] the gate weights. out[n] = sum_j weights[n, j] *
ys[where[n*K + j]], summed in fp32 in a fixed order, returned in ys's dtype.

Its backward wants two things per slot: the output gradient scaled by the slot's weight, written to the slot's row
of expert order, and the weight's gradient, the dot product of that row with the output gradient. Autograd's
version (under inductor) is two kernels that each gather every token's gradient K times; `combine_backward` reads
each token's gradient once and both results come out of one pass (Triton on CUDA, the PyTorch reference elsewhere).
The products are rounded as the forward's are: the weight to ys's dtype before it scales.
"""

from __future__ import annotations

import torch

from .tuning import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def combine(ys: torch.Tensor, where: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # ys: [N*K, D] expert order, where: [N*K] int64, weights: [N, K] fp32 -> [N, D] in ys.dtype
    return _Combine.apply(ys, where, weights)


def combine_reference(ys: torch.Tensor, where: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, k = weights.shape
    rows = ys[where].unflatten(0, (n, k))  # [N, K, D] token order
    out = (rows * weights.unsqueeze(-1).to(ys.dtype)).sum(1, dtype=torch.float32)
    # No `.to` that changes nothing: returned from the autograd function, such an alias lost its gradient under
    # torch.compile (aot_eager, torch 2.11 on the CPU: zero gradients).
    return out if out.dtype == ys.dtype else out.to(ys.dtype)


def combine_backward_reference(grad: torch.Tensor, ys: torch.Tensor, where: torch.Tensor,
                               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # grad: [N, D] -> (d ys [N*K, D] in ys.dtype, d weights [N, K] fp32)
    # (fp32 arithmetic for bf16 and fp32 operands, as in the kernel; float64 stays float64: the tests' oracle)
    n, k = weights.shape
    wide = torch.promote_types(ys.dtype, torch.float32)
    g = grad.to(wide).unsqueeze(1)  # [N, 1, D]
    w = weights.to(ys.dtype).to(wide).unsqueeze(-1)  # [N, K, 1]
    d_ys = torch.empty_like(ys)
    d_ys[where] = (g * w).to(ys.dtype).flatten(0, 1)
    d_w = (ys[where].to(wide).unflatten(0, (n, k)) * g).sum(-1)
    return d_ys, d_w


def combine_backward(grad, ys, where, weights):
    if triton is not None and (grad.is_cuda or INTERPRET):
        return torch.ops.dsv3.moe_combine_backward(grad, ys, where, weights)
    return combine_backward_reference(grad, ys, where, weights)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, where, weights):
        ctx.save_for_backward(ys, where, weights)
        return combine_reference(ys, where, weights)

    @staticmethod
    def backward(ctx, grad):
        ys, where, weights = ctx.saved_tensors
        d_ys, d_w = combine_backward(grad.contiguous(), ys, where, weights)
        return d_ys, None, d_w.to(weights.dtype)


@torch.library.custom_op("dsv3::moe_combine_backward", mutates_args=())
def _combine_backward_op(grad: torch.Tensor, ys: torch.Tensor, where: torch.Tensor,
                         weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weights.shape
    d = ys.shape[1]
    d_ys = torch.empty_like(ys)
    d_w = torch.empty(n, k, dtype=torch.float32, device=ys.device)
    if n:
        block = triton.next_power_of_2(d)
        _combine_backward_kernel[(n,)](grad, ys, where, weights.contiguous(), d_ys, d_w, d, K=k, BLOCK_D=block,
                                       num_warps=4 if block <= 2048 else 8)
    return d_ys, d_w


@_combine_backward_op.register_fake
def _(grad, ys, where, weights):
    return torch.empty_like(ys), weights.new_empty(weights.shape, dtype=torch.float32)


if triton is not None:

    @triton.jit
    def _combine_backward_kernel(grad_ptr, ys_ptr, where_ptr, w_ptr, d_ys_ptr, d_w_ptr, d, K: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)  # one token: its gradient row is read once for its K slots
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < d
        g = tl.load(grad_ptr + n * d + cols, mask=in_row, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(where_ptr + n * K + j).to(tl.int64)
            w = tl.load(w_ptr + n * K + j).to(d_ys_ptr.dtype.element_ty).to(tl.float32)
            y = tl.load(ys_ptr + row * d + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(d_ys_ptr + row * d + cols, (g * w).to(d_ys_ptr.dtype.element_ty), mask=in_row)
            tl.store(d_w_ptr + n * K + j, tl.sum(g * y, axis=0))
