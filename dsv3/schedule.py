"""The training schedules of the DeepSeek-V3 report (section 4.2), as pure functions of progress.

- Learning rate: linear warm-up, a long constant phase, a cosine decay to `min_lr`, then a constant tail
  (the report: warm-up over 2K steps to 2.2e-4, constant until 10T of 14.8T tokens, cosine to 2.2e-5 over 4.3T).
- Batch size: a linear ramp in sequences over the first tokens (the report: 3072 -> 15360 over 469B tokens).
- MTP loss weight lambda: 0.3, then 0.1 after a token count (the report: after 10T).
- Bias update speed gamma: 0.001, then 0 for the last tokens (the report: the last 500B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    stable_until: int  # step where the cosine decay starts
    decay_until: int  # step where it reaches min_lr; constant afterwards

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step < self.stable_until:
            return self.lr
        if step < self.decay_until:
            t = (step - self.stable_until) / max(self.decay_until - self.stable_until, 1)
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        return self.min_lr

    @classmethod
    def report_shape(cls, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> "LRSchedule":
        """The report's proportions on a run of max_steps: constant to 10/14.8 of it, cosine over the next 4.3/14.8."""
        stable = max(warmup_steps, round(max_steps * 10.0 / 14.8))
        decay = max(stable, round(max_steps * 14.3 / 14.8))
        return cls(lr, min_lr, warmup_steps, stable, decay)


def batch_size_at(tokens_seen: int, start: int, end: int, ramp_tokens: int, multiple: int = 1) -> int:
    """Sequences per optimiser step: linear from start to end over ramp_tokens, rounded down to `multiple`."""
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        size = end
    else:
        size = start + (end - start) * tokens_seen / ramp_tokens
    return max(multiple, int(size) // multiple * multiple)


def step_value(tokens_seen: int, before: float, after: float, switch_tokens: int | None) -> float:
    """`before` until switch_tokens have been trained on, `after` from then on (None: never switch)."""
    return after if switch_tokens is not None and tokens_seen >= switch_tokens else before
