"""The model configuration: one frozen dataclass whose field names are those of DeepSeek-V3's HF config.json.

Notable features:
- `ModelConfig.from_hf(path_or_dict)` / `.to_hf()` read and write config.json, including the transformers-5
  spelling (`rope_parameters`) and the older one (`rope_scaling`) of the YaRN settings.
- Named presets (`tiny`, `small`, `1b`, `16b`, `671b`) are a small table of overrides, not a second format.
- Validation runs in `__post_init__`, so a bad config fails where it is made, with a message naming the field.
- Derived sizes (head dims, which layers are MoE, whether YaRN is on) are properties.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that cannot describe a DeepSeek-V3 model."""


@dataclass(frozen=True)
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first_k_dense_replace layers
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA has no GQA; kept for the HF field set
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    # mla
    q_lora_rank: int | None = 1536  # None: a plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # moe
    n_routed_experts: int | None = 256  # None: every layer is dense
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    moe_intermediate_size: int = 2048
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" or "group_limited_greedy" (V2)
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    ep_size: int = 1

    # rope / yarn
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True  # the official weights rotate adjacent pairs of the rope dims

    # mtp
    num_nextn_predict_layers: int = 1

    # storage
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = field(
        default_factory=lambda: {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    )

    # config.json keys dsv3 does not interpret (auto_map, use_cache, ...), written back unchanged
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        # Layer index num_hidden_layers + k (the MTP blocks) follows the same rule, as in the official release.
        return (
            self.has_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters if YaRN is on, else None."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return rs

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        if yarn and yarn.get("mscale_all_dim"):
            m = yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
            scale *= m * m
        return scale

    @property
    def quantized_fp8(self) -> bool:
        return bool(self.quantization_config) and self.quantization_config.get("quant_method") == "fp8"

    # ---- HF config.json ------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict) -> "ModelConfig":
        """Read an HF config.json (a path to the file or its folder, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        model_type = raw.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ConfigError(f"model_type {model_type!r} is not a DeepSeek-V3 family model")
        raw = _normalise_rope(raw)
        if "dtype" in raw and "torch_dtype" not in raw:  # transformers 5 spelling
            raw["torch_dtype"] = raw.pop("dtype")
        for derived in ("head_dim", "qk_head_dim"):  # transformers writes these; they follow from the head dims
            raw.pop(derived, None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        if "quantization_config" not in raw:
            known["quantization_config"] = None
        if "rope_scaling" not in raw:
            known["rope_scaling"] = None
        if isinstance(known.get("eos_token_id"), list):  # some releases list several; the first is the EOS
            known["eos_token_id"] = known["eos_token_id"][0]
        known["extra"] = {k: v for k, v in raw.items() if k not in names}
        try:
            return cls(**known)
        except TypeError as e:
            raise ConfigError(f"bad config.json: {e}") from None

    def to_hf(self) -> dict:
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
        }
        out.update({k: copy.deepcopy(v) for k, v in self.extra.items() if k not in ("architectures", "model_type")})
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            # Copies: readers such as transformers' config classes edit the dicts they are given in place.
            out[f.name] = copy.deepcopy(value)
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**copy.deepcopy({**PRESETS[name], **overrides}))

    # ---- validation ----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be null or positive, got {self.q_lora_rank}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (DeepSeek-V3 uses silu)")
        need(self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace {self.first_k_dense_replace} must lie in [0, num_hidden_layers]")
        need(self.intermediate_size > 0 or self.first_k_dense_replace == 0,
             "intermediate_size must be positive when dense layers exist")
        if self.has_moe:
            e, k = self.n_routed_experts, self.num_experts_per_tok
            need(isinstance(e, int) and e > 0, f"n_routed_experts must be a positive integer, got {e!r}")
            need(isinstance(k, int) and 0 < k <= e,
                 f"num_experts_per_tok ({k}) must be in 1..n_routed_experts ({e})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
            need((self.n_shared_experts or 0) >= 0, "n_shared_experts must be >= 0")
            need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                 f"topk_method {self.topk_method!r} unknown (noaux_tc, greedy, group_limited_greedy)")
            need(self.scoring_func in ("sigmoid", "softmax"),
                 f"scoring_func {self.scoring_func!r} unknown (sigmoid, softmax)")
            need(self.topk_method != "noaux_tc" or self.scoring_func == "sigmoid",
                 "topk_method noaux_tc needs scoring_func sigmoid")
            g, tg = self.n_group or 1, self.topk_group or 1
            need(g >= 1 and e % g == 0, f"n_routed_experts ({e}) must be divisible by n_group ({g})")
            need(1 <= tg <= g, f"topk_group ({tg}) must be in 1..n_group ({g})")
            per_group = e // g
            need(self.topk_method != "noaux_tc" or g == 1 or per_group >= 2,
                 f"noaux_tc scores a group by its top-2 experts: n_routed_experts/n_group = {per_group} < 2")
            need(k <= tg * per_group,
                 f"num_experts_per_tok ({k}) exceeds the experts in topk_group groups ({tg} x {per_group})")
        rs = self.rope_scaling
        if rs:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None), f"rope_scaling type {kind!r} is not supported (yarn)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    need(key in rs, f"rope_scaling (yarn) lacks {key!r}")
                need(float(rs["factor"]) >= 1.0, f"rope_scaling factor must be >= 1, got {rs['factor']}")
        qc = self.quantization_config
        if qc:
            need(qc.get("quant_method") == "fp8",
                 f"quantization_config quant_method {qc.get('quant_method')!r} unsupported (fp8)")
            need(list(qc.get("weight_block_size", [128, 128])) == [128, 128],
                 f"weight_block_size {qc.get('weight_block_size')} unsupported ([128, 128])")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope(raw: dict) -> dict:
    """Fold transformers-5's `rope_parameters` into the `rope_theta` + `rope_scaling` pair of the official file."""
    raw = dict(raw)
    params = raw.pop("rope_parameters", None)
    if params is None:
        return raw
    params = dict(params)
    if "rope_theta" in params:
        raw["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind != "default" and "rope_scaling" not in raw:
        raw["rope_scaling"] = {"type": kind, **params}
    return raw


_V3_ROUTING = dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
_NO_FP8 = dict(quantization_config=None)

# Each preset is a set of overrides on the 671B defaults. Sizes are printed by `dsv3 info --preset NAME`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # CPU tests and the quickstart: a couple of M parameters
        vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, max_position_embeddings=2048, num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 512, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        initializer_range=0.02, **_V3_ROUTING, **_NO_FP8,
    ),
    "small": dict(  # ~187M total (+14M MTP), ~35M activated: the experiment size
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=128,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        max_position_embeddings=4096, num_nextn_predict_layers=1, rope_scaling=None,
        initializer_range=0.006, **_V3_ROUTING, **_NO_FP8,
    ),
    "1b": dict(  # ~1.45B total (+0.11B MTP), ~0.32B activated (published convention): the GPU benchmark size
        vocab_size=129280, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        max_position_embeddings=4096, num_nextn_predict_layers=1, rope_scaling=None,
        initializer_range=0.006, **_V3_ROUTING, **_NO_FP8,
    ),
    "16b": dict(  # DeepSeek-V2-Lite shapes (~15.7B total, ~2.4B active) with V3 routing
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=1.0, max_position_embeddings=163840, num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001, **_V3_ROUTING, **_NO_FP8,
    ),
    "671b": dict(),  # the defaults are DeepSeek-V3's config.json
}
