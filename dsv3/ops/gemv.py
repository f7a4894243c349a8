"""Linear layers at decode batch sizes: y = x W^T (+ b) for a handful of rows, as a Triton GEMV beside its plain
PyTorch reference (`F.linear`).

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
- Graph-safe (static shapes, no host sync). Under torch.compile it is the opaque custom op `dsv3::gemv`.
- Tile sizes are autotuned per shape among a few configurations; the first call of each shape benchmarks them, so
  warm up before capturing a graph (the engine does). Under the Triton interpreter the first configuration runs.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .moe_decode import triton, triton_available

if triton is not None:
    import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
MAX_ROWS = 8  # x rows up to which the GEMV beats a GEMM: each extra row re-reads W from L2
use_kernel = True  # False keeps every product on F.linear (A/B timing: benchmarks/decode.py --no-gemv)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., K] @ weight [N, K]^T takes the GEMV: inference (no grad) on CUDA with Triton, bf16/fp16 x and
    weight of one dtype, no autocast, a contiguous weight and at most MAX_ROWS rows."""
    return (use_kernel and not torch.is_grad_enabled() and triton_available(x.device)
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.dim() == 2
            and weight.is_contiguous() and not torch.is_autocast_enabled(x.device.type)
            and 0 < x.numel() // x.shape[-1] <= MAX_ROWS)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _splits(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(slices of K, their width): about four programs per SM counting 16-row tiles, slices at least 256 wide."""
    tiles = -(-n // 16)
    splits = max(1, min(-(-4 * _sm_count(device) // tiles), k // 256))
    per_split = -(-k // splits)
    width = -(-per_split // 64) * 64  # a multiple of 64, so every slice starts 128-byte aligned
    return -(-k // width), width


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K], weight: [N, K], bias: [N] -> [M, N] in x's dtype
    if triton is None:
        raise RuntimeError("the GEMV kernel needs the triton package")
    if x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("gemv_triton wants x rows contiguous and a contiguous weight")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"gemv_triton: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not match")
    splits, width = _splits(n, k, x.device)
    # One slice writes the output dtype; several write fp32 partial sums [S, M, N], added below.
    out = x.new_empty((splits, m, n), dtype=x.dtype if splits == 1 else torch.float32)
    _gemv_kernel[lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]), splits)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), width,
        HAS_BIAS=bias is not None, **_fixed_meta())
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


def _fixed_meta() -> dict:
    # The interpreter cannot time configurations: launch with the first.
    return {**_CONFIGS[0].kwargs, "num_warps": _CONFIGS[0].num_warps} if _INTERPRET else {}


@torch.library.custom_op("dsv3::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return gemv_triton(x, weight, bias)


@_gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] through the GEMV kernel; callers check `applies` first."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.dsv3.gemv(rows, weight, bias) if torch.compiler.is_compiling() else gemv_triton(rows, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


# ---- kernel ------------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _gemv_kernel(X, W, B, Y, M, N, K, stride_x, width, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (row, tile, slice): outputs [tile * BLOCK_N, +BLOCK_N) of x's row over K in [slice * width,
        # +width), into Y[slice, row] (see the module docstring).
        row = tl.program_id(0)
        split = tl.program_id(2)
        cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols_n < N
        w_rows = W + cols_n[:, None].to(tl.int64) * K  # [BLOCK_N, 1] row starts
        x_row = X + row * stride_x
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
                y += tl.load(B + cols_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(Y + (split * M + row) * N + cols_n, y.to(Y.dtype.element_ty), mask=nmask)

    # Guesses for Hopper bandwidth, as for the expert GEMVs: 4-8K weight elements per loop step, 16-byte loads.
    _CONFIGS = [
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 8, "BLOCK_K": 512}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=2, num_stages=4),
    ]
    if not _INTERPRET:  # the interpreter cannot time configurations
        _gemv_kernel = triton.autotune(_CONFIGS, key=["M", "N", "K", "width"])(_gemv_kernel)
