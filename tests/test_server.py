"""The OpenAI-compatible server, end to end: the official openai client against a real uvicorn server on 127.0.0.1
whose engine process serves a tiny DeepSeek-V3 checkpoint with the DeepSeek-V3 tokenizer.

The checkpoint is a real model with scripted weights: attention and MLP outputs are zero, so the last hidden state
is the embedding of the last token, and the embedding/head pairs make greedy decoding follow fixed token chains
(after `<｜Assistant｜>` a greeting, after `<｜tool▁outputs▁end｜>` a DeepSeek-V3 tool call, after ` tick` another
` tick`). After any other token the next-token distribution is uniform. So every text, token count and logprob the
server returns has an exact expected value, computed here from the tokenizer and the construction, while the real
engine (paged cache, batching, sampling) runs every request.
"""

import contextlib
import functools
import http.client
import os
import signal
import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import dsv3
from tests.conftest import TOKENIZER_DIR
from dsv3.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP, build_prompt
from dsv3.model import MoE
from dsv3.server import EngineClient, Prices, ServerConfig, create_app
from dsv3.server.cli import load_engine
from dsv3.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "dsv3-tiny-scripted"
KEY = "sk-test-key"
MARGIN = 30.0  # logit of a chain's next token; every other logit is 0
MAX_SEQ_LEN = 1024
MAX_CONCURRENT = 4
MAX_N = 4
MAX_BODY = 64 << 10
PRICES = Prices(input_per_million=0.5, output_per_million=2.0)
REPLY = "Hello! How can I help you today?"
TICK = "tick tock tick"  # ends in " tick", which greedy decoding repeats forever
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "description": "The time now in a time zone.",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
# user asks, the assistant called get_time, its result came back: the prompt ends in <｜tool▁outputs▁end｜>
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Paris right now?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "12:00"},
]


def scripted_chains(tok: Tokenizer) -> tuple[dict[int, int], list[int]]:
    """token -> the token greedy decoding emits after it; and the tool-call script's ids. A token may lead only one
    way, so the tool call spells its repeated pieces with different tokens ('\\n' then '\\n\\n', '```' then '``'
    '`'): the text is still the DeepSeek-V3 format."""
    enc = tok.encode
    tool_ids = ([tok.token_id(CALLS_BEGIN), tok.token_id(CALL_BEGIN)] + enc("function") + [tok.token_id(TOOL_SEP)]
                + enc("get_weather") + enc("\n") + enc("```json") + enc("\n\n") + enc('{"city": "Paris"}\n')
                + enc("``") + enc("`") + [tok.token_id(CALL_END), tok.token_id(CALLS_END)])
    chains = {}
    for trigger, script in ((tok.token_id("<｜Assistant｜>"), enc(REPLY) + [tok.eos_id]),
                            (tok.token_id("<｜tool▁outputs▁end｜>"), tool_ids + [tok.eos_id]),
                            (enc(" tick")[0], enc(" tick"))):
        for a, b in zip([trigger, *script[:-1]], script):
            assert a not in chains, f"token {a} ({tok.decode([a])!r}) would lead two ways"
            chains[a] = b
    return chains, tool_ids


def scripted_model(cfg: dsv3.ModelConfig, chains: dict[int, int]) -> dsv3.Transformer:
    model = dsv3.build_model(cfg, seed=0)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts.down_proj.zero_()
                layer.mlp.shared_experts.down_proj.weight.zero_()
            else:
                layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        model.norm.weight.fill_(1.0)
        # the final RMSNorm turns the unit vector e_k into e_k / sqrt(1/H + eps): scale the head to undo it
        head = MARGIN * math.sqrt(1 / cfg.hidden_size + cfg.rms_norm_eps)
        for k, (a, b) in enumerate(chains.items()):
            model.embed_tokens.weight[a, k] = 1.0
            model.lm_head.weight[b, k] = head
    return model


@pytest.fixture(scope="module")
def tool_ids(tok):
    return scripted_chains(tok)[1]


