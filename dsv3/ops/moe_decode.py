"""The MoE layer at decode batch sizes: fused routing and fused small-batch experts (Triton), each beside its plain
PyTorch reference. The routing kernel also makes the expert choice of training batches (`select`).

A decode step hands each MoE layer a handful of tokens. The general path (`Gate.forward`, then `Experts.forward`'s
sort and grouped GEMM) then costs ~15 small routing kernels and two CUTLASS grouped GEMMs running well below HBM
bandwidth, and the shared experts' MLP a few more launches. Here the layer is three launches and a sum:

- `gate_route`: the gate's fp32 logits x @ W^T [T, E] and all of `Gate.forward` after them: sigmoid or softmax
  scores, the correction bias (for choosing only), group scores (sum of the top two for noaux_tc, the max for
  group_limited_greedy), the `topk_group` best groups, the top-k experts inside them, their weights (normalised,
  scaled) and the tokens per expert. Each top-k is k rounds of argmax, ties going to the lower index. One launch:
  a program per two experts computes their logits for every token (32 programs read the 16b gate's 512 KB), and
  the program that arrives last (an atomic counter, which it resets) routes all the tokens from them, a tile of at
  most 4096 scores. At batch 1 on the 16b preset this took the router from three launches (cuBLAS's fp32 GEMV is
  two) to one: +4.4% and +5.5% decode tokens/s, two GPUs (docs/benchmarks.md).
- `select`, the routing kernel for training batches (and prefill): from scores the caller computed (with
  autograd), only the choice, i.e. indices and counts. A program per block of tokens (a tile of at most 4096
  scores); more than one program add their counts into a zeroed buffer with integer atomics, whose sum does not
  depend on their order. `Gate.forward` then gathers the weights in PyTorch, so gradients are those of the plain
  path, and the choice is made on the very same fp32 scores, so it is the plain path's too (up to exact ties,
  which go to the lower index here). It replaces three torch.topk calls, the group mask and `Experts.forward`'s
  scatter_add counts with one launch, and writes no scores or weights.
- `experts` (`layer` runs them after `gate_route`): two GEMV kernels that read only the chosen experts' weights,
  along their contiguous reduction dim. gate/up: a program per (token-expert pair, tile of I) computes
  silu(x . Wg[i]) * (x . Wu[i]); down: a program per (pair, tile of D) writes its output times the routing weight
  in fp32, and a sum over each token's pairs follows (no atomics: the result does not depend on scheduling); under
  torch.compile it is a chain of adds, which inductor fuses into the kernel of the residual add and the next norm.
  Programs of the same weight tile for different pairs are adjacent in launch order, so tokens that share an expert
  mostly read it from L2.
- The shared experts ride along: DeepSeek's shared experts are always-on experts of width I, so the shared MLP
  (n_shared * I wide) becomes n_shared more pairs per token at weight 1, read in place from its nn.Linear weights
  (a second set of pointers; the pair's slot picks the source). Every pair is then the same work, the T = 1 grid
  grows from K to K + n_shared pairs, and the layer needs no separate launches for the shared MLP or the add.
- FP8 checkpoints' routed experts (`Fp8Experts`): the kernels read the e4m3 stacks as stored (each expert's
  matrices zero-padded to whole 128x128 blocks) and scale each weight by its block's scale as it is loaded, so a
  decode step reads half the expert bytes; the activations stay bf16.
- A GEMV re-reads an expert once per token that chose it, so the fused path pays off while T * K <= E (`fits`);
  above that the grouped GEMM reads each expert once for all its tokens.
- Overlap under programmatic dependent launch (`tuning`): what a kernel reads that the kernel just before it did not
  write, it reads before waiting for that kernel. The router reads its first slice of the gate weight; gate/up's
  shared-MLP programs, launched first, compute their whole output from x (the router's input too) while the
  router runs, a few programs on an otherwise idle GPU, and store it after the wait; down finds its experts and
  routing weights.
- Graph-safe: shapes are static, nothing syncs with the host. Under torch.compile the kernels are the opaque custom
  ops `dsv3::moe_layer` (routing and experts: one op, so that no kernel can come between them and write x) and
  `dsv3::moe_select` (the compiler sees declared output shapes, not a launch).
- Tile sizes of the expert kernels are autotuned per shape and pair count among a few configurations chosen for
  Hopper bandwidth (a few hundred programs, 16-byte loads); the first call of each shape benchmarks them, so warm
  up before capturing a graph. Under the Triton interpreter the first configuration runs.
- `gate_route_reference` (`route_reference` of the logits), `select_reference` and `experts_reference` state the
  same computations in plain PyTorch (argmax rounds, gathered weights, the shared MLP as one matmul); the tests
  hold them against the model's Gate and MoE, and the kernels against them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fp8 import dequantize_blocks
from .tuning import autotuned, fixed_meta, gemv_configs, pdl_meta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model keeps its general path
    triton = None



@dataclass(frozen=True)
class RouteSpec:
    """The routing rule of a config, in the plain values the kernel and the custom op take."""

    top_k: int
    n_group: int  # 1: no group limit
    topk_group: int
    group_top2: bool  # a group scores the sum of its top two choices (noaux_tc), else its max
    softmax: bool  # softmax scores, else sigmoid
    norm: bool  # normalise the k weights to sum to one (before scaling)
    scale: float  # routed_scaling_factor

    @classmethod
    def from_config(cls, cfg) -> "RouteSpec":
        groups = 1 if cfg.topk_method == "greedy" else (cfg.n_group or 1)
        return cls(cfg.num_experts_per_tok, groups, cfg.topk_group or 1, cfg.topk_method == "noaux_tc",
                   cfg.scoring_func == "softmax", cfg.norm_topk_prob, float(cfg.routed_scaling_factor))


def fits(tokens: int, top_k: int, n_experts: int) -> bool:
    """Whether `tokens` tokens are few enough for the fused experts: at most one (token, expert) pair per expert."""
    return 0 < tokens * top_k <= n_experts


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


# ---- references --------------------------------------------------------------------------------------------------
def _argmax_rounds(x: torch.Tensor, n: int) -> torch.Tensor:
    # x: [T, N] -> [T, n]: the n largest, best first; torch.argmax takes the first of equal maxima
    x = x.clone()
    picks = []
    for _ in range(n):
        i = x.argmax(dim=-1, keepdim=True)
        picks.append(i)
        x.scatter_(1, i, float("-inf"))
    return torch.cat(picks, dim=1)


def select_reference(scores: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    # scores: [T, E] fp32 -> indices [T, K] int64, tokens per expert [E] int64
    t, e = scores.shape
    choice = scores if bias is None else scores + bias.float()
    if spec.n_group > 1:
        grouped = choice.view(t, spec.n_group, e // spec.n_group)  # [T, G, E/G]
        best, first = grouped.max(dim=-1, keepdim=True)
        if spec.group_top2:
            # The best once more after knocking out the first copy of it: equal to it when it occurs twice.
            best = best + grouped.scatter(-1, first, float("-inf")).amax(dim=-1, keepdim=True)
        keep = torch.zeros(t, spec.n_group, 1, dtype=torch.bool, device=scores.device)
        keep[torch.arange(t, device=scores.device)[:, None], _argmax_rounds(best[..., 0], spec.topk_group)] = True
        choice = grouped.masked_fill(~keep, float("-inf")).view(t, e)
    indices = _argmax_rounds(choice, spec.top_k)
    counts = torch.zeros(e, dtype=torch.int64, device=scores.device).scatter_add_(
        0, indices.flatten(), torch.ones_like(indices.flatten()))
    return indices, counts


def route_reference(logits: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # logits: [T, E] fp32 -> weights [T, K] fp32, indices [T, K] int64, scores [T, E] fp32, tokens per expert [E] int64
    scores = logits.softmax(dim=-1) if spec.softmax else logits.sigmoid()
    indices, counts = select_reference(scores, bias, spec)
    weights = scores.gather(1, indices)
    if spec.norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.scale, indices, scores, counts


def gate_route_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: [T, D], weight: [E, D] (the gate's, fp32) -> as route_reference, from the fp32 logits x @ weight^T
    return route_reference(x.float() @ weight.float().T, bias, spec)


# The shared experts' MLP weights, nn.Linear layout: gate_proj [S, D], up_proj [S, D], down_proj [D, S], where
# S = n_shared * I (n_shared always-on experts side by side).
SharedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Fp8Experts:
    """Routed experts stored in FP8 (serving an FP8 checkpoint): the stacks passed as gate_up_proj [E, 2Ip, Dp] (gate
    rows at 0, up rows at Ip) and down_proj [E, Dp, Ip] hold e4m3 zero-padded to whole 128x128 blocks; these are
    their fp32 block scales and the unpadded expert width I. The kernels scale each weight as they load it."""

    gate_up_scale_inv: torch.Tensor  # [E, 2Ip/128, Dp/128]
    down_scale_inv: torch.Tensor  # [E, Dp/128, Ip/128]
    inter: int  # I


def unpadded(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, inter: int, dim: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded stacks as Fp8Experts describes them (any dtype) -> [E, 2I, D] and [E, D, I], the bf16 layout."""
    ip = gate_up_proj.shape[1] // 2
    gate_up = torch.cat([gate_up_proj[:, :inter, :dim], gate_up_proj[:, ip:ip + inter, :dim]], dim=1)
    return gate_up, down_proj[:, :dim, :inter]


