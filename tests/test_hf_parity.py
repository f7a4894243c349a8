"""Parity with transformers' DeepseekV3ForCausalLM at tiny sizes, fp32 on the CPU, both directions."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsv3  # noqa: E402
from dsv3.model import build_model  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
            num_nextn_predict_layers=0, initializer_range=0.1, max_position_embeddings=512)
SEQ = 150  # longer than the YaRN original_max_position_embeddings (64): YaRN frequencies matter


def _randomise_biases(model: torch.nn.Module) -> None:
    # Non-zero routing biases make selection differ from the raw sigmoid ranking, as in a trained model.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.2)


@pytest.mark.parametrize("q_lora_rank,first_k_dense,rope", [
    (32, 1, YARN),
    (None, 1, YARN),
    (32, 0, None),
])
def test_hf_to_dsv3(tmp_path, q_lora_rank, first_k_dense, rope):
    kwargs = dict(BASE, q_lora_rank=q_lora_rank, first_k_dense_replace=first_k_dense)
    if rope:
        kwargs["rope_parameters"] = rope
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kwargs)).eval()
    _randomise_biases(hf)
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, BASE["vocab_size"], (2, SEQ))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert expected.std() > 0.5  # a model that says something, not near-zero logits
    assert (expected - got).abs().max() <= 1e-4


@pytest.mark.parametrize("overrides", [
    dict(),  # tiny: q_lora, yarn (original 512), first_k_dense 1, noaux_tc with 4 groups, MTP
    dict(q_lora_rank=None, first_k_dense_replace=2, n_shared_experts=2),
])
def test_dsv3_to_hf(tmp_path, overrides):
    cfg = dsv3.ModelConfig.preset("tiny", initializer_range=0.1, **overrides)
    model = build_model(cfg, seed=1).eval()
    _randomise_biases(model)
    dsv3.save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 600))  # past original_max_position_embeddings = 512
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    assert expected.std() > 0.5
    assert (expected - got).abs().max() <= 1e-4


def test_moe_layer_training_pass_against_transformers():
    # The MoE benchmark's two layers (benchmarks/moe_train.py): the same pass in fp32, forward and backward. Under
    # bf16 autocast dsv3 keeps its router in fp32 (the report keeps the gating in its own precision), so no token
    # changes experts (transformers' gate GEMM goes to bf16 there: 8% of the tokens changed experts at this size).
    from benchmarks.moe_train import layers, outputs_and_grads, relative

    cfg = dsv3.ModelConfig.preset("tiny")
    ours, theirs = layers(cfg, "grouped_mm", torch.device("cpu"))
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_()
    dy = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    reference = outputs_and_grads(theirs, x, dy, autocast=False)
    for a, b in zip(outputs_and_grads(ours, x, dy, autocast=False), reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours_bf16 = outputs_and_grads(ours, x, dy, autocast=True)
    assert all(relative(a, b) < 0.02 for a, b in zip(ours_bf16, reference))  # bf16 rounding only
    with torch.no_grad():
        chosen = ours.gate(x).indices.sort(-1).values
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ours.gate(x).indices.sort(-1).values, chosen)
