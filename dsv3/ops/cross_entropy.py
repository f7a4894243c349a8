"""Cross-entropy rows and their gradient in one pass over the logits (Triton), beside its PyTorch reference.

`softmax_grad_(logits, targets)` takes a chunk of logits [n, V] (bf16 under autocast) and returns, per row, the loss
logsumexp(row) - row[target] and whether the row's argmax is the target; with `grad=True` it also overwrites the
logits with the loss's gradient, softmax(row) - onehot(target), in the logits' dtype. The head loss
(`dsv3/loss.py`) then multiplies that gradient into the head's two weight products at once and drops the logits:
no fp32 copy of them, no log-softmax tensor, and no second head matmul to recompute them for the backward pass.

The kernel gives a program to each row and reads it twice: an online max/sum/argmax pass, then (with grad) the
softmax pass that writes the gradient in place. Rows whose target is negative (the ignore index -100) get loss 0,
a zero gradient and no correct guess. Ties of the argmax go to the lower index, as in torch.argmax.
"""

from __future__ import annotations

import torch

from .tuning import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

BLOCK_V = 4096  # logits per loop step of a row: 8 KB of bf16


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [n, V] (contiguous rows), targets: [n] int64 (negative = ignored) -> (loss [n] fp32, correct [n]
    bool). With grad, logits become d(loss.sum())/d(logits). The Triton kernel on CUDA, else the reference."""
    if triton is not None and (logits.is_cuda or INTERPRET):
        return softmax_grad_triton_(logits, targets, grad)
    return softmax_grad_reference_(logits, targets, grad)


def softmax_grad_reference_(logits: torch.Tensor, targets: torch.Tensor,
                            grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    valid = targets >= 0
    safe = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(x, -1)
    loss = torch.where(valid, lse - x.gather(1, safe)[:, 0], 0.0)
    correct = valid & (x.argmax(-1) == targets)
    if grad:
        g = torch.exp(x - lse[:, None])
        g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
        logits.copy_(g * valid[:, None])
    return loss, correct


def softmax_grad_triton_(logits: torch.Tensor, targets: torch.Tensor,
                         grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("softmax_grad_ needs rows with contiguous columns")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    correct = torch.empty(n, dtype=torch.bool, device=logits.device)
    if n:
        _ce_kernel[(n,)](logits, targets, loss, correct, v, logits.stride(0), GRAD=grad, BLOCK=BLOCK_V,
                         num_warps=8)
    return loss, correct


if triton is not None:
    @triton.jit
    def _ce_kernel(L, T, LOSS, CORRECT, V, stride, GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = L + row * stride
        target = tl.load(T + row)
        valid = target >= 0
        cols = tl.arange(0, BLOCK)
        # Pass 1: running max m, sum of exp(x - m), and the first index of the largest value.
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        best_idx = tl.zeros((), tl.int64)
        for v0 in range(0, V, BLOCK):
            mask = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            block_max = tl.max(x, 0)
            block_arg = v0 + tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
            best_idx = tl.where(block_max > m, block_arg, best_idx)  # strictly larger: earlier ties win
            new_m = tl.maximum(m, block_max)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            m = new_m
        lse = m + tl.log(s)
        x_t = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
        tl.store(CORRECT + row, valid & (best_idx == target))
        if GRAD:
            # Pass 2: softmax - onehot(target), zero for an ignored row, in the logits' dtype.
            for v0 in range(0, V, BLOCK):
                mask = v0 + cols < V
                x = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(v0 + cols == target, 1.0, 0.0)
                g = tl.where(valid, g, 0.0)
                tl.store(base + v0 + cols, g.to(L.dtype.element_ty), mask=mask)
