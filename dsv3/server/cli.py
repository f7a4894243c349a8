"""`dsv3 serve`: the OpenAI-compatible server on uvicorn, the engine batching every request in flight.

    dsv3 serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY ...]

Without --model it serves the quickstart's checkpoint (runs/quickstart/model) if there is one, and otherwise says
to run `dsv3 quickstart` first. Ctrl-C or SIGTERM stops taking connections, lets the responses in flight finish
(--drain-timeout), then stops the engine.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch
import uvicorn

from ..checkpoint import load_model
from ..engine import Engine
from ..tokenizer import Tokenizer
from .app import ServerConfig, create_app
from .engine_client import EngineClient
from .protocol import Prices

QUICKSTART_MODEL = Path("runs/quickstart/model")


def resolve_model(model: str | None) -> Path:
    """The checkpoint folder to serve: --model, else the quickstart's, else an error that says what to run."""
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        return path
    if (QUICKSTART_MODEL / "config.json").is_file():
        return QUICKSTART_MODEL
    raise FileNotFoundError(f"no --model given and no quickstart checkpoint at {QUICKSTART_MODEL}: run "
                            f"`dsv3 quickstart` first (it trains a tiny model on the CPU in minutes), or pass "
                            f"--model DIR with an HF-format DeepSeek-V3 checkpoint folder")


def cpu_threads(threads: int | None) -> int:
    """Threads of the engine process on the CPU: all cores but the one the HTTP process needs, unless told.
    (Oversubscribed cores make the engine's CPU kernels many times slower, not a little.)"""
    return threads or max(1, (os.cpu_count() or 1) - 1)


def load_engine(model_dir: str, device: str | None = None, dtype: str | None = None, speculative: bool = False,
                threads: int | None = None, **engine_kw) -> Engine:
    """Build the engine of a checkpoint folder; runs in the engine process (see engine_client.py)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads(threads))
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = load_model(model_dir, device=dev, dtype=dt, mtp=speculative)
    return Engine(model, speculative=speculative, **engine_kw)


def run_serve(args) -> int:
    path = resolve_model(args.model)
    tokenizer = Tokenizer.from_path(path)  # the server's half: text <-> ids and the chat template
    engine_kw = {k: v for k, v in (("max_batch_size", args.max_batch_size), ("max_seq_len", args.max_seq_len),
                                   ("num_speculative_tokens", args.speculative_tokens)) if v}
    make_engine = functools.partial(load_engine, str(path), args.device, args.dtype, args.speculative, args.threads,
                                    **engine_kw)
    config = ServerConfig(model_name=args.served_model_name or str(args.model or path), api_keys=tuple(args.api_key),
                          max_concurrent=args.max_concurrent, max_n=args.max_n,
                          prices=Prices(args.price_input, args.price_output), drain_timeout_s=args.drain_timeout)
    app = create_app(EngineClient(make_engine), tokenizer, config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(f"serving {path} as {config.model_name!r} on http://{args.host}:{args.port}/v1 (loading the engine...)",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=args.drain_timeout)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: nothing left to report
        pass
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, tools, streaming)")
    p.add_argument("--model", default=None, help=f"an HF-format checkpoint folder with its tokenizer files "
                                                 f"(default: {QUICKSTART_MODEL} if it exists)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*; repeat for several keys (default: open)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (the --model path)")
    p.add_argument("--device", default=None, help="cuda or cpu (cuda when available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="weights and cache (bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--max-batch-size", type=int, default=None, help="requests decoded together (the engine's 64)")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + completion (the engine's default)")
    p.add_argument("--speculative", action="store_true", help="draft with the model's MTP module")
    p.add_argument("--speculative-tokens", type=int, default=None,
                   help="drafts per step for greedy requests: past the first, the MTP module reads its own output (1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the engine on the CPU (all cores but one: the HTTP process needs one)")
    p.add_argument("--max-concurrent", type=int, default=512, help="requests in flight before 429 (512)")
    p.add_argument("--max-n", type=int, default=16, help="most choices per request (16)")
    p.add_argument("--price-input", type=float, default=Prices.input_per_million,
                   help=f"USD per million input tokens, for usage.cost and /metrics ({Prices.input_per_million})")
    p.add_argument("--price-output", type=float, default=Prices.output_per_million,
                   help=f"USD per million output tokens ({Prices.output_per_million})")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds that shutdown waits for in-flight requests (60)")
    p.set_defaults(func=run_serve)
