"""Expert load balancing as in the DeepSeek-V3 report (section 2.1.2), and its measurement.

- Auxiliary-loss-free balancing: after each optimiser step every MoE gate's `e_score_correction_bias` moves by
  gamma * sign(mean load - expert load). Overloaded experts become less likely to be chosen; the gate weights
  (the unbiased scores) are untouched, so the bias steers routing without a gradient that fights the LM loss.
- The complementary sequence-wise balance loss, alpha * sum_i f_i P_i per sequence, with
  f_i = N_r / (K_r T) * (tokens of the sequence routed to i) and P_i = mean over the sequence of the normalised
  affinity s_i / sum_j s_j. With `per_sequence=False` the same formula over the whole batch is the classic
  auxiliary loss of GShard/DeepSeek-V2, kept for the ablation.
- MaxVio = max load / mean load - 1, the report's measure of imbalance.
The model holds no process-group state: under data parallelism the caller all-reduces the loads before
`update_bias`, so every rank moves its biases identically.
"""

from __future__ import annotations

import torch

from .model import MoE, Routing


def max_violation(load: torch.Tensor) -> float:
    """load: [E] tokens per expert -> max / mean - 1 (0 is perfectly balanced)."""
    load = load.float()
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0


@torch.no_grad()
def update_bias(layers: list[MoE], loads: list[torch.Tensor], gamma: float) -> None:
    """bias_i += gamma * sign(mean load - load_i) for each layer; loads are summed over the optimiser step."""
    if gamma == 0:
        return
    for moe, load in zip(layers, loads):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            raise ValueError("auxiliary-loss-free balancing needs topk_method noaux_tc (a gate with a bias)")
        load = load.float().to(bias.device)
        bias.add_(gamma * torch.sign(load.mean() - load))


def balance_loss(routing: Routing, batch: int, n_experts: int, top_k: int, per_sequence: bool = True) -> torch.Tensor:
    """alpha-free balance loss sum_i f_i P_i, averaged over sequences (or over the batch as one group)."""
    scores = routing.scores  # [B*T, E]
    groups = batch if per_sequence else 1
    s = scores.view(groups, -1, n_experts)  # [G, T', E]
    tokens = s.shape[1]
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # [G, E]
    chosen = torch.zeros_like(s).scatter_(2, routing.indices.view(groups, tokens, top_k), 1.0)
    f = chosen.sum(1) * (n_experts / (top_k * tokens))  # [G, E], no gradient: counts
    return (f * p).sum(-1).mean()
