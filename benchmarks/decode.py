"""Decoding throughput of the engine: against transformers, against the HBM roofline, and with MTP speculation.

    python -m benchmarks.decode --preset 1b --batch 1 64            # dsv3 vs transformers generate, same weights
    python -m benchmarks.decode --preset 16b --batch 1 --no-hf     # fraction of the HBM roofline at batch 1
    python -m benchmarks.decode --model DIR --speculative --prompt-file benchmarks/prompts/python.txt  # MTP drafting
    python -m benchmarks.decode --preset 1b --fp8-weights --no-hf   # also the same weights served from FP8

Throughput is generated tokens over the wall time of the whole generation (prefill included) with greedy decoding
and the same prompt length and token count on both sides; decode-only tokens/s (from the first generated token on)
is reported beside it. The roofline: every decode step at batch 1 reads the activated weights (the embedding row,
the attention and dense/shared weights, 6 routed experts per MoE layer, the head) and the cache, so
tokens/s x bytes per token over the measured device copy bandwidth is the fraction of the memory roofline reached.
`--kernel torch` and `--no-graphs` time the engine without the Triton kernel or the CUDA graphs; `--compile` times it
with each decode bucket's step compiled by torch.compile (the warm-up run pays for the compilation).
`--fp8-weights` also writes the model as an FP8 checkpoint (128x128 blocks, like the official release), loads it
back with its linear layers on FP8 GEMMs (`dsv3.fp8_infer`) and times that beside the bf16 model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import dsv3
from benchmarks.common import save_results, sync
from dsv3.engine import Engine, SamplingParams
from dsv3.engine.engine import DEFAULT_MULTI_STEP
from dsv3.info import model_stats
from dsv3.model import Gate, Rotary, Transformer, cast_model
from dsv3.tokenizer import Tokenizer

PROMPTS = [  # for checkpoints with a tokenizer (the speculative run); random ids otherwise
    "To be, or not to be, that is the question:",
    "Friends, Romans, countrymen, lend me your ears;",
    "Now is the winter of our discontent",
    "All the world's a stage, and all the men and women merely players;",
]


def random_model(cfg: dsv3.ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Random weights drawn on the device (minutes faster than CPU init at 16B); only speed is measured on them."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    cast_model(model, dtype)
    model.rotary = Rotary(cfg).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0, cfg.initializer_range, generator=gen)
        for m in model.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()
    return model.eval()


def copy_bandwidth(device: torch.device, gib: int = 4) -> float:
    """Bytes per second moved by a device-to-device copy (read + write), the practical HBM ceiling."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - t0)


def time_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    dev = engine.device
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    outs: dict[str, list[int]] = {}
    sync(dev)
    t0 = time.perf_counter()
    first = None  # (time, tokens so far) once every prompt has its first token: decoding proper starts there
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        if first is None and len(outs) == len(prompts):
            first = (time.perf_counter(), sum(len(v) for v in outs.values()))
    sync(dev)
    end = time.perf_counter()
    total = sum(len(v) for v in outs.values())
    return {"tokens_per_s": total / (end - t0), "decode_tokens_per_s": (total - first[1]) / (end - first[0]),
            "first_token_s": first[0] - t0, "seconds": end - t0, "tokens": list(outs.values())}


