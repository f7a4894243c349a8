"""The model over the paged cache: one flat batch of token rows per forward, for the main model and the MTP drafter.

Notable features:
- `rows_for` lays a step's work out as the int64 rows of `attention.Step` (decode rows first, then prefill chunks)
  plus one block table per sequence, built on the host and moved to the device in two copies.
- The forward runs the model's own modules and weights (embedding, blocks, norms, head); only attention is swapped
  for the cache-backed one, through the blocks' `attn` hook.
- RoPE cos/sin come from a table over every position the engine serves, built once from the model's rotary
  module: one gather per step instead of recomputing the angles.
- `greedy_step` runs a decode step of plain greedy requests (main forward, argmax, and speculating the drafter
  and its argmax) as one call that needs no host round trip, and leaves the next step's rows in its input
  buffer; CUDA graphs capture it whole and replay it back to back.
- The model's sibling projections share one weight buffer each (`Transformer.share_input_weights`), so a step
  runs one GEMM for MLA's q and kv_a projections and one for an MLP's gate and up.
- Expert load per MoE layer is counted from each MoE's routing of the step, over real rows only: the padding rows
  of a CUDA-graph batch are masked out. A greedy step hands its routing back instead, and the engine counts it
  once it knows which rows were live (a request may stop within a burst of greedy steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import MoE, Transformer
from .attention import ID, LEN, POS, SEQ, SLOT, Step, cache_attention
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
        hidden = self._hidden(step)
        return hidden, self.expert_load(self.routing(), step.valid) if self.moes else None

    def _hidden(self, step: Step) -> torch.Tensor:
        m = self.model
        cos, sin = self._rotary(step)
        x = m.embed_tokens(step.ids).unsqueeze(0)  # [1, R, D]
        for i, layer in enumerate(m.layers):
            x = layer(x, cos, sin, attn=cache_attention(layer.self_attn, self.cache.layer(i), step))
        return m.norm(x)[0]

    def forward_mtp(self, step: Step, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 over the same rows: row i reads the main hidden state at its position and the embedding of
        the token after it (next_ids[i]); its output's logits predict the token after that. -> [R, D]"""
        m = self.model
        cos, sin = self._rotary(step)
        mtp = m.mtp[0]
        attn = cache_attention(mtp.block.self_attn, self.cache.layer(m.cfg.num_hidden_layers), step)
        return mtp(m.embed_tokens(next_ids).unsqueeze(0), hidden.unsqueeze(0), cos, sin, attn=attn)[0]

    def greedy_step(self, step: Step, speculative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode step of requests that are all plain greedy, with no trip to the host: the token after each row is
        the argmax of its logits. Speculating, every sequence feeds two rows (its last token and its draft) and the
        drafter reads each row's argmax as the token after it. The step's rows are then rewritten in place into the
        next step's (`_advance`). -> ([1 or 2, R] the argmax of the main (and of the MTP) logits of each row, the
        routing of each row (`routing`)): the engine counts the expert load once it knows which rows were live."""
        hidden = self._hidden(step)
        tokens = self.logits(hidden).argmax(dim=-1)
        if speculative:
            drafts = self.logits(self.forward_mtp(step, hidden, tokens)).argmax(dim=-1)
            out = torch.stack([tokens, drafts])
        else:
            out = tokens.unsqueeze(0)
        self._advance(step, out)
        return out, self.routing() if self.moes else None

    def _advance(self, step: Step, out: torch.Tensor) -> None:
        """Rewrite a greedy step's rows into those of the step after it, as the host would lay them out: each
        sequence feeds the token it chose at the position after its last one. Speculating, a sequence whose draft
        was right (the argmax of its first row) moves on by two positions and feeds its second row's argmax, else by
        one and feeds its first row's, each with the drafter's guess from that row as the new draft. Padding rows
        stay as they are."""
        rows, bs = step.rows, self.cache.block_size
        if out.shape[0] == 1:
            ids, pos = out[0], rows[:, POS] + 1
        else:
            tokens, drafts = out.view(2, -1, 2).unbind(0)  # [P, 2] each: the rows of P sequences, in pairs
            pairs = rows.view(-1, 2, rows.shape[1])
            accepted = (pairs[:, 1, ID] == tokens[:, 0]).long().unsqueeze(1)  # [P, 1]
            ids = torch.cat([tokens.gather(1, accepted), drafts.gather(1, accepted)], dim=1).flatten()
            pos = (pairs[:, 0, POS, None] + 1 + accepted + torch.arange(2, device=rows.device)).flatten()
        # Padding rows would index past the table; they keep their old row anyway.
        block = step.tables[rows[:, SEQ], (pos // bs).clamp(max=step.tables.shape[1] - 1)]
        nxt = rows.clone()
        nxt[:, ID], nxt[:, POS], nxt[:, SLOT], nxt[:, LEN] = ids, pos, block * bs + pos % bs, pos + 1
        rows.copy_(torch.where(step.valid.unsqueeze(1), nxt, rows))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()  # [N, V]

    def routing(self) -> torch.Tensor:
        """The experts each row of the last forward went to, per MoE layer -> [L, R, K]."""
        return torch.stack([moe.routing.indices for moe in self.moes])

    def expert_load(self, routing: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Tokens per expert of each MoE layer [L, E], over the rows of routing [L, R, K] where valid [R] is true."""
        n_layers, n_exp = routing.shape[0], self.model.cfg.n_routed_experts
        # One scatter for all layers: layer l's expert e counts in bin l * E + e.
        idx = routing + torch.arange(n_layers, device=routing.device).view(-1, 1, 1) * n_exp
        weight = valid.view(1, -1, 1).expand_as(idx).float()
        load = torch.zeros(n_layers * n_exp, device=idx.device).scatter_add_(0, idx.flatten(), weight.flatten())
        return load.view(n_layers, n_exp)
