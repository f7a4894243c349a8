"""The DeepSeek-V3 model for one device: MLA attention, DeepSeekMoE, multi-token prediction.

Notable features:
- Module and parameter names follow the HF checkpoint (`self_attn.kv_a_proj_with_mqa`, `mlp.gate`, ...), so the
  name table in `checkpoint.py` is short; the routed experts are stacked into `[E, 2I, D]` / `[E, D, I]` tensors
  and run through one grouped GEMM (`ops.grouped`), never a Python loop over every expert on the GPU.
- YaRN RoPE with the official checkpoint's pairing (adjacent dims form a rotation pair, `rope_interleave`).
- The `noaux_tc` gate (sigmoid scores, bias for selection only, top-2 group scores, -inf masking) and the softmax
  gates of V2-shaped configs.
- MTP modules at depth k take `[enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)]` and predict t_{i+k+1}; their logits come
  back from `forward(..., mtp=True)` for training and drafting.
- Each MoE layer records the tokens routed to each expert in its last forward (`mlp.load`), which the trainer uses
  for the auxiliary-loss-free bias update and MaxVio.
- On CUDA the gate's expert choice (group scores and mask, the top-k's, tokens per expert) is one Triton launch
  (`ops.moe_decode.select`) on the scores autograd computed: the same experts, weights and gradients as in PyTorch.
- Training: sibling projections that read one input (MLA's q_a and kv_a, an MLP's gate and up) run as one GEMM
  over their weights concatenated in the graph; the routed experts' input is cast to autocast's dtype before
  `ops.dispatch` copies it K times into expert order (each token read once), the SwiGLU's backward is one pass
  (`ops.swiglu`), and each token's expert outputs are combined by `ops.combine`, whose backward reads each token's
  gradient once.
- At decode batch sizes (inference, CUDA, T * K <= E) a MoE layer runs fused Triton kernels instead (`ops.moe_decode`:
  one routing launch, two expert GEMVs over the chosen experts' and the shared experts' weights): the same routing
  and load, the same output up to rounding.
- For inference, `Transformer.share_input_weights` makes the weights of sibling projections (MLA's q or q_a and
  kv_a, an MLP's gate and up) views of one buffer, so that one GEMM serves each pair: at decode sizes every GEMM is
  a latency-bound launch of a few microseconds, and names, shapes and values stay as they were.
- No process-group state: distribution wraps the model from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import ModelConfig, yarn_mscale
from .ops import moe_decode
from .ops.attention import mla_causal_attention
from .ops.combine import combine
from .ops.dispatch import dispatch
from .ops.grouped import grouped_mm
from .ops.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, then scale in the input dtype, as the reference and HF do.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


# ---- rotary embedding --------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim / 2] and the cos/sin scale, YaRN-interpolated when the config asks for it."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # fp32 throughout, in the reference's order of operations: angles reach thousands of radians, so a
    # different rounding of inv_freq shows up in the logits.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    yarn = cfg.yarn
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(yarn["factor"])
    orig = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The rope dim whose wavelength fits `rotations` turns into the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp
    # Fast-rotating dims keep their frequency, slow ones are interpolated by `factor`, a linear ramp between.
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all:
        attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq, float(attn_factor)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [..., T] -> cos, sin: [..., T, rope_dim / 2] in fp32
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.scale, freqs.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    # x: [B, T, H, R]; cos, sin: [B or 1, T, R/2]. The result lays the rotated pairs out as [first; second]
    # halves; attention only takes dot products between q and k rotated alike, so the layout stays internal.
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1f, x2f = x1.float(), x2.float()
    return torch.cat([x1f * cos - x2f * sin, x2f * cos + x1f * sin], dim=-1).to(x.dtype)


def share_weight(*layers: nn.Module, current: torch.Tensor | None = None) -> torch.Tensor | None:
    """Make the weights of linear layers that read one input views of a single [sum of N, K] buffer and return it,
    so that one GEMM computes them all (`F.linear(x, buffer)`, split). The parameters keep their names, shapes and
    values, and an in-place load writes through to the buffer; assigning a new weight afterwards would not, so
    this is for a model whose weights are final (an inference engine's). None where the layers are not all plain
    bias-free nn.Linear of one device, dtype and input width: quantised and FP8 layers keep their own kernels.
    Weights that are already views of `current` (an earlier call's buffer) keep it: a second engine over the same
    model must not free the memory the first one's CUDA graphs read."""
    weights = [layer.weight for layer in layers if type(layer) is nn.Linear and layer.bias is None]
    if len(weights) != len(layers) or len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1:
        return None
    if current is not None and current.shape == (sum(w.shape[0] for w in weights), weights[0].shape[1]) and all(
            w.data_ptr() == part.data_ptr() for w, part in zip(weights, current.split([w.shape[0] for w in weights]))):
        return current
    buffer = torch.cat([w.detach() for w in weights])  # [sum N, K]
    for w, part in zip(weights, buffer.split([w.shape[0] for w in weights])):
        w.data = part
    return buffer


def shared_linear(x: torch.Tensor, buffer: torch.Tensor | None, *layers: nn.Module) -> torch.Tensor:
    """torch.cat([layer(x) for layer in layers], -1) as one GEMM: over `buffer` (share_weight's) when there is one
    and no gradient is wanted (the buffer is a copy autograd does not connect to the parameters); when training,
    over the weights concatenated in the graph (plain bias-free nn.Linear only: FP8 and quantised layers keep their
    own kernels, and their outputs are concatenated). Training's one GEMM also makes x's gradient one product, not
    one per layer plus their sum."""
    if buffer is not None and not torch.is_grad_enabled():
        return F.linear(x, buffer)
    if torch.is_grad_enabled() and all(type(layer) is nn.Linear and layer.bias is None for layer in layers):
        return F.linear(x, torch.cat([layer.weight for layer in layers]))
    return torch.cat([layer(x) for layer in layers], dim=-1)


# ---- attention ---------------------------------------------------------------------------------------------------
class MLA(nn.Module):
    """Multi-head latent attention: queries through a low-rank bottleneck, keys and values from a shared latent."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = h
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=cfg.attention_bias)
        self.softmax_scale = cfg.softmax_scale
        self.input_weight: torch.Tensor | None = None  # share_input_weights: [q (or q_a) rows; kv_a rows]

    @property
    def q_input_proj(self) -> nn.Linear:
        """The query's projection of the block input: q_proj, or q_a_proj with a query LoRA."""
        return self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj

    def share_input_weights(self) -> None:
        self.input_weight = share_weight(self.q_input_proj, self.kv_a_proj_with_mqa, current=self.input_weight)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, D] -> q: [B, T, H * (nope + rope)] (through the query LoRA when there is one), and kv_a_proj's
        # output [B, T, kv_lora + rope], before its norm and rope
        q, kv = shared_linear(x, self.input_weight, self.q_input_proj, self.kv_a_proj_with_mqa).split(
            [self.q_input_proj.out_features, self.kv_a_proj_with_mqa.out_features], dim=-1)
        if self.cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        return q, kv

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, T, D] -> q_nope: [B, T, H, nope], q_pe: [B, T, H, rope] (roped), and what a decoder caches:
        # c_kv: [B, T, kv_lora] (normalised), k_pe: [B, T, rope] (roped)
        cfg = self.cfg
        q, kv = self.projections(x)
        q_nope, q_pe = q.unflatten(-1, (self.n_heads, cfg.qk_head_dim)).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(-2), cos, sin, cfg.rope_interleave).squeeze(-2)
        return q_nope, apply_rope(q_pe, cos, sin, cfg.rope_interleave), self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Expanded (training / prefill) form over a whole causal sequence. x: [B, T, D]
        cfg = self.cfg
        b, t, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim))
        o = mla_causal_attention(q_nope, q_pe, kv, k_pe, self.softmax_scale)  # [B, T, H, v]
        return self.o_proj(o.reshape(b, t, -1))


