"""MLA over the paged latent cache, and the model's blocks run with it.

Notable features:
- One step is a flat batch of token rows from many sequences (`Step`): decode rows first, then prefill chunks.
  Every row first writes its latent (c_kv, k_pe) into its cache slot; then each row attends to the cached tokens
  of its sequence up to its own position, so prefill, chunked prefill, decode and speculative verification are
  one code path.
- Decode rows use the absorbed form: W_UK folded into the query (q_lat = W_UK^T q_nope, kv_lora_rank wide) and W_UV
  into the output, attending straight over the cached latents (`ops.mla_decode`, Triton or its reference). The
  absorbed weights are views of `kv_b_proj.weight` ([H * (nope + v), kv_lora]: per head nope rows of W_UK, then v
  rows of W_UV), never copies.
- Prefill chunks use the expanded form: the chunk's context latents are read back from the cache and expanded by
  kv_b_proj into per-head keys and values for one SDPA call; compute-bound prompts are cheaper that way.
- The model's blocks run with this attention through their `attn` hook (`cache_attention` binds a layer's cache
  and the step), so the engine has no copy of the block code.
- Under torch.compile the Triton decode kernel is called as the custom op `dsv3::mla_decode_triton`: the compiler
  sees one opaque call with a declared output shape instead of tracing the kernel launch. The cache write is the
  custom op `dsv3::write_cache`, which mutates the cache layer in place (with Triton, one kernel:
  `ops.mla_decode.write_latents_triton`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import MLA
from ..ops.mla_decode import mla_decode, mla_decode_triton, write_latents_reference, write_latents_triton

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
    # x: [1, R, D] (the rows as one sequence, as MLA's projections expect); kv: [P, bs, C+R] -> [1, R, D]
    cfg = mla.cfg
    q_nope, q_pe, c_kv, k_pe = mla.project(x, cos, sin)  # [1, R, H, nope], [1, R, H, rope], [1, R, C], [1, R, rope]
    latents = torch.cat([c_kv, k_pe], dim=-1)[0]  # [R, C+R]
    if torch.compiler.is_compiling():
        torch.ops.dsv3.write_cache(kv, step.rows[:, SLOT], latents, step.use_triton)
    else:
        write_cache(kv, step.rows[:, SLOT], latents, step.use_triton)
    q_nope, q_pe = q_nope[0], q_pe[0]
    d = step.decode_rows
    if not step.prefills:
        out = absorbed(mla, q_nope, q_pe, kv, step)
    else:
        out = q_nope.new_empty(q_nope.shape[0], mla.n_heads, cfg.v_head_dim)  # [R, H, v]
        if d:
            out[:d] = absorbed(mla, q_nope[:d], q_pe[:d], kv, step)
        for row, n, start, seq in step.prefills:
            pages = step.tables[seq, : -(-(start + n) // kv.shape[1])]
            out[row:row + n] = expanded(mla, q_nope[row:row + n], q_pe[row:row + n], kv, pages, start)
    return mla.o_proj(out.flatten(1)).unsqueeze(0)


def write_cache(kv: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor, use_triton: bool) -> None:
    # kv: [P, bs, C+R] written in place at the flat slots [R] with latents [R, C+R]
    (write_latents_triton if use_triton else write_latents_reference)(kv, slots, latents)


# The cache write as an op that mutates its cache argument, for torch.compile: as a traced index_put into the
# layer, torch 2.11's inductor on CUDA copied the whole layer out and back around the write (found on the H200;
# torch 2.13 on the CPU writes in place). A mutating custom op is written in place when the cache is a graph input.
@torch.library.custom_op("dsv3::write_cache", mutates_args=("kv",))
def _write_cache_op(kv: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor, use_triton: bool) -> None:
    write_cache(kv, slots, latents, use_triton)


@_write_cache_op.register_fake
def _(kv, slots, latents, use_triton):
    return None


# The Triton kernel as an op torch.compile does not look into (see the module docstring).
@torch.library.custom_op("dsv3::mla_decode_triton", mutates_args=())
def _mla_decode_triton_op(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    return mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale)


@_mla_decode_triton_op.register_fake
def _(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale):
    return q_lat.new_empty(q_lat.shape)  # [M, H, C], contiguous like the kernel's merged output


def absorbed(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, step: Step) -> torch.Tensor:
    # q_nope: [M, H, nope], q_pe: [M, H, rope] for the first M rows -> [M, H, v]
    cfg = mla.cfg
    m = q_nope.shape[0]
    w = mla.kv_b_proj.weight.view(mla.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    w_uk, w_uv = w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]  # [H, nope, C], [H, v, C]
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [M, H, C]
    rows = step.rows[:m]
    args = (q_lat, q_pe, kv, step.tables, rows[:, SEQ], rows[:, LEN], mla.softmax_scale)
    if step.use_triton and torch.compiler.is_compiling():
        o_lat = torch.ops.dsv3.mla_decode_triton(*args)  # [M, H, C]
    else:
        o_lat = mla_decode(*args, step.use_triton)
    return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [M, H, v]


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
