"""The engine's attention: absorbed MLA over the paged cache against the model's expanded MLA, the decode kernel
against a per-row loop, and the model's blocks run through their attn hook with it against the plain blocks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.engine.attention import Step, cache_attention, mla_attention
from dsv3.model import MLA, build_model
from dsv3.ops.mla_decode import mla_decode_reference, triton
from tests.conftest import skip_if_interpreter_broken

CFG = dsv3.ModelConfig.preset("tiny", num_hidden_layers=2)
BS = 4  # block size


def _decode_by_loop(q_lat, q_pe, kv, tables, seq, lengths, scale, w_uv):
    # One row, one head at a time: gather the visible tokens through the block table, softmax, weighted sum, W_UV.
    out = q_lat.new_empty(q_lat.shape[0], q_lat.shape[1], w_uv.shape[1])
    c = q_lat.shape[-1]
    for m in range(q_lat.shape[0]):
        n = int(lengths[m])
        slots = [kv[int(tables[seq[m], p // kv.shape[1]]), p % kv.shape[1]] for p in range(n)]
        keys = torch.stack(slots)  # [n, C+R]
        for h in range(q_lat.shape[1]):
            s = (keys[:, :c] @ q_lat[m, h] + keys[:, c:] @ q_pe[m, h]) * scale
            out[m, h] = w_uv[h] @ (torch.softmax(s, 0) @ keys[:, :c])
    return out


def _random_decode_inputs(m, h, c, r, bs, width, seqs, gen):
    pages = seqs * width + 3
    kv = torch.randn(pages, bs, c + r, generator=gen)
    tables = torch.stack([torch.randperm(pages, generator=gen)[:width] for _ in range(seqs)])
    # seq and lengths as strided columns and q_lat head-major, the layouts the engine passes
    rows = torch.stack([torch.randint(0, seqs, (m,), generator=gen), torch.randint(1, width * bs + 1, (m,),
                                                                                   generator=gen)], dim=1)
    rows[0, 1], rows[-1, 1] = 1, width * bs  # the shortest and the longest row
    q_lat = torch.randn(h, m, c, generator=gen).transpose(0, 1)
    return q_lat, torch.randn(m, h, r, generator=gen), kv, tables, rows[:, 0], rows[:, 1]


def _w_uv(h, v, c, gen):
    # W_UV as the engine passes it: a view of kv_b_proj's weight, every head's v rows after its nope rows
    return torch.randn(h, 3 + v, c, generator=gen)[:, 3:] / c ** 0.5


@pytest.mark.parametrize("m,h,c,r,bs,width,seqs", [(5, 4, 32, 16, 4, 6, 3), (1, 3, 24, 8, 16, 2, 1),
                                                    (7, 20, 40, 12, 5, 4, 2)])
def test_decode_reference_matches_loop(m, h, c, r, bs, width, seqs):
    gen = torch.Generator().manual_seed(m)
    args = (*_random_decode_inputs(m, h, c, r, bs, width, seqs, gen), 0.3, _w_uv(h, 6, c, gen))
    torch.testing.assert_close(mla_decode_reference(*args), _decode_by_loop(*args), atol=1e-5, rtol=1e-5)


KERNEL_CHECK = """
import torch
from dsv3.ops import mla_decode
from dsv3.ops.mla_decode import mla_decode_reference, mla_decode_triton
from tests.test_engine_attention import _random_decode_inputs, _w_uv
# The merge's own tiles, then small ones, so that it loops over several chunks of splits and value channels.
for mla_decode.MERGE_S, mla_decode.MERGE_V in [(8, 16), (2, 4)]:
    for i, shape in enumerate([(5, 4, 32, 16, 4, 6, 3), (3, 20, 48, 24, 64, 3, 2), (2, 16, 64, 8, 8, 40, 2)]):
        gen = torch.Generator().manual_seed(i)
        args = (*_random_decode_inputs(*shape, gen), 0.2, _w_uv(shape[1], 10, shape[2], gen))
        err = (mla_decode_triton(*args) - mla_decode_reference(*args)).abs().max().item()
        assert err < 1e-4, (shape, err)
