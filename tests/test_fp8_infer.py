"""Serving FP8 checkpoints through FP8 GEMMs (dsv3.fp8_infer), emulated on the CPU: the layer against its
reference (linear layers and routed experts), which layers load as FP8, logits against the dequantised model, the
engine against a naive loop, and the checkpoint written back unchanged."""

import torch
from safetensors import safe_open
from torch import nn

import dsv3
from dsv3.checkpoint import hf_name
from dsv3.engine import Engine, SamplingParams
from dsv3.fp8 import dequantize_blocks, dequantize_weight_blocks, quantize_blocks, quantize_weight_blocks
from dsv3.fp8_infer import Fp8WeightExperts, Fp8WeightLinear
from dsv3.model import Experts, build_model

CFG = dsv3.ModelConfig.preset("tiny", num_hidden_layers=2)


def test_layer_is_its_reference_and_close_to_the_bf16_product():
    # Awkward sizes: both dimensions padded (200 -> 256 outputs, 300 -> 384 inputs).
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(200, 300, generator=g), torch.randn(200, generator=g), torch.randn(3, 5, 300, generator=g)
    q, scale_inv = quantize_weight_blocks(w)
    layer = Fp8WeightLinear(300, 200, b, emulate=True, device=torch.device("cpu"))
    layer.weight[:200, :300] = q
    layer.weight_scale_inv.copy_(scale_inv)
    y = layer(x)
    assert y.shape == (3, 5, 200)
    xq = dequantize_blocks(*quantize_blocks(x.reshape(15, 300), 1, 128))[:, :300]  # per token, 1x128 tiles
    want = xq @ dequantize_weight_blocks(q, scale_inv, torch.float32).t() + b
    torch.testing.assert_close(y.reshape(15, 200), want, rtol=1e-5, atol=1e-4)
    exact = x @ w.t() + b
    assert ((y - exact).norm() / exact.norm()).item() < 0.05  # e4m3 keeps 3 mantissa bits
    assert layer(x[:, :0]).shape == (3, 0, 200)


