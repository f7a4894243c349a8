"""FP8 GEMMs for DeepSeek-V3's fine-grained recipe on Hopper and the quantisation kernels that feed them, each beside
its plain PyTorch reference (the `*_reference` functions, which are also the emulation mode that runs anywhere).

Notable features:
- `quantize_act`: one pass over an activation (or its gradient) writes both of its FP8 forms: 1x128 tiles along
  channels for Fprop/Dgrad and, transposed, 128x1 tiles along tokens for Wgrad. Token tiles restart at each group's
  (expert's) first row (`RowTiles`), so one kernel serves dense layers and routed experts.
- `quantize_weight`: a [G, N, K] stack of weights to 128x128 blocks (one pass) plus the transposed copy Dgrad reads.
- `gemm`: Y = A B_g^T for the rows of each group g, A in 1x128 tiles, B in 128x128 blocks. A dense product goes to
  torch._scaled_mm (cuBLASLt's block-scaled FP8 kernels) when this torch and GPU take the layouts; everything else,
  the routed experts included, to a Triton kernel that promotes each 128-deep partial product into fp32.
- `wgrad`: dW_g = dY_g^T X_g from the 128x1 forms: cuBLASLt for a dense layer, Triton per expert.
- Row tiles are built on the device without a host sync: their count has a static upper bound.
- Imports without Triton or CUDA (the references run on the CPU); the kernels need compute capability 8.9+.

The torch APIs, as read in torch's CUDA source (ScaledBlas.cpp, 2.13) and checked on the GPU by
tests/test_fp8_gpu.py: torch._scaled_mm takes 1x128 x 128x128 and 1x128 x 1x128 block scales on sm90 (cuBLASLt
>= 12.9), with A row-major and B column-major; a 1x128 scale_a is [M, K/128] with strides (1, M); a 128x128
scale_b is the transpose of a row-major [N/128, K/128] grid; a 1x128 scale_b is a row-major [K/128, N] grid.
cuBLASLt wants the 128x128 grid's K/128 padded to a multiple of 4, and on the H200 (torch 2.11) a grid with
K/128 = 5 gave wrong products (and "Invalid scaling configuration" once padded): such reductions (K <= 128 * 4 or
not a multiple of 512) take the Triton kernel, as do all grouped (expert) products.
torch.nn.functional.scaled_mm wraps the same kernels with another 128x128 layout (K blocks padded to a multiple
of 4); we use _scaled_mm. torch._scaled_grouped_mm takes only row-wise scales on sm90, not these tiles, hence the
Triton grouped GEMM.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fp8 import AMAX_FLOOR, BLOCK, FP8, FP8_MAX, dequantize_blocks, quantize_blocks
from .grouped import grouped_mm_reference
from .tuning import autotuned, fixed_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references still run
    triton = None



def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why the FP8 kernels cannot run on `device`, or None when they can."""
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda":
        return f"the model is on {device.type}, and FP8 tensor cores are a GPU feature"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; FP8 tensor cores "
                "need 8.9 (Ada) or 9.0 (Hopper)")
    return None


# ---- row tiles -----------------------------------------------------------------------------------------------
@dataclass
class RowTiles:
    """Rows cut into tiles of at most BLOCK rows that never straddle two groups (experts). Tile t covers rows
    [start[t], end[t]) of group group[t]; tiles after the last real one are empty (start == end == 0). Group g owns
    tiles first[g] .. first[g + 1] - 1."""

    offs: torch.Tensor  # [G] int32 cumulative row ends
    start: torch.Tensor  # [T] int32
    end: torch.Tensor  # [T] int32
    group: torch.Tensor  # [T] int32
    first: torch.Tensor  # [G + 1] int32

    @property
    def count(self) -> int:
        return self.start.shape[0]

    @property
    def groups(self) -> int:
        return self.offs.shape[0]


def row_tiles(rows: int, offs: torch.Tensor | None = None, device: torch.device | None = None) -> RowTiles:
    """Tiles for `rows` rows split into groups by `offs` ([G] int32 cumulative ends, the last equal to rows);
    without offs one group holds every row (a dense layer)."""
    if offs is None:
        return _dense_tiles(rows, torch.device(device or "cpu"))
    return _group_tiles(rows, offs)


