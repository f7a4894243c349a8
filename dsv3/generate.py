"""`dsv3 generate` and `dsv3 chat`: text in, streamed text out, through the inference engine.

Notable features:
- Tokenisation and the chat template live here; the engine sees token ids only. Text streams through
  `StreamDecoder`, so a multi-byte character is printed whole, never as replacement characters.
- `generate` prepends BOS (unless --no-bos) and continues the prompt; `chat` renders the model's own chat template
  over the conversation each turn and keeps the assistant's replies in the history (/reset, /exit).
- `--compile` runs the decode step through torch.compile (fused kernels, then the CUDA graph).
- `--speculative` loads the MTP module and drafts with it (`--speculative-tokens` drafts a step); statistics go to
  stderr at the end of each reply: prompt and generated tokens, time to first token, decode tokens/s, the draft
  acceptance rate and the drafts accepted a step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .chat_format import render_chat
from .checkpoint import load_model
from .engine import Engine, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


def _add_common(p, max_tokens: int) -> None:
    p.add_argument("--model", required=True, help="an HF-format checkpoint folder with its tokenizer files")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens per reply ({max_tokens})")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (0)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--speculative", action="store_true", help="draft with the model's MTP module")
    p.add_argument("--speculative-tokens", type=int, default=1,
                   help="drafts per step for greedy decoding: past the first, the MTP module reads its own output (1)")
    p.add_argument("--device", default=None, help="cuda or cpu (cuda when available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="weights and cache (bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + reply (the engine's default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (bf16 weights; the first reply waits for the compiler)")


def load(args) -> tuple[Engine, Tokenizer]:
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"checkpoint folder {args.model} does not exist")
    tokenizer = Tokenizer.from_path(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"loading {args.model} on {device} ({dtype})", file=sys.stderr)
    model = load_model(args.model, device=device, dtype=dtype, mtp=args.speculative)
    engine = Engine(model, max_batch_size=1, max_seq_len=args.max_seq_len, speculative=args.speculative,
                    compile=args.compile, num_speculative_tokens=args.speculative_tokens)
    return engine, tokenizer


def sampling_params(args, tokenizer: Tokenizer, max_tokens: int) -> SamplingParams:
    # The tokenizer's EOS ends a reply too, should the config name another one.
    stop = (tokenizer.eos_id,) if tokenizer.eos_token is not None else ()
    return SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, stop_token_ids=stop)


def stream(engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
           out=None) -> list[int]:
    """Generate for one prompt, printing text (to stdout) as it comes; return the generated ids; print statistics."""
    out = out or sys.stdout
    before = engine.metrics()
    decoder = StreamDecoder(tokenizer, skip_special=True)
    ids: list[int] = []
    start = time.perf_counter()
    first = None
    engine.add_request(prompt_ids, params)
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token_ids and first is None:
                first = time.perf_counter()
            ids += o.new_token_ids
            for t in o.new_token_ids:
                out.write(decoder.feed(t))
            out.flush()
    out.write(decoder.finish() + "\n")
    end = time.perf_counter()
    after = engine.metrics()
    stats = f"[{len(prompt_ids)} prompt + {len(ids)} generated tokens"
    if first is not None:
        stats += f", first token {1e3 * (first - start):.0f} ms"
        if len(ids) > 1 and end > first:
            stats += f", {(len(ids) - 1) / (end - first):.1f} tokens/s"
    drafted = after["spec_drafted"] - before["spec_drafted"]
    if drafted:
        accepted = after["spec_accepted"] - before["spec_accepted"]
        stats += (f", draft acceptance {accepted / drafted:.1%}, "
                  f"{accepted / (after['spec_rounds'] - before['spec_rounds']):.2f} drafts accepted a step")
    print(stats + "]", file=sys.stderr)
    return ids


def run_generate(args) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine, tokenizer = load(args)
    ids = tokenizer.encode(text, add_bos=not args.no_bos and tokenizer.bos_token is not None)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    sys.stdout.write(text)
    stream(engine, tokenizer, ids, sampling_params(args, tokenizer, args.max_tokens))
    return 0


def run_chat(args) -> int:
    engine, tokenizer = load(args)
    if tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no chat template (tokenizer_config.json 'chat_template' or "
                         f"chat_template.jinja)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat: /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                             bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        ids = tokenizer.encode(prompt)
        room = engine.max_seq_len - len(ids)
        if room < 1:
            print(f"[the conversation is {len(ids)} tokens, the limit is {engine.max_seq_len}: /reset]",
                  file=sys.stderr)
            messages.pop()
            continue
        reply = stream(engine, tokenizer, ids, sampling_params(args, tokenizer, min(args.max_tokens, room)))
        messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special=True)})


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _add_common(p, max_tokens=256)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="an interactive chat with the model's chat template")
    _add_common(p, max_tokens=1024)
    p.add_argument("--system", default=None, help="a system prompt")
    p.set_defaults(func=run_chat)
