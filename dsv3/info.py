"""`dsv3 info`: parameters, FLOPs, KV cache and weight memory of a configuration, by arithmetic alone.

Notable features:
- Nothing is instantiated: the accounting walks a list of the model's weight matrices (`weights(cfg)`), built
  from the config the way `model.py` builds its modules; the tests check it against a meta-device model.
- Activated parameters per token, three ways: every parameter a token touches (embedding and head included);
  without the embedding and head; and without the embedding only. The last is the convention of the published
  numbers: 36.6B for DeepSeek-V3 ("37B"), 2.45B for DeepSeek-V2-Lite ("2.4B"), 20.9B for DeepSeek-V2 ("21B").
  The embedding is a table lookup, the head a matmul every token pays for.
- MTP is counted apart from the main model, as the report does (671B total excludes it). The HF checkpoint stores
  each MTP depth with its own copies of the embedding and head, which dsv3 shares: 671.0B + 13.5B = 684.5B, the
  release's "685B (671B + 14B)".
- Forward FLOPs per token = 2 x activated matmul parameters + attention scores and values at a sequence length,
  causal attention counted at half (every query sees on average half of the keys); training = 3 x forward, MTP
  included when the config has MTP depths, since training runs them.
- KV cache per token: MLA's latent (kv_lora_rank + qk_rope_head_dim) against expanded per-head K and V, in bf16
  and in FP8 with one fp32 scale per 128 elements (the 1x128 tiles of FP8 activations).
- Weight memory in bf16, FP8 (128x128 blocks, fp32 scales), int8 (one bf16 scale per output row) and int4
  (symmetric, one bf16 scale per group of 32 or 128 inputs, no zero points). Embedding, head, norms and the router stay bf16 in every format, as in the
  official FP8 release; the routing bias is a buffer (not a parameter) and is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

from .config import PRESETS, ModelConfig

BLOCK = 128  # FP8 weight blocks are 128x128; FP8 activations (and so an FP8 KV cache) use 1x128 tiles
INT4_GROUPS = (128, 32)
SCALE_BYTES = {"fp8": 4, "int8": 2, "int4": 2}  # fp32 scales for FP8 (the checkpoint's), bf16 for int8 / int4
WEIGHT_FORMATS = ("bf16", "fp8", "int8", *(f"int4-g{g}" for g in INT4_GROUPS))
QUANTISED_KINDS = ("linear", "expert")  # the rest (embedding, head, norms, biases, router) stays bf16
MATMUL_KINDS = ("linear", "expert", "gate", "head")


@dataclass(frozen=True)
class Weight:
    """A weight matrix [rows, cols] (a vector has cols 1), `copies` times side by side (routed experts)."""

    name: str
    rows: int
    cols: int
    kind: str  # "embed", "head", "norm", "bias", "gate", "linear" or "expert"
    copies: int = 1

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.copies

    def activated(self, cfg: ModelConfig) -> int:
        used = cfg.num_experts_per_tok if self.kind == "expert" else self.copies
        return self.rows * self.cols * used

    def nbytes(self, fmt: str) -> int:
        """Bytes of the weight stored in `fmt` (one of WEIGHT_FORMATS), scales included."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}")
        r, c = self.rows, self.cols
        if fmt == "bf16" or self.kind not in QUANTISED_KINDS:
            per_copy = 2 * r * c
        elif fmt == "fp8":
            per_copy = r * c + math.ceil(r / BLOCK) * math.ceil(c / BLOCK) * SCALE_BYTES["fp8"]
        elif fmt == "int8":
            per_copy = r * c + r * SCALE_BYTES["int8"]
        else:
            group = int(fmt.removeprefix("int4-g"))
            # two int4 values a byte, packed along each row
            per_copy = r * math.ceil(c / 2) + r * math.ceil(c / group) * SCALE_BYTES["int4"]
        return per_copy * self.copies


