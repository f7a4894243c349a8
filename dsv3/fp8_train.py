"""FP8 training with DeepSeek-V3's recipe: `apply_fp8(model)` and an AdamW with bf16 moments. The recipe and its
tensor layouts are explained at the top of `fp8.py`.

Notable features:
- `apply_fp8` switches a dsv3 Transformer to FP8 in place: every nn.Linear but the output head becomes an
  `Fp8Linear` (attention projections, dense MLPs, shared experts, MTP's eh_proj) and the routed experts an
  `Fp8Experts`. The module objects, parameters and names stay the same, so an optimiser built before still holds
  them and checkpoints do not change. Embedding, head, gate, norms and the attention core are left as they are.
- One autograd function serves dense layers and experts: Fprop, Dgrad and Wgrad in FP8 with fp32 accumulation.
  The input is kept for the backward only in its 128x1 FP8 form (half the bytes of bf16).
- Quantised weights are cached until the weight changes (its version counter moves when the optimiser steps), so
  the micro-batches of one step, and recomputation under activation checkpointing, quantise each weight once.
- Under torch.compile the FP8 layers are custom ops (`dsv3::fp8_matmul`, its backward, `dsv3::fp8_quantize_weight`):
  the compiled model is one graph, where tracing the autograd function broke it at every FP8 layer.
- Emulation (quantise, dequantise, matmul in fp32) where the kernels cannot run, the CPU included: the same tiles
  and scales, so the same numerics up to summation order. apply_fp8 says when it falls back to it.
- Under autocast the FP8 layers return the autocast dtype, as nn.Linear would; gradients of the master weights
  are fp32.
- `make_adamw(..., bf16_moments=True)`: AdamW whose two moments are stored in bf16 and updated in fp32;
  `clip_and_step` clips the gradient inside its update.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .model import Experts
from .ops import fp8_gemm as ops
from .ops.adamw import adamw_step_
from .ops.swiglu import swiglu
from .parallel import clip_coefficient, grad_norm


@dataclass(frozen=True)
class Fp8Settings:
    emulate: bool  # quantise, dequantise, matmul in fp32 instead of the FP8 kernels
    pow2: bool = False  # power-of-two scales (DeepSeek-V3.1's ue8m0)


def _forward(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor | None, n: int, keep_cols: bool,
             settings: Fp8Settings, out_dtype: torch.dtype) -> tuple[torch.Tensor, ops.ActFp8, ops.RowTiles]:
    # Fprop: x [M, K] (M > 0) -> y [M, n], x in FP8 (its 128x1 form with keep_cols, what Wgrad reads), its row tiles
    tiles = ops.row_tiles(x.shape[0], offs, x.device)
    with torch.autocast(x.device.type, enabled=False):
        xq = ops.quantize_act(x, tiles, settings.pow2, with_cols=keep_cols, emulate=settings.emulate)
        return ops.gemm(xq.q, xq.s, wq, ws, tiles, n, out_dtype, settings.emulate), xq, tiles


def _backward(dy: torch.Tensor, xqt: torch.Tensor | None, xst: torch.Tensor | None, wqt: torch.Tensor,
              ws: torch.Tensor, tiles: ops.RowTiles, k: int, need_x: bool, need_w: bool, settings: Fp8Settings,
              x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # dy: [M, N] (M > 0), tiles: the forward's -> dx [M, k] (need_x), dw [G, N, k] (need_w)
    dx = dw = None
    with torch.autocast(dy.device.type, enabled=False):
        dyq = ops.quantize_act(dy, tiles, settings.pow2, with_cols=need_w, emulate=settings.emulate)
        if need_x:  # Dgrad: dY in 1x128 tiles against the transposed weight blocks
            dx = ops.gemm(dyq.q, dyq.s, wqt, ws.transpose(1, 2), tiles, k, x_dtype, settings.emulate)
        if need_w:  # Wgrad: dY and X both in 128x1 tiles along the tokens
            dw = ops.wgrad(dyq, ops.ActFp8(None, None, xqt, xst), tiles, dy.shape[1], k, settings.emulate)
            dw = dw.to(w_dtype)
    return dx, dw


class _Fp8MatMul(torch.autograd.Function):
    """y = x w_g^T for the rows of each group g, its three GEMMs in FP8 (eager; compiled code calls the custom op
    `dsv3::fp8_matmul` below instead).

    x: [M, K]; weight: [G, N, K], the master weight, an input only to receive its gradient; wq, wqt, ws: its
    quantised form (ops.WeightFp8); offs: [G] int32 row ends, or None for one group (a dense layer)."""

    @staticmethod
    def forward(ctx, x, weight, wq, wqt, ws, offs, settings: Fp8Settings, out_dtype: torch.dtype):
        m, k = x.shape
        g, n = weight.shape[:2]
        ctx.settings, ctx.shape, ctx.dtypes = settings, (g, m, n, k), (x.dtype, weight.dtype)
        if m == 0:
            return x.new_zeros((0, n), dtype=out_dtype)
        y, xq, ctx.tiles = _forward(x, wq, ws, offs, n, ctx.needs_input_grad[1], settings, out_dtype)
        ctx.save_for_backward(xq.qt, xq.st, wqt, ws)
        return y

    @staticmethod
    def backward(ctx, dy):
        settings, (g, m, n, k), (x_dtype, w_dtype) = ctx.settings, ctx.shape, ctx.dtypes
        need_x, need_w = ctx.needs_input_grad[:2]
        if m == 0:
            dx = dy.new_zeros((0, k), dtype=x_dtype) if need_x else None
            dw = torch.zeros((g, n, k), dtype=w_dtype, device=dy.device) if need_w else None
        else:
            xqt, xst, wqt, ws = ctx.saved_tensors
            dx, dw = _backward(dy, xqt, xst, wqt, ws, ctx.tiles, k, need_x, need_w, settings, x_dtype, w_dtype)
        return dx, dw, None, None, None, None, None, None


# ---- under torch.compile -----------------------------------------------------------------------------------------
# Dynamo cannot trace _Fp8MatMul whole (row tiles built per call, Triton launches with autotuning, the choice
# between cuBLASLt and Triton made on the host): every FP8 layer would break the graph and recompile per shape.
# Compiled code calls these custom ops instead, single calls with declared output shapes to the compiler, with the
# same three GEMMs. Eager code keeps the autograd function: a custom op costs more dispatch per call.
@torch.library.custom_op("dsv3::fp8_quantize_weight", mutates_args=())
def _quantize_weight_op(w: torch.Tensor, pow2: bool, emulate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wq = ops.quantize_weight(w, pow2, emulate)
    return wq.q, wq.qt, wq.s


@_quantize_weight_op.register_fake
def _(w, pow2, emulate):
    g, n, k = w.shape
    np_, kp = ops.padded(n), ops.padded(k)
    return (w.new_empty((g, np_, kp), dtype=ops.FP8), w.new_empty((g, kp, np_), dtype=ops.FP8),
            w.new_empty((g, np_ // ops.BLOCK, kp // ops.BLOCK), dtype=torch.float32))


@torch.library.custom_op("dsv3::fp8_matmul", mutates_args=())
def _fp8_matmul_op(x: torch.Tensor, weight: torch.Tensor, wq: torch.Tensor, wqt: torch.Tensor, ws: torch.Tensor,
                   offs: torch.Tensor | None, keep_cols: bool, pow2: bool, emulate: bool, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # -> y [M, N], and x's 128x1 form for Wgrad (qt [Kp, T*128], st [T, Kp]; T = 0 without keep_cols). weight
    # (the master) only receives the gradient; wqt is kept for Dgrad.
    m, n = x.shape[0], weight.shape[1]
    if m == 0:
        return _fp8_matmul_fake(x, weight, wq, wqt, ws, offs, False, pow2, emulate, out_dtype)
    y, xq, _ = _forward(x, wq, ws, offs, n, keep_cols, Fp8Settings(emulate, pow2), out_dtype)
    if not keep_cols:
        kp = ops.padded(x.shape[1])
        return y.contiguous(), x.new_empty((kp, 0), dtype=ops.FP8), x.new_empty((0, kp))
    return y.contiguous(), xq.qt, xq.st


@_fp8_matmul_op.register_fake
def _fp8_matmul_fake(x, weight, wq, wqt, ws, offs, keep_cols, pow2, emulate, out_dtype):
    m, n, kp = x.shape[0], weight.shape[1], ops.padded(x.shape[1])
    t = ops.tile_count(m, 1 if offs is None else offs.shape[0]) if keep_cols and m else 0
    return (x.new_empty((m, n), dtype=out_dtype), x.new_empty((kp, t * ops.BLOCK), dtype=ops.FP8),
            x.new_empty((t, kp), dtype=torch.float32))


@torch.library.custom_op("dsv3::fp8_matmul_backward", mutates_args=())
def _fp8_backward_op(dy: torch.Tensor, xqt: torch.Tensor, xst: torch.Tensor, wqt: torch.Tensor, ws: torch.Tensor,
                     offs: torch.Tensor | None, k: int, groups: int, need_x: bool, need_w: bool, pow2: bool,
                     emulate: bool, x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # -> dx [M, k] (empty [0] without need_x), dw [G, N, k] (empty [0] without need_w)
    m, n = dy.shape
    if m == 0:
        dx = dy.new_zeros((0, k), dtype=x_dtype)
        dw = torch.zeros((groups, n, k), dtype=w_dtype, device=dy.device)
    else:
        tiles = ops.row_tiles(m, offs, dy.device)  # as the forward built them
        dx, dw = _backward(dy, xqt, xst, wqt, ws, tiles, k, need_x, need_w, Fp8Settings(emulate, pow2), x_dtype,
                           w_dtype)
    return (dx.contiguous() if need_x else dy.new_empty(0, dtype=x_dtype),
            dw.contiguous() if need_w else dy.new_empty(0, dtype=w_dtype))


@_fp8_backward_op.register_fake
def _(dy, xqt, xst, wqt, ws, offs, k, groups, need_x, need_w, pow2, emulate, x_dtype, w_dtype):
    m, n = dy.shape
    return (dy.new_empty((m, k) if need_x else (0,), dtype=x_dtype),
            dy.new_empty((groups, n, k) if need_w else (0,), dtype=w_dtype))


def _fp8_op_context(ctx, inputs, output):
    x, weight, wq, wqt, ws, offs, keep_cols, pow2, emulate, out_dtype = inputs
    _, xqt, xst = output
    ctx.meta = (x.shape[1], weight.shape[0], pow2, emulate, x.dtype, weight.dtype)
    ctx.save_for_backward(xqt, xst, wqt, ws, offs)


def _fp8_op_backward(ctx, dy, _dqt, _dst):
    k, groups, pow2, emulate, x_dtype, w_dtype = ctx.meta
    xqt, xst, wqt, ws, offs = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    dx, dw = torch.ops.dsv3.fp8_matmul_backward(dy.contiguous(), xqt, xst, wqt, ws, offs, k, groups, need_x,
                                                need_w, pow2, emulate, x_dtype, w_dtype)
    return (dx if need_x else None), (dw if need_w else None), None, None, None, None, None, None, None, None


_fp8_matmul_op.register_autograd(_fp8_op_backward, setup_context=_fp8_op_context)


class _WeightCache:
    """Quantised weights, kept until the weight changes. An entry holds an alias of its source tensor, so no other
    tensor can take the same address while it lives, and the version counter tells in-place updates apart."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, w: torch.Tensor, settings: Fp8Settings) -> ops.WeightFp8:
        if torch.compiler.is_compiling():
            return ops.WeightFp8(*torch.ops.dsv3.fp8_quantize_weight(w.detach(), settings.pow2, settings.emulate))
        key = (w.data_ptr(), tuple(w.shape), w.stride())
        hit = self._entries.get(key)
        if hit is not None and hit[1] == w._version and hit[2] == settings:
            return hit[3]
        with torch.no_grad():
            wq = ops.quantize_weight(w.detach(), settings.pow2, settings.emulate)
        self._entries[key] = (w.detach(), w._version, settings, wq)
        return wq


