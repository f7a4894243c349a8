"""Products at decode batch sizes: linear layers y = x W^T (+ b) and the absorbed attention's per-head products, for
a handful of rows, as Triton GEMVs beside their plain PyTorch references (`F.linear`, einsum).

A batch-1 decode step multiplies one row by every weight matrix of the model, so each product is a read of the
weight and nothing else. cuBLAS runs these M = 1 products as tiled GEMMs (64x8 tiles) at about 1 TB/s on the H200
for the 16b preset's attention shapes (620 us for 645 MB in the kernel profile of docs/benchmarks.md), a quarter of
what the memory delivers, and the attention projections are the larger part of what a 16b step reads outside the
experts. The kernel here is the expert GEMVs' design (`moe_decode.py`, about half of copy bandwidth at T = 1):

- A program per (row of x, tile of BLOCK_N weight rows, slice of K): it streams its tile of W along the contiguous
  K dim in BLOCK_K-wide steps with 16-byte loads, multiplies by x's slice in fp32, and reduces once at the end.
- Rows of x vary fastest in launch order, so the programs reading one weight tile for different rows run together
  and the re-reads hit L2; beyond MAX_ROWS rows a GEMM's reuse wins and `applies` says no.
- Narrow outputs (kv_a_proj's 576 rows make 36 tiles of 16) would leave most SMs idle, so K is split until there
  are about four programs per SM; the slices' fp32 partial sums are added by one small sum (no atomics, so the
  result does not depend on scheduling). Wide outputs (the head) run one slice and write the output dtype directly.
- The same kernel runs a batch of matrices: x [M, B, K] times W[b]^T, which is MLA decoding's W_UV (each head's
  latent output times its [v, C] slice of kv_b_proj). W_UK goes the other way (q_nope [nope] times the head's
  [nope, C] slice, reduced over rows), so a column kernel reads those tiles along C and reduces over rows; both
  replace cuBLAS batched GEMMs of one row per head.
- Graph-safe (static shapes, no host sync). Under torch.compile they are the opaque custom ops `dsv3::gemv` and
  `dsv3::gemv_cols`.
- Tile sizes are autotuned per shape among a few configurations; the first call of each shape benchmarks them, so
  warm up before capturing a graph (the engine does). Under the Triton interpreter the first configuration runs.
"""

from __future__ import annotations

import functools

import torch

from .moe_decode import triton, triton_available
from .tuning import autotuned, fixed_meta, gemv_configs

if triton is not None:
    import triton.language as tl

