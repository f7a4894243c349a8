"""The model over the paged cache: one flat batch of token rows per forward, for the main model and the MTP drafter.

Notable features:
- `rows_for` lays a step's work out as the int64 rows of `attention.Step` (decode rows first, then prefill chunks)
  plus one block table per sequence, built on the host and moved to the device in two copies.
- The forward runs the model's own modules and weights (embedding, blocks, norms, head); only attention is swapped
  for the cache-backed one, through the blocks' `attn` hook.
- RoPE cos/sin come from a table over every position the engine serves, built once from the model's rotary
  module: one gather per step instead of recomputing the angles.
- `greedy_step` runs a decode step of plain greedy requests (main forward, argmax, and speculating the
  verification and the drafter, chained for more than one draft) as one call that needs no host round trip, and
  leaves the next step's rows in its input buffer; CUDA graphs capture it whole and replay it back to back.
- The model's sibling projections share one weight buffer each (`Transformer.share_input_weights`), so a step
  runs one GEMM for MLA's q and kv_a projections and one for an MLP's gate and up.
- Expert load per MoE layer is counted from each MoE's routing of the step, over real rows only: the padding rows
  of a CUDA-graph batch are masked out. A greedy step hands its routing back instead, and the engine counts it
  once it knows which rows were live (a request may stop within a burst of greedy steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import MoE, Transformer
from .attention import ID, LEN, POS, SEQ, SLOT, VALID, Step, cache_attention
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

    def greedy_step(self, step: Step, drafts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode step of requests that are all plain greedy, with no trip to the host: the token after each row is
        the argmax of its logits. With `drafts` k > 0 (speculating) every sequence feeds G = k + 1 rows, its last
        token and k drafts; a draft is accepted when it is the token after the row before it, and the sequence's
        next k drafts come from the MTP module (`_drafts`). The step's rows are then rewritten in place into the
        next step's. -> (out, the routing of each row (`routing`), which the engine counts as expert load once it
        knows which rows were live). out is [1, R], the argmax of each row, or speculating [2, R], that and each
        sequence's next drafts in the first k of its G rows."""
        hidden = self._hidden(step)
        tokens = self.logits(hidden).argmax(dim=-1)  # [R]
        g = drafts + 1
        rows = step.rows.view(-1, g, step.rows.shape[1])  # [P, G, 6]: the rows of P sequences
        chosen = tokens.view(-1, g)  # [P, G]
        if drafts:
            right = rows[:, 1:, ID] == chosen[:, :-1]  # [P, k]
            accepted = right.long().cumprod(dim=1).sum(dim=1, keepdim=True)  # [P, 1]: drafts right in a row
            new = self._drafts(step, hidden, tokens, rows[:, 0], accepted, drafts)  # [P, k]
            fed = torch.cat([chosen.gather(1, accepted), new], dim=1)  # [P, G]
            out = torch.stack([tokens, F.pad(new, (0, 1)).flatten()])
        else:
            accepted = torch.zeros_like(chosen)
            fed, out = chosen, tokens.unsqueeze(0)
        # Each sequence moves on past its fed token and accepted drafts, feeding the token chosen after them.
        pos = rows[:, 0, POS, None] + 1 + accepted + torch.arange(g, device=tokens.device)  # [P, G]
        step.rows.copy_(self._rows_at(step, step.rows, fed.flatten(), pos.flatten()))
        return out, self.routing() if self.moes else None

    def _drafts(self, step: Step, hidden: torch.Tensor, tokens: torch.Tensor, first: torch.Tensor,
                accepted: torch.Tensor, k: int) -> torch.Tensor:
        """The next k drafts of each sequence of a greedy speculative step -> [P, k].

        The drafter runs over every row (its cache layer needs each row's latent), reading the row's main hidden
        state and the token chosen after it; the row of the last accepted position gives the first draft. Each
        further draft runs the MTP module on its own previous output, as a depth-2 module would read depth 1's,
        one row per sequence at the next position; its cache writes there are overwritten by the next step's
        drafter rows before any of them reads the slot. first: [P, 6] each sequence's first row."""
        g = k + 1
        m = self.forward_mtp(step, hidden, tokens)  # [R, D]
        guess = self.logits(m).argmax(dim=-1).view(-1, g)  # [P, G]
        out = [guess.gather(1, accepted)]  # [P, 1]
        h = m.view(-1, g, m.shape[-1]).gather(1, accepted.unsqueeze(2).expand(-1, -1, m.shape[-1]))[:, 0]  # [P, D]
        for j in range(1, k):
            # Call j sits at the next fed position + j - 1; the previous call's output stands for its hidden state.
            pos = first[:, POS] + accepted[:, 0] + j
            chain = Step(self._rows_at(step, first, out[-1][:, 0], pos), step.tables, first.shape[0], [],
                         step.use_triton)
            h = self.forward_mtp(chain, h, out[-1][:, 0])
            out.append(self.logits(h).argmax(dim=-1, keepdim=True))
        return torch.cat(out, dim=1)

    def _rows_at(self, step: Step, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """rows [N, 6] moved to feed ids [N] at positions pos [N] of their sequences, as `rows_for` lays a decode
        row out; padding rows (not valid) stay as they are, on the scratch slot."""
        bs, tables = self.cache.block_size, step.tables
        # Padding rows would index past the table; they keep their old row anyway.
        block = tables[rows[:, SEQ], (pos // bs).clamp(max=tables.shape[1] - 1)]
        nxt = rows.clone()
        nxt[:, ID], nxt[:, POS], nxt[:, SLOT], nxt[:, LEN] = ids, pos, block * bs + pos % bs, pos + 1
        return torch.where(rows[:, VALID, None].bool(), nxt, rows)

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
