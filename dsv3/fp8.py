"""FP8 (E4M3) with fine-grained scaling: DeepSeek-V3's checkpoint format and its training recipe.

The recipe (DeepSeek-V3 report, section 3.3)
---------------------------------------------
Every linear layer's three GEMMs run on FP8 inputs: the forward pass Y = X W^T (Fprop), the input gradient
dX = dY W (Dgrad) and the weight gradient dW = dY^T X (Wgrad). What is sensitive to precision or cheap stays in
bf16/fp32: the embedding, the output head, the MoE gate, the norms and the attention core (softmax(QK^T) V). Master
weights, their gradients and the optimiser's arithmetic are fp32; AdamW's two moments may be stored in bf16.

One format, E4M3, for everything, gradients included. Per-tensor FP8 recipes keep E5M2 for gradients because a
single scale must cover a whole tensor's range; here the range problem is solved by scaling small tiles instead, so
the extra mantissa bit of E4M3 is worth more than E5M2's exponent bit.

Fine-grained scales. A tile's scale is amax / 448 (448 is E4M3's largest finite value), amax clamped at 1e-4 so a
tile of zeros gets a finite scale; the tile is divided by its scale, saturated to +-448 and rounded to E4M3. We store
the scale itself (`scale_inv` in the checkpoint's naming): dequantised value = fp8 * scale. The tiles are
- activations, forward: 1x128, one scale per token per 128 channels. An outlier channel (LLM activations have
  them) only coarsens the 127 neighbours in its tile, not the whole token or tensor;
- weights: 128x128 blocks. Weights are smooth enough for the coarser grid, and a square block is the same block
  after transposition, so the one quantised weight serves Fprop (contracting over inputs) and Dgrad (over outputs);
- Wgrad contracts over tokens, so both of its operands, X and dY, are cut into 128x1 tiles: 128 tokens of one
  channel. X is quantised into both forms in the same pass of the forward and only its 128x1 form (FP8, half the
  bytes of bf16) is kept for the backward.
Every tile edge is 128 because the GEMM walks K in steps of 128: each step's partial product comes out of the FP8
tensor cores, is multiplied by the two tiles' scales and added into an fp32 accumulator. That is the report's
"promotion every 128 elements": Hopper's FP8 MMA accumulates with about 14 bits, so long sums are carried in fp32
registers instead, and the scales cost one multiply per 128-step, not one per element.

Power-of-two scales (optional, DeepSeek-V3.1's "ue8m0"): the scale is rounded up to a power of two. Scaling then
only moves exponents, which is exact, and the scales fit an 8-bit exponent-only format; the price is up to one bit
of resolution in tiles whose amax sits just above a power of two.

Layouts (M tokens, K inputs, N outputs; every dimension a GEMM contracts over is zero-padded to a multiple of 128,
written Kp, Np, Mp; zeros change no amax and add nothing to a dot product):
- X in 1x128 tiles:   q [M, Kp] e4m3, scale [M, Kp/128] fp32 stored column-major (stride (1, M)).
- X in 128x1 tiles:   stored transposed, q [Kp, Mp] e4m3 (tokens contiguous), scale [Mp/128, Kp] row-major.
  With routed experts the 128-token tiles start at each expert's first row, so no tile mixes two experts.
- W in 128x128 tiles: q [Np, Kp] and its transpose [Kp, Np] (each GEMM reads K-contiguous operands, which
  Hopper's FP8 MMA requires), scale [Np/128, Kp/128] row-major: the checkpoint's `weight_scale_inv` grid.
These are exactly what torch._scaled_mm's cuBLASLt block-scaled kernels take on sm90 (1x128 scales outer-dim-major,
128x128 scales inner-dim-major), so the dense GEMMs run there; the Triton kernels in `ops/fp8_gemm.py` read the
same tensors through their strides. Quantised weights are cached until the optimiser changes the weight, so
gradient-accumulation micro-batches quantise each weight once per step.

This module holds the format and its plain PyTorch reference; `ops/fp8_gemm.py` holds the kernels and
`fp8_train.py` the autograd functions, the module swap and the optimiser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128
AMAX_FLOOR = 1e-4  # smallest amax a scale is computed from: all-zero tiles get a finite scale


def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """fp32 scales amax / 448 (amax clamped at AMAX_FLOOR), rounded up to a power of two with pow2."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    # A tensor divisor: CUDA turns division by a Python scalar into multiplication by its reciprocal, which can be
    # an ulp off the correctly rounded quotient the Triton kernels compute.
    scale = amax / torch.full_like(amax, FP8_MAX)
    if pow2:
        # Add the largest mantissa to the bit pattern and drop the mantissa: exact ceil to a power of two for the
        # normal, positive floats scales are (log2/ceil/exp2 can round the wrong way next to a power of two).
        bits = scale.view(torch.int32)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return scale


def quantize_blocks(x: torch.Tensor, rows: int, cols: int, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., M, K] -> (q: e4m3 [..., Mp, Kp], scale: fp32 [..., Mp/rows, Kp/cols]) in rows x cols tiles.

    M and K are zero-padded up to multiples of rows and cols; value ~= q * scale tile by tile."""
    if x.dim() < 2:
        raise ValueError(f"quantize_blocks needs a matrix (or a stack of them), got shape {tuple(x.shape)}")
    m, k = x.shape[-2:]
    padded = F.pad(x.float(), (0, -k % cols, 0, -m % rows))
    tiles = padded.unflatten(-1, (-1, cols)).unflatten(-3, (-1, rows))  # [..., Mp/rows, rows, Kp/cols, cols]
    scale = scale_from_amax(tiles.abs().amax(dim=(-3, -1)), pow2)  # [..., Mp/rows, Kp/cols]
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2).flatten(-3, -2), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize_blocks: the tile shape is read off the two shapes. Returns the padded matrix."""
    m, k = q.shape[-2:]
    sm, sk = scale.shape[-2:]
    if q.shape[:-2] != scale.shape[:-2] or m % sm or k % sk:
        raise ValueError(f"scale grid {tuple(scale.shape)} does not tile a {tuple(q.shape)} tensor evenly")
    tiles = q.float().unflatten(-1, (sk, k // sk)).unflatten(-3, (sm, m // sm))  # [..., sm, rows, sk, cols]
    return (tiles * scale.float()[..., :, None, :, None]).flatten(-2).flatten(-3, -2).to(dtype)


def quantize_weight_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (q: e4m3 [out, in], scale_inv: fp32 [ceil(out/block), ceil(in/block)]): the checkpoint format,
    where partial blocks at the edges are stored unpadded."""
    out, inp = w.shape
    q, scale = quantize_blocks(w, block, block)
    return q[:out, :inp].contiguous(), scale


def dequantize_weight_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                             block: int = BLOCK) -> torch.Tensor:
    """q: e4m3 [out, in], scale_inv: [ceil(out/block), ceil(in/block)] -> [out, in] in `dtype`. Runs anywhere."""
    out, inp = q.shape
    want = (-(-out // block), -(-inp // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not fit a {out}x{inp} weight "
                         f"in {block}x{block} blocks (expected {want})")
    s = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return (q.float() * s).to(dtype)
