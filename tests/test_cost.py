"""dsv3.cost: the count parser, the GPU-hour relation by hand, and the report's 180K GPU-hours per 1T tokens."""

import pytest

from dsv3.cli import main
from dsv3.config import ModelConfig
from dsv3.cost import parse_count, parse_tokens, training_cost
from dsv3.info import model_stats

# The MFU the report's 180K H800 GPU-hours per trillion tokens implies for the 671B config (docs/cost.md)
MFU_BF16, MFU_FP8 = 0.4067, 0.2033


@pytest.mark.parametrize("text,expected", [
    ("14.8T", 14_800_000_000_000), ("100M", 100_000_000), ("1e9", 1_000_000_000), ("469b", 469_000_000_000),
    ("2G", 2_000_000_000), ("180K", 180_000), ("2,048", 2048), ("1_000", 1000), (" 3k ", 3000), ("7", 7),
])
def test_parse_tokens(text, expected):
    assert parse_tokens(text) == expected


def test_parse_count_keeps_fractions():
    assert parse_count("2.5") == 2.5
    assert parse_count("0.5K") == 500.0


@pytest.mark.parametrize("text", ["", "T", "abc", "1.5X", "-5T", "0", "nan", "inf"])
def test_parse_tokens_rejects(text):
    with pytest.raises(ValueError, match="count"):
        parse_tokens(text)


def micro_config() -> ModelConfig:
    return ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=6, moe_intermediate_size=3,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                       q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4,
                       n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                       num_nextn_predict_layers=0, rope_scaling=None, quantization_config=None)


def test_gpu_hours_by_hand():
    # Matmul weights a token uses in the micro config:
    #   attention per layer: q_proj 8x(2*6)=96, kv_a 8x6=48, kv_b 4x(2*8)=64, o 8x8=64          -> 272
    #   layer 0 dense MLP 3x8x6=144; layer 1 router 4x8=32 + 2 routed experts 2x72 + shared 72  -> 248
    #   head 100x8=800;  total 2*272 + 144 + 248 + 800 = 1736
    # attention at seq 10: 2 heads x (6 + 4) dims x 2 FLOPs x 10/2 keys x 2 layers = 400
    forward = 2 * 1736 + 400
    train = 3 * forward
    s = model_stats(micro_config(), seq_len=10)
    assert s.matmul_params == 1736
    assert s.train_flops_per_token == train
    c = training_cost(s.train_flops_per_token, 1e9, peak_tflops=1.0, mfu=0.5, price_per_gpu_hour=3.0, gpus=2)
    hours = 1e9 * train / (0.5 * 1e12 * 3600)
    assert c.gpu_hours == pytest.approx(hours, rel=1e-12)
    assert c.dollars == pytest.approx(3.0 * hours, rel=1e-12)
    assert c.days == pytest.approx(hours / 2 / 24, rel=1e-12)
    assert c.tokens_per_sec_per_gpu == pytest.approx(1e9 / (hours * 3600), rel=1e-12)


def test_the_three_unknowns_agree():
    flops = model_stats(ModelConfig.preset("1b")).train_flops_per_token
    by_mfu = training_cost(flops, 2e11, mfu=0.3)
    by_hours = training_cost(flops, 2e11, gpu_hours=by_mfu.gpu_hours)
    by_rate = training_cost(flops, 2e11, tokens_per_sec_per_gpu=by_mfu.tokens_per_sec_per_gpu)
    for c in (by_hours, by_rate):
        assert c.mfu == pytest.approx(0.3, rel=1e-12)
        assert c.gpu_hours == pytest.approx(by_mfu.gpu_hours, rel=1e-12)


def test_report_180k_gpu_hours_per_trillion_tokens():
    flops = model_stats(ModelConfig.preset("671b"), seq_len=4096).train_flops_per_token
    bf16 = training_cost(flops, 1e12, peak_tflops=989, mfu=MFU_BF16)
    fp8 = training_cost(flops, 1e12, peak_tflops=2 * 989, mfu=MFU_FP8)
    assert bf16.gpu_hours == pytest.approx(180e3, rel=1e-3)
    assert fp8.gpu_hours == pytest.approx(180e3, rel=1e-3)
    # 14.8T tokens: the report's 2,664K pre-training GPU-hours, $5.328M of the $5.576M total at $2
    full = training_cost(flops, 14.8e12, peak_tflops=989, mfu=MFU_BF16)
    assert full.gpu_hours == pytest.approx(2664e3, rel=1e-3)
    assert full.dollars == pytest.approx(5.328e6, rel=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of"),
    (dict(mfu=0.4, gpu_hours=10.0), "exactly one of"),
    (dict(mfu=1.5), "cannot exceed 1"),
    (dict(mfu=0.0), "mfu must be positive"),
    (dict(tokens_per_sec_per_gpu=-1.0), "tokens_per_sec_per_gpu must be positive"),
    (dict(mfu=0.4, gpus=0), "gpus must be positive"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        training_cost(1e9, 1e12, **kwargs)


def test_cli(capsys):
    assert main(["cost", "--tokens", "1T", "--gpu-hours", "180K"]) == 0
    out = capsys.readouterr().out
    assert f"{100 * MFU_BF16:.2f}%" in out and "$360,000" in out and "989 TFLOP/s" in out
    assert main(["cost", "--tokens", "1T", "--gpu-hours", "180K", "--fp8"]) == 0
    assert f"{100 * MFU_FP8:.2f}%" in capsys.readouterr().out
    assert main(["cost", "--preset", "tiny", "--tokens", "1e9", "--tokens-per-sec-per-gpu", "1e6",
                "--gpu-hour-price", "4", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    hours = 1e9 / 1e6 / 3600
    assert f"{hours:.3g}" in out and "days" in out
    assert main(["cost", "--tokens", "14.8Q", "--mfu", "0.4"]) == 2
    assert "cannot read '14.8Q'" in capsys.readouterr().err