@contextlib.contextmanager
def running_server(folder: Path):
    """The server on a free port of 127.0.0.1 in a thread of this process; its engine in a process of its own."""
    make_engine = functools.partial(load_engine, str(folder), "cpu", "float32", threads=1, max_batch_size=8,
                                    max_seq_len=MAX_SEQ_LEN)
    config = ServerConfig(model_name=MODEL, api_keys=(KEY,), max_body_bytes=MAX_BODY, max_concurrent=MAX_CONCURRENT,
                          max_n=MAX_N, prices=PRICES)
    engine = EngineClient(make_engine)
    app = create_app(engine, Tokenizer.from_path(folder), config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "engine": engine}
    finally:
        srv.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    chains, _ = scripted_chains(tok)
    cfg = dsv3.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    folder = tmp_path_factory.mktemp("scripted")
    dsv3.save_model(scripted_model(cfg, chains), folder, tokenizer_dir=TOKENIZER_DIR)
    return folder, cfg


@pytest.fixture(scope="module")
def server(checkpoint):
    folder, cfg = checkpoint
    with running_server(folder) as srv:
        yield {**srv, "cfg": cfg}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


# ---- helpers -------------------------------------------------------------------------------------------------------
def lp_next(vocab: int) -> float:
    """log p of the chain's next token: logit MARGIN against vocab - 1 zeros."""
    return MARGIN - (MARGIN + math.log1p((vocab - 1) * math.exp(-MARGIN)))


def lp_other(vocab: int) -> float:
    return -(MARGIN + math.log1p((vocab - 1) * math.exp(-MARGIN)))


def post(server, path: str, body, key: str | None = KEY, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(server["url"] + path, data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server["url"] + path, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(server) -> dict[tuple, float]:
    """/metrics as {(name, (label pairs...)): value}, checking that every line is valid exposition format."""
    status, text = get(server, "/metrics")
    assert status == 200
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)', line)
        assert m, f"not a valid sample line: {line!r}"
        name, labels, value = m.groups()
        assert re.sub(r"_(bucket|sum|count)$", "", name) in typed or name in typed, f"{name} has no TYPE line"
        pairs = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        out[(name, pairs)] = float(value)
    return out


def metric(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple((k, str(v)) for k, v in labels.items())), 0.0)


def hf_ids(hf_tok, messages) -> list[int]:
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def chat_prompt_len(tok, messages, tools=None, tool_choice=None) -> int:
    return len(tok.encode(build_prompt(tok.chat_template, messages, tools, tool_choice, bos_token=tok.bos_token,
                                       eos_token=tok.eos_token)))


def wait_until(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def engine_idle(server) -> bool:
    m = scrape(server)
    return (metric(m, "dsv3_engine_running_requests") == 0 and metric(m, "dsv3_engine_waiting_requests") == 0
            and metric(m, "dsv3_cache_blocks_used") == 0 and metric(m, "dsv3_requests_in_flight") == 0)


# ---- chat ----------------------------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_SEQ_LEN
    assert get(server, "/health")[0] == 200  # no key needed


def test_chat(server, client, tok, hf_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == REPLY
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    prompt = len(hf_ids(hf_tok, messages))  # the chat template as transformers renders it
    completion = len(tok.encode(REPLY)) + 1  # the EOS is generated (and not shown)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt, completion, prompt + completion)
    cost = r.usage.model_extra["cost"]
    assert cost["prompt"] == pytest.approx(prompt * 0.5e-6) and cost["completion"] == pytest.approx(completion * 2e-6)
    assert cost["total"] == pytest.approx(cost["prompt"] + cost["completion"]) and cost["currency"] == "USD"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What's 2+2? 天气"}],
    [{"role": "system", "content": "A"}, {"role": "user", "content": "B"}, {"role": "assistant", "content": "C"},
     {"role": "user", "content": "D"}],
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
])
def test_chat_template_is_the_tokenizers(server, client, hf_tok, messages):
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=1)
    # developer is OpenAI's name for system; text parts are joined, as transformers does
    expected = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    expected = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
                for m in expected]
    assert r.usage.prompt_tokens == len(hf_ids(hf_tok, expected))


def test_chat_stream(server, client, tok):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == REPLY
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(tok.encode(REPLY)) + 1
    assert chunks[-1].usage.prompt_tokens == chat_prompt_len(tok, [{"role": "user", "content": "Hi"}])