@functools.lru_cache(maxsize=64)
def _dense_tiles(rows: int, device: torch.device) -> RowTiles:
    # A dense layer's tiles depend on the row count alone: built once, not in every layer's forward.
    return _group_tiles(rows, torch.full((1,), rows, dtype=torch.int32, device=device))


def tile_count(rows: int, groups: int) -> int:
    """The number of row tiles (real and empty) for `rows` rows in `groups` groups: sum_g ceil(c_g / 128) <=
    ceil(M / 128) + G - 1 for any split of M rows, a count known without a host sync."""
    return max(-(-rows // BLOCK) + groups - 1, 0)


def _group_tiles(rows: int, offs: torch.Tensor) -> RowTiles:
    g = offs.shape[0]
    ends = offs.long()
    counts = ends - F.pad(ends[:-1], (1, 0))
    per_group = (counts + BLOCK - 1) // BLOCK
    last = per_group.cumsum(0)  # [G] one past each group's last tile
    n = tile_count(rows, g)
    t = torch.arange(n, device=offs.device)
    grp = torch.searchsorted(last, t, right=True).clamp(max=g - 1)
    valid = t < last[-1]
    start = ends[grp] - counts[grp] + (t - last[grp] + per_group[grp]) * BLOCK
    end = torch.minimum(start + BLOCK, ends[grp])
    zero = torch.zeros_like(start)
    return RowTiles(offs, torch.where(valid, start, zero).int(), torch.where(valid, end, zero).int(), grp.int(),
                    F.pad(last, (1, 0)).int())


# ---- quantised operands --------------------------------------------------------------------------------------
@dataclass
class ActFp8:
    """An activation [M, K] (or its gradient) in FP8, both forms."""

    q: torch.Tensor  # [M, Kp] e4m3 in 1x128 tiles
    s: torch.Tensor  # [M, Kp/128] fp32, strides (1, M)
    qt: torch.Tensor | None  # [Kp, T*128] e4m3 in 128x1 tiles, tokens contiguous, RowTiles tile t at columns t*128..
    st: torch.Tensor | None  # [T, Kp] fp32


@dataclass
class WeightFp8:
    """A [G, N, K] stack of weights in 128x128 blocks."""

    q: torch.Tensor  # [G, Np, Kp] e4m3
    qt: torch.Tensor  # [G, Kp, Np] e4m3, the transpose
    s: torch.Tensor  # [G, Np/128, Kp/128] fp32


def quantize_act_reference(x: torch.Tensor, tiles: RowTiles, pow2: bool = False, with_cols: bool = True) -> ActFp8:
    m, k = x.shape
    q, s = quantize_blocks(x, 1, BLOCK, pow2)
    s = s.t().contiguous().t()  # the column-major layout the kernels write
    if not with_cols:
        return ActFp8(q, s, None, None)
    kp = q.shape[1]
    idx = tiles.start[:, None].long() + torch.arange(BLOCK, device=x.device)  # [T, 128] row of each tile slot
    inside = idx < tiles.end[:, None]
    rows = F.pad(x.float(), (0, kp - k))[idx.clamp(max=m - 1)] * inside[..., None]  # [T, 128, Kp]
    qc, sc = quantize_blocks(rows.flatten(0, 1), BLOCK, 1, pow2)  # [T*128, Kp], [T, Kp]
    return ActFp8(q, s, qc.t().contiguous(), sc)


def quantize_weight_reference(w: torch.Tensor, pow2: bool = False) -> WeightFp8:
    q, s = quantize_blocks(w, BLOCK, BLOCK, pow2)
    return WeightFp8(q, q.transpose(1, 2).contiguous(), s)


def gemm_reference(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, tiles: RowTiles,
                   n_out: int, out_dtype: torch.dtype) -> torch.Tensor:
    """a: e4m3 [M, Kp] with 1x128 scales sa [M, Kp/128]; b: e4m3 [G, Nb, Kp] with 128x128 scales sb
    [G, Nb/128, Kp/128]. The rows of group g are multiplied by b[g]^T, in fp32 -> [M, n_out] in out_dtype."""
    out = grouped_mm_reference(dequantize_blocks(a, sa), dequantize_blocks(b, sb).transpose(1, 2), tiles.offs)
    return out[:, :n_out].to(out_dtype)


def wgrad_reference(dy: ActFp8, x: ActFp8, tiles: RowTiles, n: int, k: int) -> torch.Tensor:
    """dW_g = dY_g^T X_g from the 128x1 forms -> fp32 [G, n, k]."""
    dy32 = dequantize_blocks(dy.qt.t(), dy.st)  # [T*128, Np]
    x32 = dequantize_blocks(x.qt.t(), x.st)  # [T*128, Kp]
    first = tiles.first.tolist()  # a host sync: the reference only
    out = dy32.new_zeros(tiles.groups, dy32.shape[1], x32.shape[1])
    for g in range(tiles.groups):
        rows = slice(first[g] * BLOCK, first[g + 1] * BLOCK)
        out[g] = dy32[rows].t() @ x32[rows]
    return out[:, :n, :k]


# ---- Triton kernels ------------------------------------------------------------------------------------------
if triton is not None:
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)

    @triton.jit
    def _scale(amax, POW2: tl.constexpr):
        # Correctly rounded division and the same power-of-two trick as fp8.scale_from_amax: bit-exact with it.
        scale = tl.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)
        if POW2:
            bits = scale.to(tl.int32, bitcast=True)
            scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return scale

    @triton.jit
    def _quant_act_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, start_ptr, end_ptr, m, k, stride_xm, k_pad, t_rows,
                          POW2: tl.constexpr, WITH_COLS: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (row tile, 128 channels): a 128x128 block read once, quantised both ways.
        tile = tl.program_id(0)
        kb = tl.program_id(1)
        r0 = tl.load(start_ptr + tile)
        r1 = tl.load(end_ptr + tile)
        i = tl.arange(0, BLOCK)
        rows = (r0 + i).to(tl.int64)
        cols = kb * BLOCK + i
        in_rows = rows < r1
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=in_rows[:, None] & (cols[None, :] < k), other=0.0).to(tl.float32)
        scale = _scale(tl.max(tl.abs(x), axis=1), POW2)  # per token: 1x128 tiles
        q = tl.clamp(tl.div_rn(x, scale[:, None]), -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + rows[:, None] * k_pad + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=in_rows[:, None])
        tl.store(s_ptr + kb * m + rows, scale, mask=in_rows)
        if WITH_COLS:
            scale_c = _scale(tl.max(tl.abs(x), axis=0), POW2)  # per channel: 128x1 tiles
            qc = tl.clamp(tl.div_rn(x, scale_c[None, :]), -_FP8_MAX, _FP8_MAX)
            # Rows past the tile's end were loaded as zeros: they pad the token tile to 128 in the transpose.
            tl.store(qt_ptr + cols[:, None].to(tl.int64) * t_rows + (tile * BLOCK + i)[None, :],
                     tl.trans(qc).to(qt_ptr.dtype.element_ty))
            tl.store(st_ptr + tile * k_pad + cols, scale_c)

    @triton.jit
    def _quant_weight_kernel(w_ptr, q_ptr, s_ptr, n, k, n_pad, k_pad, stride_wg, stride_wn, stride_wk,
                             POW2: tl.constexpr, BLOCK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        kb = tl.program_id(2)
        rn = nb * BLOCK + tl.arange(0, BLOCK)
        rk = kb * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + g * stride_wg + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=(rn[:, None] < n) & (rk[None, :] < k), other=0.0).to(tl.float32)
        scale = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
        q = tl.clamp(tl.div_rn(w, scale), -_FP8_MAX, _FP8_MAX)
        plane = g * n_pad * k_pad
        tl.store(q_ptr + plane + rn[:, None] * k_pad + rk[None, :], q.to(q_ptr.dtype.element_ty))
        tl.store(s_ptr + (g * (n_pad // BLOCK) + nb) * (k_pad // BLOCK) + kb, scale)

    @triton.jit
    def _gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, start_ptr, end_ptr, group_ptr, n_out, n_b, k_pad, n_tiles,
                     stride_am, stride_sam, stride_sak, stride_bg, stride_bn, stride_sbg, stride_sbn, stride_sbk,
                     stride_cm, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        n_cols = tl.cdiv(n_out, BLOCK_N)
        # GROUP_M row tiles walk one band of columns before moving right, so B's tiles are re-read from L2.
        per_band = GROUP_M * n_cols
        first_m = (pid // per_band) * GROUP_M
        size_m = tl.minimum(n_tiles - first_m, GROUP_M)
        tile = first_m + (pid % per_band) % size_m
        pid_n = (pid % per_band) // size_m
        r0 = tl.load(start_ptr + tile)
        r1 = tl.load(end_ptr + tile)
        if r0 < r1:
            g = tl.load(group_ptr + tile).to(tl.int64)
            rows = (r0 + tl.arange(0, BLOCK)).to(tl.int64)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK)
            in_rows = rows < r1
            in_b = cols < n_b
            a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :]
            b_ptrs = b_ptr + g * stride_bg + cols.to(tl.int64)[:, None] * stride_bn + ks[None, :]
            sa_ptrs = sa_ptr + rows * stride_sam
            sb_ptrs = sb_ptr + g * stride_sbg + (cols // BLOCK) * stride_sbn
            acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
            for kb in range(0, k_pad // BLOCK):
                a = tl.load(a_ptrs, mask=in_rows[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=in_b[:, None], other=0.0)
                sa = tl.load(sa_ptrs + kb * stride_sak, mask=in_rows, other=0.0)
                sb = tl.load(sb_ptrs + kb * stride_sbk, mask=in_b, other=0.0)
                # Promotion: each 128-deep FP8 product is scaled and summed in fp32 registers.
                acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
                a_ptrs += BLOCK
                b_ptrs += BLOCK
            c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :]
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=in_rows[:, None] & (cols[None, :] < n_out))

    @triton.jit
    def _wgrad_kernel(dy_ptr, sdy_ptr, x_ptr, sx_ptr, w_ptr, first_ptr, n, k, n_pad, k_pad, t_rows,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        n_m = tl.cdiv(n, BLOCK_M)
        n_n = tl.cdiv(k, BLOCK_N)
        g = pid // (n_m * n_n)
        pid_m = (pid % (n_m * n_n)) // n_n
        pid_n = pid % n_n
        t0 = tl.load(first_ptr + g)
        t1 = tl.load(first_ptr + g + 1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tok = tl.arange(0, BLOCK)
        in_m = rm < n_pad
        in_n = rn < k_pad
        dy_ptrs = dy_ptr + rm.to(tl.int64)[:, None] * t_rows + tok[None, :]
        x_ptrs = x_ptr + rn.to(tl.int64)[:, None] * t_rows + tok[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(t0, t1):  # this group's 128-token tiles
            a = tl.load(dy_ptrs + t * BLOCK, mask=in_m[:, None], other=0.0)
            b = tl.load(x_ptrs + t * BLOCK, mask=in_n[:, None], other=0.0)
            sa = tl.load(sdy_ptr + t * n_pad + rm, mask=in_m, other=0.0)
            sb = tl.load(sx_ptr + t * k_pad + rn, mask=in_n, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        out = w_ptr + g.to(tl.int64) * n * k + rm.to(tl.int64)[:, None] * k + rn[None, :]
        tl.store(out, acc, mask=(rm[:, None] < n) & (rn[None, :] < k))

    # Tile shapes: 128-row tiles are fixed by the recipe (one scale per row and 128-deep step); the rest is tuned.
    # 128x256 is the FP8 tile of Hopper's fastest GEMMs (cuBLAS, DeepGEMM): 48 KB of operands per pipeline stage.
    _GEMM_CONFIGS = [triton.Config({"BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=s) for s in (3, 4)] + \
        [triton.Config({"BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
         triton.Config({"BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3)]
    _WGRAD_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=s) for s in (3, 4)] + \
        [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
         triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3)]
    _gemm_kernel = autotuned(_GEMM_CONFIGS, ["n_out", "k_pad"])(_gemm_kernel)
    _wgrad_kernel = autotuned(_WGRAD_CONFIGS, ["n", "k"])(_wgrad_kernel)



# ---- launchers -----------------------------------------------------------------------------------------------
def quantize_act(x: torch.Tensor, tiles: RowTiles, pow2: bool = False, with_cols: bool = True,
                 emulate: bool = False) -> ActFp8:
    """x: [M, K] -> both FP8 forms (the 128x1 one only with_cols). Empty inputs are the caller's to skip."""
    if emulate:
        return quantize_act_reference(x, tiles, pow2, with_cols)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    kp = padded(k)
    q = torch.empty((m, kp), dtype=FP8, device=x.device)
    s = torch.empty((kp // BLOCK, m), dtype=torch.float32, device=x.device).t()
    qt = torch.empty((kp, tiles.count * BLOCK), dtype=FP8, device=x.device) if with_cols else None
    st = torch.empty((tiles.count, kp), dtype=torch.float32, device=x.device) if with_cols else None
    _quant_act_kernel[(tiles.count, kp // BLOCK)](
        x, q, s, qt if with_cols else q, st if with_cols else s, tiles.start, tiles.end, m, k, x.stride(0), kp,
        tiles.count * BLOCK, POW2=pow2, WITH_COLS=with_cols, BLOCK=BLOCK, num_warps=8)
    return ActFp8(q, s, qt, st)


def quantize_weight(w: torch.Tensor, pow2: bool = False, emulate: bool = False) -> WeightFp8:
    """w: [G, N, K] (any strides) -> 128x128 blocks and the transposed copy."""
    if emulate:
        return quantize_weight_reference(w, pow2)
    g, n, k = w.shape
    np_, kp = padded(n), padded(k)
    q = torch.empty((g, np_, kp), dtype=FP8, device=w.device)
    s = torch.empty((g, np_ // BLOCK, kp // BLOCK), dtype=torch.float32, device=w.device)
    _quant_weight_kernel[(g, np_ // BLOCK, kp // BLOCK)](
        w, q, s, n, k, np_, kp, *w.stride(), POW2=pow2, BLOCK=BLOCK, num_warps=8)
    # The transpose as a copy of the FP8 bytes: storing tl.trans(q) from the kernel wrote wrong bytes under
    # Triton 3.6 on the H200 (tests/test_fp8_gpu.py), and a byte copy of a weight is cheap next to the GEMMs.
    return WeightFp8(q, q.transpose(1, 2).contiguous(), s)


def gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, tiles: RowTiles, n_out: int,
         out_dtype: torch.dtype, emulate: bool = False) -> torch.Tensor:
    """Fprop and Dgrad; the arguments are those of gemm_reference."""
    if emulate:
        return gemm_reference(a, sa, b, sb, tiles, n_out, out_dtype)
    if tiles.groups == 1 and a.shape[0] % 16 == 0 and sb.shape[-1] % 4 == 0 and cublas_block_scaled(a.device):
        # cuBLASLt wants 16-aligned rows and a 128x128 scale grid 4 blocks deep (see the docstring).
        return torch._scaled_mm(a, b[0].t(), scale_a=sa, scale_b=sb[0].contiguous().t(),
                                out_dtype=out_dtype)[:, :n_out]
    return gemm_triton(a, sa, b, sb, tiles, n_out, out_dtype)


def gemm_triton(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, tiles: RowTiles, n_out: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    m, kp = a.shape
    out = torch.empty((m, n_out), dtype=out_dtype, device=a.device)
    grid = lambda meta: (tiles.count * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_kernel[grid](a, sa, b, sb, out, tiles.start, tiles.end, tiles.group, n_out, b.shape[1], kp, tiles.count,
                       a.stride(0), sa.stride(0), sa.stride(1), b.stride(0), b.stride(1), sb.stride(0),
                       sb.stride(1), sb.stride(2), out.stride(0), BLOCK=BLOCK, **fixed_meta(_GEMM_CONFIGS))
    return out


def wgrad(dy: ActFp8, x: ActFp8, tiles: RowTiles, n: int, k: int, emulate: bool = False) -> torch.Tensor:
    """dW [G, n, k] fp32 from the 128x1 forms of dY [M, n] and X [M, k]."""
    if emulate:
        return wgrad_reference(dy, x, tiles, n, k)
    if tiles.groups == 1 and cublas_block_scaled(dy.qt.device):
        return torch._scaled_mm(dy.qt, x.qt.t(), scale_a=dy.st.t(), scale_b=x.st,
                                out_dtype=torch.float32)[None, :n, :k]
    return wgrad_triton(dy, x, tiles, n, k)


def wgrad_triton(dy: ActFp8, x: ActFp8, tiles: RowTiles, n: int, k: int) -> torch.Tensor:
    np_, kp = dy.qt.shape[0], x.qt.shape[0]
    out = torch.empty((tiles.groups, n, k), dtype=torch.float32, device=dy.qt.device)
    grid = lambda meta: (tiles.groups * triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa
    _wgrad_kernel[grid](dy.qt, dy.st, x.qt, x.st, out, tiles.first, n, k, np_, kp, dy.qt.shape[1], BLOCK=BLOCK,
                        **fixed_meta(_WGRAD_CONFIGS))
    return out


@functools.cache
def _cublas_check(device: torch.device) -> str | None:
    """Runs the three dense products through torch._scaled_mm once on small operands and compares them with the
    references: None when all agree, else the reason (this torch, cuBLASLt or GPU lacks the block-scaled path)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return "torch._scaled_mm is not available"
    gen = torch.Generator(device=device).manual_seed(0)
    # Reductions 4 blocks deep both ways (512), as `gemm` only sends such products here.
    x = torch.randn(64, 512, device=device, generator=gen)
    w = torch.randn(1, 512, 512, device=device, generator=gen)
    dy = torch.randn(64, 512, device=device, generator=gen)
    tiles = row_tiles(64, device=device)
    xq, dyq = quantize_act(x, tiles), quantize_act(dy, tiles)
    wq = quantize_weight(w)
    pairs = [
        lambda: torch._scaled_mm(xq.q, wq.q[0].t(), scale_a=xq.s, scale_b=wq.s[0].t(), out_dtype=torch.float32),
        lambda: gemm_reference(xq.q, xq.s, wq.q, wq.s, tiles, 512, torch.float32),
        lambda: torch._scaled_mm(dyq.q, wq.qt[0].t(), scale_a=dyq.s, scale_b=wq.s[0].t().contiguous().t(),
                                 out_dtype=torch.float32),
        lambda: gemm_reference(dyq.q, dyq.s, wq.qt, wq.s.transpose(1, 2), tiles, 512, torch.float32),
        lambda: torch._scaled_mm(dyq.qt, xq.qt.t(), scale_a=dyq.st.t(), scale_b=xq.st, out_dtype=torch.float32),
        lambda: wgrad_reference(dyq, xq, tiles, 512, 512)[0],
    ]
    for fast, ref in zip(pairs[::2], pairs[1::2]):
        try:
            got = fast()
        except (RuntimeError, NotImplementedError, ValueError) as e:
            return f"torch._scaled_mm rejected DeepSeek's block scales: {str(e).splitlines()[0]}"
        want = ref()
        if ((got - want).norm() / want.norm()).item() > 1e-3:
            return "torch._scaled_mm with block scales disagrees with the reference"
    return None


def cublas_block_scaled(device: torch.device) -> bool:
    """Whether dense FP8 products go to cuBLASLt (checked once per device; a warning says why not)."""
    if device.type != "cuda":
        return False
    reason = _cublas_check(device)
    if reason is not None:
        _warn_once(f"{reason}; dense FP8 GEMMs use the Triton kernel instead")
    return reason is None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)
