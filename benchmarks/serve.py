"""Serving throughput and latency: N concurrent streaming clients against `dsv3 serve`, beside the engine alone.

    python -m benchmarks.serve --preset 1b --clients 64 --duration 60      # starts a server on a random 1b model
    python -m benchmarks.serve --url http://127.0.0.1:8000 --model NAME    # an existing server: HTTP numbers only

Each client loops for --duration seconds: a streamed /v1/completions request of --prompt-len random token ids and
exactly --max-tokens new tokens (greedy, ignore_eos), then the next; requests in flight at the deadline run to
their end, and the run's time is up to the last one. Reported, as vLLM's and SGLang's serving benchmarks report
them: requests/s, output tokens/s, time to first token, time per output token (per request: (latency - TTFT) /
(tokens - 1)) and inter-token latency (between streamed chunks) at p50 and p99, and errors. The client speaks
HTTP/1.1 over asyncio streams itself, so that it costs little next to the server.

With --preset the server runs in a process of its own (its engine in another), on random weights; afterwards this
process builds the same engine and runs the same closed loop of --clients requests without HTTP, and prints the
ratio of the two output-token rates (the issue's target: at least 0.8 on an H200 with the 1b preset and 64 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dsv3
from benchmarks.common import save_results, sync
from benchmarks.decode import random_model
from dsv3.engine import Engine, SamplingParams
from dsv3.server.cli import cpu_threads

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "deepseek-v3"
PROMPT_VOCAB = 128000  # ids below the DeepSeek tokenizer's added tokens: plain text pieces
WARMUP_TOKENS = 16


def random_engine(preset: str, device: str, dtype: str, max_batch_size: int, max_seq_len: int) -> Engine:
    """The benchmark's engine: random weights (only speed is measured). Runs in the server's engine process."""
    if device == "cpu":
        torch.set_num_threads(cpu_threads(None))
    cfg = dsv3.ModelConfig.preset(preset)
    model = random_model(cfg, torch.device(device), getattr(torch, dtype))
    return Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len)


# ---- the server process ------------------------------------------------------------------------------------------
def serve(args) -> None:
    import uvicorn

    from dsv3.server import EngineClient, ServerConfig, create_app
    from dsv3.tokenizer import Tokenizer

    # by its module's name, not __main__'s: the engine process must be able to import what it unpickles
    factory = importlib.import_module("benchmarks.serve").random_engine
    make_engine = functools.partial(factory, args.preset, args.device, args.dtype, args.clients,
                                    args.prompt_len + args.max_tokens)
    app = create_app(EngineClient(make_engine), Tokenizer.from_path(args.tokenizer),
                     ServerConfig(model_name=args.preset, max_concurrent=4 * args.clients))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ---- the client --------------------------------------------------------------------------------------------------
@dataclass
class Record:
    start: float
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    tokens: int = 0
    error: str | None = None


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield the body's bytes as they come: chunked transfer encoding, or a Content-Length body."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            yield (await reader.readexactly(size + 2))[:-2]
    else:
        yield await reader.readexactly(int(headers.get("content-length", "0")))


async def stream_request(url: str, path: str, payload: dict, api_key: str | None) -> Record:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    rec = Record(time.perf_counter())
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as e:
        rec.error = f"connect: {e}"
        return rec
    try:
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Authorization: Bearer {api_key}\r\n" if api_key else "") + "\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        buf = b""
        async for data in _read_body(reader, headers):
            if status != 200:
                buf += data
                continue
            buf += data
            *events, buf = buf.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    rec.end = now
                    continue
                msg = json.loads(data)
                if "error" in msg:
                    rec.error = msg["error"]["message"]
                elif msg.get("usage"):
                    rec.tokens = msg["usage"]["completion_tokens"]
                elif msg["choices"] and msg["choices"][0]["text"]:
                    rec.first = rec.first or now
                    rec.chunks.append(now)
        if status != 200:
            rec.error = f"HTTP {status}: {buf[:200].decode(errors='replace')}"
        elif rec.end is None and rec.error is None:
            rec.error = "the stream ended without [DONE]"
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return rec


async def run_clients(args, model: str, max_tokens: int, duration: float, seed: int) -> tuple[list[Record], float]:
    rng = random.Random(seed)
    vocab = min(PROMPT_VOCAB, args.vocab_size)
    records: list[Record] = []
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def client() -> None:
        sent = 0
        while sent == 0 or time.perf_counter() < deadline:  # every client sends at least one request
            payload = {"model": model, "prompt": [rng.randrange(vocab) for _ in range(args.prompt_len)],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}
            records.append(await stream_request(args.url, "/v1/completions", payload, args.api_key))
            sent += 1

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return records, time.perf_counter() - t0


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p99": None}
    xs = sorted(xs)
    return {q: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] for q, p in (("p50", 0.5), ("p99", 0.99))}


def summarize(records: list[Record], seconds: float) -> dict:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ms = 1e3
    return {
        "requests": len(records), "errors": len(records) - len(ok), "seconds": seconds,
        "first_errors": sorted({r.error for r in records if r.error})[:5],
        "requests_per_s": len(ok) / seconds, "output_tokens_per_s": tokens / seconds,
        "ttft_ms": {k: v and v * ms for k, v in percentiles([r.first - r.start for r in ok if r.first]).items()},
        "tpot_ms": {k: v and v * ms for k, v in percentiles(
            [(r.end - r.first) / (r.tokens - 1) for r in ok if r.first and r.tokens > 1]).items()},
        "itl_ms": {k: v and v * ms for k, v in percentiles(
            [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]).items()},
    }


# ---- the engine alone --------------------------------------------------------------------------------------------
def engine_closed_loop(engine: Engine, args, max_tokens: int, duration: float, seed: int) -> tuple[int, float]:
    """The clients' workload without HTTP: args.clients requests in flight, a new one as each finishes, until the
    deadline; then the rest run out. Returns (output tokens, seconds)."""
    rng = random.Random(seed)
    vocab = min(PROMPT_VOCAB, args.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def add() -> None:
        engine.add_request([rng.randrange(vocab) for _ in range(args.prompt_len)], params)

    sync(engine.device)
    t0 = time.perf_counter()
    deadline = t0 + duration
    for _ in range(args.clients):
        add()
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished and time.perf_counter() < deadline:
                add()
    sync(engine.device)
    return tokens, time.perf_counter() - t0


# ---- driver ------------------------------------------------------------------------------------------------------
def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the server at {url} did not come up in {timeout:.0f} s")
        time.sleep(1)


def http_phase(args, model: str) -> dict:
    # warm-up: every client once with a short request, so the engine's CUDA graphs for these batch sizes exist
    warm, _ = asyncio.run(run_clients(args, model, WARMUP_TOKENS, 0.0, seed=1))
    if any(r.error for r in warm):
        raise SystemExit(f"warm-up requests failed: {sorted({r.error for r in warm if r.error})[:3]}")
    records, seconds = asyncio.run(run_clients(args, model, args.max_tokens, args.duration, seed=2))
    return summarize(records, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", help="start a server on a random model of this preset (1b)")
    p.add_argument("--url", help="benchmark the server at this URL instead (HTTP numbers only)")
    p.add_argument("--model", help="the model name the server at --url serves")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which clients start requests")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--port", type=int, default=8321, help="port of the server this benchmark starts")
    p.add_argument("--tokenizer", default=str(TOKENIZER_DIR),
                   help="the server's tokenizer folder (the DeepSeek-V3 one in ../shared/data)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process's own entry
    args = p.parse_args()
    if args.serve:
        serve(args)
        return
    if args.url:
        if not args.model:
            raise SystemExit("--url needs --model, the name that server serves")
        args.vocab_size = PROMPT_VOCAB
        wait_healthy(args.url.rstrip("/"), None, timeout=30)
        save_results("serve_url", {"url": args.url, "clients": args.clients, "prompt_len": args.prompt_len,
                                   "max_tokens": args.max_tokens, "http": http_phase(args, args.model)})
        return
    args.vocab_size = dsv3.ModelConfig.preset(args.preset).vocab_size
    args.url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "benchmarks.serve", "--serve", *sys.argv[1:]]
    server = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ})
    try:
        print(f"starting the server on a random {args.preset} model ...", flush=True)
        wait_healthy(args.url, server)
        http = http_phase(args, args.preset)
        print(json.dumps({"http": http}, indent=2), flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(120)
    # the same workload on the same engine, in this process, without HTTP
    engine = random_engine(args.preset, args.device, args.dtype, args.clients, args.prompt_len + args.max_tokens)
    engine_closed_loop(engine, args, WARMUP_TOKENS, 0.0, seed=1)
    tokens, seconds = engine_closed_loop(engine, args, args.max_tokens, args.duration, seed=2)
    alone = {"output_tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens}
    save_results(f"serve_{args.preset}", {
        "preset": args.preset, "device": args.device, "dtype": args.dtype, "clients": args.clients,
        "duration": args.duration, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "http": http, "engine_alone": alone,
        "http_over_engine": http["output_tokens_per_s"] / alone["output_tokens_per_s"]})


if __name__ == "__main__":
    main()