def block_weights(cfg: ModelConfig, layer_idx: int) -> list[Weight]:
    """The weights of decoder block `layer_idx` (indices >= num_hidden_layers are MTP blocks)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    out = [Weight("input_layernorm", d, 1, "norm")]
    if cfg.q_lora_rank is None:
        out.append(Weight("self_attn.q_proj", h * cfg.qk_head_dim, d, "linear"))
    else:
        out += [Weight("self_attn.q_a_proj", cfg.q_lora_rank, d, "linear"),
                Weight("self_attn.q_a_layernorm", cfg.q_lora_rank, 1, "norm"),
                Weight("self_attn.q_b_proj", h * cfg.qk_head_dim, cfg.q_lora_rank, "linear")]
    out += [Weight("self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, "linear"),
            Weight("self_attn.kv_a_layernorm", cfg.kv_lora_rank, 1, "norm"),
            Weight("self_attn.kv_b_proj", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, "linear"),
            Weight("self_attn.o_proj", d, h * cfg.v_head_dim, "linear"),
            Weight("post_attention_layernorm", d, 1, "norm")]
    if cfg.attention_bias:
        out += [Weight("self_attn.q_a_proj.bias", cfg.q_lora_rank, 1, "bias")] if cfg.q_lora_rank else []
        out += [Weight("self_attn.kv_a_proj_with_mqa.bias", cfg.kv_lora_rank + cfg.qk_rope_head_dim, 1, "bias"),
                Weight("self_attn.o_proj.bias", d, 1, "bias")]
    if cfg.is_moe_layer(layer_idx):
        e, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        out += [Weight("mlp.gate", e, d, "gate"),
                # one entry per checkpoint matrix: FP8 blocks tile gate and up apart
                Weight("mlp.experts.gate_proj", inter, d, "expert", e),
                Weight("mlp.experts.up_proj", inter, d, "expert", e),
                Weight("mlp.experts.down_proj", d, inter, "expert", e)]
        if cfg.n_shared_experts:
            shared = inter * cfg.n_shared_experts
            out += [Weight("mlp.shared_experts.gate_proj", shared, d, "linear"),
                    Weight("mlp.shared_experts.up_proj", shared, d, "linear"),
                    Weight("mlp.shared_experts.down_proj", d, shared, "linear")]
    else:
        inter = cfg.intermediate_size
        out += [Weight("mlp.gate_proj", inter, d, "linear"),
                Weight("mlp.up_proj", inter, d, "linear"),
                Weight("mlp.down_proj", d, inter, "linear")]
    return [dataclasses.replace(w, name=f"layers.{layer_idx}.{w.name}") for w in out]


def weights(cfg: ModelConfig) -> list[Weight]:
    """The main model's weights (MTP excluded), each tied tensor once."""
    d = cfg.hidden_size
    out = [Weight("embed_tokens", cfg.vocab_size, d, "embed")]
    for i in range(cfg.num_hidden_layers):
        out += block_weights(cfg, i)
    out.append(Weight("norm", d, 1, "norm"))
    if not cfg.tie_word_embeddings:
        out.append(Weight("lm_head", cfg.vocab_size, d, "head"))
    return out


def mtp_weights(cfg: ModelConfig) -> list[Weight]:
    """The weights the MTP depths add to the main model (their embedding and head are the main model's)."""
    d, out = cfg.hidden_size, []
    for k in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + k
        out += [Weight(f"mtp.{k}.enorm", d, 1, "norm"), Weight(f"mtp.{k}.hnorm", d, 1, "norm"),
                Weight(f"mtp.{k}.eh_proj", d, 2 * d, "linear"),
                *block_weights(cfg, layer), Weight(f"mtp.{k}.head_norm", d, 1, "norm")]
    return out