def test_chat_stream_without_usage(server, client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 temperature=0, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY


def test_chat_logprobs(server, client, tok):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    ids = tok.encode(REPLY) + [tok.eos_id]
    assert [c.token for c in content] == [tok.decode([i]) for i in ids]
    v = tok.vocab_size
    for c in content:
        assert c.logprob == pytest.approx(lp_next(v), abs=1e-4)
        assert c.bytes == list(c.token.encode())
        assert [t.token for t in c.top_logprobs][:1] == [c.token] and len(c.top_logprobs) == 2
        assert c.top_logprobs[1].logprob == pytest.approx(lp_other(v), abs=1e-4)


def test_stop_strings(server, client, tok):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0, stop=["can I", "zzz"])
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == "Hello! How " and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(tok.encode("Hello! How can I"))  # up to the token that completed it
    chunks = list(client.chat.completions.create(**kw, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "Hello! How " and not any("can" in p for p in pieces)  # no piece of the stop string
    # a stop string in a text completion; the engine's request is aborted and its cache freed
    c = client.completions.create(model=MODEL, prompt="Hello! How can", max_tokens=20, temperature=0, stop="today")
    assert c.choices[0].text == " I help you " and c.choices[0].finish_reason == "stop"
    assert wait_until(lambda: engine_idle(server))


def test_n_choices_and_seeds(server, client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]  # a seed makes a request repeatable
    assert len(set(texts)) == 3  # ... with different seeds per choice: 4 tokens drawn from a uniform 128K vocabulary
    other = client.completions.create(**{**kw, "seed": 99, "n": 1})
    assert other.choices[0].text not in texts
    assert a.usage.completion_tokens == 12 and a.usage.prompt_tokens == 6  # BOS + 5 tokens, counted once


# ---- tools ---------------------------------------------------------------------------------------------------------
def test_tool_call(server, client, tok):
    r = client.chat.completions.create(model=MODEL, messages=TOOL_TURNS, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.prompt_tokens == chat_prompt_len(tok, TOOL_TURNS, TOOLS)


def test_tool_call_stream(server, client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=TOOL_TURNS, tools=TOOLS, tool_choice="auto",
                                                 temperature=0, stream=True))
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].function.name == "get_weather" and deltas[0].id
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("choice", ["none", "auto", "required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_is_rendered(server, client, tok, tool_ids, choice):
    r = client.chat.completions.create(model=MODEL, messages=TOOL_TURNS, tools=TOOLS, tool_choice=choice,
                                       temperature=0)
    assert r.usage.prompt_tokens == chat_prompt_len(tok, TOOL_TURNS, TOOLS, choice)
    if choice == "none":  # no parsing: the model's text comes back as it is
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == tok.decode(tool_ids)
    else:
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


# ---- completions ---------------------------------------------------------------------------------------------------
def test_completion(server, client, tok):
    r = client.completions.create(model=MODEL, prompt="Hello! How can", max_tokens=20, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == " I help you today?" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 1 + len(tok.encode("Hello! How can"))  # BOS is added to text prompts
    assert r.usage.completion_tokens == len(tok.encode(" I help you today?")) + 1
    chunks = list(client.completions.create(model=MODEL, prompt="Hello! How can", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == " I help you today?"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_length_and_token_prompts(server, client, tok):
    ids = tok.encode(TICK)
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:-1] + tok.encode("Hello")], max_tokens=5,
                                  temperature=0)
    first, second = sorted(r.choices, key=lambda c: c.index)
    assert first.text == " tick" * 5 and first.finish_reason == "length"
    assert second.text == "! How can I help" and second.finish_reason == "length"
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 10


def test_echo_logprobs_score_the_prompt(server, client, tok):
    """How evaluation harnesses score multiple choice: echo + logprobs + max_tokens 0 returns the logprob of every
    prompt token given its prefix; the scripted continuation must win."""
    context, options = "Hello! How can I help you", [" today?", " tomorrow?"]
    r = client.completions.create(model=MODEL, prompt=[context + o for o in options], max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    v = tok.vocab_size
    scores = []
    for choice, option in zip(sorted(r.choices, key=lambda c: c.index), options):
        text = context + option
        assert choice.text == text and choice.finish_reason == "length"
        ids = [tok.bos_id] + tok.encode(text)
        lp = choice.logprobs
        assert lp.tokens == [tok.decode([i]) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        chains = scripted_chains(tok)[0]
        for j in range(1, len(ids)):
            prev = ids[j - 1]
            want = (-math.log(v) if prev not in chains else lp_next(v) if chains[prev] == ids[j] else lp_other(v))
            assert lp.token_logprobs[j] == pytest.approx(want, abs=1e-4), (j, lp.tokens[j])
        # offsets index the returned text (BOS is a special token: it shows as nothing)
        assert lp.text_offset[:2] == [0, 0]
        for j in range(1, len(ids)):
            end = lp.text_offset[j + 1] if j + 1 < len(ids) else len(text)
            assert text[lp.text_offset[j]:end] == lp.tokens[j]
        n_context = 1 + len(tok.encode(context))
        scores.append(sum(lp.token_logprobs[n_context:]))
    assert scores[0] > scores[1]
    assert r.usage.completion_tokens == 0


def test_echo_stream_with_generation(server, client, tok):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello! How", max_tokens=3, echo=True, logprobs=0,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello! How can I help"
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    ids = [tok.bos_id] + tok.encode("Hello! How can I help")
    assert tokens == [tok.decode([i]) for i in ids]


# ---- batching, disconnects, limits ---------------------------------------------------------------------------------
def test_concurrent_requests_are_batched(server, client, tok):
    before = scrape(server)

    def one(i: int) -> str:
        if i % 2:
            return client.completions.create(model=MODEL, prompt=TICK, max_tokens=30, temperature=0).choices[0].text
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
        texts = list(pool.map(one, range(MAX_CONCURRENT)))
    assert texts == [REPLY if i % 2 == 0 else " tick" * 30 for i in range(MAX_CONCURRENT)]
    after = scrape(server)
    tokens = metric(after, "dsv3_generation_tokens_total") - metric(before, "dsv3_generation_tokens_total")
    steps = metric(after, "dsv3_engine_steps_total") - metric(before, "dsv3_engine_steps_total")
    assert tokens == 2 * 30 + 2 * (len(tok.encode(REPLY)) + 1)
    assert steps < 0.75 * tokens  # one step decodes several requests


def test_stream_disconnect_aborts(server, client):
    before = scrape(server)
    stream = client.completions.create(model=MODEL, prompt=TICK, max_tokens=900, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text for _ in range(3)]
    assert all(p and p == " tick" * (len(p) // 5) for p in pieces)  # a greedy burst streams its tokens together
    stream.close()
    assert wait_until(lambda: engine_idle(server)), "the engine kept the request after its client left"
    after = scrape(server)
    assert metric(after, "dsv3_choices_finished_total", reason="abort") == metric(
        before, "dsv3_choices_finished_total", reason="abort") + 1
    assert metric(after, "dsv3_generation_tokens_total") - metric(before, "dsv3_generation_tokens_total") < 900


def test_non_streamed_disconnect_aborts(server):
    before = scrape(server)
    host, port = server["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
    body = json.dumps({"model": MODEL, "prompt": TICK, "max_tokens": 900, "temperature": 0})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    assert wait_until(lambda: engine_idle(server)), "the engine kept the request after its client left"
    after = scrape(server)
    assert metric(after, "dsv3_choices_finished_total", reason="abort") == metric(
        before, "dsv3_choices_finished_total", reason="abort") + 1
    assert metric(after, "dsv3_requests_total", endpoint="/v1/completions", status=499) == metric(
        before, "dsv3_requests_total", endpoint="/v1/completions", status=499) + 1


def test_concurrency_limit(server, client):
    streams = [client.completions.create(model=MODEL, prompt=TICK, max_tokens=900, temperature=0, stream=True)
               for _ in range(MAX_CONCURRENT)]
    try:
        for s in streams:
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for s in streams:
            s.close()
    assert wait_until(lambda: engine_idle(server))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert r.choices[0].message.content == REPLY


# ---- errors --------------------------------------------------------------------------------------------------------
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
CMPL = {"model": MODEL, "prompt": "Hi"}
BAD_TOOL = [{"type": "function", "function": {"name": "no spaces allowed"}}]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "Hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "n": MAX_N + 1}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "tools": BAD_TOOL}, 400, "tools[0].function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     400, "tool_choice.function.name"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/completions", {**CMPL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**CMPL, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {**CMPL, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {**CMPL, "max_tokens": 2000}, 400, "max_tokens"),
    ("/v1/completions", {**CMPL, "suffix": "x"}, 400, "suffix"),
])
def test_invalid_requests(server, path, body, status, param):
    code, reply = post(server, path, body)
    assert code == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]
    if param and err["code"] != "context_length_exceeded":  # that one is worded as vLLM words it
        assert err["message"].startswith(param) if status == 400 else param in err["message"]


def test_over_length_message(server, tok):
    code, reply = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2000})
    n = chat_prompt_len(tok, CHAT["messages"])
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert reply["error"]["message"] == (
        f"This model's maximum context length is {MAX_SEQ_LEN} tokens. However, you requested {n + 2000} tokens "
        f"({n} in the messages, 2000 in the completion). Please reduce the length of the messages or completion.")


def test_errors_through_the_openai_client(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-5)
    assert e.value.param == "max_tokens"
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.code == "invalid_api_key"


def test_auth_body_size_and_routes(server):
    assert post(server, "/v1/chat/completions", CHAT, key=None)[0] == 401
    assert post(server, "/v1/chat/completions", CHAT, key="sk-wrong")[0] == 401
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    code, reply = post(server, "/v1/chat/completions", huge)
    assert code == 413 and reply["error"]["code"] == "request_too_large"
    assert post(server, "/v1/embeddings", {"model": MODEL, "input": "x"})[0] == 404
    code, text = get(server, "/v1/chat/completions")
    assert code == 405 and "error" in json.loads(text)


# ---- metrics and the state after all of the above ------------------------------------------------------------------
def test_metrics(server, client, tok):
    before = scrape(server)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)
    after = scrape(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    u = r.usage
    assert delta("dsv3_prompt_tokens_total") == u.prompt_tokens
    assert delta("dsv3_generation_tokens_total") == u.completion_tokens
    assert delta("dsv3_cost_usd_total", direction="input") == pytest.approx(u.prompt_tokens * 0.5e-6)
    assert delta("dsv3_cost_usd_total", direction="output") == pytest.approx(u.completion_tokens * 2e-6)
    assert delta("dsv3_requests_total", endpoint="/v1/chat/completions", status=200) == 1
    assert delta("dsv3_choices_finished_total", reason="stop") == 1
    for h in ("dsv3_time_to_first_token_seconds", "dsv3_time_per_output_token_seconds",
              "dsv3_request_latency_seconds"):
        assert delta(h + "_count") == 1
        assert metric(after, h + "_bucket", le="+Inf") == metric(after, h + "_count")
    # every forwarded token (the prompt and all generated tokens but the last) is routed to top-k experts per layer
    cfg = server["cfg"]
    forwarded = u.prompt_tokens + u.completion_tokens - 1
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for layer in moe_layers:
        routed = sum(delta("dsv3_expert_tokens_total", layer=layer, expert=e) for e in range(cfg.n_routed_experts))
        assert routed == forwarded * cfg.num_experts_per_tok
        assert metric(after, "dsv3_expert_load_imbalance", layer=layer) >= 1
    assert metric(after, "dsv3_cache_blocks_total") > 0 and metric(after, "dsv3_cache_usage_ratio") == 0


def test_still_serving_after_everything(server, client):
    assert get(server, "/health") == (200, json.dumps({"status": "ok", "model": MODEL}, separators=(",", ":")))
    assert engine_idle(server)
    m = scrape(server)
    for status in (400, 401, 404, 405, 413, 429):
        assert sum(v for (name, labels), v in m.items()
                   if name == "dsv3_requests_total" and ("status", str(status)) in labels) >= 1, status
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert r.choices[0].message.content == REPLY


def test_engine_crash_fails_requests_cleanly(checkpoint):
    """A separate server whose engine process is killed mid-stream: the stream ends in an error event, new requests
    get 503, /health says why."""
    with running_server(checkpoint[0]) as srv:
        c = openai.OpenAI(base_url=srv["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = iter(c.completions.create(model=MODEL, prompt=TICK, max_tokens=900, temperature=0, stream=True))
        assert next(stream).choices[0].text == " tick"
        os.kill(srv["engine"].pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="the engine cannot serve"):
            list(stream)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 503 and e.value.code == "engine_unavailable"
        code, text = get(srv, "/health")
        assert code == 503 and "exit code -9" in json.loads(text)["reason"]