import dsv3.engine.attention  # registers the kernel as the custom op compiled engines call
torch.library.opcheck(torch.ops.dsv3.mla_decode_triton, args, test_utils="test_faketensor")
print("ok")
"""


@pytest.mark.skipif(triton is None, reason="needs the triton package (its interpreter runs the kernel on the CPU)")
def test_triton_kernel_matches_reference_in_interpreter():
    # TRITON_INTERPRET is read when kernels are defined, so the check runs in a fresh interpreter.
    skip_if_interpreter_broken()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _mla_and_inputs(t: int):
    torch.manual_seed(0)
    mla = MLA(CFG)
    for p in mla.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, t, CFG.hidden_size)
    cos, sin = build_model(CFG).rotary(torch.arange(t))
    return mla, x, cos[None], sin[None]


def _step(t: int, blocks: list[int], decode_rows: int, prefills, start: int = 0) -> Step:
    rows = [(0, p, blocks[p // BS] * BS + p % BS, p + 1, 1, 0) for p in range(start, start + t)]
    return Step(torch.tensor(rows), torch.tensor([blocks]), decode_rows, prefills, use_triton=False)


def _cache(pages: int = 16) -> torch.Tensor:
    return torch.zeros(pages, BS, CFG.kv_lora_rank + CFG.qk_rope_head_dim)


@torch.no_grad()
def test_absorbed_equals_expanded():
    t = 23
    mla, x, cos, sin = _mla_and_inputs(t)
    expected = mla(x, cos, sin)  # the model's expanded, causal MLA
    blocks = [9, 2, 14, 5, 11, 7]  # scattered pages
    # Every token as a decode row: writes its latent, then attends absorbed to positions <= its own.
    absorbed = mla_attention(mla, x, cos, sin, _cache(), _step(t, blocks, t, []))
    torch.testing.assert_close(absorbed, expected, atol=1e-5, rtol=1e-4)
    # The same tokens as one prefill chunk (expanded over the cache), and as two chunks, the second reading the first.
    whole = mla_attention(mla, x, cos, sin, _cache(), _step(t, blocks, 0, [(0, t, 0, 0)]))
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=1e-4)
    kv = _cache()
    mla_attention(mla, x[:, :10], cos[:, :10], sin[:, :10], kv, _step(10, blocks, 0, [(0, 10, 0, 0)]))
    second = mla_attention(mla, x[:, 10:], cos[:, 10:], sin[:, 10:], kv, _step(t - 10, blocks, 0, [(0, t - 10, 10, 0)],
                                                                              start=10))
    torch.testing.assert_close(second, expected[:, 10:], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_mixed_decode_and_prefill_rows():
    # Two sequences in one step: 3 decode rows of sequence 0 (positions 7..9, cache holds 0..6) and a prefill chunk
    # of sequence 1, each against its own expanded reference.
    mla, x, cos, sin = _mla_and_inputs(10)
    _, y, cos2, sin2 = _mla_and_inputs(6)  # the same weights
    y = y * 0.5  # (the same draws as x's first tokens otherwise)
    expected0, expected1 = mla(x, cos, sin), mla(y, cos2, sin2)
    kv, b0, b1 = _cache(), [3, 8, 1], [12, 4]
    mla_attention(mla, x[:, :7], cos[:, :7], sin[:, :7], kv, _step(7, b0, 0, [(0, 7, 0, 0)]))
    rows = [(0, p, b0[p // BS] * BS + p % BS, p + 1, 1, 0) for p in range(7, 10)]
    rows += [(0, p, b1[p // BS] * BS + p % BS, p + 1, 1, 1) for p in range(6)]
    step = Step(torch.tensor(rows), torch.tensor([b0, b1 + [0]]), 3, [(3, 6, 0, 1)], use_triton=False)
    out = mla_attention(mla, torch.cat([x[:, 7:], y], 1), torch.cat([cos[:, 7:], cos2], 1),
                        torch.cat([sin[:, 7:], sin2], 1), kv, step)
    torch.testing.assert_close(out[:, :3], expected0[:, 7:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 3:], expected1, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_block_and_mtp_forwards_match_the_model():
    model = build_model(CFG.replace(initializer_range=0.1), seed=1).eval()
    t, blocks = 13, [4, 1, 6, 3]
    cos, sin = model.rotary(torch.arange(t))
    cos, sin = cos[None], sin[None]
    x = torch.randn(1, t, CFG.hidden_size)
    for i, layer in enumerate(model.layers):  # one dense block, one MoE block
        attn = cache_attention(layer.self_attn, _cache(), _step(t, blocks, 0, [(0, t, 0, 0)]))
        torch.testing.assert_close(layer(x, cos, sin, attn=attn), layer(x, cos, sin), atol=1e-5, rtol=1e-4)
    emb, h = torch.randn(1, t, CFG.hidden_size), torch.randn(1, t, CFG.hidden_size)
    mtp = model.mtp[0]
    attn = cache_attention(mtp.block.self_attn, _cache(), _step(t, blocks, t, []))
    torch.testing.assert_close(mtp(emb, h, cos, sin, attn=attn), mtp(emb, h, cos, sin), atol=1e-5, rtol=1e-4)
