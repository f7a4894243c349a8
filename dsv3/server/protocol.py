"""The OpenAI wire format: request schemas (pydantic), error bodies, usage with cost, and the response objects.

Notable features:
- Requests are validated strictly (no "10" for 10, no true for 1) against OpenAI's ranges, and a failure becomes an
  `APIError` whose `param` is the field's path (`messages[0].content`, `tools[1].function.name`) and whose message
  starts with it. Unknown fields are ignored: clients send fields newer than this server.
- Sampling extensions under vLLM's names: top_k, min_p, repetition_penalty, ignore_eos.
- Responses and stream chunks are plain dicts built by small functions: the streaming path makes one per token, where
  pydantic models would cost more than the rest of the work. The tests read them back with the openai client's own
  types.
- `usage` carries the cost of the response at the configured prices (`Prices`, USD per million tokens; the defaults
  are DeepSeek-V3's published $0.27 input / $1.10 output).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # as in the OpenAI API
MAX_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


# ---- errors ------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers  # HTTP headers of the reply, e.g. Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_PATH_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*): ")
_SUBPATH_PREFIX = re.compile(r"^((?:\[\d+\]|\.[A-Za-z_]\w*)+): ")


def invalid(message: str, param: str | None = None) -> APIError:
    """A 400 for a ValueError whose message starts with the field's path ("tools[0].type: ..."), as
    dsv3.chat_format and the engine write them; the path becomes `param`."""
    if param is None and (m := _PATH_PREFIX.match(message)):
        param = m.group(1)
    return APIError(400, message, param)


def parse(schema: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _path(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if param and (m := _SUBPATH_PREFIX.match(msg)):  # a validator that names a part of its field
            param, msg = param + m.group(1), msg[m.end():]
        if err["type"].endswith("_type"):  # a wrong type: show what came
            msg += f", got {json.dumps(err['input'])[:80]}"
        raise APIError(400, f"{param}: {msg}" if param else msg, param) from None


# ---- requests ----------------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by chat and text completions. None means "the default", as some clients send null."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: Any = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        stops = [v] if isinstance(v, str) else v
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stops)):
            raise ValueError(f"expected a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
        return tuple(stops)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # checked with the tools by dsv3.chat_format
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict]) -> list[dict]:
        out = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"[{i}].role: expected one of {', '.join(ROLES)}, got {json.dumps(role)}")
            # "developer" is OpenAI's newer name for the system role
            out.append({**m, "role": "system"} if role == "developer" else m)
        return out

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict | None) -> None:
        if v is not None and v.get("type") != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported, got {json.dumps(v)[:80]}")
        return None


class CompletionRequest(_Request):
    prompt: Any
    max_tokens: int | None = Field(None, ge=0)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of lists of token ids -> a list of prompts."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

        if isinstance(v, str):
            return [v]
        if ids(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return v
        if isinstance(v, list) and v and all(ids(p) for p in v):
            return v
        raise ValueError("expected a string, a list of strings, a non-empty list of token ids, or a list of such "
                         "lists")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info) -> None:
        if v is not None and v != (info.data.get("n") or 1):
            raise ValueError("best_of other than n is not supported by this server")
        return None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return None


# ---- usage and cost ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prices:
    """USD per million tokens; the defaults are DeepSeek-V3's published API prices (cache miss)."""

    input_per_million: float = 0.27
    output_per_million: float = 1.10

    def __post_init__(self) -> None:
        for name in ("input_per_million", "output_per_million"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"price {name} must be >= 0, got {getattr(self, name)}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        return (prompt_tokens * self.input_per_million / 1e6, completion_tokens * self.output_per_million / 1e6)


def usage(prompt_tokens: int, completion_tokens: int, prices: Prices) -> dict:
    cin, cout = prices.cost(prompt_tokens, completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "cost": {"currency": "USD", "prompt": cin, "completion": cout, "total": cin + cout}}


# ---- responses ---------------------------------------------------------------------------------------------------
def chat_completion(id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def chat_chunk(id: str, created: int, model: str, choices: list[dict], with_usage: bool,
               usage_: dict | None = None) -> dict:
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:  # OpenAI sends "usage": null on every chunk but the last when include_usage is set
        chunk["usage"] = usage_
    return chunk


def text_completion(id: str, created: int, model: str, choices: list[dict], usage_: dict | None = None,
                    with_usage: bool = True) -> dict:
    """A completions response, or one of its stream chunks (object "text_completion" either way)."""
    out = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = usage_
    return out


def sse(data: dict | str) -> str:
    """One server-sent event; `data: [DONE]` ends an OpenAI stream."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def model_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dsv3",
                                        "max_model_len": max_model_len}]}
