"""Decode attention of absorbed MLA over the paged latent cache: a Triton kernel and its PyTorch reference.

Absorbed MLA is multi-query attention with one shared key/value head of width C + R: every query head h brings a
latent query q_lat[h] = W_UK[h]^T q_nope[h] (C wide) and its roped q_pe[h] (R wide); a cached token j brings its
normalised c_kv[j] (C) and roped k_pe[j] (R). Then

    score[h, j] = (q_lat[h] . c_kv[j] + q_pe[h] . k_pe[j]) * scale,    out[h] = softmax_j(score[h]) @ c_kv

and the caller maps `out` (still latent, C wide) through W_UV. The cache of one layer is [num_blocks, block_size,
C + R] (c_kv then k_pe in each slot); sequence s owns the blocks `block_tables[s]` in order.

Notable features:
- Query rows, not sequences: row m reads the table of sequence `seq[m]` and sees its first `lengths[m]` tokens, so the
  rows of a speculative verification (several positions of one sequence) and plain decode rows share one launch.
- The kernel is split-K ("flash decoding"): programs over (row, block of 16 heads, split of the pages) each run an
  online softmax over their pages and write a partial output with its log-sum-exp; a second kernel merges the
  splits (one launch, where the torch epilogue it replaces took four: at batch 1 each costs as much as the
  attention itself). The split count depends on shapes only, never on the lengths, so the launches can live in a
  CUDA graph.
- Any C, R and head count (power-of-two tiles with masks); tokens past a row's length are never read. Queries, seq
  and lengths may be strided views (the engine passes columns of its packed row tensor).
- `write_latents_triton`: the step's cache write (each row's latent into its slot) as one small kernel launched like
  the others of the step (programmatic dependent launch), where the indexed assignment it replaces was an aten
  index kernel that the next kernel could not overlap: 16b batch-1 decode 382.3 vs 365.8 tokens/s (+4.5%).
- `mla_decode_reference` is the plain gather-and-softmax the kernel is tested against; it is also the CPU path.
"""

from __future__ import annotations

import functools

import torch

from .tuning import pdl_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

BLOCK_H = 16  # heads per program: tl.dot needs at least 16 rows
BLOCK_N = 32  # cached tokens per inner step
MERGE_S, MERGE_C = 32, 64  # the merge's tile: splits x latent channels per step


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    # q_lat: [M, H, C], q_pe: [M, H, R], kv_cache: [P, bs, C+R], block_tables: [S, W], seq, lengths: [M] -> [M, H, C]
    c = q_lat.shape[-1]
    kv = kv_cache[block_tables[seq].long()].flatten(1, 2).float()  # [M, W*bs, C+R]
    scores = torch.einsum("mhc,msc->mhs", q_lat.float(), kv[..., :c])
    scores = scores + torch.einsum("mhr,msr->mhs", q_pe.float(), kv[..., c:])
    visible = torch.arange(kv.shape[1], device=kv.device) < lengths[:, None]  # [M, W*bs]
    probs = (scores * scale).masked_fill(~visible[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("mhs,msc->mhc", probs, kv[..., :c]).to(q_lat.dtype)


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq: torch.Tensor, lengths: torch.Tensor, scale: float, use_triton: bool) -> torch.Tensor:
    if use_triton:
        return mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale)
    return mla_decode_reference(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale)


def write_latents_reference(kv_cache: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor) -> None:
    # kv_cache: [P, bs, C+R] written in place at the flat slots [M] with latents [M, C+R]
    kv_cache.view(-1, kv_cache.shape[-1])[slots] = latents


