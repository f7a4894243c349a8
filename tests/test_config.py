"""ModelConfig: HF config.json in and out, presets, validation messages."""

import json

import pytest

import dsv3
from dsv3.config import PRESETS, ConfigError, ModelConfig

OFFICIAL_671B = {  # deepseek-ai/DeepSeek-V3 config.json, the fields that shape the model
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "num_nextn_predict_layers": 1, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "use_cache": True,
}


def test_official_config_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_671B))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg == ModelConfig.preset("671b")
    out = cfg.to_hf()
    for k, v in OFFICIAL_671B.items():
        assert out[k] == v, k
    assert ModelConfig.from_hf(out) == cfg


def test_transformers5_rope_parameters():
    raw = {k: v for k, v in OFFICIAL_671B.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                              "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                              "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.yarn["factor"] == 40 and cfg.rope_theta == 10000.0
    default = ModelConfig.from_hf(dict(raw, rope_parameters={"rope_type": "default", "rope_theta": 5.0}))
    assert default.yarn is None and default.rope_theta == 5.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("change,message", [
    (dict(n_routed_experts=10, n_group=4), "divisible by n_group"),
    (dict(num_experts_per_tok=20), "num_experts_per_tok"),
    (dict(topk_group=9), "topk_group"),
    (dict(n_group=16, topk_group=2), "top-2"),
    (dict(topk_method="banana"), "topk_method"),
    (dict(scoring_func="softmax"), "noaux_tc needs scoring_func sigmoid"),
    (dict(qk_rope_head_dim=7), "even"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling={"type": "yarn"}), "factor"),
    (dict(quantization_config={"quant_method": "gptq"}), "quant_method"),
])
def test_validation_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny", **change)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="llama"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")


def test_frozen():
    cfg = dsv3.ModelConfig.preset("tiny")
    with pytest.raises(Exception):
        cfg.hidden_size = 3  # type: ignore[misc]


def test_to_hf_and_presets_hand_out_copies():
    cfg = ModelConfig.preset("tiny")
    cfg.to_hf()["rope_scaling"]["factor"] = 99  # as transformers' config classes do to the dict they get
    assert cfg.rope_scaling["factor"] != 99 and ModelConfig.preset("tiny").rope_scaling["factor"] != 99