def test_experts_are_their_reference():
    # Each expert's gate, up and down products equal quantise -> dequantise -> matmul with its own weights; the
    # padded sizes (I = 64 -> 128, D = 200 -> 256) add nothing.
    g = torch.Generator().manual_seed(3)
    n, dim, inter = 3, 200, 64
    bf16 = Experts(n, dim, inter)
    with torch.no_grad():
        for p in bf16.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    fp8 = Fp8WeightExperts(n, dim, inter, emulate=True, device=torch.device("cpu"))
    ip = fp8.gate_up_proj.shape[1] // 2
    deq = {}  # part -> [E, N, K] fp32, the dequantised stored weights
    for part, w, row0 in [("gate", bf16.gate_up_proj[:, :inter], 0), ("up", bf16.gate_up_proj[:, inter:], ip),
                          ("down", bf16.down_proj, 0)]:
        stack = fp8.down_proj if part == "down" else fp8.gate_up_proj
        scales = fp8.down_proj_scale_inv if part == "down" else fp8.gate_up_proj_scale_inv
        for e in range(n):
            q, scale_inv = quantize_weight_blocks(w[e].detach())
            stack[e, row0:row0 + q.shape[0], : q.shape[1]] = q
            scales[e, row0 // 128:row0 // 128 + scale_inv.shape[0]] = scale_inv
        deq[part] = torch.stack([dequantize_weight_blocks(*quantize_weight_blocks(w[e].detach()), torch.float32)
                                 for e in range(n)])
    xs = torch.randn(7, dim, generator=g)
    offs = torch.tensor([3, 3, 7], dtype=torch.int32)  # expert 1 gets no rows
    ends = [0, 3, 3, 7]

    def act(x):  # per token, 1x128 tiles
        return dequantize_blocks(*quantize_blocks(x, 1, 128))[:, : x.shape[1]]

    want = []
    for e in (0, 2):  # expert 1 has no rows
        x = act(xs[ends[e]:ends[e + 1]])
        h = torch.nn.functional.silu(x @ deq["gate"][e].t()) * (x @ deq["up"][e].t())
        want.append(act(h) @ deq["down"][e].t())
    got = fp8.mlp(xs, offs)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
    exact = bf16.mlp(xs, offs).detach()
    assert ((got - exact).norm() / exact.norm()).item() < 0.1
    assert fp8.mlp(xs[:0], torch.zeros(3, dtype=torch.int32)).shape == (0, dim)
    assert fp8.decode_weights(torch.bfloat16) is None  # emulated: the fused kernels do not apply


def _fp8_checkpoint(tmp_path):
    path = tmp_path / "fp8"
    dsv3.save_model(build_model(CFG, seed=0), path, fp8=True)
    return path


def test_fp8_layers_and_logits(tmp_path):
    path = _fp8_checkpoint(tmp_path)
    plain = dsv3.load_model(path, dtype=torch.float32)  # on the CPU the default dequantises
    assert not any(isinstance(m, Fp8WeightLinear) for m in plain.modules())
    model = dsv3.load_model(path, dtype=torch.float32, fp8_gemms=True)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8WeightLinear)}
    attn = model.layers[0].self_attn
    assert isinstance(attn.kv_a_proj_with_mqa, Fp8WeightLinear) and isinstance(attn.o_proj, Fp8WeightLinear)
    assert type(attn.kv_b_proj) is nn.Linear  # the absorbed decode attention reads its bf16 halves
    assert "layers.0.mlp.down_proj" in fp8 and "mtp.0.eh_proj" in fp8  # a dense MLP, MTP's projection
    # The shared experts stay bf16 for the fused decode kernels; head and router are never FP8.
    assert not any("shared_experts" in n or n.endswith("mlp.gate") or n == "lm_head" for n in fp8)
    # The routed experts (MTP's too) are served from their stored FP8 weights.
    experts = [m for m in model.modules() if isinstance(m, (Experts, Fp8WeightExperts))]
    assert len(experts) == len(model.moe_layers()) and all(type(m) is Fp8WeightExperts for m in experts)
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids), plain(ids)
    # Only the activations' quantisation separates the two: the weights are the same FP8 numbers.
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_engine_with_fp8_gemms_matches_a_naive_loop(tmp_path):
    model = dsv3.load_model(_fp8_checkpoint(tmp_path), dtype=torch.float32, fp8_gemms=True)
    engine = Engine(model, block_size=4, num_blocks=32, max_prefill_tokens=8)
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (5, 13)]
    ids = {engine.add_request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)): p for p in ps}
    got = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    for i, prompt in ids.items():
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
        assert got[i] == seq[len(prompt):]


def test_saving_an_fp8_serving_model_writes_the_checkpoint_back(tmp_path):
    path = _fp8_checkpoint(tmp_path)
    again = tmp_path / "again"
    model = dsv3.load_model(path, dtype=torch.bfloat16, fp8_gemms=True)
    served = {hf_name(n + ".weight", CFG) for n, m in model.named_modules() if isinstance(m, Fp8WeightLinear)}
    served |= {f"{hf_name(n, CFG)}.{e}.{part}.weight" for n, m in model.named_modules()
               if isinstance(m, Fp8WeightExperts)
               for e in range(CFG.n_routed_experts) for part in ("gate_proj", "up_proj", "down_proj")}
    assert served
    dsv3.save_model(model, again, fp8=True)

    def tensors(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    a, b = tensors(path), tensors(again)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    for name in served:  # FP8 layers write back their bytes; the rest (shared experts, kv_b_proj) quantise again
        for t in (name, name + "_scale_inv"):
            assert torch.equal(a[t].view(torch.uint8) if a[t].dtype == torch.float8_e4m3fn else a[t],
                               b[t].view(torch.uint8) if b[t].dtype == torch.float8_e4m3fn else b[t]), t
