"""Serving FP8 checkpoints with FP8 GEMMs: the official release's e4m3 weights and 128x128 `weight_scale_inv`
blocks are kept as stored, and each product quantises its input per token in 1x128 tiles and runs the same
block-scaled GEMM as training's Fprop (`ops/fp8_gemm.py`: cuBLASLt where it serves, else Triton). Weights then take
half the memory and half the bytes per decoded token of bf16.

`load_model(..., fp8_gemms=...)` decides which layers (`fp8_served`): every linear layer whose weight the
checkpoint stores in FP8 (attention projections, dense MLPs, MTP's eh_proj), except `kv_b_proj`, whose two halves
the absorbed decode attention reads as bf16 matrices (W_UK folded into the query, W_UV into the output), and the
shared experts, which ride in the fused decode kernels of `ops/moe_decode.py` as bf16 rows. The routed experts
become `Fp8WeightExperts`: each expert's gate, up and down weights as stored, run through the grouped form of the
same GEMM (one group per expert, the rows sorted by `Experts.forward`'s dispatch) and, at decode batch sizes,
through the fused expert kernels, which scale each FP8 weight by its block's scale as they read it. That halves
the memory of the part of the model that dominates it (the experts are ~95% of DeepSeek-V3's weights) and the
bytes a decode step reads from it. Activations are quantised per token for the GEMMs, not for the decode kernels
(bf16 activations times FP8 weights there); at up to `gemv.MAX_ROWS` rows the linear layers too take such a
kernel, a block-scaled W8A16 GEMV, instead of quantising a few rows for a GEMM. Where the FP8 kernels cannot run,
the same numerics are emulated (quantise, dequantise, matmul), which the CPU tests use; the default there is to
dequantise at load instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import BLOCK, FP8
from .model import Experts
from .ops import fp8_gemm as ops
from .ops import fp8_gemv, moe_decode


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
        if not self.emulate and fp8_gemv.applies(rows):  # decode batch sizes: one W8A16 GEMV launch
            y = fp8_gemv.fp8_gemv(rows, self.weight, self.weight_scale_inv, self.out_features)
        else:
            tiles = ops.row_tiles(rows.shape[0], device=x.device)
            y = _fp8_product(rows, self.weight[None], self.weight_scale_inv[None], tiles, self.out_features,
                             self.emulate)
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
    """The routed experts of an FP8 checkpoint, as stored: buffers `gate_up_proj` e4m3 [E, 2Ip, Dp] (each expert's
    gate rows from 0, its up rows from Ip) and `down_proj` [E, Dp, Ip], every stored [I, D] / [D, I] matrix
    zero-padded to whole 128x128 blocks, with their `*_scale_inv` fp32 block grids. Dispatch, weighting and combine
    are Experts.forward's; `mlp` runs the grouped FP8 GEMMs, and at decode sizes the fused expert kernels read the
    FP8 stacks directly (`decode_weights`)."""

    def __init__(self, n: int, dim: int, inter: int, emulate: bool, device: torch.device):
        nn.Module.__init__(self)  # not Experts.__init__: no bf16 parameters
        self.dim, self.inter, self.emulate = dim, inter, emulate
        dp, ip = ops.padded(dim), ops.padded(inter)
        for name, (rows, cols) in [("gate_up_proj", (2 * ip, dp)), ("down_proj", (dp, ip))]:
            self.register_buffer(name, torch.zeros((n, rows, cols), dtype=FP8, device=device))
            self.register_buffer(name + "_scale_inv", torch.ones((n, rows // BLOCK, cols // BLOCK), device=device))

    def mlp(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        # xs: [M, D] rows grouped by expert, offs: [E] int32 group ends -> [M, D]
        tiles = ops.row_tiles(xs.shape[0], offs)
        ip = self.gate_up_proj.shape[1] // 2
        gate_up = _fp8_product(xs, self.gate_up_proj, self.gate_up_proj_scale_inv, tiles, 2 * ip, self.emulate)
        h = F.silu(gate_up[:, : self.inter]) * gate_up[:, ip: ip + self.inter]  # [M, I]
        return _fp8_product(h, self.down_proj, self.down_proj_scale_inv, tiles, self.dim, self.emulate)

    def decode_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, moe_decode.Fp8Experts] | None:
        if self.emulate:
            return None
        scales = moe_decode.Fp8Experts(self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.inter)
        return self.gate_up_proj, self.down_proj, scales

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The stacks without their padding, gate rows then up rows as in Experts (the scale grids stay as they are).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        names = prefix + "gate_up_proj", prefix + "down_proj"
        stacks = moe_decode.unpadded(destination[names[0]], destination[names[1]], self.inter, self.dim)
        destination.update(zip(names, stacks))

    def extra_repr(self) -> str:
        return f"experts={self.gate_up_proj.shape[0]}, dim={self.dim}, inter={self.inter}, emulate={self.emulate}"


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
            _swap(model, name, Fp8WeightExperts(n, dim, two_inter // 2, emulate, module.gate_up_proj.device))


def replace_linears(model: nn.Module, chosen: Callable[[str], bool], emulate: bool) -> None:
    """Swap each nn.Linear whose module name `chosen` accepts for an (empty) Fp8WeightLinear on the same device.
    The caller fills the buffers (load_model does, from the checkpoint)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and chosen(name):
            _swap(model, name, Fp8WeightLinear(module.in_features, module.out_features, module.bias, emulate,
                                               module.weight.device))


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