def experts_reference(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                      indices: torch.Tensor, shared: SharedWeights | None = None, fp8: Fp8Experts | None = None
                      ) -> torch.Tensor:
    # x: [T, D], gate_up_proj: [E, 2I, D], down_proj: [E, D, I] (or FP8 stacks, see Fp8Experts), weights, indices:
    # [T, K] -> [T, D] in x.dtype
    if fp8 is not None:
        gate_up_proj, down_proj = unpadded(dequantize_blocks(gate_up_proj, fp8.gate_up_scale_inv),
                                           dequantize_blocks(down_proj, fp8.down_scale_inv), fp8.inter, x.shape[1])
    t, k = indices.shape
    chosen = indices.flatten()  # [T*K]: pair p is token p // K
    xs = x.float().repeat_interleave(k, dim=0)  # [T*K, D]
    gate, up = torch.einsum("pd,pjd->pj", xs, gate_up_proj[chosen].float()).chunk(2, dim=-1)
    h = (F.silu(gate) * up).to(x.dtype)  # the kernels hand h from gate/up to down in the activation dtype
    ys = torch.einsum("pi,pdi->pd", h.float(), down_proj[chosen].float())  # [T*K, D]
    y = (ys.view(t, k, -1) * weights.float().unsqueeze(-1)).sum(dim=1)  # [T, D] fp32
    if shared is not None:  # the shared MLP at weight 1, its h rounded like the routed experts', summed in fp32
        w_gate, w_up, w_down = (w.float() for w in shared)
        h = (F.silu(x.float() @ w_gate.T) * (x.float() @ w_up.T)).to(x.dtype)  # [T, S]
        y = y + h.float() @ w_down.T
    return y.to(x.dtype)