@dataclass(frozen=True)
class ModelStats:
    # parameters (main model: MTP excluded, as in the report's 671B)
    total_params: int
    embedding_params: int
    head_params: int  # 0 with tied embeddings
    activated_params: int  # per token, embedding and head included
    activated_params_no_embed_head: int
    activated_params_no_embed: int  # the published convention (37B for V3, 2.4B for V2-Lite)
    matmul_params: int  # activated weights a token multiplies with: what the FLOPs count
    # MTP
    mtp_params: int  # unique to the MTP depths
    mtp_params_hf: int  # as the HF checkpoint stores them: plus an embedding and a head copy per depth
    mtp_activated_params: int  # per token, the shared embedding and head excluded
    # FLOPs per token
    seq_len: int
    attn_flops_per_token: float  # forward attention scores and values, main model, causal
    fwd_flops_per_token: float  # main model forward, attention included
    mtp_fwd_flops_per_token: float  # MTP depths' forward, their head matmul included
    train_flops_per_token: float  # 3 x (forward + MTP forward)
    # KV cache per token (main model layers; an MTP drafter adds one layer's worth per depth)
    kv_layers: int
    kv_latent_elems: int  # per layer: kv_lora_rank + qk_rope_head_dim
    kv_expanded_elems: int  # per layer: heads x (qk_nope + qk_rope + v_head_dim)
    kv_bytes_per_layer: dict  # "latent-bf16", "latent-fp8", "expanded-bf16", "expanded-fp8" -> bytes
    kv_bytes: dict  # the same over all kv_layers
    # weight memory, bytes by format (WEIGHT_FORMATS)
    weight_bytes: dict  # main model
    mtp_weight_bytes: dict  # the MTP depths' own weights

    @property
    def kv_ratio(self) -> float:
        return self.kv_expanded_elems / self.kv_latent_elems

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "kv_ratio": self.kv_ratio}


def attention_flops_per_layer(cfg: ModelConfig, seq_len: int) -> float:
    # Per token and head: q.k over qk_head_dim and p.v over v_head_dim, 2 FLOPs a multiply-add, against
    # seq_len / 2 keys on average under the causal mask.
    return 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2


def _fp8_cache_bytes(elems: int) -> int:
    # One byte an element plus one fp32 scale per 1x128 tile, as FP8 activations are scaled.
    return elems + math.ceil(elems / BLOCK) * 4


def model_stats(cfg: ModelConfig, seq_len: int = 4096) -> ModelStats:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    main, mtp = weights(cfg), mtp_weights(cfg)

    def total(ws, kinds=None):
        return sum(w.numel for w in ws if kinds is None or w.kind in kinds)

    def active(ws, kinds=None):
        return sum(w.activated(cfg) for w in ws if kinds is None or w.kind in kinds)

    embed, head = total(main, ("embed",)), total(main, ("head",))
    head_matmul = cfg.vocab_size * cfg.hidden_size  # a tied head multiplies all the same
    activated = active(main)
    matmul = active(main, MATMUL_KINDS) + (head_matmul if cfg.tie_word_embeddings else 0)
    mtp_matmul = active(mtp, MATMUL_KINDS) + head_matmul * cfg.num_nextn_predict_layers
    layer_attn = attention_flops_per_layer(cfg, seq_len)
    attn = layer_attn * cfg.num_hidden_layers
    fwd = 2 * matmul + attn
    mtp_fwd = 2 * mtp_matmul + layer_attn * cfg.num_nextn_predict_layers

    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    per_layer = {"latent-bf16": 2 * latent, "latent-fp8": _fp8_cache_bytes(latent),
                 "expanded-bf16": 2 * expanded, "expanded-fp8": _fp8_cache_bytes(expanded)}
    return ModelStats(
        total_params=total(main), embedding_params=embed, head_params=head,
        activated_params=activated, activated_params_no_embed_head=activated - embed - head,
        activated_params_no_embed=activated - embed, matmul_params=matmul,
        mtp_params=total(mtp), mtp_params_hf=total(mtp) + cfg.num_nextn_predict_layers * 2 * embed,
        mtp_activated_params=active(mtp),
        seq_len=seq_len, attn_flops_per_token=attn, fwd_flops_per_token=fwd, mtp_fwd_flops_per_token=mtp_fwd,
        train_flops_per_token=3 * (fwd + mtp_fwd),
        kv_layers=cfg.num_hidden_layers, kv_latent_elems=latent, kv_expanded_elems=expanded,
        kv_bytes_per_layer=per_layer, kv_bytes={k: v * cfg.num_hidden_layers for k, v in per_layer.items()},
        weight_bytes={f: sum(w.nbytes(f) for w in main) for f in WEIGHT_FORMATS},
        mtp_weight_bytes={f: sum(w.nbytes(f) for w in mtp) for f in WEIGHT_FORMATS},
    )


