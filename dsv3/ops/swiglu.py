"""SwiGLU for training, silu(gate) * up, with a one-pass backward.

`swiglu(h)` takes the gate and up projections side by side, h [..., 2I] (gate columns first) as the experts' grouped
GEMM and the MLPs' one GEMM make them, and returns [..., I]. Its forward is plain PyTorch, which inductor fuses into
one kernel near copy speed. Its backward reads h and the output gradient once and writes h's gradient: the gate half
d * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))), the up half d * silu(gate). Inductor's version of that
writes the two halves as a concatenation, each output element loading its three inputs (H200, the 1b experts at
batch 48: 589,824 rows of 1024, 1.35 ms, ~2.2 TB/s); `swiglu_backward` is a Triton kernel on CUDA and the PyTorch
reference elsewhere, computing in fp32 and rounding once to h's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tuning import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    # h: [..., 2I] (gate | up) -> [..., I] in h.dtype
    return _SwiGLU.apply(h)


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward_reference(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # grad: [..., I], h: [..., 2I] -> d h [..., 2I] in h.dtype (fp32 arithmetic; float64 stays float64: the tests'
    # oracle)
    wide = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.to(wide).chunk(2, dim=-1)
    d = grad.to(wide)
    sig = torch.sigmoid(gate)
    d_gate = d * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, d * gate * sig], dim=-1).to(h.dtype)


def swiglu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if triton is not None and (h.is_cuda or INTERPRET):
        return torch.ops.dsv3.swiglu_backward(grad, h)
    return swiglu_backward_reference(grad, h)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu_reference(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return swiglu_backward(grad.contiguous(), h.contiguous())


BLOCK_ELEMENTS = 4096  # of each of the three inputs per program: rows x columns


@torch.library.custom_op("dsv3::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    inter = grad.shape[-1]
    rows = grad.numel() // inter if inter else 0
    d_h = torch.empty_like(h)
    if rows:
        block_i = min(triton.next_power_of_2(inter), BLOCK_ELEMENTS)
        block_m = BLOCK_ELEMENTS // block_i
        grid = (triton.cdiv(rows, block_m), triton.cdiv(inter, block_i))
        _swiglu_backward_kernel[grid](grad, h, d_h, rows, inter, BLOCK_M=block_m, BLOCK_I=block_i, num_warps=8)
    return d_h


@_swiglu_backward_op.register_fake
def _(grad, h):
    return torch.empty_like(h)


if triton is not None:

    @triton.jit
    def _swiglu_backward_kernel(grad_ptr, h_ptr, d_h_ptr, rows, inter, BLOCK_M: tl.constexpr,
                                BLOCK_I: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
        c = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]  # [1, BLOCK_I]
        mask = (r < rows) & (c < inter)
        gate_at = r * (2 * inter) + c
        d = tl.load(grad_ptr + r * inter + c, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(h_ptr + gate_at, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + gate_at + inter, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = d * up * sig * (1 + gate * (1 - sig))
        tl.store(d_h_ptr + gate_at, d_gate.to(d_h_ptr.dtype.element_ty), mask=mask)
        tl.store(d_h_ptr + gate_at + inter, (d * gate * sig).to(d_h_ptr.dtype.element_ty), mask=mask)