def write_latents_triton(kv_cache: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor) -> None:
    """write_latents_reference as one Triton launch."""
    if triton is None:
        raise RuntimeError("the Triton cache write needs the triton package")
    width = kv_cache.shape[-1]
    if not kv_cache.is_contiguous() or latents.shape[-1] != width or latents.stride(-1) != 1:
        raise ValueError(f"write_latents wants a contiguous cache and latent rows of width {width}")
    if latents.shape[0]:
        _write_latents[(latents.shape[0],)](kv_cache, slots, latents, slots.stride(0), latents.stride(0), width,
                                            BLOCK=triton.next_power_of_2(width), **pdl_meta(kv_cache.device))


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (a CUDA device with Triton installed)."""
    return triton is not None and device.type == "cuda"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(rows: int, head_blocks: int, pages: int, device: torch.device) -> int:
    # Enough programs to fill the GPU about twice at the widest table; empty splits return at once.
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    return max(1, min(pages, -(-2 * sms // (rows * head_blocks))))


def mla_decode_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the Triton MLA decode kernel needs the triton package")
    m, h, c = q_lat.shape
    r = q_pe.shape[-1]
    if kv_cache.shape[-1] != c + r or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous [blocks, block_size, {c + r}], got {list(kv_cache.shape)}")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q_lat, q_pe and block_tables need a contiguous last dimension")
    page = kv_cache.shape[1]
    pages = block_tables.shape[1]
    head_blocks = triton.cdiv(h, BLOCK_H)
    splits = _num_splits(m, head_blocks, pages, q_lat.device)
    pages_per_split = triton.cdiv(pages, splits)
    splits = triton.cdiv(pages, pages_per_split)
    partial = q_lat.new_empty(m, splits, h, c, dtype=torch.float32)
    lse = q_lat.new_empty(m, splits, h, dtype=torch.float32)
    _mla_decode_split[(m, head_blocks, splits)](
        q_lat, q_pe, kv_cache, block_tables, seq, lengths, partial, lse, float(scale),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0), seq.stride(0),
        lengths.stride(0), h, pages_per_split,
        # tl.dot wants every tile dimension >= 16; the masks keep the padding out.
        C=c, R=r, BLOCK_C=max(16, triton.next_power_of_2(c)), BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, PAGE=page, num_warps=4, num_stages=2, **pdl_meta(q_lat.device),
    )
    out = torch.empty_like(q_lat, memory_format=torch.contiguous_format)  # [M, H, C]
    _mla_merge[(m, h, triton.cdiv(c, MERGE_C))](partial, lse, out, splits, h, C=c, BLOCK_S=MERGE_S, BLOCK_C=MERGE_C,
                                                **pdl_meta(q_lat.device))
    return out


if triton is not None:
    from .tuning import pdl_prologue

    @triton.jit
    def _mla_decode_split(Q, QPE, KV, BT, SEQ, LENS, OUT, LSE, scale,
                          stride_qm, stride_qh, stride_pm, stride_ph, stride_bt, stride_seq, stride_len,
                          H, PAGES_PER_SPLIT,
                          C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        row = tl.program_id(0)
        head_block = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)

        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        hmask = heads < H
        cmask = offs_c < C
        rmask = offs_r < R
        q = tl.load(Q + row * stride_qm + heads[:, None] * stride_qh + offs_c[None, :],
                    mask=hmask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_C]
        q_pe = tl.load(QPE + row * stride_pm + heads[:, None] * stride_ph + offs_r[None, :],
                       mask=hmask[:, None] & rmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]

        table = BT + tl.load(SEQ + row * stride_seq).to(tl.int64) * stride_bt
        length = tl.load(LENS + row * stride_len)
        start = split * PAGES_PER_SPLIT * PAGE
        end = tl.minimum(start + PAGES_PER_SPLIT * PAGE, length)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)
            tmask = toks < end
            block = tl.load(table + toks // PAGE, mask=tmask, other=0).to(tl.int64)
            slot = KV + (block * PAGE + toks % PAGE)[:, None] * (C + R)  # [BLOCK_N, 1] slot pointers
            c_kv = tl.load(slot + offs_c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
            k_pe = tl.load(slot + C + offs_r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))  # [BLOCK_H, BLOCK_N]
            s = tl.where(tmask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
            m_i = m_new

        # A split past the row's length read nothing: output 0 with log-sum-exp -inf, so the merge ignores it.
        has = l_i > 0
        safe_l = tl.where(has, l_i, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(has, m_i + tl.log(safe_l), float("-inf"))
        base = (row * n_splits + split) * H
        tl.store(OUT + (base + heads)[:, None] * C + offs_c[None, :], out, mask=hmask[:, None] & cmask[None, :])
        tl.store(LSE + base + heads, lse, mask=hmask)

    @triton.jit
    def _write_latents(KV, SLOTS, LAT, stride_slot, stride_lat, W, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Program m: latent row m into the cache's flat slot SLOTS[m]
        pdl_prologue(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < W
        slot = tl.load(SLOTS + row * stride_slot).to(tl.int64)
        tl.store(KV + slot * W + cols, tl.load(LAT + row * stride_lat + cols, mask=mask), mask=mask)

    @triton.jit
    def _mla_merge(PART, LSE, OUT, n_splits, H, C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                   PDL: tl.constexpr):
        # Program (row, head, channel block): out = sum over splits of exp(lse_s - logsumexp(lse)) * part_s. Each
        # partial is normalised by its own softmax sum, so these weights make the softmax over all the tokens. A
        # row's first split always holds tokens (lengths >= 1), so the max below is finite; empty splits (lse
        # -inf) weigh 0.
        pdl_prologue(PDL)
        row = tl.program_id(0)
        head = tl.program_id(1)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        offs_s = tl.arange(0, BLOCK_S)
        first = LSE + row * n_splits * H + head  # lse of split s at first + s * H
        lse0 = tl.load(first + offs_s * H, mask=offs_s < n_splits, other=float("-inf"))
        top = tl.max(lse0, axis=0)
        for s0 in range(BLOCK_S, n_splits, BLOCK_S):
            chunk = tl.load(first + (s0 + offs_s) * H, mask=s0 + offs_s < n_splits, other=float("-inf"))
            top = tl.maximum(top, tl.max(chunk, axis=0))
        total = tl.sum(tl.exp(lse0 - top), axis=0)
        for s0 in range(BLOCK_S, n_splits, BLOCK_S):
            chunk = tl.load(first + (s0 + offs_s) * H, mask=s0 + offs_s < n_splits, other=float("-inf"))
            total += tl.sum(tl.exp(chunk - top), axis=0)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            splits = s0 + offs_s
            smask = splits < n_splits
            w = tl.exp(tl.load(first + splits * H, mask=smask, other=float("-inf")) - top) / total  # [BLOCK_S]
            part = tl.load(PART + ((row * n_splits + splits) * H + head)[:, None] * C + offs_c[None, :],
                           mask=smask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_S, BLOCK_C]
            acc += tl.sum(part * w[:, None], axis=0)
        tl.store(OUT + (row * H + head) * C + offs_c, acc.to(OUT.dtype.element_ty), mask=cmask)