def time_engine_repeated(engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """time_engine `repeats` times: the run with the median decode rate, and the rates' range beside it."""
    runs = sorted((time_engine(engine, prompts, new_tokens) for _ in range(repeats)),
                  key=lambda run: run["decode_tokens_per_s"])
    rates = [run["decode_tokens_per_s"] for run in runs]
    return {**runs[len(runs) // 2], "decode_tokens_per_s_range": [rates[0], rates[-1]]}


def time_hf(hf, prompts: torch.Tensor, new_tokens: int) -> dict:
    dev = prompts.device
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              attention_mask=torch.ones_like(prompts), pad_token_id=0)
    hf.generate(prompts[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    out = hf.generate(prompts, **kw)
    sync(dev)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": prompts.shape[0] * new_tokens / seconds, "seconds": seconds,
            "tokens": out[:, prompts.shape[1]:].tolist()}


def engine_for(model, args, batch: int, prompt_len: int, speculative: bool = False) -> Engine:
    per_seq = -(-(prompt_len + args.new_tokens + 1) // 64)
    return Engine(model, max_batch_size=batch, block_size=64, num_blocks=batch * per_seq + 1,
                  max_seq_len=prompt_len + args.new_tokens + 1, speculative=speculative,
                  cuda_graphs=not args.no_graphs, decode_kernel=args.kernel, compile=args.compile,
                  multi_step=args.multi_step, num_speculative_tokens=args.speculative_tokens)


def versus_transformers(args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = dsv3.ModelConfig.preset(args.preset)
    model = random_model(cfg, device, dtype)
    stats = model_stats(cfg)
    results: dict = {"preset": args.preset, "dtype": args.dtype, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "kernel": args.kernel, "cuda_graphs": not args.no_graphs,
                     "compile": args.compile, "multi_step": args.multi_step, "runs": []}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (max(args.batch), args.prompt_len), generator=gen)

    def timed(m) -> dict[int, dict]:
        runs = {}
        for b in args.batch:
            engine = engine_for(m, args, b, args.prompt_len)
            # Warm-up on the timed prompts: captures the CUDA graphs this batch uses, the prompt step's included, and
            # compiles the kernels of the prompt's shapes, which a shorter warm-up prompt leaves to the first timed
            # run (and that run may be the median one).
            time_engine(engine, ids[:b].tolist(), 8)
            runs[b] = time_engine_repeated(engine, ids[:b].tolist(), args.new_tokens, args.repeats)
            del engine
            torch.cuda.empty_cache()
        return runs

    ours = timed(model)
    fp8 = {}
    if args.fp8_weights:
        with tempfile.TemporaryDirectory() as tmp:
            dsv3.save_model(model, tmp, fp8=True)
            fp8 = timed(dsv3.load_model(tmp, device=device, dtype=dtype, fp8_gemms=True))
    # Bytes one decode step reads at batch 1, in bf16: activated weights (one embedding row, not the table) and
    # the cache at the mean context of the decode steps.
    bytes_per_token = 2 * (stats.activated_params - stats.embedding_params + cfg.hidden_size)
    context = args.prompt_len + args.new_tokens / 2
    bytes_per_token += 2 * context * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    bandwidth = copy_bandwidth(device)
    results.update(activated_bytes_per_token=bytes_per_token, copy_bandwidth_GBps=bandwidth / 1e9)
    hf_models = {}
    if not args.no_hf:
        import transformers

        tmp = tempfile.TemporaryDirectory()
        dsv3.save_model(model, tmp.name)
        for impl in ("eager", "grouped_mm"):
            hf_models[impl] = lambda impl=impl: transformers.AutoModelForCausalLM.from_pretrained(
                tmp.name, dtype=dtype, attn_implementation="sdpa", experts_implementation=impl).to(device).eval()
    for b in args.batch:
        row = {"batch": b, "dsv3_tokens_per_s": ours[b]["tokens_per_s"],
               "dsv3_decode_tokens_per_s": ours[b]["decode_tokens_per_s"],
               "dsv3_decode_tokens_per_s_range": ours[b]["decode_tokens_per_s_range"]}
        if b == 1:
            row["hbm_roofline_fraction"] = ours[b]["decode_tokens_per_s"] * bytes_per_token / bandwidth
        if b in fp8:
            row["dsv3_fp8_tokens_per_s"] = fp8[b]["tokens_per_s"]
            row["dsv3_fp8_decode_tokens_per_s"] = fp8[b]["decode_tokens_per_s"]
            row["fp8_vs_bf16"] = fp8[b]["decode_tokens_per_s"] / ours[b]["decode_tokens_per_s"]
        for impl, make in hf_models.items():
            hf = make()
            with torch.no_grad():
                theirs = time_hf(hf, ids[:b].to(device), args.new_tokens)
            del hf
            torch.cuda.empty_cache()
            row[f"hf_{impl}_tokens_per_s"] = theirs["tokens_per_s"]
            row[f"speedup_vs_hf_{impl}"] = ours[b]["tokens_per_s"] / theirs["tokens_per_s"]
            # bf16 greedy paths drift apart eventually; the length of the common prefix shows they start alike
            a, t = ours[b]["tokens"][0], theirs["tokens"][0]
            row[f"common_prefix_with_hf_{impl}"] = next((i for i, (x, y) in enumerate(zip(a, t)) if x != y), len(a))
        results["runs"].append(row)
        print(row, flush=True)
    return results


def speculative_speedup(args, device: torch.device, dtype: torch.dtype) -> dict:
    model = dsv3.load_model(args.model, device=device, dtype=dtype, mtp=True)
    cfg = model.cfg
    if (Path(args.model) / "tokenizer.json").is_file():
        tok = Tokenizer.from_path(args.model)
        lines = Path(args.prompt_file).read_text().splitlines() if args.prompt_file else PROMPTS
        prompts = [tok.encode(line, add_bos=tok.bos_token is not None) for line in lines if line.strip()]
    else:
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, cfg.vocab_size, (4, args.prompt_len), generator=gen).tolist()
    longest = max(len(p) for p in prompts)
    results: dict = {"model": str(args.model), "dtype": args.dtype, "new_tokens": args.new_tokens,
                     "compile": args.compile, "multi_step": args.multi_step,
                     "speculative_tokens": args.speculative_tokens, "runs": []}
    plain = engine_for(model, args, 1, longest)
    spec = engine_for(model, args, 1, longest, speculative=True)
    # Warm-up over every prompt: a prompt length not seen yet costs kernel compilations and autotuning (prefill
    # shapes), which the engine timed first would pay and the second would find cached.
    for p in prompts:
        time_engine(plain, [p], 8)
        time_engine(spec, [p], 8)
    m = spec.metrics()
    drafted0, accepted0, rounds0 = m["spec_drafted"], m["spec_accepted"], m["spec_rounds"]
    for p in prompts:  # batch 1, one prompt at a time
        a, s = time_engine(plain, [p], args.new_tokens), time_engine(spec, [p], args.new_tokens)
        same = next((i for i, (x, y) in enumerate(zip(a["tokens"][0], s["tokens"][0])) if x != y), args.new_tokens)
        results["runs"].append({"prompt_tokens": len(p), "plain_tokens_per_s": a["tokens_per_s"],
                                "speculative_tokens_per_s": s["tokens_per_s"],
                                "speedup": s["tokens_per_s"] / a["tokens_per_s"],
                                "plain_decode_tokens_per_s": a["decode_tokens_per_s"],
                                "speculative_decode_tokens_per_s": s["decode_tokens_per_s"],
                                "decode_speedup": s["decode_tokens_per_s"] / a["decode_tokens_per_s"],
                                "plain_first_token_s": a["first_token_s"],
                                "speculative_first_token_s": s["first_token_s"],
                                "common_prefix": same})
        print(results["runs"][-1], flush=True)
    m = spec.metrics()
    results["acceptance_rate"] = (m["spec_accepted"] - accepted0) / max(1, m["spec_drafted"] - drafted0)
    results["accepted_per_step"] = (m["spec_accepted"] - accepted0) / max(1, m["spec_rounds"] - rounds0)
    for key in ("speedup", "decode_speedup"):
        results[f"mean_{key}"] = sum(r[key] for r in results["runs"]) / len(results["runs"])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", help="a random model of this preset (1b)")
    p.add_argument("--model", help="a checkpoint folder instead (the speculative run)")
    p.add_argument("--speculative", action="store_true", help="time MTP speculation against plain decoding")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed generations per engine (the median's figures are reported, with the decode rates' "
                        "range): run-to-run spread on the same build")
    p.add_argument("--prompt-file", help="prompts for the speculative run, one per line")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernel", default="auto", choices=["auto", "triton", "torch"], help="decode attention")
    p.add_argument("--no-graphs", action="store_true", help="run the decode step eagerly")
    p.add_argument("--compile", action="store_true", help="torch.compile each decode bucket's step")
    p.add_argument("--speculative-tokens", type=int, default=1,
                   help="drafts per step: the MTP module chained on its own output past the first (greedy bursts)")
    p.add_argument("--multi-step", type=int, default=DEFAULT_MULTI_STEP,
                   help="greedy decode steps per host round trip (1: a round trip every step)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (the roofline alone)")
    p.add_argument("--fp8-weights", action="store_true", help="also time the weights served from an FP8 checkpoint")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    suffix = ("_compiled" if args.compile else "") + ("_fp8" if args.fp8_weights else "")
    if args.speculative:
        if not args.model:
            raise SystemExit("--speculative needs --model DIR, a checkpoint trained with MTP")
        save_results(f"decode_speculative{suffix}", speculative_speedup(args, device, dtype))
    else:
        save_results(f"decode_{args.preset}{suffix}", versus_transformers(args, device, dtype))


if __name__ == "__main__":
    main()
