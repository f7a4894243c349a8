"""HF-format checkpoints: FP8 layout, round trips, MTP, sharding, atomic writes and the errors that name tensors."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.checkpoint import CheckpointError, convert, fp8_eligible, write_checkpoint
from dsv3.fp8 import FP8, dequantize_weight_blocks, quantize_weight_blocks
from dsv3.model import build_model


def _tiny(**kw):
    return build_model(dsv3.ModelConfig.preset("tiny", **kw), seed=3).eval()


def _all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fp8_layout_matches_official(tmp_path):
    # Awkward sizes: 200 is not a multiple of 128, so scale grids end in partial blocks.
    model = _tiny(hidden_size=200, intermediate_size=300)
    dsv3.save_model(model, tmp_path, fp8=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    tensors = _all_tensors(tmp_path)
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        quantised = name + "_scale_inv" in tensors
        unquantised_kind = any(s in name for s in ("embed_tokens", "lm_head", "shared_head.head", "norm",
                                                   "mlp.gate.weight", "e_score_correction_bias"))
        assert quantised == (not unquantised_kind), name
        if quantised:
            scale = tensors[name + "_scale_inv"]
            assert t.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert list(scale.shape) == [math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)], name
        if name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32, name
    # per-expert names as in the official release, MTP at layer num_hidden_layers
    assert "model.layers.1.mlp.experts.15.down_proj.weight_scale_inv" in tensors
    assert "model.layers.3.eh_proj.weight" in tensors and "model.layers.3.shared_head.head.weight" in tensors


def test_fp8_reload_logits(tmp_path):
    # With the report's init (std 0.006) FP8 weights cost about what bf16 costs; and the reloaded model is exactly
    # the original with its linear weights passed through 128x128 block quantisation.
    model = _tiny(initializer_range=0.006)
    dsv3.save_model(model, tmp_path, fp8=True, dtype=torch.float32)
    reloaded = dsv3.load_model(tmp_path, dtype=torch.float32)
    fake = _tiny(initializer_range=0.006)
    with torch.no_grad():
        for name, p in fake.named_parameters():
            if p.dim() < 2 or any(s in name for s in ("embed_tokens", "lm_head", "gate.weight")):
                continue
            # The checkpoint holds each expert's gate and up matrices apart: quantise them apart.
            rows = fake.cfg.moe_intermediate_size if name.endswith("gate_up_proj") else p.shape[-2]
            for w in p.view(-1, p.shape[-1]).split(rows):
                w.copy_(dequantize_weight_blocks(*quantize_weight_blocks(w), torch.float32))
        ids = torch.randint(0, model.cfg.vocab_size, (2, 200))
        ref, got, fq = model(ids), reloaded(ids), fake(ids)
        bf16 = build_model(model.cfg, dtype=torch.bfloat16, seed=3).eval()(ids).float()
    assert (got - fq).abs().max() <= 1e-5
    assert _rel(got, ref) <= 2 * _rel(bf16, ref) + 1e-3


def test_fp8_eligibility_rule():
    w = torch.zeros(4, 4)
    assert fp8_eligible("model.layers.0.self_attn.q_a_proj.weight", w)
    assert fp8_eligible("model.layers.3.eh_proj.weight", w)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.3.shared_head.head.weight"):
        assert not fp8_eligible(name, w), name


def test_block_quantisation_round_trip_error():
    w = torch.randn(300, 260)
    q, s = quantize_weight_blocks(w)
    assert q.dtype == FP8 and s.shape == (3, 3)
    back = dequantize_weight_blocks(q, s, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 of each block's values
    for i in range(3):
        for j in range(3):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            err = (back[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] - blk).abs()
            assert (err <= blk.abs() * 2**-4 + s[i, j] * 2**-9 + 1e-12).all()


def test_mtp_round_trip_and_not_dropped(tmp_path):
    model = _tiny(num_nextn_predict_layers=2)
    dsv3.save_model(model, tmp_path)
    back = dsv3.load_model(tmp_path)
    assert len(back.mtp) == 2
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        a, b = model(ids, mtp=True), back(ids, mtp=True)
    for x, y in zip(a.mtp_logits, b.mtp_logits):
        assert torch.equal(x, y)
    # a checkpoint that lacks the MTP layer is an error unless MTP is declined
    tensors = _all_tensors(tmp_path)
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.4.")}
    (tmp_path / "model.safetensors").unlink()
    save_file(kept, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\."):
        dsv3.load_model(tmp_path)
    assert len(dsv3.load_model(tmp_path, mtp=False).mtp) == 0


def test_sharded_save_and_load(tmp_path):
    model = _tiny()
    dsv3.save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    back = dsv3.load_model(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_errors_name_the_tensor(tmp_path):
    model = _tiny()
    dsv3.save_model(model, tmp_path)
    tensors = _all_tensors(tmp_path)

    def rewrite(t):
        (tmp_path / "model.safetensors").unlink()
        save_file(t, tmp_path / "model.safetensors")

    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.7.up_proj.weight"]
    rewrite(missing)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight"):
        dsv3.load_model(tmp_path)
    extra = dict(tensors, **{"model.layers.0.self_attn.bogus.weight": torch.zeros(2)})
    rewrite(extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*bogus"):
        dsv3.load_model(tmp_path)
    rewrite(tensors)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 48  # the config no longer matches the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa\.weight has shape"):
        dsv3.load_model(tmp_path)


def test_no_pickle_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        dsv3.load_model(tmp_path / "nowhere")
    dsv3.ModelConfig.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(dsv3.ModelConfig.preset("tiny").to_hf()))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # never read: pickles run code
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dsv3.load_model(tmp_path)


def test_atomic_write_keeps_old_checkpoint(tmp_path):
    model = _tiny()
    target = tmp_path / "ckpt"
    dsv3.save_model(model, target)
    before = sorted(p.name for p in target.iterdir())

    def crashing():
        yield "model.embed_tokens.weight", torch.zeros(3, 3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(target, {"model_type": "deepseek_v3"}, crashing(), fp8=False, dtype=torch.float32)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    dsv3.load_model(target)  # still whole


def test_convert_fp8_bf16_round_trip(tmp_path):
    model = _tiny(initializer_range=0.006)
    dsv3.save_model(model, tmp_path / "fp32")
    convert(tmp_path / "fp32", tmp_path / "fp8", to="fp8")
    convert(tmp_path / "fp8", tmp_path / "bf16", to="bf16")
    convert(tmp_path / "bf16", tmp_path / "fp8b", to="fp8")
    fp8, fp8b = _all_tensors(tmp_path / "fp8"), _all_tensors(tmp_path / "fp8b")
    assert fp8.keys() == fp8b.keys()
    bf16 = _all_tensors(tmp_path / "bf16")
    assert not any(k.endswith("_scale_inv") for k in bf16)
    assert bf16["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert bf16["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("quantization_config") is None
    ids = torch.randint(0, model.cfg.vocab_size, (1, 64))
    with torch.no_grad():
        a = dsv3.load_model(tmp_path / "fp8", dtype=torch.float32)(ids)
        b = dsv3.load_model(tmp_path / "fp8b", dtype=torch.float32)(ids)
    assert _rel(b, a) < 0.02  # re-quantising dequantised FP8 values is nearly lossless
    with safe_open(tmp_path / "fp8" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F8_E4M3"


def test_cli_convert(tmp_path):
    from dsv3.cli import main

    dsv3.save_model(_tiny(), tmp_path / "a")
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "fp8"]) == 0
    assert (tmp_path / "b" / "config.json").is_file()
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "c"), "--to", "bf16"]) == 2
