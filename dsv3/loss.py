"""Cross-entropy through the output head in chunks of tokens, so [tokens, vocab] logits never exist whole.

With DeepSeek-V3's 129K vocabulary a batch of 32K tokens would need 17 GB of fp32 logits and as much again for
their gradient. Each chunk's logits are computed, reduced to a loss sum and a count of correct top-1 guesses, and
dropped; activation checkpointing recomputes them in the backward pass. The cost is one extra head matmul per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, weight).float()  # [n, V]
    loss = F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [N, D], weight: [V, D], targets: [N] (-100 ignored) -> (mean loss, top-1 accuracy) over the
    non-ignored targets."""
    losses, corrects = [], []
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            loss, correct = torch.utils.checkpoint.checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        else:
            loss, correct = _chunk_loss(h, weight, t)
        losses.append(loss)
        corrects.append(correct)
    count = (targets != -100).sum().clamp(min=1)
    return torch.stack(losses).sum() / count, torch.stack(corrects).sum().float().detach() / count
