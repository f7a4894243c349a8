"""Requests as the engine sees them: sampling parameters, the state of one request, and what a step hands back.

Notable features:
- `SamplingParams` is frozen and validated where it is made: a bad value raises ValueError naming the field.
- temperature 0 means greedy (argmax of the penalised logits); top_k 0, top_p 1 and min_p 0 switch those filters off.
- Logprobs (top-n and prompt) are those of the model's raw distribution, log_softmax of the logits before penalties,
  temperature or filters, as OpenAI reports them.
- A stop token (EOS or one of stop_token_ids) is the last of the request's token ids: it is generated, so it is
  returned, with finish_reason "stop"; the text layers decide whether to print it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # the most top-n alternatives a request may ask for, as in the OpenAI API


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs of each generated token (0 = only the chosen one)
    prompt_logprobs: int | None = None  # logprobs of each prompt token given its prefix (None for the first)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens", "an integer >= 0")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0 (0 is greedy)")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 disables it)")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            need(is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "in [-2, 2]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "a number > 0")
        need(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**64), "seed", "None or in [0, 2**64)")
        need(isinstance(self.stop_token_ids, (tuple, list)) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", "a sequence of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS), name,
                 f"None or an integer in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely tokens, most likely first


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None  # only in the first output of a request
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop token), "length", "abort"
    num_prompt_tokens: int
    num_generated_tokens: int


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str
    prompt_logprobs: list[TokenLogprob | None] | None


@dataclass(eq=False)
class Request:
    """The engine's state of one request; `tokens` is the prompt followed by what has been generated."""

    id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens[:num_computed] have their latents in the cache
    blocks: list[int] = field(default_factory=list)  # cache blocks, in position order
    generator: torch.Generator | None = None
    draft: int | None = None  # speculative: the MTP module's guess of the token after tokens[-1]
    draft_probs: torch.Tensor | None = None  # [V] the distribution the draft was drawn from
    chained: list[int] = field(default_factory=list)  # greedy bursts: further drafts after `draft` (engine.py)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    new_tokens: list[int] = field(default_factory=list)  # generated since the last output
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_first: bool = False
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def outputs(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def decoding(self) -> bool:
        """All but the last token are cached: the next forward feeds one token (plus a draft) and samples."""
        return self.num_computed == len(self.tokens) - 1

    def append(self, token: int, logprob: TokenLogprob | None) -> None:
        """Add a generated token and finish the request if it is a stop token or the last one allowed."""
        self.tokens.append(token)
        self.new_tokens.append(token)
        if logprob is not None:
            self.new_logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.num_generated >= self.params.max_tokens:
            self.finish_reason = "length"

    def take_output(self) -> RequestOutput:
        out = RequestOutput(
            request_id=self.id, new_token_ids=self.new_tokens,
            new_logprobs=self.new_logprobs if self.params.logprobs is not None else None,
            prompt_logprobs=None if self.sent_first else self.prompt_logprobs,
            finished=self.finish_reason is not None, finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt), num_generated_tokens=self.num_generated)
        self.new_tokens, self.new_logprobs, self.sent_first = [], [], True
        return out
