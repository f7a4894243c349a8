"""dsv3.info against independent counts: meta-device models, transformers' model, torch's FLOP counter, hand
computations, and the sizes DeepSeek published."""

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dsv3.model
from dsv3.cli import main
from dsv3.config import ModelConfig
from dsv3.info import Weight, attention_flops_per_layer, model_stats
from dsv3.model import MoE, Transformer, build_model
from dsv3.ops.grouped import grouped_mm_reference

CONFIGS = {
    **{name: ModelConfig.preset(name) for name in ("tiny", "small", "1b", "16b", "671b")},
    # no q_lora, MoE every other layer (the MTP blocks at 5 and 6 are then dense and MoE), no shared expert
    "tiny-sparse": ModelConfig.preset("tiny", q_lora_rank=None, moe_layer_freq=2, num_hidden_layers=5,
                                      num_nextn_predict_layers=2, n_shared_experts=0),
    # dense only, tied embeddings, attention biases
    "tiny-dense": ModelConfig.preset("tiny", n_routed_experts=None, tie_word_embeddings=True, attention_bias=True),
}
# DeepSeek-V2's config.json: published as 236B total, 21B activated
V2 = ModelConfig(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                 num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, q_lora_rank=1536,
                 n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
                 topk_method="group_limited_greedy", scoring_func="softmax", num_nextn_predict_layers=0,
                 quantization_config=None)


def meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def split_params(model: Transformer) -> tuple[dict, dict]:
    main_p, mtp_p = {}, {}
    for name, p in model.named_parameters():  # a tied head appears once, as embed_tokens
        (mtp_p if name.startswith("mtp.") else main_p)[name] = p
    return main_p, mtp_p


@pytest.mark.parametrize("name", list(CONFIGS))
def test_totals_match_the_module_tree(name):
    cfg = CONFIGS[name]
    model = meta_model(cfg)
    main_p, mtp_p = split_params(model)
    s = model_stats(cfg)
    assert s.total_params == sum(p.numel() for p in main_p.values())
    assert s.mtp_params == sum(p.numel() for p in mtp_p.values())
    assert s.embedding_params == model.embed_tokens.weight.numel()
    assert s.head_params == (0 if cfg.tie_word_embeddings else model.lm_head.weight.numel())
    # the checkpoint repeats the embedding and the head in every MTP layer
    vd = cfg.vocab_size * cfg.hidden_size
    assert s.mtp_params_hf == s.mtp_params + 2 * vd * cfg.num_nextn_predict_layers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_activated_by_subtracting_idle_experts(name):
    cfg = CONFIGS[name]
    model = meta_model(cfg)
    main_p, mtp_p = split_params(model)

    def idle(modules) -> int:
        # a token leaves E - k routed experts of every MoE layer untouched
        out = 0
        for m in modules:
            if isinstance(m, MoE):
                per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
                out += (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return out

    s = model_stats(cfg)
    activated = sum(p.numel() for p in main_p.values()) - idle(model.layers.modules())
    assert s.activated_params == activated
    assert s.activated_params_no_embed == activated - model.embed_tokens.weight.numel()
    assert s.activated_params_no_embed_head == activated - sum(
        p.numel() for n, p in main_p.items() if n in ("embed_tokens.weight", "lm_head.weight"))
    assert s.mtp_activated_params == sum(p.numel() for p in mtp_p.values()) - idle(model.mtp.modules())
    assert s.activated_params < s.total_params or not cfg.has_moe


@pytest.mark.parametrize("name", ["671b", "16b", "tiny"])
def test_total_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = CONFIGS[name]
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items() if k != "quantization_config"})
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg)  # builds no MTP layer: the main model alone
    assert model_stats(cfg).total_params == sum(p.numel() for p in hf.parameters())


def test_published_sizes():
    v3 = model_stats(CONFIGS["671b"])
    assert abs(v3.total_params - 671e9) < 0.01 * 671e9
    assert abs(v3.activated_params - 37e9) < 1e9
    assert abs(v3.activated_params_no_embed - 37e9) < 1e9
    assert abs(v3.total_params + v3.mtp_params_hf - 685e9) < 1e9  # the HF checkpoint, MTP layer included
    lite = model_stats(CONFIGS["16b"])  # DeepSeek-V2-Lite: 15.7B total, 2.4B activated
    assert abs(lite.total_params - 15.7e9) < 0.05e9
    assert abs(lite.activated_params_no_embed - 2.4e9) < 0.1e9
    v2 = model_stats(V2)
    assert abs(v2.total_params - 236e9) < 0.5e9
    assert abs(v2.activated_params_no_embed - 21e9) < 0.5e9


def test_kv_cache_671b():
    cfg = CONFIGS["671b"]
    attn = meta_model(cfg).layers[0].self_attn
    s = model_stats(cfg)
    assert s.kv_latent_elems == attn.kv_a_proj_with_mqa.out_features == 576
    # expanded: per-head k_nope and v from kv_b_proj, and the shared k_pe repeated for every head
    assert s.kv_expanded_elems == attn.kv_b_proj.out_features + cfg.num_attention_heads * cfg.qk_rope_head_dim
    assert s.kv_expanded_elems == 40960
    assert round(s.kv_ratio) == 71
    assert s.kv_bytes_per_layer == {"latent-bf16": 1152, "latent-fp8": 576 + 5 * 4,
                                    "expanded-bf16": 81920, "expanded-fp8": 40960 + 320 * 4}
    assert s.kv_bytes["latent-bf16"] == 1152 * 61  # about 70 KB per token
    assert round(s.kv_bytes["latent-bf16"] / 1e3) == 70


