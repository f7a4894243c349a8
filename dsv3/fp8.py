"""FP8 (E4M3) block scaling, as in DeepSeek-V3's checkpoints.

A weight [out, in] is cut into 128x128 blocks; each block stores e4m3 values and one fp32 `scale_inv` with
value = fp8 * scale_inv, scale_inv = amax(block) / 448. Dimensions that are not multiples of 128 end in a
partial block, which is why the scale grid is [ceil(out/128), ceil(in/128)].
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    out, inp = w.shape
    return torch.nn.functional.pad(w, (0, -inp % block, 0, -out % block))


def quantize_weight_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (q: e4m3 [out, in], scale_inv: fp32 [ceil(out/block), ceil(in/block)])."""
    out, inp = w.shape
    padded = _pad_to_blocks(w.float(), block)
    tiles = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [ob, block, ib, block]
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)  # all-zero blocks get a tiny scale
    scale_inv = amax / FP8_MAX
    q = (tiles / scale_inv).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(2).flatten(0, 1)[:out, :inp].contiguous(), scale_inv[:, 0, :, 0].contiguous()


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
