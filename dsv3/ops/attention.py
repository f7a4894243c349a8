"""MLA's causal attention for training (forward and backward, Triton), beside its PyTorch reference.

`mla_causal_attention(q_nope, q_pe, kv, k_pe, scale)` takes MLA's pieces as the projections make them, strided views
included: q_nope [B, T, H, Dn], q_pe [B, T, H, Dr] (roped), kv [B, T, H, Dn + Dv] (kv_b_proj's output per head: k_nope,
then v), k_pe [B, T, Dr] (roped, one for all heads); it returns o [B, T, H, Dv], the layout o_proj reads. kv's
gradient comes back as one tensor, so that no concatenation of k_nope's and v's gradients is needed before kv_b_proj's
backward.

Why a kernel of our own: cuDNN's attention, torch's choice on Hopper, takes one query/key width, so MLA's q and k
had to be concatenated (k_pe copied to every head), and its kernels run MLA's heads (96 = 64 + 32 for queries and keys,
64 for values in `1b`) in tiles named `..._64x64x128`, likely padded to 128. Here each score is the sum of two products
at their own widths, q_nope . k_nope + q_pe . k_pe, the values' products run at Dv, and the pieces are read where they
lie. At the `1b` shapes (H200, batch 48) the kernels alone about match cuDNN's (forward 1.43 against 1.24 ms, backward
4.3 against 4.8); what is gained is the copies around the call: one layer's forward and backward from the
projections' outputs 8.56 -> 6.62 ms, the whole training step ~0.7% at equal clock (docs/benchmarks.md, session 24).

The algorithm is FlashAttention-2's: the forward keeps a running max and sum per query row (base-2 exponentials of
the scores times scale * log2(e)) and stores each row's log-sum-exp; the backward recomputes the probabilities from
it, in one kernel per key block (dK, dV, looping over later query blocks) and one per query block (dQ, looping over
earlier key blocks), so no gradient is accumulated atomically. k_pe's gradient comes out per head and is summed.
Arithmetic in fp32, products on the tensor cores in the inputs' dtype.

The reference, `mla_causal_attention_reference`, is the concatenated form through scaled_dot_product_attention: what
runs on the CPU, in fp32 on a GPU, and where the head sizes are not powers of two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .tuning import INTERPRET, autotuned, fixed_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

LOG2E = math.log2(math.e)  # the kernels exponentiate in base 2


def mla_causal_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                         scale: float) -> torch.Tensor:
    # q_nope: [B, T, H, Dn], q_pe: [B, T, H, Dr], kv: [B, T, H, Dn + Dv], k_pe: [B, T, Dr] -> o: [B, T, H, Dv]
    on_gpu = q_nope.is_cuda and q_nope.dtype in (torch.bfloat16, torch.float16)  # fp32 products would be tf32's
    if triton is not None and (on_gpu or INTERPRET) and _kernel_shapes(q_nope, q_pe, kv):
        return _MLAAttention.apply(q_nope, q_pe, kv, k_pe, scale)
    return mla_causal_attention_reference(q_nope, q_pe, kv, k_pe, scale)


def mla_causal_attention_reference(q_nope, q_pe, kv, k_pe, scale: float) -> torch.Tensor:
    heads, dn = q_nope.shape[2], q_nope.shape[-1]
    k_nope, v = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, Dn + Dr]
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=scale).transpose(1, 2)


def _kernel_shapes(q_nope, q_pe, kv) -> bool:
    # tl.arange and the tensor cores' products want power-of-two widths of at least 16; the grid's second dimension,
    # B * H (one head's blocks run side by side, sharing its keys in L2), is at most 65,535
    dn = q_nope.shape[-1]
    widths = all(d >= 16 and d & (d - 1) == 0 for d in (dn, q_pe.shape[-1], kv.shape[-1] - dn))
    return widths and q_nope.shape[0] * q_nope.shape[2] <= 65535


def _last_dim_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


class _MLAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_pe, kv, k_pe, scale):
        q_nope, q_pe, kv, k_pe = _last_dim_contiguous(q_nope, q_pe, kv, k_pe)
        o, lse = torch.ops.dsv3.mla_attention_fwd(q_nope, q_pe, kv, k_pe, scale)
        ctx.save_for_backward(q_nope, q_pe, kv, k_pe, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q_nope, q_pe, kv, k_pe, o, lse = ctx.saved_tensors
        (grad_o,) = _last_dim_contiguous(grad_o)
        grads = torch.ops.dsv3.mla_attention_bwd(grad_o, q_nope, q_pe, kv, k_pe, o, lse, ctx.scale)
        return *grads, None


def _strides(t: torch.Tensor, dims: int = 3) -> list[int]:
    return list(t.stride()[:dims])


def _tuning_length(t: int) -> int:
    # the kernels' autotuning key: the sequence length rounded up to a power of two, so that a caller scoring texts of
    # many lengths does not time the tiles again for each one (training sees one length)
    return triton.next_power_of_2(t)


def _configs(tiles) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# (BLOCK_M, BLOCK_N, warps, stages), the best few of a sweep at the `1b` shapes on an H200 (docs/benchmarks.md,
# session 24): the forward's query block and key step; the dK/dV kernel's query step and key block; the dQ kernel's
# key step and query block. The dK/dV kernel with two stages ran 1.3x faster than with three.
FWD_TILES = ((128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 4, 4))
DKDV_TILES = ((64, 64, 4, 2), (64, 64, 4, 1), (64, 128, 4, 2), (32, 128, 4, 3))
DQ_TILES = ((32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3))


@torch.library.custom_op("dsv3::mla_attention_fwd", mutates_args=())
def _fwd_op(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, h, dn = q_nope.shape
    dv = kv.shape[-1] - dn
    o = q_nope.new_empty(b, t, h, dv)
    lse = torch.empty(b, h, t, device=q_nope.device, dtype=torch.float32)  # base 2, scores times scale * log2(e)
    if o.numel():
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)  # noqa: E731
        _fwd_kernel[grid](q_nope, q_pe, kv, k_pe, o, lse, scale * LOG2E, t, _tuning_length(t), h, *_strides(q_nope),
                          *_strides(q_pe), *_strides(kv), *_strides(k_pe, 2), *_strides(o), DN=dn, DR=q_pe.shape[-1],
                          DV=dv, **fixed_meta(_configs(FWD_TILES)))
    return o, lse


@_fwd_op.register_fake
def _(q_nope, q_pe, kv, k_pe, scale):
    b, t, h, dn = q_nope.shape
    return q_nope.new_empty(b, t, h, kv.shape[-1] - dn), q_nope.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("dsv3::mla_attention_bwd", mutates_args=())
def _bwd_op(grad_o: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, h, dn = q_nope.shape
    dr, dv = q_pe.shape[-1], kv.shape[-1] - dn
    d_q_nope, d_q_pe, d_kv = q_nope.new_empty(b, t, h, dn), q_pe.new_empty(b, t, h, dr), kv.new_empty(b, t, h, dn + dv)
    d_k_pe_heads = q_nope.new_empty(b, t, h, dr, dtype=torch.float32)
    if o.numel():
        delta = torch.empty_like(lse)  # [B, H, T]: each row's sum of o * d_o, the softmax backward's correction
        rows = b * t * h
        _delta_kernel[(triton.cdiv(rows, 64),)](o, grad_o, delta, rows, t, h, *_strides(o), *_strides(grad_o),
                                                DV=dv, BLOCK=64, num_warps=4)
        args = (q_nope, q_pe, kv, k_pe, grad_o, lse, delta, scale * LOG2E, scale, t, _tuning_length(t), h,
                *_strides(q_nope), *_strides(q_pe), *_strides(kv), *_strides(k_pe, 2), *_strides(grad_o))
        _dkdv_kernel[lambda meta: (triton.cdiv(t, meta["BLOCK_N"]), b * h)](
            *args, d_kv, d_k_pe_heads, DN=dn, DR=dr, DV=dv, **fixed_meta(_configs(DKDV_TILES)))
        _dq_kernel[lambda meta: (triton.cdiv(t, meta["BLOCK_N"]), b * h)](
            *args, d_q_nope, d_q_pe, DN=dn, DR=dr, DV=dv, **fixed_meta(_configs(DQ_TILES)))
    return d_q_nope, d_q_pe, d_kv, d_k_pe_heads.sum(2).to(k_pe.dtype)


@_bwd_op.register_fake
def _(grad_o, q_nope, q_pe, kv, k_pe, o, lse, scale):
    b, t, h, dn = q_nope.shape
    return (q_nope.new_empty(b, t, h, dn), q_pe.new_empty(b, t, h, q_pe.shape[-1]), kv.new_empty(kv.shape),
            k_pe.new_empty(k_pe.shape))


if triton is not None:

    @triton.jit
    def _tile(ptr, sb, st, sh, b, h, rows, t, D: tl.constexpr):
        # rows [R] of batch b, head h (sh = 0: shared by all heads) -> [R, D], zero past the sequence
        cols = tl.arange(0, D)
        return tl.load(ptr + b.to(tl.int64) * sb + h * sh + rows[:, None].to(tl.int64) * st + cols[None, :],
                       mask=rows[:, None] < t, other=0.0)

    @triton.jit
    def _store_tile(ptr, value, sb, st, sh, b, h, rows, t, D: tl.constexpr):
        cols = tl.arange(0, D)
        tl.store(ptr + b.to(tl.int64) * sb + h * sh + rows[:, None].to(tl.int64) * st + cols[None, :],
                 value.to(ptr.dtype.element_ty), mask=rows[:, None] < t)

    @triton.jit
    def _query_block(QN, QR, t, heads, sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h, DN: tl.constexpr, DR: tl.constexpr,
                     BLOCK: tl.constexpr):
        # Program (i, b * H + h) of a grid over query blocks: rows [m0, m0 + BLOCK) of batch b, head h, and their
        # q_nope and q_pe. The last blocks, with the most keys to visit, start first.
        m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK
        b = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        rows = m0 + tl.arange(0, BLOCK)
        return (m0, b, h, rows, _tile(QN, sqn_b, sqn_t, sqn_h, b, h, rows, t, DN),
                _tile(QR, sqr_b, sqr_t, sqr_h, b, h, rows, t, DR))

    @triton.jit
    def _fwd_step(acc, m_i, l_i, qn, qr, KV, KR, b, h, n0, t, qk_scale, skv_b, skv_t, skv_h, skr_b, skr_t, rows_m,
                  DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        kn = _tile(KV, skv_b, skv_t, skv_h, b, h, cols_n, t, DN)
        kr = _tile(KR, skr_b, skr_t, 0, b, 0, cols_n, t, DR)
        s = tl.dot(qn, tl.trans(kn)) + tl.dot(qr, tl.trans(kr))  # [BLOCK_M, BLOCK_N] fp32, before the scale
        if MASKED:  # the block on the diagonal: key positions after the query's are out
            s = tl.where(rows_m[:, None] >= cols_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # running maxima in scaled units (qk_scale > 0)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one fused multiply-add per score
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = _tile(KV + DN, skv_b, skv_t, skv_h, b, h, cols_n, t, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return acc, m_new, l_i

    @autotuned(_configs(FWD_TILES), key=["t_tune", "DN", "DR", "DV"])
    @triton.jit
    def _fwd_kernel(QN, QR, KV, KR, O, LSE, qk_scale, t, t_tune, heads, sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h,
                    skv_b, skv_t, skv_h, skr_b, skr_t, so_b, so_t, so_h, DN: tl.constexpr, DR: tl.constexpr,
                    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        m0, b, h, rows_m, qn, qr = _query_block(QN, QR, t, heads, sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h, DN, DR,
                                                BLOCK_M)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        for n0 in range(0, m0, BLOCK_N):  # key blocks wholly before the queries (BLOCK_M is a multiple of BLOCK_N)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, qn, qr, KV, KR, b, h, n0, t, qk_scale, skv_b, skv_t, skv_h,
                                      skr_b, skr_t, rows_m, DN, DR, DV, BLOCK_N, False)
        for n0 in range(m0, m0 + BLOCK_M, BLOCK_N):  # the diagonal
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, qn, qr, KV, KR, b, h, n0, t, qk_scale, skv_b, skv_t, skv_h,
                                      skr_b, skr_t, rows_m, DN, DR, DV, BLOCK_N, True)
        _store_tile(O, acc / l_i[:, None], so_b, so_t, so_h, b, h, rows_m, t, DV)
        tl.store(LSE + (b * heads + h).to(tl.int64) * t + rows_m, m_i + tl.math.log2(l_i), mask=rows_m < t)

    @triton.jit
    def _delta_kernel(O, DO, DELTA, rows, t, heads, so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, DV: tl.constexpr,
                      BLOCK: tl.constexpr):
        # rows are (b, t, h) in o's order; DELTA is [B, H, T]
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        h = r % heads
        pos = (r // heads) % t
        b = r // (heads * t)
        cols = tl.arange(0, DV)[None, :]
        mask = (r < rows)[:, None]
        o = tl.load(O + (b * so_b + pos * so_t + h * so_h)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + (b * sdo_b + pos * sdo_t + h * sdo_h)[:, None] + cols, mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(DELTA + (b * heads + h) * t + pos, tl.sum(o * do, 1), mask=r < rows)

    @triton.jit
    def _dkdv_step(dkn, dkr, dv, kn, kr, vt, QN, QR, DO, LSE, DELTA, b, h, heads, m0, t, qk_scale, rows_n,
                   sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h, sdo_b, sdo_t, sdo_h,
                   DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
        rows_m = m0 + tl.arange(0, BLOCK_M)
        qn = _tile(QN, sqn_b, sqn_t, sqn_h, b, h, rows_m, t, DN)
        qr = _tile(QR, sqr_b, sqr_t, sqr_h, b, h, rows_m, t, DR)
        do = _tile(DO, sdo_b, sdo_t, sdo_h, b, h, rows_m, t, DV)
        at = (b * heads + h).to(tl.int64) * t + rows_m
        lse = tl.load(LSE + at, mask=rows_m < t, other=float("inf"))  # rows past the end: probabilities 0
        delta = tl.load(DELTA + at, mask=rows_m < t, other=0.0)
        s_t = tl.dot(kn, tl.trans(qn)) + tl.dot(kr, tl.trans(qr))  # [BLOCK_N, BLOCK_M]: scores, transposed
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(rows_m[None, :] >= rows_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(vt, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(qn.dtype)  # the scores' gradient (before the scale)
        dkn += tl.dot(ds_t, qn)
        dkr += tl.dot(ds_t, qr)
        return dkn, dkr, dv

    @autotuned(_configs(DKDV_TILES), key=["t_tune", "DN", "DR", "DV"])
    @triton.jit
    def _dkdv_kernel(QN, QR, KV, KR, DO, LSE, DELTA, qk_scale, scale, t, t_tune, heads, sqn_b, sqn_t, sqn_h,
                     sqr_b, sqr_t, sqr_h, skv_b, skv_t, skv_h, skr_b, skr_t, sdo_b, sdo_t, sdo_h, DKV, DKR,
                     DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        # Program (j, b * H + h): key rows [n0, n0 + BLOCK_N) against every query row at or after them. The first
        # key blocks, with the most queries to visit, start first.
        n0 = tl.program_id(0) * BLOCK_N
        b = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        rows_n = n0 + tl.arange(0, BLOCK_N)
        kn = _tile(KV, skv_b, skv_t, skv_h, b, h, rows_n, t, DN)
        kr = _tile(KR, skr_b, skr_t, 0, b, 0, rows_n, t, DR)
        vt = _tile(KV + DN, skv_b, skv_t, skv_h, b, h, rows_n, t, DV)
        dkn = tl.zeros([BLOCK_N, DN], tl.float32)
        dkr = tl.zeros([BLOCK_N, DR], tl.float32)
        dv = tl.zeros([BLOCK_N, DV], tl.float32)
        for m0 in range(n0, n0 + BLOCK_N, BLOCK_M):  # the diagonal (BLOCK_N is a multiple of BLOCK_M)
            dkn, dkr, dv = _dkdv_step(dkn, dkr, dv, kn, kr, vt, QN, QR, DO, LSE, DELTA, b, h, heads, m0, t, qk_scale,
                                      rows_n, sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h, sdo_b, sdo_t, sdo_h,
                                      DN, DR, DV, BLOCK_M, True)
        for m0 in range(n0 + BLOCK_N, t, BLOCK_M):
            dkn, dkr, dv = _dkdv_step(dkn, dkr, dv, kn, kr, vt, QN, QR, DO, LSE, DELTA, b, h, heads, m0, t, qk_scale,
                                      rows_n, sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h, sdo_b, sdo_t, sdo_h,
                                      DN, DR, DV, BLOCK_M, False)
        # d_kv is [B, T, H, DN + DV] contiguous (k_nope's gradient, then v's); d_k_pe per head in fp32, summed over
        # heads after
        _store_tile(DKV, dkn * scale, t * heads * (DN + DV), heads * (DN + DV), DN + DV, b, h, rows_n, t, DN)
        _store_tile(DKV + DN, dv, t * heads * (DN + DV), heads * (DN + DV), DN + DV, b, h, rows_n, t, DV)
        _store_tile(DKR, dkr * scale, t * heads * DR, heads * DR, DR, b, h, rows_n, t, DR)

    @triton.jit
    def _dq_step(dqn, dqr, qn, qr, do, lse, delta, KV, KR, b, h, n0, t, qk_scale, rows_m,
                 skv_b, skv_t, skv_h, skr_b, skr_t,
                 DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        kn = _tile(KV, skv_b, skv_t, skv_h, b, h, cols_n, t, DN)
        kr = _tile(KR, skr_b, skr_t, 0, b, 0, cols_n, t, DR)
        vt = _tile(KV + DN, skv_b, skv_t, skv_h, b, h, cols_n, t, DV)
        s = tl.dot(qn, tl.trans(kn)) + tl.dot(qr, tl.trans(kr))  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(rows_m[:, None] >= cols_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(vt))
        ds = (p * (dp - delta[:, None])).to(qn.dtype)
        dqn += tl.dot(ds, kn)
        dqr += tl.dot(ds, kr)
        return dqn, dqr

    @autotuned(_configs(DQ_TILES), key=["t_tune", "DN", "DR", "DV"])
    @triton.jit
    def _dq_kernel(QN, QR, KV, KR, DO, LSE, DELTA, qk_scale, scale, t, t_tune, heads, sqn_b, sqn_t, sqn_h,
                   sqr_b, sqr_t, sqr_h, skv_b, skv_t, skv_h, skr_b, skr_t, sdo_b, sdo_t, sdo_h, DQN, DQR,
                   DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        # This kernel's query block is BLOCK_N wide, its key steps BLOCK_M: every key row at or before the block.
        m0, b, h, rows_m, qn, qr = _query_block(QN, QR, t, heads, sqn_b, sqn_t, sqn_h, sqr_b, sqr_t, sqr_h, DN, DR,
                                                BLOCK_N)
        do = _tile(DO, sdo_b, sdo_t, sdo_h, b, h, rows_m, t, DV)
        at = (b * heads + h).to(tl.int64) * t + rows_m
        lse = tl.load(LSE + at, mask=rows_m < t, other=float("inf"))
        delta = tl.load(DELTA + at, mask=rows_m < t, other=0.0)
        dqn = tl.zeros([BLOCK_N, DN], tl.float32)
        dqr = tl.zeros([BLOCK_N, DR], tl.float32)
        for n0 in range(0, m0, BLOCK_M):
            dqn, dqr = _dq_step(dqn, dqr, qn, qr, do, lse, delta, KV, KR, b, h, n0, t, qk_scale, rows_m,
                                skv_b, skv_t, skv_h, skr_b, skr_t, DN, DR, DV, BLOCK_M, False)
        for n0 in range(m0, m0 + BLOCK_N, BLOCK_M):
            dqn, dqr = _dq_step(dqn, dqr, qn, qr, do, lse, delta, KV, KR, b, h, n0, t, qk_scale, rows_m,
                                skv_b, skv_t, skv_h, skr_b, skr_t, DN, DR, DV, BLOCK_M, True)
        _store_tile(DQN, dqn * scale, t * heads * DN, heads * DN, DN, b, h, rows_m, t, DN)
        _store_tile(DQR, dqr * scale, t * heads * DR, heads * DR, DR, b, h, rows_m, t, DR)