@pytest.mark.parametrize("name", ["tiny", "tiny-sparse", "tiny-dense"])
def test_flops_match_torch_flop_counter(name, monkeypatch):
    # The loop reference of the grouped GEMM runs plain matmuls the counter sees; the math attention backend
    # computes every score, masked or not, so half its bmm FLOPs are the causal count.
    monkeypatch.setattr(dsv3.model, "grouped_mm", grouped_mm_reference)
    cfg = CONFIGS[name]
    model = build_model(cfg, seed=0)
    t = 40
    ids = torch.randint(0, cfg.vocab_size, (1, t))
    s = model_stats(cfg, seq_len=t)

    def count(mtp: bool, backward: bool) -> tuple[int, int]:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            out = model(ids, mtp=mtp)
            if backward:
                (out.logits.sum() + sum(x.sum() for x in out.mtp_logits)).backward()
        ops = fc.get_flop_counts()["Global"]
        bmm = sum(v for op, v in ops.items() if "bmm" in str(op))
        return fc.get_total_flops() - bmm, bmm

    with torch.no_grad():
        mm, bmm = count(mtp=False, backward=False)
        mm_mtp, bmm_mtp = count(mtp=True, backward=False)
    assert mm == 2 * t * s.matmul_params
    assert bmm / 2 == t * s.attn_flops_per_token
    assert mm + bmm / 2 == t * s.fwd_flops_per_token
    assert (mm_mtp + bmm_mtp / 2) - (mm + bmm / 2) == t * s.mtp_fwd_flops_per_token
    mm_train, bmm_train = count(mtp=True, backward=True)
    assert mm_train + bmm_train / 2 == t * s.train_flops_per_token


def test_attention_flops_by_hand():
    cfg = CONFIGS["671b"]
    # 128 heads x (192 + 128) dims x 2 FLOPs x 4096 / 2 keys, per layer and token
    assert attention_flops_per_layer(cfg, 4096) == 128 * 320 * 2 * 2048
    assert model_stats(cfg).attn_flops_per_token == 61 * 128 * 320 * 2 * 2048


@pytest.mark.parametrize("name", ["tiny-sparse", "16b", "671b"])
def test_fp8_bytes_from_the_module_tree(name):
    cfg = CONFIGS[name]
    main_p, _ = split_params(meta_model(cfg))

    def fp8(rows, cols):
        return rows * cols + math.ceil(rows / 128) * math.ceil(cols / 128) * 4

    expected = 0
    for n, p in main_p.items():
        if n.endswith("experts.gate_up_proj"):  # [E, 2I, D]: gate and up are separate checkpoint matrices
            e, two_i, d = p.shape
            expected += e * 2 * fp8(two_i // 2, d)
        elif n.endswith("experts.down_proj"):  # [E, D, I]
            expected += p.shape[0] * fp8(*p.shape[1:])
        elif p.dim() == 2 and not any(k in n for k in ("embed_tokens", "lm_head", "mlp.gate.weight")):
            expected += fp8(*p.shape)
        else:
            expected += 2 * p.numel()
    s = model_stats(cfg)
    assert s.weight_bytes["fp8"] == expected
    assert s.weight_bytes["bf16"] == 2 * s.total_params


def test_weight_bytes_by_hand():
    w = Weight("w", 300, 200, "linear")
    assert w.nbytes("bf16") == 120_000
    assert w.nbytes("fp8") == 60_000 + 3 * 2 * 4  # 3 x 2 blocks of 128x128, fp32 scales
    assert w.nbytes("int8") == 60_000 + 300 * 2  # one bf16 scale per row
    assert w.nbytes("int4-g128") == 30_000 + 300 * 2 * 2  # ceil(200/128) groups a row
    assert w.nbytes("int4-g32") == 30_000 + 300 * 7 * 2
    experts = Weight("e", 100, 60, "expert", copies=4)
    assert experts.nbytes("fp8") == 4 * (6000 + 4)
    assert Weight("emb", 10, 4, "embed").nbytes("int4-g32") == 80  # kept in bf16
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        w.nbytes("int3")


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        model_stats(CONFIGS["tiny"], seq_len=0)


def test_cli_table_and_json(capsys, tmp_path):
    assert main(["info", "--preset", "671b"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "71.1x" in out and "70.27 KB" in out
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["16b"].to_hf()))
    assert main(["info", "--config", str(tmp_path), "--seq-len", "1024", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["total_params"] == model_stats(CONFIGS["16b"]).total_params
    assert got["seq_len"] == 1024
    assert got["attn_flops_per_token"] == 27 * attention_flops_per_layer(CONFIGS["16b"], 1024)


def test_cli_errors(capsys, tmp_path):
    assert main(["info", "--preset", "tiny", "--seq-len", "0"]) == 2
    assert "seq_len must be a positive integer" in capsys.readouterr().err
    assert main(["info", "--config", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