# ---- feed-forward ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)
        self.input_weight: torch.Tensor | None = None  # share_input_weights: [gate rows; up rows]

    def share_input_weights(self) -> None:
        self.input_weight = share_weight(self.gate_proj, self.up_proj, current=self.input_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(shared_linear(x, self.input_weight, self.gate_proj, self.up_proj)))


@dataclass
class Routing:
    weights: torch.Tensor  # [N, K] gate weights of the chosen experts (fp32)
    indices: torch.Tensor  # [N, K] chosen expert ids
    scores: torch.Tensor  # [N, E] unbiased affinities (sigmoid or softmax), for balance losses
    counts: torch.Tensor | None = None  # [E] tokens per expert, when the routing kernel counted them


class Gate(nn.Module):
    """Top-k routing over n_routed_experts, group-limited when n_group > 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # Moved by the trainer, not by gradients; used to choose experts, never to weight them.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None
        self.spec = moe_decode.RouteSpec.from_config(cfg)
        # Whether the routing kernel (`moe_decode.select`) makes the choice: None on CUDA with Triton; True or False
        # forces it (the tests under Triton's interpreter, A/B runs).
        self.fused: bool | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, D] -> [N, E] fp32
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32: near-ties decide experts
            return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> Routing:
        # x: [N, D]
        cfg = self.cfg
        logits = self.logits(x)
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        fused = moe_decode.triton_available(x.device) if self.fused is None else self.fused
        if fused:
            # One kernel for the choice below and the tokens per expert, made on these very scores (so the same
            # experts); the weights are gathered here, in autograd, so gradients are the plain path's.
            indices, counts = moe_decode.select(scores.detach(), self.e_score_correction_bias, self.spec)
        else:
            indices, counts = self.choose(scores), None
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * cfg.routed_scaling_factor, indices, scores, counts)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        # scores: [N, E] -> indices [N, K] of the chosen experts, in PyTorch
        cfg = self.cfg
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        groups = cfg.n_group or 1
        if groups > 1 and cfg.topk_method != "greedy":
            grouped = choice.unflatten(-1, (groups, -1))  # [N, G, E/G]
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_score = grouped.amax(dim=-1)
            keep = group_score.topk(cfg.topk_group, dim=-1).indices  # [N, topk_group]
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            # -inf, not 0: a zero-masked group can still win against negative biased scores.
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        return choice.topk(cfg.num_experts_per_tok, dim=-1).indices


class Experts(nn.Module):
    """The routed experts, stacked so one grouped GEMM runs them all."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, dim))  # [E, 2I, D]: gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(n, dim, inter))  # [E, D, I]

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [N, D] -> ([N, D], tokens per expert [E])
        k = routing.indices.shape[1]
        n_exp = routing.scores.shape[-1]
        flat = routing.indices.flatten()  # [N*K] expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # [N*K] the pairs grouped by expert
        where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # scatter_add rather than bincount: a static output shape keeps torch.compile graphs whole.
        counts = (routing.counts if routing.counts is not None
                  else flat.new_zeros(n_exp).scatter_add_(0, flat, torch.ones_like(flat)))
        offs = counts.cumsum(0).to(torch.int32)
        if torch.is_autocast_enabled(x.device.type):
            # The experts' GEMMs read x in autocast's dtype: cast its N rows before they are copied K times.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        xs = dispatch(x, where, k)  # [N*K, D], rows grouped by expert
        ys = self.mlp(xs, offs)  # [N*K, D]
        # Each token's k expert outputs, weighted and summed in fp32 in a fixed order (reproducible on the GPU too).
        return combine(ys, where, routing.weights), counts

    def decode_weights(self, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, moe_decode.Fp8Experts | None] | None:
        """(gate_up_proj, down_proj, FP8 scales or None) as the fused decode kernels read them for activations of
        `dtype`, or None where they cannot (weights of another dtype: fp32 master weights, for one)."""
        if self.gate_up_proj.dtype != dtype:
            return None
        return self.gate_up_proj, self.down_proj, None

    def mlp(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        # xs: [M, D] rows grouped by expert, offs: [E] int32 group ends -> [M, D], each row through its expert.
        # The one place FP8 variants (training's Fp8Experts, serving's Fp8WeightExperts) differ from this class.
        return grouped_mm(swiglu(grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs)),
                          self.down_proj.transpose(1, 2), offs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.load: torch.Tensor | None = None  # [E] tokens per expert in the last forward
        self.routing: Routing | None = None  # kept only while `keep_routing` is set (balance losses, the engine)
        self.keep_routing = False

    def shared_weights(self) -> moe_decode.SharedWeights | None:
        """The shared experts' gate, up and down weights, as the fused kernels read them."""
        s = self.shared_experts
        return None if s is None else (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)

    def decode_path(self, x: torch.Tensor) -> bool:
        """Whether x [N, D] takes the fused decode kernels: inference (no grad) on CUDA with Triton, bf16/fp16
        activations, routed experts the kernels can read for them (`Experts.decode_weights`: stacks of the same
        dtype, or FP8 stacks), shared experts as plain nn.Linear of the same dtype, no autocast, and few enough
        tokens (`moe_decode.fits`)."""
        s = self.shared_experts
        return (not torch.is_grad_enabled() and moe_decode.triton_available(x.device)
                and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(x.device.type)
                and self.experts.decode_weights(x.dtype) is not None
                and (s is None or type(s) is MLP and all(type(lin) is nn.Linear and lin.weight.dtype == x.dtype
                                                         for lin in (s.gate_proj, s.up_proj, s.down_proj)))
                and moe_decode.fits(x.shape[0], self.gate.spec.top_k, self.gate.cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y, routing, self.load = self.fused(flat) if self.decode_path(flat) else self.general(flat)
        self.routing = routing if self.keep_routing else None
        return y.view(shape)

    def general(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        # x: [N, D] -> (y [N, D], routing, tokens per expert [E]): gate, grouped GEMM experts, shared MLP
        routing = self.gate(x)
        y, load = self.experts(x, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, routing, load

    def fused(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        # x: [N, D] -> as `general`, through the decode kernels (see decode_path for when they apply)
        # The shared experts are always-on experts: the same kernels run them, as pairs of weight 1.
        gate_up, down, fp8 = self.experts.decode_weights(x.dtype)
        y, weights, indices, scores, load = moe_decode.layer(x, self.gate.weight, self.gate.e_score_correction_bias,
                                                             self.gate.spec, gate_up, down, self.shared_weights(), fp8)
        return y, Routing(weights, indices, scores), load


# ---- blocks and the model ----------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.checkpoint = False  # activation checkpointing: recompute this block in the backward pass
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """attn, when given, is called as attn(h, cos, sin) in place of self.self_attn (e.g. the inference
        engine's MLA over its paged cache, with the same weights)."""
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, attn, use_reentrant=False)
        return self._forward(x, cos, sin, attn)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 attn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        x = x + (self.self_attn if attn is None else attn)(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth. Embedding and output head are the main model's (shared, as in the report)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # shared_head.norm in the checkpoint

    def forward(self, emb: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        # emb: [B, T, D] embeddings of the tokens k ahead; h: [B, T, D] previous depth's normed output
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # [embedding; hidden] order
        return self.head_norm(self.block(x, cos, sin, attn))


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, V]; None when the head is left to the caller (head=False)
    mtp_logits: list[torch.Tensor]  # D x [B, T, V]; depth k at position i predicts token i + k + 1
    hidden: torch.Tensor  # [B, T, D] final normed hidden state (what MTP depth 1 and a drafter read)
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # D x [B, T, D], normed, before the head


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        self.rotary = Rotary(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, mtp: bool = False, positions: torch.Tensor | None = None,
                head: bool = True):
        """input_ids: [B, T] -> logits [B, T, V]; with mtp=True an `Output` with the MTP logits too.

        head=False returns an `Output` of hidden states only: a trainer with a large vocabulary applies the head
        chunk by chunk inside its loss instead of holding [B, T, V] logits.
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary(positions)
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        if head and not mtp:
            return self.lm_head(h)
        mtp_hidden, prev = [], h
        for k, module in enumerate(self.mtp if mtp else [], start=1):
            # Depth k at position i reads token i + k; positions past the end see padding, which causal
            # attention keeps away from every valid position.
            ahead = F.pad(input_ids[:, k:], (0, k), value=0)
            prev = module(self.embed_tokens(ahead), prev, cos, sin)
            mtp_hidden.append(prev)
        if not head:
            return Output(None, [], h, mtp_hidden)
        return Output(self.lm_head(h), [self.lm_head(x) for x in mtp_hidden], h, mtp_hidden)

    def share_input_weights(self) -> None:
        """For inference: one GEMM for each pair of sibling projections (see `share_weight`; not for training)."""
        for module in self.modules():
            if isinstance(module, (MLA, MLP)):
                module.share_input_weights()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def init_weights(model: Transformer, seed: int | None = None) -> Transformer:
    """The report's initialisation: every matrix ~ N(0, initializer_range), norms 1, routing biases 0."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    std = model.cfg.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    for m in model.modules():
        if isinstance(m, Gate) and m.e_score_correction_bias is not None:
            m.e_score_correction_bias.zero_()
    return model


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast to `dtype`, keeping the gate weight and routing bias in fp32 as HF's loader and the trainer expect."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Gate):
            m.weight.data = m.weight.data.float()
            if m.e_score_correction_bias is not None:
                m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    return model


def build_model(cfg: ModelConfig, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> Transformer:
    """A freshly initialised model; weights are drawn on the CPU so a seed gives the same model on any device."""
    model = init_weights(Transformer(cfg), seed)
    return cast_model(model.to(device) if device else model, dtype)