# ---- human units -------------------------------------------------------------------------------------------------
def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    # decimal units (1 GB = 1e9 bytes), like the published "70 KB per token"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} B"


def human_flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} FLOP"


def format_stats(s: ModelStats, title: str) -> str:
    rows: list[tuple[str, str]] = [
        ("parameters (main model, MTP excluded)", ""),
        ("  total", human_count(s.total_params)),
        ("  embedding / head", f"{human_count(s.embedding_params)} / {human_count(s.head_params)}"),
        ("  activated per token, all", human_count(s.activated_params)),
        ("  activated, without embedding (published)", human_count(s.activated_params_no_embed)),
        ("  activated, without embedding and head", human_count(s.activated_params_no_embed_head)),
        ("MTP", ""),
        ("  own parameters", human_count(s.mtp_params)),
        ("  as stored in the HF checkpoint", human_count(s.mtp_params_hf)),
        ("  total with HF's MTP", human_count(s.total_params + s.mtp_params_hf)),
        (f"FLOPs per token (seq {s.seq_len}, causal)", ""),
        ("  forward: 2 x matmul params", human_flops(2 * s.matmul_params)),
        ("  forward: attention", human_flops(s.attn_flops_per_token)),
        ("  forward: main model", human_flops(s.fwd_flops_per_token)),
        ("  forward: MTP", human_flops(s.mtp_fwd_flops_per_token)),
        ("  training: 3 x (main + MTP)", human_flops(s.train_flops_per_token)),
        (f"KV cache per token (per layer / {s.kv_layers} layers)", ""),
    ]
    for key, elems in (("latent", s.kv_latent_elems), ("expanded", s.kv_expanded_elems)):
        for dtype in ("bf16", "fp8"):
            k = f"{key}-{dtype}"
            rows.append((f"  {'MLA latent' if key == 'latent' else 'expanded K/V'} {dtype} ({elems:,} elems)",
                         f"{human_bytes(s.kv_bytes_per_layer[k])} / {human_bytes(s.kv_bytes[k])}"))
    rows.append(("  expanded / latent", f"{s.kv_ratio:.1f}x"))
    rows.append(("weights (main model / MTP)", ""))
    notes = {"bf16": "", "fp8": " (128x128 fp32 scales)", "int8": " (per-row scales)"}
    for f in WEIGHT_FORMATS:
        label = notes.get(f, f" (group {f.removeprefix('int4-g')} scales)")
        rows.append((f"  {f}{label}", f"{human_bytes(s.weight_bytes[f])} / {human_bytes(s.mtp_weight_bytes[f])}"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join([title, *(f"{k:<{width}}{v}" if v else k for k, v in rows)])


# ---- CLI ---------------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=list(PRESETS), help="a named configuration (default 671b)")
    g.add_argument("--config", help="an HF config.json, or the folder holding it")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs (4096)")


def config_from_args(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    if args.config:
        return ModelConfig.from_hf(args.config), args.config
    name = args.preset or "671b"
    return ModelConfig.preset(name), f"preset {name}"


def register(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs, KV cache and weight memory of a configuration")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args) -> int:
        cfg, source = config_from_args(args)
        stats = model_stats(cfg, args.seq_len)
        print(json.dumps(stats.to_json(), indent=2) if args.json else format_stats(stats, source))
        return 0

    p.set_defaults(func=run)
