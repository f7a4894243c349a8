"""MLA over the paged latent cache, and the model's blocks run with it.

Notable features:
- One step is a flat batch of token rows from many sequences (`Step`): decode rows first, then prefill chunks.
  Every row first writes its latent (c_kv, k_pe) into its cache slot; then each row attends to the cached tokens
  of its sequence up to its own position, so prefill, chunked prefill, decode and speculative verification are
  one code path. After the input projections, the latents' norm and rope, the cache write, the query's rope and
  the decode rows' latent queries are one step (`ops.mla_prepare`: one Triton kernel, or its reference).
- Decode rows use the absorbed form: W_UK folded into the query (q_lat = W_UK^T q_nope, kv_lora_rank wide) and W_UV
  into the output, attending straight over the cached latents (`ops.mla_decode`, Triton or its reference). The
  absorbed weights are views of `kv_b_proj.weight` ([H * (nope + v), kv_lora]: per head nope rows of W_UK, then v
  rows of W_UV), never copies.
- Prefill chunks use the expanded form: the chunk's context latents are read back from the cache and expanded by
  kv_b_proj into per-head keys and values for one SDPA call; compute-bound prompts are cheaper that way.
- The model's blocks run with this attention through their `attn` hook (`cache_attention` binds a layer's cache
  and the step), so the engine has no copy of the block code.
- Under torch.compile the Triton kernels are called as the custom ops `dsv3::mla_prepare` (which mutates the
  cache layer in place) and `dsv3::mla_decode_triton`: the compiler sees opaque calls with declared output shapes
  instead of tracing the kernel launches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLA
from ..ops import gemv
from ..ops.mla_decode import mla_decode, mla_decode_triton
from ..ops.mla_prepare import prepare, prepare_triton

# columns of Step.rows
ID, POS, SLOT, LEN, VALID, SEQ = range(6)


@dataclass
class Step:
    """The rows of one forward on the device; the same for every layer."""

    rows: torch.Tensor  # [R, 6] int64: token id, position, cache slot, visible length, valid (0/1), sequence
    tables: torch.Tensor  # [S, W] int64: block table of each sequence, padded with block 0
    decode_rows: int  # rows [0, decode_rows): absorbed attention, one query each
    prefills: list[tuple[int, int, int, int]]  # (first row, rows, first position, sequence): expanded attention
    use_triton: bool

    @property
    def ids(self) -> torch.Tensor:
        return self.rows[:, ID]

    @property
    def positions(self) -> torch.Tensor:
        return self.rows[:, POS]

    @property
    def valid(self) -> torch.Tensor:
        return self.rows[:, VALID].bool()


def mla_attention(mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                  step: Step) -> torch.Tensor:
    # x: [1, R, D] (the rows as one sequence, as MLA's projections expect); cos, sin: [1, R, rope/2];
    # kv: [P, bs, C+R] -> [1, R, D]
    cfg = mla.cfg
    h, nope = mla.n_heads, cfg.qk_nope_head_dim
    q, latent_in = projections(mla, x[0], step.use_triton)  # [R, H*(nope+rope)], [R, C+rope]
    w = mla.kv_b_proj.weight.view(h, nope + cfg.v_head_dim, cfg.kv_lora_rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, C], [H, v, C]
    d = step.decode_rows
    norm = mla.kv_a_layernorm
    args = (q, latent_in, w_uk, norm.weight, norm.eps, cos[0], sin[0], cfg.rope_interleave, kv, step.rows[:, SLOT], d)
    # Every row's latent into its cache slot, every row's roped q_pe, the decode rows' latent queries.
    if step.use_triton and torch.compiler.is_compiling():
        q_lat, q_pe = torch.ops.dsv3.mla_prepare(*args)  # [d, H, C], [R, H, rope]
    else:
        q_lat, q_pe = prepare(*args, step.use_triton)
    if not step.prefills:
        out = absorbed(mla, q_lat, q_pe, kv, w_uv, step)
    else:
        q_nope = q.unflatten(-1, (h, cfg.qk_head_dim))[..., :nope]  # [R, H, nope]
        out = q_nope.new_empty(q_nope.shape[0], h, cfg.v_head_dim)  # [R, H, v]
        if d:
            out[:d] = absorbed(mla, q_lat, q_pe[:d], kv, w_uv, step)
        for row, n, start, seq in step.prefills:
            pages = step.tables[seq, : -(-(start + n) // kv.shape[1])]
            out[row:row + n] = expanded(mla, q_nope[row:row + n], q_pe[row:row + n], kv, pages, start)
    flat = out.flatten(1)  # [R, H*v]
    o = mla.o_proj
    if step.use_triton and type(o) is nn.Linear and o.bias is None and gemv.applies(flat, o.weight):
        return gemv.gemv(flat, o.weight).unsqueeze(0)
    return o(flat).unsqueeze(0)


def projections(mla: MLA, x: torch.Tensor, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # x: [R, D] -> MLA.projections' q [R, H*(nope+rope)] and kv_a output [R, C+rope]; at a few rows one GEMV over
    # the shared input weight (`ops.gemv`), which reads its weights while the previous kernel (the norm) finishes
    w = mla.input_weight
    if use_triton and w is not None and mla.cfg.q_lora_rank is None and gemv.applies(x, w):
        kv_width = mla.kv_a_proj_with_mqa.out_features
        q, kv = gemv.gemv(x, w).split([w.shape[0] - kv_width, kv_width], dim=-1)
        return q, kv
    return mla.projections(x)


# The prepare kernel as an op that mutates its cache argument, for torch.compile: as a traced index_put into the
# layer, torch 2.11's inductor on CUDA copied the whole layer out and back around the write (found on the H200;
# torch 2.13 on the CPU writes in place). A mutating custom op is written in place when the cache is a graph input.
@torch.library.custom_op("dsv3::mla_prepare", mutates_args=("kv_cache",))
def _mla_prepare_op(q: torch.Tensor, kv: torch.Tensor, w_uk: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, interleave: bool, kv_cache: torch.Tensor,
                    slots: torch.Tensor, lat_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return prepare_triton(q, kv, w_uk, norm_weight, eps, cos, sin, interleave, kv_cache, slots, lat_rows)


@_mla_prepare_op.register_fake
def _(q, kv, w_uk, norm_weight, eps, cos, sin, interleave, kv_cache, slots, lat_rows):
    h, _, c = w_uk.shape
    return q.new_empty(lat_rows, h, c), q.new_empty(q.shape[0], h, kv_cache.shape[-1] - c)


# The Triton kernel as an op torch.compile does not look into (see the module docstring).
@torch.library.custom_op("dsv3::mla_decode_triton", mutates_args=())
def _mla_decode_triton_op(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq: torch.Tensor, lengths: torch.Tensor, scale: float, w_uv: torch.Tensor) -> torch.Tensor:
    return mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale, w_uv)


@_mla_decode_triton_op.register_fake
def _(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale, w_uv):
    return q_lat.new_empty(q_lat.shape[0], q_lat.shape[1], w_uv.shape[1])  # [M, H, v]


def absorbed(mla: MLA, q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, w_uv: torch.Tensor,
             step: Step) -> torch.Tensor:
    # q_lat: [M, H, C], q_pe: [M, H, rope] for the first M rows, w_uv: [H, v, C] -> [M, H, v]
    rows = step.rows[: q_lat.shape[0]]
    args = (q_lat, q_pe, kv, step.tables, rows[:, SEQ], rows[:, LEN], mla.softmax_scale, w_uv)
    if step.use_triton and torch.compiler.is_compiling():
        return torch.ops.dsv3.mla_decode_triton(*args)
    return mla_decode(*args, step.use_triton)


def expanded(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pages: torch.Tensor,
             start: int) -> torch.Tensor:
    # q_nope: [T, H, nope], q_pe: [T, H, rope] at positions start..start+T-1; pages: the sequence's blocks -> [T, H, v]
    cfg = mla.cfg
    t, h = q_nope.shape[0], mla.n_heads
    ctx = start + t
    c_kv, k_pe = kv[pages].flatten(0, 1)[:ctx].split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    k_nope, v = mla.kv_b_proj(c_kv).unflatten(-1, (h, -1)).split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, T, qk]
    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, h, -1)], dim=-1).transpose(0, 1)  # [H, ctx, qk]
    v = v.transpose(0, 1)  # [H, ctx, v]
    dv = v.shape[-1]
    if q.is_cuda and dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # the fused kernels want one head size for q, k and v
    if start == 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=mla.softmax_scale)
    else:
        # Query i sits at position start + i and sees keys 0..start + i (SDPA's is_causal would align top-left).
        mask = torch.arange(ctx, device=q.device) <= torch.arange(start, ctx, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=mla.softmax_scale)
    return o[..., :dv].transpose(0, 1)


def cache_attention(mla: MLA, kv: torch.Tensor, step: Step) -> Callable[..., torch.Tensor]:
    """`mla` over the cache layer `kv` for the rows of `step`, in the form of `Block.forward`'s attn hook."""
    def attn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return mla_attention(mla, x, cos, sin, kv, step)

    return attn