# ---- launchers ---------------------------------------------------------------------------------------------------
ROUTE_TILE = 4096  # scores one routing program holds at most: a [BLOCK_T, BLOCK_G, BLOCK_PG] tile


def _route_meta(spec: RouteSpec, e: int) -> dict:
    """The routing kernels' shared launch constants for `e` experts: the rule, and the expert grid (group, expert
    within it) padded to powers of two."""
    return dict(E=e, G=spec.n_group, PG=e // spec.n_group, K=spec.top_k, TOPK_GROUP=spec.topk_group,
                GROUP_TOP2=spec.group_top2, BLOCK_G=triton.next_power_of_2(spec.n_group),
                BLOCK_PG=triton.next_power_of_2(e // spec.n_group), BLOCK_K=triton.next_power_of_2(spec.top_k))


def _route_warps(tile: int) -> int:
    # A small tile reduces inside one warp (shuffles only, no shared-memory round trips).
    return 1 if tile <= 256 else 4 if tile <= 2048 else 8


def select_triton(scores: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise RuntimeError("the fused routing kernel needs the triton package")
    scores = scores.float().contiguous()  # no-ops on what the gate hands over
    t, e = scores.shape
    indices = scores.new_empty(t, spec.top_k, dtype=torch.int64)
    meta = _route_meta(spec, e)
    experts = meta["BLOCK_G"] * meta["BLOCK_PG"]
    # Tokens per program: a tile of at most ROUTE_TILE scores (the small preset's 64 experts: 64 tokens, 512
    # programs at 32K tokens).
    block_t = min(triton.next_power_of_2(max(t, 1)), max(1, ROUTE_TILE // experts))
    programs = triton.cdiv(max(t, 1), block_t)  # T = 0 still runs one program, to store zero counts
    # One program stores its counts; several add theirs to zeros (a memset: no host sync, fine in a CUDA graph).
    counts = scores.new_zeros(e, dtype=torch.int64) if programs > 1 else scores.new_empty(e, dtype=torch.int64)
    _select_kernel[(programs,)](
        scores, bias.float() if bias is not None else scores, indices, counts, t, **meta, HAS_BIAS=bias is not None,
        ATOMIC_COUNTS=programs > 1, BLOCK_T=block_t, num_warps=_route_warps(block_t * experts),
        **pdl_meta(scores.device),
    )
    return indices, counts


_ARRIVED: dict[torch.device, torch.Tensor] = {}  # gate_route_triton's arrival counter, per device


def gate_route_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's logits and the routing in one launch, for decode batches (the routing runs in one program)."""
    if triton is None:
        raise RuntimeError("the fused routing kernel needs the triton package")
    t, d = x.shape
    e = weight.shape[0]
    meta = _route_meta(spec, e)
    experts = meta["BLOCK_G"] * meta["BLOCK_PG"]
    block_t = triton.next_power_of_2(max(t, 1))
    if block_t * experts > ROUTE_TILE:
        raise ValueError(f"gate_route routes at most {ROUTE_TILE // experts} tokens at once, got {t}")
    if not weight.is_contiguous() or x.stride(-1) != 1:
        raise ValueError("gate_route wants a contiguous gate weight and contiguous rows of x")
    arrived = _ARRIVED.get(x.device)
    if arrived is None:  # zero once; each launch's last program sets it back to zero
        arrived = _ARRIVED[x.device] = torch.zeros(1, dtype=torch.int32, device=x.device)
    logits = x.new_empty(t, e, dtype=torch.float32)
    weights = logits.new_empty(t, spec.top_k)
    indices = logits.new_empty(t, spec.top_k, dtype=torch.int64)
    scores = torch.empty_like(logits)
    counts = logits.new_empty(e, dtype=torch.int64)
    # Two experts a program: 32 programs for 64 experts, each reading 16 KB of gate weight; a product tile of at
    # most ROUTE_TILE elements too.
    block_e = 2
    block_d = min(triton.next_power_of_2(d), max(16, ROUTE_TILE // (block_t * block_e)))
    _gate_route_kernel[(triton.cdiv(e, block_e),)](
        x, weight, logits, arrived, bias.float() if bias is not None else logits, weights, indices, scores, counts,
        t, d, x.stride(0), spec.scale, **meta, HAS_BIAS=bias is not None, SOFTMAX=spec.softmax, NORM=spec.norm,
        BLOCK_E=block_e, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=_route_warps(block_t * experts),
        **pdl_meta(x.device),
    )
    return weights, indices, scores, counts


def experts_triton(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                   indices: torch.Tensor, shared: SharedWeights | None = None, fp8: Fp8Experts | None = None
                   ) -> torch.Tensor:
    return expert_parts(x, gate_up_proj, down_proj, weights, indices, shared, fp8).sum(dim=1).to(x.dtype)


def expert_parts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor, shared: SharedWeights | None = None, fp8: Fp8Experts | None = None,
                 x_settled: bool = False) -> torch.Tensor:
    """The two kernels of experts_triton: each token's K + NS pairs (routed experts times their weights, then the
    shared MLP's slices) -> [T, K + NS, D] fp32, which the caller sums. x_settled: x was not written by the kernel
    launched just before (see _gate_up_kernel; `layer_triton` knows it is so)."""
    if triton is None:
        raise RuntimeError("the fused expert kernels need the triton package")
    t, d = x.shape
    k = indices.shape[1]
    inter = down_proj.shape[-1] if fp8 is None else fp8.inter
    # Row strides and the up rows' offset: the stacks' own (padded, for FP8) sizes.
    up_row, gu_stride, down_stride = gate_up_proj.shape[1] // 2, gate_up_proj.shape[2], down_proj.shape[2]
    # Without shared experts the kernels never take their shared branch: any pointers of the right dtype will do;
    # likewise the scales of bf16 experts.
    s_gate, s_up, s_down = shared if shared is not None else (x, x, x)
    gu_scale, down_scale = (fp8.gate_up_scale_inv, fp8.down_scale_inv) if fp8 is not None else (weights, weights)
    ns = 0 if shared is None else s_down.shape[1] // inter
    if not (gate_up_proj.is_contiguous() and down_proj.is_contiguous() and indices.is_contiguous()
            and weights.is_contiguous() and x.stride(-1) == 1 and gu_scale.is_contiguous()
            and down_scale.is_contiguous() and s_gate.is_contiguous() and s_up.is_contiguous()
            and s_down.is_contiguous()):
        raise ValueError("experts_triton wants contiguous weights, scales, indices and routing weights, and x rows")
    if shared is not None and not (ns >= 1 and s_gate.shape == s_up.shape == (ns * inter, d)
                                   and s_down.shape == (d, ns * inter)
                                   and s_gate.dtype == s_up.dtype == s_down.dtype == x.dtype):
        raise ValueError("the shared experts must be n * I wide, laid out as nn.Linear, in the activations' dtype")
    # Pair p is token p // (K + NS) and its slot p % (K + NS): slots below K are its routed experts (in routing
    # order), the NS after them the shared MLP's I-wide slices, at weight 1. Every pair is the same amount of work.
    pairs = t * (k + ns)
    h = x.new_empty(pairs, inter)  # [T*(K+NS), I]
    _gate_up_kernel[lambda meta: (pairs * triton.cdiv(inter, meta["BLOCK_I"]),)](
        x, gate_up_proj, gu_scale, s_gate, s_up, indices, h, x.stride(0), d, inter, up_row, gu_stride, pairs,
        K=k, NS=ns, FP8=fp8 is not None, X_SETTLED=x_settled, **fixed_meta(_GATE_UP_CONFIGS), **pdl_meta(x.device))
    part = x.new_empty(pairs, d, dtype=torch.float32)  # [T*(K+NS), D]: each pair's output times its weight
    _down_kernel[lambda meta: (pairs, triton.cdiv(d, meta["BLOCK_D"]))](
        h, down_proj, down_scale, s_down, indices, weights, part, d, inter, down_proj.shape[1], down_stride, pairs,
        K=k, NS=ns, FP8=fp8 is not None, **fixed_meta(_DOWN_CONFIGS), **pdl_meta(x.device))
    return part.view(t, k + ns, d)


def layer_triton(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec,
                 gate_up_proj: torch.Tensor, down_proj: torch.Tensor, shared: SharedWeights | None = None,
                 fp8: Fp8Experts | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_route_triton, then expert_parts -> (pairs [T, K + NS, D] fp32, weights, indices, scores, counts)."""
    weights, indices, scores, counts = gate_route_triton(x, gate_weight, bias, spec)
    # The routing kernel reads x too, so whatever wrote x finished before the expert kernels could start.
    pairs = expert_parts(x, gate_up_proj, down_proj, weights, indices, shared, fp8, x_settled=True)
    return pairs, weights, indices, scores, counts


# ---- custom ops: what torch.compile sees (see the module docstring) ----------------------------------------------
@torch.library.custom_op("dsv3::moe_select", mutates_args=())
def _select_op(scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
               group_top2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Only the choice's fields: scoring, normalisation and scale do not enter it.
    return select_triton(scores, bias, RouteSpec(top_k, n_group, topk_group, group_top2, False, False, 1.0))


@_select_op.register_fake
def _(scores, bias, top_k, n_group, topk_group, group_top2):
    t, e = scores.shape
    return scores.new_empty(t, top_k, dtype=torch.int64), scores.new_empty(e, dtype=torch.int64)


@torch.library.custom_op("dsv3::moe_layer", mutates_args=())
def _layer_op(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
              topk_group: int, group_top2: bool, softmax: bool, norm: bool, scale: float, gate_up_proj: torch.Tensor,
              down_proj: torch.Tensor, shared_gate: torch.Tensor | None, shared_up: torch.Tensor | None,
              shared_down: torch.Tensor | None, gate_up_scale_inv: torch.Tensor | None,
              down_scale_inv: torch.Tensor | None, inter: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The pairs' outputs, summed by the caller's compiled graph: the sum and cast fuse there with what follows
    # (the residual add) instead of taking launches of their own.
    spec = RouteSpec(top_k, n_group, topk_group, group_top2, softmax, norm, scale)
    shared = None if shared_gate is None else (shared_gate, shared_up, shared_down)
    fp8 = None if gate_up_scale_inv is None else Fp8Experts(gate_up_scale_inv, down_scale_inv, inter)
    return layer_triton(x, gate_weight, bias, spec, gate_up_proj, down_proj, shared, fp8)


@_layer_op.register_fake
def _(x, gate_weight, bias, top_k, n_group, topk_group, group_top2, softmax, norm, scale, gate_up_proj, down_proj,
      shared_gate, shared_up, shared_down, gate_up_scale_inv, down_scale_inv, inter):
    t, e = x.shape[0], gate_weight.shape[0]
    inter = down_proj.shape[-1] if gate_up_scale_inv is None else inter  # as expert_parts reads it
    n_shared = 0 if shared_down is None else shared_down.shape[1] // inter
    scores = x.new_empty(t, e, dtype=torch.float32)
    return (x.new_empty((t, top_k + n_shared, x.shape[1]), dtype=torch.float32), scores.new_empty(t, top_k),
            scores.new_empty(t, top_k, dtype=torch.int64), scores, scores.new_empty(e, dtype=torch.int64))


def select(scores: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing kernel's choice alone: scores [T, E] fp32 (no gradient flows through) -> (indices [T, K] int64,
    tokens per expert [E] int64), as `Gate.forward` and `Experts.forward` would give them from these scores."""
    if torch.compiler.is_compiling():
        return torch.ops.dsv3.moe_select(scores, bias, spec.top_k, spec.n_group, spec.topk_group, spec.group_top2)
    return select_triton(scores, bias, spec)


def layer(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec,
          gate_up_proj: torch.Tensor, down_proj: torch.Tensor, shared: SharedWeights | None = None,
          fp8: Fp8Experts | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer at decode batch sizes, three launches and a sum: x [T, D], the gate's weight [E, D] and the
    experts (bf16/fp16 stacks in x's dtype, or FP8 stacks with `fp8`; the shared experts' MLP when given) ->
    (y [T, D] in x.dtype, then as `gate_route_triton`: weights, indices, scores, tokens per expert)."""
    if torch.compiler.is_compiling():
        scales = (None, None, 0) if fp8 is None else (fp8.gate_up_scale_inv, fp8.down_scale_inv, fp8.inter)
        pairs, *routing = torch.ops.dsv3.moe_layer(
            x, gate_weight, bias, spec.top_k, spec.n_group, spec.topk_group, spec.group_top2, spec.softmax,
            spec.norm, spec.scale, gate_up_proj, down_proj, *(shared or (None,) * 3), *scales)  # [T, pairs, D] fp32
        # A chain of elementwise adds, not a sum over dim 1: inductor fuses them into the kernel of the residual add
        # and the next norm, where a sum is a reduction kernel of its own.
        return functools.reduce(torch.add, pairs.unbind(1)).to(x.dtype), *routing
    pairs, *routing = layer_triton(x, gate_weight, bias, spec, gate_up_proj, down_proj, shared, fp8)
    return pairs.sum(dim=1).to(x.dtype), *routing


# ---- kernels -----------------------------------------------------------------------------------------------------
if triton is not None:
    from .tuning import pdl_prologue

    @triton.jit
    def _select_kernel(X, BIAS, INDICES, COUNTS, T, E: tl.constexpr, G: tl.constexpr, PG: tl.constexpr,
                       K: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr,
                       ATOMIC_COUNTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_PG: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # Program p chooses the experts of tokens [p * BLOCK_T, +BLOCK_T) from their scores X: indices and counts.
        pdl_prologue(PDL)
        _route_block(X, BIAS, X, INDICES, X, COUNTS, T, 1.0, tl.program_id(0) * BLOCK_T, E, G, PG, K, TOPK_GROUP,
                     HAS_BIAS, False, GROUP_TOP2, False, True, ATOMIC_COUNTS, False, BLOCK_T, BLOCK_G, BLOCK_PG,
                     BLOCK_K)

    @triton.jit
    def _gate_route_kernel(X, W, LOGITS, ARRIVED, BIAS, WEIGHTS, INDICES, SCORES, COUNTS, T, D, stride_x, scale,
                           E: tl.constexpr, G: tl.constexpr, PG: tl.constexpr, K: tl.constexpr,
                           TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr,
                           GROUP_TOP2: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_PG: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # Program p: the fp32 logits of experts [p * BLOCK_E, +BLOCK_E) for all T tokens (x [T, D] in its dtype,
        # the gate weight W [E, D], products in fp32), into LOGITS [T, E]. The program that arrives last (ARRIVED
        # counts them; it resets it to 0 for the next launch) then routes all the tokens from LOGITS.
        ex = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        tok = tl.arange(0, BLOCK_T)
        emask = ex < E
        tmask = tok < T
        # The gate weight is no kernel's output: its first slice is read before waiting for the previous kernel,
        # each next one during the current step (the last step's load is masked off entirely).
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(W + ex[:, None] * D + cols[None, :], mask=emask[:, None] & (cols < D)[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_E, BLOCK_D]
        pdl_prologue(PDL)
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(X + tok[:, None] * stride_x + cols[None, :], mask=tmask[:, None] & (cols < D)[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            cols += BLOCK_D
            w = tl.load(W + ex[:, None] * D + cols[None, :], mask=emask[:, None] & (cols < D)[None, :],
                        other=0.0).to(tl.float32)
        tl.store(LOGITS + tok[:, None] * E + ex[None, :], acc, mask=tmask[:, None] & emask[None, :])
        # Every thread's stores are issued before the arrival; acq_rel publishes them to, and in the last program
        # makes the others' visible to, the loads below (which skip L1: it is not coherent across SMs).
        tl.debug_barrier()
        if tl.atomic_add(ARRIVED, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            tl.store(ARRIVED, 0)
            _route_block(LOGITS, BIAS, WEIGHTS, INDICES, SCORES, COUNTS, T, scale, 0, E, G, PG, K, TOPK_GROUP,
                         HAS_BIAS, SOFTMAX, GROUP_TOP2, NORM, False, False, True, BLOCK_T, BLOCK_G, BLOCK_PG,
                         BLOCK_K)

    @triton.jit
    def _route_block(X, BIAS, WEIGHTS, INDICES, SCORES, COUNTS, T, scale, first,
                     E: tl.constexpr, G: tl.constexpr, PG: tl.constexpr, K: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, GROUP_TOP2: tl.constexpr, NORM: tl.constexpr,
                     SELECT_ONLY: tl.constexpr, ATOMIC_COUNTS: tl.constexpr, UNCACHED: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr, BLOCK_K: tl.constexpr):
        # Routes tokens [first, +BLOCK_T) from their logits X, or with SELECT_ONLY chooses from their scores X
        # (writing only indices and counts); UNCACHED: X was written by other programs of this launch, so its
        # loads bypass L1 (not coherent across SMs).
        # Experts sit in a [BLOCK_G, BLOCK_PG] grid (expert = group * PG + j), padded to powers of two.
        grp = tl.arange(0, BLOCK_G)[None, :, None]
        j = tl.arange(0, BLOCK_PG)[None, None, :]
        emask = (grp < G) & (j < PG)  # [1, BLOCK_G, BLOCK_PG]
        expert = tl.where(emask, grp * PG + j, -1)  # padding never matches a chosen index
        kk = tl.arange(0, BLOCK_K)[None, :]
        tok = first + tl.arange(0, BLOCK_T)
        tmask = tok < T
        tok3 = tok[:, None, None]
        tmask3 = tmask[:, None, None]
        xmask = tmask3 & emask  # [BLOCK_T, BLOCK_G, BLOCK_PG]
        if UNCACHED:
            x = tl.load(X + tok3 * E + expert, mask=xmask, other=0.0, cache_modifier=".cg")
        else:
            x = tl.load(X + tok3 * E + expert, mask=xmask, other=0.0)
        if SELECT_ONLY:
            scores = x
        else:
            # Padded tokens read 0 (finite, so no NaN below); padded experts are -inf, i.e. score 0.
            logit = x
            logit = tl.where(emask, logit, float("-inf"))
            if SOFTMAX:
                top = tl.max(tl.max(logit, axis=2), axis=1)
                p = tl.exp(logit - top[:, None, None])
                scores = p / tl.sum(tl.sum(p, axis=2), axis=1)[:, None, None]
            else:
                scores = tl.where(emask, tl.sigmoid(logit), 0.0)
            tl.store(SCORES + tok3 * E + expert, scores, mask=xmask)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(BIAS + expert, mask=emask, other=0.0)
        choice = tl.where(emask, choice, float("-inf"))  # padded experts are never chosen

        if G > 1:
            best = tl.max(choice, axis=2)  # [BLOCK_T, BLOCK_G]
            if GROUP_TOP2:
                # Knock out the first copy of the best: the second best equals it when it occurs twice.
                first = tl.min(tl.where(choice == best[:, :, None], j, BLOCK_PG), axis=2)
                best = best + tl.max(tl.where(j == first[:, :, None], float("-inf"), choice), axis=2)
            gidx = tl.arange(0, BLOCK_G)[None, :]
            gscore = tl.where(gidx < G, best, float("-inf"))
            keep = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                top = tl.max(gscore, axis=1)
                pick = tl.min(tl.where(gscore == top[:, None], gidx, BLOCK_G), axis=1)
                hit = gidx == pick[:, None]
                keep = keep | hit
                gscore = tl.where(hit, float("-inf"), gscore)
            choice = tl.where(keep[:, :, None], choice, float("-inf"))

        chosen = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_PG], dtype=tl.int1)
        w_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        i_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        for k in tl.static_range(K):
            top = tl.max(tl.max(choice, axis=2), axis=1)  # [BLOCK_T]
            pick = tl.min(tl.min(tl.where(choice == top[:, None, None], expert, E), axis=2), axis=1)
            hit = expert == pick[:, None, None]
            choice = tl.where(hit, float("-inf"), choice)
            chosen = chosen | hit
            i_tile = tl.where(kk == k, pick[:, None], i_tile)
            if not SELECT_ONLY:
                w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=2), axis=1)
                w_tile = tl.where(kk == k, w[:, None], w_tile)
        out = tok[:, None] * K + kk
        omask = tmask[:, None] & (kk < K)
        tl.store(INDICES + out, i_tile.to(tl.int64), mask=omask)
        if not SELECT_ONLY:
            if NORM:
                w_tile = w_tile / (tl.sum(w_tile, axis=1)[:, None] + 1e-20)
            tl.store(WEIGHTS + out, w_tile * scale, mask=omask)

        # Tokens per expert: one reduction over the block's tokens after the K rounds, not one per round.
        counts = tl.sum((chosen & tmask3).to(tl.int32), axis=0).to(tl.int64)  # [BLOCK_G, BLOCK_PG]
        grp2 = tl.arange(0, BLOCK_G)[:, None]
        j2 = tl.arange(0, BLOCK_PG)[None, :]
        cmask = (grp2 < G) & (j2 < PG)
        if ATOMIC_COUNTS:  # integer adds: the total does not depend on the order the programs run in
            tl.atomic_add(COUNTS + grp2 * PG + j2, counts, mask=cmask, sem="relaxed")
        else:
            tl.store(COUNTS + grp2 * PG + j2, counts, mask=cmask)

    @triton.jit
    def _gate_up_rows(x_row, w_gate, w_up, s_gate, s_up, rmask, D, SCALED: tl.constexpr, BLOCK_I: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        # (gate . x, up . x) for BLOCK_I rows, given as row-start pointers [BLOCK_I, 1] into the gate and up
        # weights; SCALED multiplies each weight by its 128x128 block's scale (s_gate, s_up: the rows' scale rows).
        acc_g = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            m = rmask[:, None] & cmask[None, :]
            wg = tl.load(w_gate + cols[None, :], mask=m, other=0.0).to(tl.float32)
            wu = tl.load(w_up + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if SCALED:
                wg *= tl.load(s_gate + (cols // 128)[None, :], mask=m, other=1.0)
                wu *= tl.load(s_up + (cols // 128)[None, :], mask=m, other=1.0)
            acc_g += wg * x
            acc_u += wu * x
        return tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)

    @triton.jit
    def _gate_up_kernel(X, W, WS, SG, SU, IDX, H, stride_x, D, I, UP, WD, n_pairs, K: tl.constexpr,
                        NS: tl.constexpr, FP8: tl.constexpr, X_SETTLED: tl.constexpr, BLOCK_I: tl.constexpr,
                        BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        # Program p: rows [tile * BLOCK_I, +BLOCK_I) of the gate and of the up projection of one pair's expert
        # (pairs as in `experts_triton`). The shared MLP's programs come first, then the routed experts', pairs
        # varying fastest within each, so the programs reading one weight tile for several tokens (an expert they
        # all chose, the shared MLP) run together and mostly hit L2. A routed expert's stack holds gate rows from 0
        # and up rows from UP, WD elements apart (I and D for bf16; the padded Ip and Dp for FP8, whose weights are
        # scaled by their 128x128 block's scale as they are loaded).
        # X_SETTLED: x was written before the previous kernel ran (it is the routing kernel's input too), so the
        # shared MLP's programs, which need nothing the routing writes, compute before waiting for it and only
        # store after (their output may reuse memory the routing kernel still reads); launched first, they overlap
        # the routing, a few programs on an otherwise idle GPU.
        # The two branches call the row loop separately: an FP8 stack and the bf16 shared MLP are pointers of
        # different types, which the compiler will not merge into one variable.
        pid = tl.program_id(0)
        tokens = n_pairs // (K + NS)
        shared_programs = tokens * NS * tl.cdiv(I, BLOCK_I)
        if pid < shared_programs:
            tile = pid // (tokens * NS)
            tok = pid % (tokens * NS) // NS
            slot = K + pid % NS
        else:
            q = pid - shared_programs
            tile = q // (tokens * K)
            tok = q % (tokens * K) // K
            slot = q % K
        pair = tok * (K + NS) + slot
        rows = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        rmask = rows < I
        x_row = X + tok * stride_x
        if slot < K:  # a routed expert of the stack: chosen by the previous kernel
            pdl_prologue(PDL)
            expert = tl.load(IDX + tok * K + slot).to(tl.int64)
            w_gate = W + expert * 2 * UP * WD + rows[:, None] * WD  # [BLOCK_I, 1] row starts
            # its FP8 block scales ([E, 2UP/128, WD/128]): gate rows', then up rows'
            s_gate = WS + expert * (2 * UP // 128) * (WD // 128) + (rows // 128)[:, None] * (WD // 128)
            gate, up = _gate_up_rows(x_row, w_gate, w_gate + UP * WD, s_gate, s_gate + (UP // 128) * (WD // 128),
                                     rmask, D, FP8, BLOCK_I, BLOCK_D)
        else:  # I-wide slice slot - K of the shared MLP: its rows of gate_proj and up_proj [NS * I, D]
            if not X_SETTLED:
                pdl_prologue(PDL)
            first = (slot - K).to(tl.int64) * I * D
            gate, up = _gate_up_rows(x_row, SG + first + rows[:, None] * D, SU + first + rows[:, None] * D, WS, WS,
                                     rmask, D, False, BLOCK_I, BLOCK_D)
            if X_SETTLED:
                pdl_prologue(PDL)
        h = gate * tl.sigmoid(gate) * up  # silu(gate) * up
        tl.store(H + pair * I + rows, h.to(H.dtype.element_ty), mask=rmask)

    @triton.jit
    def scaled_rows_dot(h_row, w_rows, s_rows, rmask, I, SCALED: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_I: tl.constexpr):
        # w . h for BLOCK_D rows given as row-start pointers [BLOCK_D, 1]; SCALED as in _gate_up_rows. Also the
        # row loop of the dense FP8 GEMV (`ops.fp8_gemv`).
        acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            cols = i0 + tl.arange(0, BLOCK_I)
            cmask = cols < I
            h = tl.load(h_row + cols, mask=cmask, other=0.0).to(tl.float32)
            m = rmask[:, None] & cmask[None, :]
            w = tl.load(w_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if SCALED:
                w *= tl.load(s_rows + (cols // 128)[None, :], mask=m, other=1.0)
            acc += w * h[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _down_kernel(H, W, WS, SD, IDX, WTS, Y, D, I, DR, WI, n_pairs, K: tl.constexpr, NS: tl.constexpr,
                     FP8: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr):
        # Program (pair, tile): outputs [tile * BLOCK_D, +BLOCK_D) of one pair times its routing weight (1 for the
        # shared MLP's slices), in fp32; the launcher sums each token's K + NS pairs. A program per pair rather than
        # per token: at T = 1 the 16b shapes give K + NS times more programs, which a GEMV needs to keep enough
        # loads in flight. A routed expert's [DR, WI] matrix is [D, I] for bf16, the padded [Dp, Ip] for FP8.
        # Two calls of the row loop for the reason _gate_up_kernel gives. Everything but h was settled before the
        # previous kernel (gate/up, which reads the same indices) could start: a program finds its expert and routing
        # weight before it waits for h.
        pair = tl.program_id(0)
        tok = pair // (K + NS)
        slot = pair % (K + NS)
        rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < D
        if slot < K:  # a routed expert of the stack
            expert = tl.load(IDX + tok * K + slot).to(tl.int64)
            weight = tl.load(WTS + tok * K + slot)  # its routing weight
            w_rows = W + expert * DR * WI + rows[:, None] * WI
            s_rows = WS + expert * (DR // 128) * (WI // 128) + (rows // 128)[:, None] * (WI // 128)
            pdl_prologue(PDL)
            out = scaled_rows_dot(H + pair * I, w_rows, s_rows, rmask, I, FP8, BLOCK_D, BLOCK_I) * weight
        else:  # columns [(slot - K) * I, +I) of the shared MLP's down_proj [D, NS * I]
            sd_rows = SD + (slot - K).to(tl.int64) * I + rows[:, None] * (NS * I)
            pdl_prologue(PDL)
            out = scaled_rows_dot(H + pair * I, sd_rows, WS, rmask, I, False, BLOCK_D, BLOCK_I)
        tl.store(Y + pair * D + rows, out, mask=rmask)

    _GATE_UP_CONFIGS = gemv_configs("BLOCK_I", "BLOCK_D")
    _DOWN_CONFIGS = gemv_configs("BLOCK_D", "BLOCK_I")
    _gate_up_kernel = autotuned(_GATE_UP_CONFIGS, ["D", "I", "n_pairs", "FP8", "X_SETTLED"])(_gate_up_kernel)
    _down_kernel = autotuned(_DOWN_CONFIGS, ["D", "I", "n_pairs", "FP8"])(_down_kernel)
