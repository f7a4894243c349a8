"""Request handlers of the OpenAI API: a decoded JSON body in, a response dict or a server-sent-event stream out.

Notable features:
- Chat prompts are the model's own chat template (tokenizer_config.json) rendered over the messages with the tools
  block (dsv3.chat_format), encoded without adding BOS (the template writes it). Text prompts of /v1/completions get
  the tokenizer's BOS, as HF tokenizers add it; token-id prompts are taken as they are.
- max_tokens defaults to what the context has left (chat) or 16 (completions, as OpenAI); a prompt plus max_tokens
  over the context is a 400 worded as vLLM words it.
- The n choices (times the prompts, for completions) go to the engine as one group with seeds seed, seed+1, ...;
  their streams are merged into one, each chunk carrying its choice's index. With echo and logprobs the prompt's own
  tokens are scored too; max_tokens 0 scores the prompt alone, which is how evaluation harnesses rank answers.
- Streams are OpenAI's: for chat a role chunk first, then content or tool-call deltas, a chunk with the
  finish_reason per choice, the usage chunk when stream_options.include_usage is set, and `data: [DONE]`. An engine
  failure mid-stream becomes an `error` event, which the openai client raises.
- Each call's tokens, cost, finish reasons and latencies go to the metrics once, when it ends for any reason.
- Nothing here is model-specific: the tool-call format is chat_format's, the stop token the tokenizer's EOS.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from ..chat_format import ToolCallDelta, build_prompt
from ..engine import SamplingParams
from ..tokenizer import Tokenizer
from .engine_client import EngineClient, EngineError, Generation
from .metrics import ServerMetrics
from .output import ChoiceText, Delta, Scored
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, Prices, chat_chunk, chat_completion,
                       invalid, model_list, parse, sse, text_completion, usage)

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as in the OpenAI API


@dataclass
class Stream:
    """A streaming reply: iterate `chunks` (SSE text); `close()` (idempotent) ends the call if the stream never
    ran to its end, aborting what is left in the engine."""

    chunks: AsyncIterator[str]
    close: Callable[[], None]


def _tool_calls(deltas: list[ToolCallDelta]) -> list[dict]:
    calls: list[dict] = []
    for d in deltas:
        if d.name is not None:
            calls.append({"id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments}})
        else:
            calls[d.index]["function"]["arguments"] += d.arguments
    return calls


class _Call:
    """One API call in flight: its engine requests, a ChoiceText per choice, what they have produced so far."""

    def __init__(self, prefix: str, gen: Generation, choices: list[ChoiceText], prompt_tokens: int, arrival: float,
                 on_close: Callable[[_Call], None]):
        self.id = f"{prefix}-{gen.group_id}"
        self.created = int(time.time())
        self.gen, self.choices, self.prompt_tokens, self.arrival = gen, choices, prompt_tokens, arrival
        self.totals = [Delta() for _ in choices]  # a non-streamed reply's choices
        self._on_close = on_close
        self.closed = False

    def take(self, batch: list, into: list[Delta] | None = None) -> list[tuple[int, Delta]]:
        """Feed a batch of engine outputs to the choices. Their additions go to `into` (one Delta per choice), or
        else to new deltas, returned per choice in arrival order."""
        now = time.perf_counter()
        fresh: dict[int, Delta] = {}
        for index, out in batch:
            choice = self.choices[index]
            was_finished = choice.finished
            choice.add(out, now, into[index] if into is not None else fresh.setdefault(index, Delta()))
            if choice.finished and not was_finished and not out.finished:
                self.gen.abort(index)  # a stop string ended it: the engine need not go on
        return [(i, d) for i, d in fresh.items() if not d.empty]

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.gen.close()
            self._on_close(self)


class Handlers:
    def __init__(self, client: EngineClient, tokenizer: Tokenizer, model_name: str, *, max_n: int, prices: Prices,
                 metrics: ServerMetrics):
        self.client, self.tokenizer, self.model_name = client, tokenizer, model_name
        self.max_n, self.prices, self.metrics = max_n, prices, metrics
        self.created = int(time.time())
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))

    def models(self) -> dict:
        return model_list(self.model_name, self.created, self.client.info.max_seq_len)

    # ---- /v1/chat/completions --------------------------------------------------------------------------------------
    async def chat(self, body, arrival: float) -> dict | Stream:
        req = parse(ChatCompletionRequest, body)
        self._check(req.model, req.n)
        tok = self.tokenizer
        if tok.chat_template is None:
            raise APIError(400, f"the model {self.model_name} has no chat template: use /v1/completions")
        try:
            text = build_prompt(tok.chat_template, req.messages, req.tools, req.tool_choice, bos_token=tok.bos_token,
                                eos_token=tok.eos_token)
        except ValueError as e:
            raise invalid(str(e)) from None
        prompt = tok.encode(text)
        max_tokens = self._max_tokens(len(prompt), req.max_completion_tokens or req.max_tokens, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, logprobs=top)
        tools = bool(req.tools) and req.tool_choice != "none"
        choices = [ChoiceText(tok, stop=req.stop, tools=tools, logprobs=top is not None) for _ in params]
        call = await self._start("chatcmpl", [(prompt, p) for p in params], choices, len(prompt), arrival)
        if req.stream:
            usage_ = req.stream_options is not None and req.stream_options.include_usage
            return Stream(self._chat_stream(call, usage_), call.close)
        await self._run(call)
        out = []
        for i, (choice, total) in enumerate(zip(call.choices, call.totals)):
            message = {"role": "assistant", "content": total.text}
            if total.tool_calls:
                message["tool_calls"] = _tool_calls(total.tool_calls)
                message["content"] = total.text if total.text.strip() else None
            out.append({"index": i, "message": message, "finish_reason": choice.finish_reason,
                        "logprobs": self._chat_logprobs(total.scored) if top is not None else None})
        return chat_completion(call.id, call.created, self.model_name, out, self._usage(call))

    def _chat_stream(self, call: _Call, with_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage_: dict | None = None) -> str:
            return sse(chat_chunk(call.id, call.created, self.model_name, choices, with_usage, usage_))

        def choice(i: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

        def deltas(i: int, d: Delta) -> Iterator[list[dict]]:
            if d.text or d.scored:
                lp = self._chat_logprobs(d.scored) if call.choices[i].logprobs else None
                yield [choice(i, {"content": d.text}, lp)]
            if d.tool_calls:
                yield [choice(i, {"tool_calls": [t.to_openai() for t in d.tool_calls]})]
            if d.finish_reason:
                yield [choice(i, {}, finish_reason=d.finish_reason)]

        opening = "".join(chunk([choice(i, {"role": "assistant", "content": ""})]) for i in range(len(call.choices)))
        return self._sse(call, with_usage, chunk, deltas, opening)

    async def _sse(self, call: _Call, with_usage: bool, chunk, deltas, opening: str = "") -> AsyncIterator[str]:
        """The SSE framing both endpoints share: per engine batch one write of delta chunks, then usage and [DONE]."""
        try:
            if opening:
                yield opening
            async for batch in call.gen.batches():
                # one write per batch: a socket send costs more than the JSON
                events = [chunk(choices) for i, d in call.take(batch) for choices in deltas(i, d)]
                if events:
                    yield "".join(events)
            if with_usage:
                yield chunk([], self._usage(call))
        except EngineError as e:
            yield sse(self._engine_error(e).body())
        finally:
            call.close()
        yield sse("[DONE]")

    def _chat_logprobs(self, scored: list[Scored]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [{**entry(s.token_id, s.logprob.logprob), "top_logprobs": [entry(t, v) for t, v in s.logprob.top]}
                   for s in scored if s.logprob is not None]
        return {"content": content, "refusal": None}

    # ---- /v1/completions -------------------------------------------------------------------------------------------
    async def completions(self, body, arrival: float) -> dict | Stream:
        req = parse(CompletionRequest, body)
        self._check(req.model, req.n)
        prompts = [self._prompt_ids(p, i, len(req.prompt)) for i, p in enumerate(req.prompt)]
        max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
        for p in prompts:
            self._max_tokens(len(p), max_tokens, "prompt")
        scored = req.logprobs is not None
        params = self._params(req, max_tokens, logprobs=req.logprobs,
                              prompt_logprobs=req.logprobs if req.echo and scored else None)
        choices = [ChoiceText(self.tokenizer, stop=req.stop, echo=p if req.echo else None, logprobs=scored)
                   for p in prompts for _ in params]
        call = await self._start("cmpl", [(p, sp) for p in prompts for sp in params], choices,
                                 sum(map(len, prompts)), arrival)
        if req.stream:
            usage_ = req.stream_options is not None and req.stream_options.include_usage
            return Stream(self._completion_stream(call, usage_), call.close)
        await self._run(call)
        out = [{"index": i, "text": total.text, "finish_reason": choice.finish_reason,
                "logprobs": self._completion_logprobs(total.scored) if scored else None}
               for i, (choice, total) in enumerate(zip(call.choices, call.totals))]
        return text_completion(call.id, call.created, self.model_name, out, self._usage(call))

    def _completion_stream(self, call: _Call, with_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage_: dict | None = None) -> str:
            return sse(text_completion(call.id, call.created, self.model_name, choices, usage_, with_usage))

        def deltas(i: int, d: Delta) -> Iterator[list[dict]]:
            if d.text or d.scored:
                lp = self._completion_logprobs(d.scored) if call.choices[i].logprobs else None
                yield [{"index": i, "text": d.text, "logprobs": lp, "finish_reason": None}]
            if d.finish_reason:
                yield [{"index": i, "text": "", "logprobs": None, "finish_reason": d.finish_reason}]

        return self._sse(call, with_usage, chunk, deltas)

    def _completion_logprobs(self, scored: list[Scored]) -> dict:
        t = self.token_text
        return {"tokens": [t(s.token_id) for s in scored],
                "token_logprobs": [s.logprob.logprob if s.logprob else None for s in scored],
                "top_logprobs": [{t(i): v for i, v in s.logprob.top} if s.logprob else None for s in scored],
                "text_offset": [s.offset for s in scored]}

    def _prompt_ids(self, prompt: str | list[int], i: int, count: int) -> list[int]:
        param = f"prompt[{i}]" if count > 1 else "prompt"
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_token is not None)
            if not ids:
                raise APIError(400, f"{param}: the prompt is empty", param)
            return ids
        vocab = self.client.info.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param)
        return prompt

    # ---- shared ----------------------------------------------------------------------------------------------------
    def _check(self, model: str, n: int | None) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           "model", code="model_not_found")
        if n is not None and n > self.max_n:
            raise APIError(400, f"n: at most {self.max_n} choices per request, got {n}", "n")

    def _max_tokens(self, prompt_len: int, requested: int | None, where: str) -> int:
        """max_tokens for a prompt: the request's if the context has room, else a 400; what is left by default."""
        limit = self.client.info.max_seq_len
        completion = max(1, limit - prompt_len) if requested is None else requested
        if prompt_len + completion > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                     f"{prompt_len + completion} tokens ({prompt_len} in the {where}, {completion} in the completion). "
                     f"Please reduce the length of the {where} or completion.",
                where if requested is None or prompt_len >= limit else "max_tokens", code="context_length_exceeded")
        return completion

    def _params(self, req, max_tokens: int, logprobs: int | None,
                prompt_logprobs: int | None = None) -> list[SamplingParams]:
        tok = self.tokenizer
        ignore_eos = bool(req.ignore_eos)
        # The tokenizer's EOS ends a reply too, should the model's config name another one.
        stop_ids = () if ignore_eos or tok.eos_token is None else (tok.eos_id,)

        def value(v, default):
            return default if v is None else v

        try:
            return [SamplingParams(
                max_tokens=max_tokens, temperature=value(req.temperature, 1.0), top_p=value(req.top_p, 1.0),
                top_k=max(value(req.top_k, 0), 0), min_p=value(req.min_p, 0.0),
                presence_penalty=value(req.presence_penalty, 0.0), frequency_penalty=value(req.frequency_penalty, 0.0),
                repetition_penalty=value(req.repetition_penalty, 1.0),
                seed=None if req.seed is None else (req.seed + j) % 2**64, stop_token_ids=stop_ids,
                ignore_eos=ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                for j in range(value(req.n, 1))]
        except ValueError as e:
            raise invalid(str(e)) from None

    async def _start(self, prefix: str, jobs: list, choices: list[ChoiceText], prompt_tokens: int,
                     arrival: float) -> _Call:
        try:
            gen = await self.client.submit(jobs)
        except ValueError as e:  # the engine's own check, e.g. more cache blocks than it has
            raise invalid(str(e)) from None
        except EngineError as e:
            raise self._engine_error(e) from None
        return _Call(prefix, gen, choices, prompt_tokens, arrival, self._record)

    async def _run(self, call: _Call) -> None:
        """Collect a non-streamed call to its end."""
        try:
            async for batch in call.gen.batches():
                call.take(batch, into=call.totals)
        except EngineError as e:
            raise self._engine_error(e) from None
        finally:
            call.close()

    def _usage(self, call: _Call) -> dict:
        return usage(call.prompt_tokens, call.completion_tokens, self.prices)

    @staticmethod
    def _engine_error(e: EngineError) -> APIError:
        # the first line only: a crash's traceback is for the server's log, not for clients
        reason = str(e).splitlines()[0].rstrip(":")
        return APIError(503, f"the engine cannot serve: {reason}", type="server_error", code="engine_unavailable")

    def _record(self, call: _Call) -> None:
        m = self.metrics
        completion = call.completion_tokens
        m.prompt_tokens.inc(call.prompt_tokens)
        m.generation_tokens.inc(completion)
        cin, cout = self.prices.cost(call.prompt_tokens, completion)
        m.cost.inc(cin, direction="input")
        m.cost.inc(cout, direction="output")
        firsts = [c.first_token_time for c in call.choices if c.first_token_time is not None]
        if firsts:
            m.ttft.observe(min(firsts) - call.arrival)
            m.latency.observe(max(c.last_token_time for c in call.choices if c.last_token_time) - call.arrival)
        for c in call.choices:
            m.finished.inc(reason=c.finish_reason or "abort")
            if c.num_tokens > 1:
                m.tpot.observe((c.last_token_time - c.first_token_time) / (c.num_tokens - 1))
