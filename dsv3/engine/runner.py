"""The model over the paged cache: one flat batch of token rows per forward, for the main model and the MTP drafter.

Notable features:
- `rows_for` lays a step's work out as the int64 rows of `attention.Step` (decode rows first, then prefill chunks)
  plus one block table per sequence, built on the host and moved to the device in two copies.
- The forward runs the model's own modules and weights (embedding, blocks, norms, head); only attention is swapped
  for the cache-backed one, through the blocks' `attn` hook.
- RoPE cos/sin come from a table over every position the engine serves, built once from the model's rotary
  module: one gather per step instead of recomputing the angles.
- `greedy_speculative` fuses a speculative decode step of plain greedy requests (main forward, drafter, both
  argmaxes) into one call that needs no host round trip in between; CUDA graphs capture it whole.
- The model's sibling projections share one weight buffer each (`Transformer.share_input_weights`), so a step
  runs one GEMM for MLA's q and kv_a projections and one for an MLP's gate and up.
- Expert load per MoE layer is counted from each MoE's routing of the step, over real rows only: the padding rows
  of a CUDA-graph batch are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import MoE, Transformer
from .attention import Step, cache_attention
from .cache import LatentCache
from .request import Request


@dataclass
class Work:
    """What one request feeds this step: `tokens` at positions start, start + 1, ..."""

    req: Request
    tokens: list[int]
    start: int
    decode: bool  # decode rows (one token, or a token and its draft) use absorbed attention


@dataclass
class HostRows:
    rows: torch.Tensor  # [R, 6] int64 (attention.Step's columns)
    tables: torch.Tensor  # [S, W] int64
    decode_rows: int
    prefills: list[tuple[int, int, int, int]]


PAD_ROW = (0, 0, 0, 1, 0, 0)  # token 0 at position 0, written to scratch slot 0, seeing one token; not valid


def rows_for(works: list[Work], cache: LatentCache, pad_to: int | None = None, width: int | None = None) -> HostRows:
    """Decode works must come before prefill works (the scheduler orders them so)."""
    rows, prefills, decode_rows = [], [], 0
    for seq, w in enumerate(works):
        if w.decode:
            decode_rows += len(w.tokens)
        else:
            prefills.append((len(rows), len(w.tokens), w.start, seq))
        for i, token in enumerate(w.tokens):
            pos = w.start + i
            rows.append((token, pos, cache.slot(w.req.blocks, pos), pos + 1, 1, seq))
    if pad_to is not None:
        rows += [PAD_ROW] * (pad_to - len(rows))
    width = width or max(len(w.req.blocks) for w in works)
    tables = [w.req.blocks + [0] * (width - len(w.req.blocks)) for w in works]
    return HostRows(torch.tensor(rows, dtype=torch.int64), torch.tensor(tables, dtype=torch.int64), decode_rows,
                    prefills)


class ModelRunner:
    def __init__(self, model: Transformer, cache: LatentCache, use_triton: bool, max_positions: int):
        self.model = model
        self.cache = cache
        self.use_triton = use_triton
        self.device = cache.device
        model.share_input_weights()  # one GEMM per pair of sibling projections: fewer launches per decode step
        self.moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
        for moe in self.moes:
            moe.keep_routing = True  # the routing of the last forward, to count expert load over real rows
        with torch.no_grad():
            cos, sin = model.rotary(torch.arange(max_positions, device=self.device))
        self.rope = torch.cat([cos, sin], dim=-1)  # [max_positions, rope]: cos then sin, fp32

    def to_device(self, host: HostRows) -> Step:
        return Step(host.rows.to(self.device, non_blocking=True), host.tables.to(self.device, non_blocking=True),
                    host.decode_rows, host.prefills, self.use_triton)

    def _rotary(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope[step.positions].unsqueeze(0).chunk(2, dim=-1)  # [1, R, rope/2] each
        return cos, sin

    def forward(self, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> the final normed hidden state of every row [R, D], and tokens per expert [MoE layers, E] (or None)."""
        m = self.model
        cos, sin = self._rotary(step)
        x = m.embed_tokens(step.ids).unsqueeze(0)  # [1, R, D]
        for i, layer in enumerate(m.layers):
            x = layer(x, cos, sin, attn=cache_attention(layer.self_attn, self.cache.layer(i), step))
        return m.norm(x)[0], self._expert_load(step.valid)

    def forward_mtp(self, step: Step, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 over the same rows: row i reads the main hidden state at its position and the embedding of
        the token after it (next_ids[i]); its output's logits predict the token after that. -> [R, D]"""
        m = self.model
        cos, sin = self._rotary(step)
        mtp = m.mtp[0]
        attn = cache_attention(mtp.block.self_attn, self.cache.layer(m.cfg.num_hidden_layers), step)
        return mtp(m.embed_tokens(next_ids).unsqueeze(0), hidden.unsqueeze(0), cos, sin, attn=attn)[0]

    def greedy_speculative(self, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A speculative decode step for requests that are all plain greedy. There the token after each row is the
        argmax of its logits (on every row a request keeps), so the drafter can read it without a trip to the host.
        -> ([2, R] the argmax of the main and of the MTP logits of each row, expert load)"""
        hidden, load = self.forward(step)
        tokens = self.logits(hidden).argmax(dim=-1)
        drafts = self.logits(self.forward_mtp(step, hidden, tokens)).argmax(dim=-1)
        return torch.stack([tokens, drafts]), load

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()  # [N, V]

    def _expert_load(self, valid: torch.Tensor) -> torch.Tensor | None:
        if not self.moes:
            return None
        n_layers, n_exp = len(self.moes), self.model.cfg.n_routed_experts
        # One scatter for all layers: layer l's expert e counts in bin l * E + e.
        idx = torch.stack([moe.routing.indices for moe in self.moes])  # [L, R, K]
        idx = idx + torch.arange(n_layers, device=idx.device).view(-1, 1, 1) * n_exp
        weight = valid.view(1, -1, 1).expand_as(idx).float()
        load = torch.zeros(n_layers * n_exp, device=idx.device).scatter_add_(0, idx.flatten(), weight.flatten())
        return load.view(n_layers, n_exp)