MAX_ROWS = 8  # x rows up to which the GEMV beats a GEMM: each extra row re-reads W from L2
use_kernel = True  # False keeps every product on F.linear (A/B timing: benchmarks/decode.py --no-gemv)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the product of x with weight takes a GEMV: inference (no grad) on CUDA with Triton, bf16/fp16 x and
    weight of one dtype, no autocast, the weight's last dim contiguous, and at most MAX_ROWS rows (x [..., K] for a
    linear weight [N, K]; x [M, B, K] for a batch of B matrices [B, ., .], M rows each)."""
    rows = x.numel() // x.shape[-1] if weight.dim() == 2 else x.shape[0]
    return (use_kernel and not torch.is_grad_enabled() and triton_available(x.device)
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.dim() in (2, 3)
            and weight.stride(-1) == 1 and not torch.is_autocast_enabled(x.device.type) and 0 < rows <= MAX_ROWS)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _splits(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(slices of K, their width) for n output rows: about four programs per SM counting 16-row tiles, slices at
    least 256 wide."""
    tiles = -(-n // 16)
    splits = max(1, min(-(-4 * _sm_count(device) // tiles), k // 256))
    per_split = -(-k // splits)
    width = -(-per_split // 64) * 64  # a multiple of 64, so every slice starts 128-byte aligned
    return -(-k // width), width


def _check(x: torch.Tensor, weight: torch.Tensor, ok: bool, what: str) -> None:
    if triton is None:
        raise RuntimeError("the GEMV kernels need the triton package")
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or not ok:
        raise ValueError(f"{what}: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match, or a last "
                         f"dim is not contiguous")


def bmm_nt_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, B, K], weight: [B, N, K], bias: [N] (B = 1) -> [M, B, N] = x[:, b] @ weight[b]^T, in x's dtype
    m, nb, k = x.shape
    n = weight.shape[1]
    _check(x, weight, weight.shape[0] == nb and weight.shape[2] == k and (bias is None or bias.shape == (n,)),
           "gemv")
    splits, width = _splits(nb * n, k, x.device)
    # One slice writes the output dtype; several write fp32 partial sums [S, M, B, N], added below.
    out = x.new_empty((splits, m, nb, n), dtype=x.dtype if splits == 1 else torch.float32)
    _gemv_kernel[lambda meta: (m * nb, triton.cdiv(n, meta["BLOCK_N"]), splits)](
        x, weight, bias if bias is not None else weight, out, m, nb, n, k, x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), width, HAS_BIAS=bias is not None, **fixed_meta(_CONFIGS))
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


def bmm_nn_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # x: [M, B, J], weight: [B, J, C] -> [M, B, C] = x[:, b] @ weight[b], in x's dtype
    m, nb, j = x.shape
    c = weight.shape[2]
    _check(x, weight, weight.shape[0] == nb and weight.shape[1] == j, "gemv (columns)")
    out = x.new_empty((m, nb, c))
    _gemv_cols_kernel[lambda meta: (m * nb, triton.cdiv(c, meta["BLOCK_C"]))](
        x, weight, out, m, nb, j, c, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        **fixed_meta(_COLS_CONFIGS))
    return out


@torch.library.custom_op("dsv3::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return bmm_nt_triton(x, weight, bias)


@_gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))


@torch.library.custom_op("dsv3::gemv_cols", mutates_args=())
def _gemv_cols_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return bmm_nn_triton(x, weight)


@_gemv_cols_op.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[2]))


def bmm_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, B, K] times each weight[b] [N, K] transposed -> [M, B, N], through the GEMV kernel (see `applies`)."""
    return torch.ops.dsv3.gemv(x, weight, bias) if torch.compiler.is_compiling() else bmm_nt_triton(x, weight, bias)


def bmm_nn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, B, J] times each weight[b] [J, C] -> [M, B, C], through the column GEMV kernel (see `applies`)."""
    return torch.ops.dsv3.gemv_cols(x, weight) if torch.compiler.is_compiling() else bmm_nn_triton(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] through the GEMV kernel (see `applies`)."""
    rows = x.reshape(-1, 1, x.shape[-1])
    return bmm_nt(rows, weight[None], bias).view(*x.shape[:-1], weight.shape[0])


def bmm_nt_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.einsum("mbk,bnk->mbn", x, weight)
    return y if bias is None else y + bias


def bmm_nn_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.einsum("mbj,bjc->mbc", x, weight)


# ---- kernel ------------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _gemv_kernel(X, W, BIAS, Y, M, NB, N, K, sxm, sxb, swb, swn, width, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (row m of matrix b, tile, slice): outputs [tile * BLOCK_N, +BLOCK_N) of x[m, b] . W[b]^T over K in
        # [slice * width, +width), into Y[slice, m, b] (see the module docstring).
        m = tl.program_id(0) % M
        b = tl.program_id(0) // M
        split = tl.program_id(2)
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = ns < N
        w_rows = W + b.to(tl.int64) * swb + ns[:, None].to(tl.int64) * swn  # [BLOCK_N, 1] row starts
        x_row = X + m * sxm + b * sxb
        start = split * width
        end = tl.minimum(start + width, K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < end
            xv = tl.load(x_row + ks, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            if split == 0:  # the bias once, in the first slice's partial sum
                y += tl.load(BIAS + ns, mask=nmask, other=0.0).to(tl.float32)
        tl.store(Y + ((split * M + m) * NB + b) * N + ns, y.to(Y.dtype.element_ty), mask=nmask)

    @triton.jit
    def _gemv_cols_kernel(X, W, Y, M, NB, J, C, sxm, sxb, swb, swj, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
        # Program (row m of matrix b, tile): outputs [tile * BLOCK_C, +BLOCK_C) of x[m, b] . W[b], W[b] [J, C] read
        # along its contiguous C in [BLOCK_J, BLOCK_C] tiles and reduced over J once at the end.
        m = tl.program_id(0) % M
        b = tl.program_id(0) // M
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        w_mat = W + b.to(tl.int64) * swb
        x_row = X + m * sxm + b * sxb
        acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, J, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            jmask = js < J
            xv = tl.load(x_row + js, mask=jmask, other=0.0).to(tl.float32)
            w = tl.load(w_mat + js[:, None].to(tl.int64) * swj + cs[None, :], mask=jmask[:, None] & cmask[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * xv[:, None]
        tl.store(Y + (m * NB + b) * C + cs, tl.sum(acc, axis=0).to(Y.dtype.element_ty), mask=cmask)

    _CONFIGS = gemv_configs("BLOCK_N", "BLOCK_K")  # the expert GEMVs' tiles
    _COLS_CONFIGS = [
        triton.Config({"BLOCK_C": 64, "BLOCK_J": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_C": 128, "BLOCK_J": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_C": 256, "BLOCK_J": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_C": 32, "BLOCK_J": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_C": 128, "BLOCK_J": 64}, num_warps=8, num_stages=2),
    ]
    _gemv_kernel = autotuned(_CONFIGS, ["M", "NB", "N", "K", "width"])(_gemv_kernel)
    _gemv_cols_kernel = autotuned(_COLS_CONFIGS, ["M", "NB", "J", "C"])(_gemv_cols_kernel)