def _fp8_matmul(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor | None, settings: Fp8Settings,
                cache: _WeightCache) -> torch.Tensor:
    # x: [M, K], weight: [G, N, K] -> [M, N] in the autocast dtype under autocast, else x's
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    wq = cache.get(weight, settings)
    if torch.compiler.is_compiling():
        keep_cols = weight.requires_grad and torch.is_grad_enabled()  # Wgrad will need x's 128x1 form
        return torch.ops.dsv3.fp8_matmul(x, weight, wq.q, wq.qt, wq.s, offs, keep_cols, settings.pow2,
                                         settings.emulate, out_dtype)[0]
    return _Fp8MatMul.apply(x, weight, wq.q, wq.qt, wq.s, offs, settings, out_dtype)


class Fp8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs; made by apply_fp8 from an nn.Linear, parameters untouched."""

    fp8: Fp8Settings
    _fp8_cache: _WeightCache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        y = _fp8_matmul(x.reshape(-1, x.shape[-1]), self.weight.unsqueeze(0), None, self.fp8, self._fp8_cache)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Fp8Experts(Experts):
    """Routed experts whose two grouped GEMMs (gate/up and down) run in FP8; made by apply_fp8 from Experts.
    Dispatch, expert weighting and combine are Experts.forward's own: only `mlp` differs."""

    fp8: Fp8Settings
    _fp8_cache: _WeightCache

    def mlp(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        # xs: [M, D] rows grouped by expert; offs: [E] -> [M, D]
        h = swiglu(_fp8_matmul(xs, self.gate_up_proj, offs, self.fp8, self._fp8_cache))
        return _fp8_matmul(h, self.down_proj, offs, self.fp8, self._fp8_cache)


def apply_fp8(model: nn.Module, emulate: bool | None = None, pow2_scales: bool = False) -> nn.Module:
    """Switch `model` (a dsv3 Transformer) to FP8 training in place and return it.

    emulate=None picks the FP8 kernels where they run (CUDA, compute capability >= 8.9, Triton) and emulation
    elsewhere, with a warning; emulate=False insists on the kernels and raises where they cannot run."""
    device = next(model.parameters()).device
    reason = ops.fp8_unsupported_reason(device)
    if emulate is None:
        emulate = reason is not None
        if emulate:
            warnings.warn(f"FP8 kernels cannot run here ({reason}); training with FP8 emulated (quantise, "
                          "dequantise, matmul in fp32): FP8's numerics at below bf16's speed", stacklevel=2)
    elif not emulate and reason is not None:
        raise RuntimeError(f"FP8 training needs the FP8 kernels, but {reason}; "
                           "apply_fp8(model, emulate=True) runs the same numerics anywhere")
    settings = Fp8Settings(emulate=emulate, pow2=pow2_scales)
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            # Swapping the class keeps the object, its parameters and hooks: nothing that refers to it breaks.
            module.__class__ = Fp8Linear
        elif isinstance(module, Experts):
            module.__class__ = Fp8Experts
        else:
            continue
        module.fp8 = settings
        module._fp8_cache = _WeightCache()
    return model


# ---- optimiser -----------------------------------------------------------------------------------------------
class AdamW(torch.optim.Optimizer):
    """AdamW (torch's update, decoupled weight decay) with both moments stored in `moment_dtype` and every step's
    arithmetic in fp32: DeepSeek-V3 keeps the moments in bf16 and saw no loss of accuracy. On CUDA each parameter's
    update is one Triton kernel pass (`ops.adamw`)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        """grad_scale: a one-element fp32 tensor multiplying every gradient as the update reads it (clipping's
        factor, `clip_and_step`); the gradients themselves are left as they are."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            for s in states:
                s["step"] += 1
            adamw_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group["lr"], *group["betas"],
                        group["eps"], group["weight_decay"], grad_scale)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader casts floating state to each parameter's dtype (fp32 master weights): the moments come back
        # to their own dtype, bf16 -> fp32 -> bf16 being exact, so a resumed run continues as a straight one.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        return state


def make_adamw(params, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1,
               eps: float = 1e-8, bf16_moments: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW (fused on CUDA) with fp32 moments, or ours with bf16 moments; `params` as for any optimiser."""
    if bf16_moments:
        return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moment_dtype=torch.bfloat16)
    params = list(params)
    on_cuda = all(p.is_cuda for g in params for p in (g["params"] if isinstance(g, dict) else [g]))
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=on_cuda or None)


def clip_and_step(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradient to max_norm by the whole model's norm, step the optimiser, and return the norm (before
    clipping, as torch's clip_grad_norm_ does). dsv3's AdamW applies the clipping factor as it reads each gradient,
    so clipping costs one read of the gradients (the norm) where scaling them first would add a read and a write."""
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params)
    coef = clip_coefficient(norm, max_norm)
    if isinstance(optimizer, AdamW):
        optimizer.step(grad_scale=coef.float())
    else:
        torch._foreach_mul_([p.grad for p in params], coef)
        optimizer.step()
    return norm
