"""Serving FP8 checkpoints with FP8 GEMMs: the official release's e4m3 weights and 128x128 `weight_scale_inv`
blocks are kept as stored, and each product quantises its input per token in 1x128 tiles and runs the same
block-scaled GEMM as training's Fprop (`ops/fp8_gemm.py`: cuBLASLt where it serves, else Triton). Weights then take
half the memory and half the bytes per decoded token of bf16.

`load_model(..., fp8_gemms=...)` decides which layers (`fp8_served`): every linear layer whose weight the
checkpoint stores in FP8 (attention projections, dense MLPs, MTP's eh_proj), except `kv_b_proj`, whose two halves
the absorbed decode attention reads as bf16 matrices (W_UK folded into the query, W_UV into the output), and the
shared experts, which ride in the fused decode kernels of `ops/moe_decode.py` (bf16 rows). The routed experts
become `Fp8WeightExperts`: each expert's gate, up and down weights as stored, run through the grouped form of the
same GEMM (one group per expert, the rows sorted by `Experts.forward`'s dispatch). That halves the memory of the
part of the model that dominates it (the experts are ~95% of DeepSeek-V3's weights); at decode batch sizes those
layers take the grouped path instead of the bf16 GEMV kernels (FP8 variants of those are still to come). Where
the FP8 kernels cannot run, the same numerics are emulated (quantise, dequantise, matmul), which the CPU tests use;
the default there is to dequantise at load instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import BLOCK, FP8
from .model import Experts
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
        rows = x.reshape(-1, self.in_features)
        tiles = ops.row_tiles(rows.shape[0], device=x.device)
        y = _fp8_product(rows, self.weight[None], self.weight_scale_inv[None], tiles, self.out_features, self.emulate)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The checkpoint's layout: the weight without its padding (the scale grid is the same either way).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"][: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, emulate={self.emulate}"


class Fp8WeightExperts(Experts):
    """The routed experts of an FP8 checkpoint, as stored: buffers `gate_proj`, `up_proj` e4m3 [E, Ip, Dp] and
    `down_proj` [E, Dp, Ip] (each expert's [I, D] / [D, I] zero-padded to whole 128x128 blocks) with their
    `*_scale_inv` fp32 block grids. Dispatch, weighting and combine are Experts.forward's; `mlp` runs the grouped
    FP8 GEMMs."""

    PARTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n: int, dim: int, inter: int, emulate: bool, device: torch.device):
        nn.Module.__init__(self)  # not Experts.__init__: no bf16 parameters
        self.dim, self.inter, self.emulate = dim, inter, emulate
        dp, ip = ops.padded(dim), ops.padded(inter)
        for name, (rows, cols) in zip(self.PARTS, [(ip, dp), (ip, dp), (dp, ip)]):
            self.register_buffer(name, torch.zeros((n, rows, cols), dtype=FP8, device=device))
            self.register_buffer(name + "_scale_inv", torch.ones((n, rows // BLOCK, cols // BLOCK), device=device))

    def shape(self, part: str) -> tuple[int, int]:
        """An expert's stored [N, K] for `part`, without the padding."""
        return (self.dim, self.inter) if part == "down_proj" else (self.inter, self.dim)

    def mlp(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        # xs: [M, D] rows grouped by expert, offs: [E] int32 group ends -> [M, D]
        tiles = ops.row_tiles(xs.shape[0], offs)
        gate, up = (_fp8_product(xs, getattr(self, p), getattr(self, p + "_scale_inv"), tiles, self.inter,
                                 self.emulate) for p in ("gate_proj", "up_proj"))
        return _fp8_product(F.silu(gate) * up, self.down_proj, self.down_proj_scale_inv, tiles, self.dim,
                            self.emulate)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The checkpoint's layout: each weight without its padding (the scale grids are the same either way).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for part in self.PARTS:
            n, k = self.shape(part)
            destination[prefix + part] = destination[prefix + part][:, :n, :k]

    def extra_repr(self) -> str:
        return f"experts={self.gate_proj.shape[0]}, dim={self.dim}, inter={self.inter}, emulate={self.emulate}"


def _fp8_product(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, tiles: ops.RowTiles, n: int,
                 emulate: bool) -> torch.Tensor:
    # x: [M, K] in groups of rows (tiles), w: [G, Np, Kp] e4m3 -> [M, n] in x's dtype (the autocast dtype under
    # autocast): x quantised per token in 1x128 tiles, then the block-scaled GEMM with fp32 accumulation
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if x.shape[0] == 0:
        return x.new_zeros((0, n), dtype=out_dtype)
    with torch.autocast(dev, enabled=False):
        xq = ops.quantize_act(x, tiles, with_cols=False, emulate=emulate)
        return ops.gemm(xq.q, xq.s, w, w_scale_inv, tiles, n, out_dtype, emulate)


def fp8_served(module_name: str) -> bool:
    """Whether the linear layer `module_name` (a native name) serves from FP8 when its checkpoint weight is FP8."""
    return not module_name.endswith("kv_b_proj") and ".shared_experts." not in module_name


def replace_experts(model: nn.Module, emulate: bool) -> None:
    """Swap every routed Experts module for an (empty) Fp8WeightExperts of its size; load_model fills it."""
    for name, module in list(model.named_modules()):
        if type(module) is Experts:
            n, two_inter, dim = module.gate_up_proj.shape
            fp8 = Fp8WeightExperts(n, dim, two_inter // 2, emulate, module.gate_up_proj.device)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, fp8)


def replace_linears(model: nn.Module, chosen: Callable[[str], bool], emulate: bool) -> None:
    """Swap each nn.Linear whose module name `chosen` accepts for an (empty) Fp8WeightLinear on the same device.
    The caller fills the buffers (load_model does, from the checkpoint)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and chosen(name):
            parent, _, leaf = name.rpartition(".")
            fp8 = Fp8WeightLinear(module.in_features, module.out_features, module.bias, emulate,
                                  module.weight.device)
            setattr(model.get_submodule(parent) if parent else model, leaf, fp8)
