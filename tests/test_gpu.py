"""The fast GPU paths against their references. Skipped on machines without CUDA (CI); run on the H200 by
`python -m pytest tests/test_gpu.py` through the device tool."""

import pytest
import torch

import dsv3
from dsv3.model import build_model
from dsv3.ops.grouped import fused_available, grouped_mm, grouped_mm_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("sizes", [[0, 5, 0, 130, 1, 64], [1], [300, 0, 0, 7]])
def test_grouped_mm_bf16_fused(sizes):
    dev = torch.device("cuda")
    x = torch.randn(sum(sizes), 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(sizes), 256, 136, device=dev, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
    assert fused_available(x)
    fast, ref = grouped_mm(x, w, offs), grouped_mm_reference(x, w, offs)
    torch.testing.assert_close(fast, ref, atol=0.5, rtol=2e-2)
    gf = torch.autograd.grad(fast.float().square().sum(), (x, w))
    gr = torch.autograd.grad(ref.float().square().sum(), (x, w))
    for a, b in zip(gf, gr):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_bf16_gpu_model_tracks_fp32_cpu():
    cfg = dsv3.ModelConfig.preset("tiny", initializer_range=0.006)
    ref = build_model(cfg, seed=0).eval()
    gpu = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 300))
    with torch.no_grad():
        a = ref(ids, mtp=True)
        b = gpu(ids.cuda(), mtp=True)
    for x, y in [(a.logits, b.logits), (a.mtp_logits[0], b.mtp_logits[0])]:
        rel = (y.float().cpu() - x).norm() / x.norm()
        assert rel < 0.03
