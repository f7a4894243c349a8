"""Serving FP8 checkpoints with FP8 GEMMs: the official release's e4m3 weights and 128x128 `weight_scale_inv`
blocks are kept as stored, and each product quantises its input per token in 1x128 tiles and runs the same
block-scaled GEMM as training's Fprop (`ops/fp8_gemm.py`: cuBLASLt where it serves, else Triton). Weights then take
half the memory and half the bytes per decoded token of bf16.

`load_model(..., fp8_gemms=...)` decides which layers (`fp8_served`): every linear layer whose weight the
checkpoint stores in FP8 (attention projections, dense MLPs, MTP's eh_proj), except `kv_b_proj`, whose two halves
the absorbed decode attention reads as bf16 matrices (W_UK folded into the query, W_UV into the output), and the
experts, routed and shared: their decode path is the fused GEMV kernels of `ops/moe_decode.py`, which read bf16
rows (FP8 variants of those kernels are still to come). Where the FP8 kernels cannot run, the same numerics are emulated
(quantise, dequantise, matmul), which the CPU tests use; the default there is to dequantise at load instead.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .fp8 import BLOCK, FP8
from .ops import fp8_gemm as ops


class Fp8WeightLinear(nn.Module):
    """y = x W^T (+ b) with W held as an FP8 checkpoint stores it. Buffers: `weight` e4m3 [Np, Kp] (the checkpoint's
    [N, K] zero-padded to multiples of 128: zeros add nothing and keep every block whole) and `weight_scale_inv`
    fp32 [Np/128, Kp/128], under the checkpoint's own names."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, emulate: bool,
                 device: torch.device):
        super().__init__()
        self.in_features, self.out_features, self.emulate = in_features, out_features, emulate
        np_, kp = ops.padded(out_features), ops.padded(in_features)
        self.register_buffer("weight", torch.zeros((np_, kp), dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.ones((np_ // BLOCK, kp // BLOCK), device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] in x's dtype (the autocast dtype under autocast)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros((*x.shape[:-1], self.out_features), dtype=out_dtype)
        tiles = ops.row_tiles(rows.shape[0], device=x.device)
        with torch.autocast(dev, enabled=False):
            xq = ops.quantize_act(rows, tiles, with_cols=False, emulate=self.emulate)
            y = ops.gemm(xq.q, xq.s, self.weight[None], self.weight_scale_inv[None], tiles, self.out_features,
                         out_dtype, self.emulate)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The checkpoint's layout: the weight without its padding (the scale grid is the same either way).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"][: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, emulate={self.emulate}"


def fp8_served(module_name: str) -> bool:
    """Whether the linear layer `module_name` (a native name) serves from FP8 when its checkpoint weight is FP8."""
    return not module_name.endswith("kv_b_proj") and ".shared_experts." not in module_name


def replace_linears(model: nn.Module, chosen: Callable[[str], bool], emulate: bool) -> None:
    """Swap each nn.Linear whose module name `chosen` accepts for an (empty) Fp8WeightLinear on the same device.
    The caller fills the buffers (load_model does, from the checkpoint)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and chosen(name):
            parent, _, leaf = name.rpartition(".")
            fp8 = Fp8WeightLinear(module.in_features, module.out_features, module.bias, emulate,
                                  module.weight.device)
            setattr(model.get_submodule(parent) if parent else model, leaf, fp8)
