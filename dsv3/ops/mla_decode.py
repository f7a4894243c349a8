"""Decode attention of absorbed MLA over the paged latent cache: a Triton kernel and its PyTorch reference.

Absorbed MLA is multi-query attention with one shared key/value head of width C + R: every query head h brings a
latent query q_lat[h] = W_UK[h]^T q_nope[h] (C wide) and its roped q_pe[h] (R wide); a cached token j brings its
normalised c_kv[j] (C) and roped k_pe[j] (R). Then

    score[h, j] = (q_lat[h] . c_kv[j] + q_pe[h] . k_pe[j]) * scale,    o[h] = softmax_j(score[h]) @ c_kv

and W_UV maps the latent o[h] (C wide) to the head's values. The cache of one layer is [num_blocks, block_size,
C + R] (c_kv then k_pe in each slot); sequence s owns the blocks `block_tables[s]` in order.

Notable features:
- Query rows, not sequences: row m reads the table of sequence `seq[m]` and sees its first `lengths[m]` tokens, so the
  rows of a speculative verification (several positions of one sequence) and plain decode rows share one launch.
  With programmatic dependent launch the split kernel reads seq, lengths and the tables before it waits for the
  kernel launched just before it, so they must not come from that kernel (the engine's come from the host).
- The kernel is split-K ("flash decoding"): programs over (row, block of 16 heads, split of the pages) each run an
  online softmax over their pages and write a partial output with its log-sum-exp; a second kernel merges the
  splits and maps the merged latent through W_UV (`w_uv`, [H, v, C]) to the head's output [v], so the caller gets
  [M, H, v]. That kernel reads its W_UV tile before it waits for the split kernel (programmatic dependent launch:
  the weights do not depend on it), so at batch 1 the merge and cuBLAS's per-head bmm it replaces cost one short
  launch. The split count depends on shapes only, never on the lengths, so the launches can live in a CUDA graph.
- Any C, R and head count (power-of-two tiles with masks); tokens past a row's length are never read. Queries, seq
  and lengths may be strided views (the engine passes columns of its packed row tensor).
- `mla_decode_reference` is the plain gather-and-softmax (then a bmm) the kernel is tested against; it is also the
  CPU path.
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
MERGE_S, MERGE_V = 8, 16  # the merge's tiles: splits per step, value channels per program (16b: 128 programs)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq: torch.Tensor, lengths: torch.Tensor, scale: float, w_uv: torch.Tensor) -> torch.Tensor:
    # q_lat: [M, H, C], q_pe: [M, H, R], kv_cache: [P, bs, C+R], block_tables: [S, W], seq, lengths: [M],
    # w_uv: [H, v, C] -> [M, H, v]
    c = q_lat.shape[-1]
    kv = kv_cache[block_tables[seq].long()].flatten(1, 2).float()  # [M, W*bs, C+R]
    scores = torch.einsum("mhc,msc->mhs", q_lat.float(), kv[..., :c])
    scores = scores + torch.einsum("mhr,msr->mhs", q_pe.float(), kv[..., c:])
    visible = torch.arange(kv.shape[1], device=kv.device) < lengths[:, None]  # [M, W*bs]
    probs = (scores * scale).masked_fill(~visible[:, None, :], float("-inf")).softmax(dim=-1)
    o_lat = torch.einsum("mhs,msc->mhc", probs, kv[..., :c]).to(q_lat.dtype)
    return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq: torch.Tensor, lengths: torch.Tensor, scale: float, w_uv: torch.Tensor,
               use_triton: bool) -> torch.Tensor:
    fn = mla_decode_triton if use_triton else mla_decode_reference
    return fn(q_lat, q_pe, kv_cache, block_tables, seq, lengths, scale, w_uv)


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (a CUDA device with Triton installed)."""
    return triton is not None and device.type == "cuda"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(rows: int, head_blocks: int, chunks: int, device: torch.device) -> int:
    # Enough programs to fill the GPU about twice at the widest table, down to one chunk of BLOCK_N tokens each (at
    # batch 1 a split's time is mostly the latency of its first loads, so short splits finish soonest); empty
    # splits return at once.
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    return max(1, min(chunks, -(-2 * sms // (rows * head_blocks))))


def mla_decode_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq: torch.Tensor, lengths: torch.Tensor, scale: float, w_uv: torch.Tensor) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the Triton MLA decode kernel needs the triton package")
    m, h, c = q_lat.shape
    r = q_pe.shape[-1]
    if kv_cache.shape[-1] != c + r or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous [blocks, block_size, {c + r}], got {list(kv_cache.shape)}")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1 or block_tables.stride(-1) != 1 or w_uv.stride(-1) != 1:
        raise ValueError("q_lat, q_pe, block_tables and w_uv need a contiguous last dimension")
    if w_uv.shape[0] != h or w_uv.shape[2] != c:
        raise ValueError(f"w_uv must be [{h}, v, {c}], got {list(w_uv.shape)}")
    page = kv_cache.shape[1]
    pages = block_tables.shape[1]
    head_blocks = triton.cdiv(h, BLOCK_H)
    chunks = triton.cdiv(pages * page, BLOCK_N)
    splits = _num_splits(m, head_blocks, chunks, q_lat.device)
    chunks_per_split = triton.cdiv(chunks, splits)
    splits = triton.cdiv(chunks, chunks_per_split)
    partial = q_lat.new_empty(m, splits, h, c, dtype=torch.float32)
    lse = q_lat.new_empty(m, splits, h, dtype=torch.float32)
    _mla_decode_split[(m, head_blocks, splits)](
        q_lat, q_pe, kv_cache, block_tables, seq, lengths, partial, lse, float(scale),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0), seq.stride(0),
        lengths.stride(0), h, chunks_per_split * BLOCK_N,
        # tl.dot wants every tile dimension >= 16; the masks keep the padding out.
        C=c, R=r, BLOCK_C=max(16, triton.next_power_of_2(c)), BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, PAGE=page, num_warps=8, num_stages=2, **pdl_meta(q_lat.device),
    )
    v = w_uv.shape[1]
    out = q_lat.new_empty(m, h, v)
    _mla_merge[(m, h, triton.cdiv(v, MERGE_V))](partial, lse, w_uv, out, splits, h, w_uv.stride(0), w_uv.stride(1),
                                                C=c, V=v, BLOCK_S=MERGE_S, BLOCK_C=triton.next_power_of_2(c),
                                                BLOCK_V=MERGE_V, **pdl_meta(q_lat.device))
    return out


if triton is not None:
    from .tuning import pdl_prologue

    @triton.jit
    def _mla_decode_split(Q, QPE, KV, BT, SEQ, LENS, OUT, LSE, scale,
                          stride_qm, stride_qh, stride_pm, stride_ph, stride_bt, stride_seq, stride_len,
                          H, TOKENS_PER_SPLIT,
                          C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        head_block = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)

        # The rows' sequences, lengths and block tables come from the host (or kernels long done), never from the
        # kernel just before, so the first pages' ids are looked up before waiting for that kernel: two dependent
        # loads off the critical path of a batch-1 step.
        table = BT + tl.load(SEQ + row * stride_seq).to(tl.int64) * stride_bt
        length = tl.load(LENS + row * stride_len)
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, length)
        first = start + tl.arange(0, BLOCK_N)
        block = tl.load(table + first // PAGE, mask=first < end, other=0).to(tl.int64)
        pdl_prologue(PDL)

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

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)
            tmask = toks < end
            slot = KV + (block * PAGE + toks % PAGE)[:, None] * (C + R)  # [BLOCK_N, 1] slot pointers
            c_kv = tl.load(slot + offs_c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
            k_pe = tl.load(slot + C + offs_r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
            following = toks + BLOCK_N
            block = tl.load(table + following // PAGE, mask=following < end, other=0).to(tl.int64)
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
    def _mla_merge(PART, LSE, W, OUT, n_splits, H, stride_wh, stride_wv, C: tl.constexpr, V: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
        # Program (row, head, tile of V): the merged latent o = sum over splits of exp(lse_s - logsumexp(lse)) *
        # part_s, then out = W_UV[head, tile] @ o. Each partial is normalised by its own softmax sum, so these
        # weights make the softmax over all the tokens. A row's first split always holds tokens (lengths >= 1), so
        # the max below is finite; empty splits (lse -inf) weigh 0 and their partials are not read.
        row = tl.program_id(0)
        head = tl.program_id(1)
        offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        # The weight tile does not depend on the split kernel: read it before waiting for that.
        w = tl.load(W + head * stride_wh + offs_v[:, None] * stride_wv + offs_c[None, :],
                    mask=(offs_v < V)[:, None] & cmask[None, :], other=0.0)  # [BLOCK_V, BLOCK_C]
        pdl_prologue(PDL)
        offs_s = tl.arange(0, BLOCK_S)
        first = LSE + row * n_splits * H + head  # lse of split s at first + s * H
        top = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            chunk = tl.load(first + (s0 + offs_s) * H, mask=s0 + offs_s < n_splits, other=float("-inf"))
            top = tl.maximum(top, chunk)
        top_all = tl.max(top, axis=0)
        total = tl.zeros([BLOCK_S], dtype=tl.float32)
        lat = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            splits = s0 + offs_s
            lse = tl.load(first + splits * H, mask=splits < n_splits, other=float("-inf"))
            weight = tl.exp(lse - top_all)  # [BLOCK_S], 0 for empty splits
            total += weight
            part = tl.load(PART + ((row * n_splits + splits) * H + head)[:, None] * C + offs_c[None, :],
                           mask=(lse > float("-inf"))[:, None] & cmask[None, :], other=0.0)  # [BLOCK_S, BLOCK_C]
            lat += tl.sum(part * weight[:, None], axis=0)
        # Rounded to the activation dtype first, as the unfused path's bmm input was.
        lat = (lat / tl.sum(total, axis=0)).to(OUT.dtype.element_ty).to(tl.float32)
        out = tl.sum(w.to(tl.float32) * lat[None, :], axis=1)  # [BLOCK_V]
        tl.store(OUT + (row * H + head) * V + offs_v, out.to(OUT.dtype.element_ty), mask=offs_v < V)
