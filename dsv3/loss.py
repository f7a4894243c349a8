"""Cross-entropy through the output head in chunks of tokens, so [tokens, vocab] logits never exist whole.

With DeepSeek-V3's 129K vocabulary a batch of 32K tokens would need 17 GB of fp32 logits and as much again for
their gradient. Each chunk's logits are computed, reduced to a loss sum and a count of correct top-1 guesses and,
when a gradient is wanted, turned in place into the loss's gradient (`ops/cross_entropy.py`), which is multiplied
straight into the gradients of the chunk's hidden states and of the head weight; then the chunk is dropped. The
backward pass only scales those two gradients by the loss's upstream gradient. Per chunk that is three head
matmuls (a plain autograd loss under activation checkpointing needs four) and one read-and-write of the logits in
their own dtype (bf16 under autocast) instead of fp32 copies, log-softmax tensors and their gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.cross_entropy import softmax_grad_


class _HeadLoss(torch.autograd.Function):
    """(sum of the per-token losses, number of correct top-1 guesses) of hidden [N, D] through weight [V, D]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                grad_enabled: bool):
        want_h, want_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(hidden) if want_h else None  # [N, D]
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None  # [V, D], summed over chunks
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            logits = F.linear(h, weight)  # [n, V], bf16 under autocast
            row_loss, row_correct = softmax_grad_(logits, targets[start:start + chunk_tokens], want_h or want_w)
            loss += row_loss.sum()
            correct += row_correct.sum()
            if want_h:  # logits now hold d(loss)/d(logits)
                grad_h[start:start + chunk_tokens] = logits @ weight  # autocast, if on, casts as for F.linear
            if want_w:
                _add_product_(grad_w, logits.t(), h)
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss, correct

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, _g_correct):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * g_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * g_loss).to(ctx.weight_dtype), None, None, None)


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    # acc [M, N] fp32 += a [M, K] @ b [K, N]. On CUDA with 16-bit a, cuBLAS adds the fp32 product straight into acc
    # (out_dtype): no 16-bit product to round and then add in a pass of its own (0.5 GB each way a chunk at a
    # 129K vocabulary). Elsewhere autocast, if on, makes the product as for F.linear and it is added.
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b.to(a.dtype), out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


# A chunk's logits take at most this much memory: 16,384 tokens of bf16 logits at DeepSeek-V3's vocabulary, 8,192
# of fp32. Longer chunks add fewer fp32 partial sums into the head weight's gradient (H200, 1b at batch 48 with MTP:
# +0.3% tokens/s from 8,192 to 16,384 bf16 tokens).
CHUNK_BYTES = 4 << 30


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [N, D], weight: [V, D], targets: [N] (-100 ignored) -> (mean loss, top-1 accuracy) over the
    non-ignored targets. chunk_tokens: tokens per chunk of logits, by default a multiple of 1024 whose logits fit
    in CHUNK_BYTES."""
    if chunk_tokens is None:
        dev = hidden.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else torch.promote_types(hidden.dtype, weight.dtype))
        chunk_tokens = max(1024, CHUNK_BYTES // (weight.shape[0] * dtype.itemsize) // 1024 * 1024)
    # Grad mode is off inside the Function's forward: it is read here, so that evaluation makes no gradients.
    loss, correct = _HeadLoss.apply(hidden, weight, targets, chunk_tokens, torch.is_grad_enabled())
    count = (targets >= 0).sum().clamp(min=1)
    return loss / count, correct.float() / count
