"""Chat prompts and tool calls in the DeepSeek-V3 format: messages -> prompt text, model text -> content + tool calls.

Notable features:
- `render_chat` renders a HF Jinja chat template the way transformers' `apply_chat_template(tokenize=False)` does:
  the same sandboxed Jinja settings and helpers (`raise_exception`, a `tojson` that does not HTML-escape,
  `strftime_now`, loop controls, the `{% generation %}` tag). One deliberate difference: keys whose value is None are
  kept, because the DeepSeek-V3 template tells tool-call turns apart by `content is none` (transformers 5 drops
  None-valued keys, and then fails on that template).
- The official template never shows the model the tool definitions. `build_prompt` adds a system block written by
  `tools_system_prompt`: each function's JSON schema, the exact tool-call token format, and what `tool_choice`
  ("none", "auto", "required", or one named function) asks for. Tool schemas are validated, errors name the field.
- `ToolCallStreamParser` splits streamed model text into content deltas and OpenAI-style tool-call deltas. It holds
  back text only while it could still be the start of a tool-call token (or the closing fence of the arguments), and
  it tolerates what the template itself renders: a missing `<｜tool▁calls▁begin｜>` or `<｜tool▁calls▁end｜>`, or a
  call cut off by EOS. `parse_tool_calls` is the same parser fed the whole text, so both always agree.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP)
TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")


# ---- rendering ---------------------------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would corrupt prompts
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _make_env()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e} (line {e.lineno})") from e


def _plain(value: Any, where: str) -> Any:
    """A deep copy made of JSON types only: templates are untrusted code and must not reach live objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where}: expected JSON data (dict, list, str, number, bool, None), got {type(value).__name__}")


def render_chat(template: str, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, bos_token: str | None = None, eos_token: str | None = None,
                **kw: Any) -> str:
    """Render `messages` with a HF chat template. Extra keyword arguments become template variables."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}]: expected an object with a 'role', got {type(m).__name__}")
    # transformers passes the tokenizer's special tokens that are set; unset ones stay undefined in the template
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    variables = {"documents": None, **special, **kw}
    try:
        return _compile(template).render(
            messages=_plain(messages, "messages"), tools=_plain(tools, "tools"),
            add_generation_prompt=add_generation_prompt, **_plain(variables, "template variables"))
    except jinja2.TemplateError as e:  # raise_exception(...) or a message the template cannot handle
        raise ValueError(f"chat template: {e}") from e


# ---- tools in the prompt ------------------------------------------------------------------------------------------
def validate_tools(tools: Any) -> list[dict]:
    """Check OpenAI-style tool definitions; the error names the offending field."""
    if not isinstance(tools, list):
        raise ValueError(f"tools: expected a list of tools, got {type(tools).__name__}")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            raise ValueError(f"{where}.type: expected 'function', got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ValueError(f"{where}.function: expected an object with a 'name', got {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise ValueError(f"{where}.function.name: {name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        if name in seen:
            raise ValueError(f"{where}.function.name: {name!r} is already defined by tools[{seen[name]}]")
        seen[name] = i
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError(f"{where}.function.description: expected a string, "
                             f"got {type(fn['description']).__name__}")
        if "parameters" in fn:
            params = fn["parameters"]
            if not isinstance(params, Mapping):
                raise ValueError(f"{where}.function.parameters: expected a JSON schema object, "
                                 f"got {type(params).__name__}")
            if params.get("type", "object") != "object":
                raise ValueError(f"{where}.function.parameters.type: expected 'object', got {params['type']!r}")
            if "properties" in params and not isinstance(params["properties"], Mapping):
                raise ValueError(f"{where}.function.parameters.properties: expected an object, "
                                 f"got {type(params['properties']).__name__}")
    return tools


def _forced_function(tool_choice: Any, tools: list[dict]) -> str | None:
    """Validate tool_choice; return the function name it forces, if any."""
    if tool_choice is None or tool_choice in TOOL_CHOICES:
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice: 'required' needs at least one tool in tools")
        return None
    if not (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), Mapping)):
        raise ValueError(f"tool_choice: expected 'none', 'auto', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
    name = tool_choice["function"].get("name")
    if name not in {t["function"]["name"] for t in tools}:
        raise ValueError(f"tool_choice.function.name: {name!r} is not one of the functions in tools")
    return name


def tools_system_prompt(tools: list[dict], tool_choice: Any = None) -> str:
    """The system-prompt block that shows the model its functions and how to call them. `tool_choice` defaults to
    "auto". With no tools it is the empty string (and "required" or a named function is an error)."""
    validate_tools(tools)
    forced = _forced_function(tool_choice, tools)
    if not tools:
        return ""
    lines = ["## Tools", "", "You have access to the following functions.", ""]
    for tool in tools:
        fn = tool["function"]
        lines.append(f"### {fn['name']}")
        if fn.get("description"):
            lines.append(fn["description"])
        schema = fn.get("parameters", {"type": "object", "properties": {}})
        lines += [f"Parameters (JSON schema): {json.dumps(schema, ensure_ascii=False)}", ""]
    if tool_choice == "none":
        lines.append("Do not call any function in this reply: answer the user with text only.")
        return "\n".join(lines)
    example = f"{CALL_BEGIN}function{TOOL_SEP}FUNCTION_NAME\n```json\nARGUMENTS\n```{CALL_END}"
    lines += [
        "## How to call functions",
        "",
        "To call functions, write the calls in exactly this format, with one block per call, and nothing after "
        "the last one:",
        f"{CALLS_BEGIN}{example}\n{example}{CALLS_END}",
        "ARGUMENTS is one JSON object that follows the function's parameter schema. The results will be given "
        "to you in the next turn.",
        "",
    ]
    if forced is not None:
        lines.append(f"In this reply you must call the function {forced}, and no other function.")
    elif tool_choice == "required":
        lines.append("In this reply you must call one or more of the functions.")
    else:
        lines.append("Call functions only when they help you answer; otherwise answer the user with text.")
    return "\n".join(lines)


def _normalize_message(message: Mapping, where: str) -> dict:
    """OpenAI request shapes -> what HF templates expect: text parts joined into one string, tool-call arguments
    as a JSON string, and the content of a tool-call turn None (templates test `content is none`)."""
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ValueError(f"{where}: expected an object with a string 'role'")
    m = dict(message)
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                 f"are supported")
            texts.append(part["text"])
        m["content"] = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"{where}.content: expected a string, a list of text parts or null")
    if m.get("tool_calls"):
        if not isinstance(m["tool_calls"], list):
            raise ValueError(f"{where}.tool_calls: expected a list of tool calls")
        # a turn with both text and calls keeps both; the template decides what it shows (DeepSeek-V3's: the text)
        if not m.get("content"):
            m["content"] = None
        calls = []
        for j, call in enumerate(m["tool_calls"]):
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ValueError(f"{where}.tool_calls[{j}].function: expected an object with a string 'name'")
            args = fn.get("arguments", "{}")
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            calls.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
        m["tool_calls"] = calls
    elif "content" not in m:
        raise ValueError(f"{where}.content: missing")
    return m


def build_prompt(template: str, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
                 add_generation_prompt: bool = True, bos_token: str | None = None, eos_token: str | None = None,
                 **kw: Any) -> str:
    """The prompt text for an OpenAI-style chat request. The tools block is merged into the leading system message
    with a blank line, the way the DeepSeek-V3 template joins system messages, or becomes the system message.
    Meant for templates that do not render `tools` themselves (DeepSeek-V3's does not)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of messages")
    msgs = [_normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    block = tools_system_prompt(tools or [], tool_choice)
    if block:
        if msgs[0]["role"] == "system" and isinstance(msgs[0].get("content"), str):
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + block}
        else:
            msgs.insert(0, {"role": "system", "content": block})
    return render_chat(template, msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                       eos_token=eos_token, **kw)


# ---- tool calls in the model's output -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of tool call `index`: the first has id and name (arguments ""), later ones add arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict:
        """The `choices[].delta.tool_calls[]` entry of an OpenAI streaming chunk."""
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _held_prefix_len(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a tool token (it may still become one)."""
    start = text.rfind("<", max(0, len(text) - max(map(len, TOOL_TOKENS)) + 1))
    while start != -1:
        tail = text[start:]
        if any(tok.startswith(tail) for tok in TOOL_TOKENS):
            return len(text) - start
        start = text.find("<", start + 1)
    return 0


def _arguments(body: str, final: bool) -> str:
    """The arguments inside a call body '\\n```json\\n{...}\\n```'. With final=False the body may still grow, and
    the result is the part that is certain: it stops before any trailing whitespace/backticks (which may be the
    closing fence), and is empty while the opening fence is still ambiguous."""
    s = body.lstrip()
    if not final and len(s) < len("```json") and "```json".startswith(s):
        return ""
    if s.startswith("```"):
        s = s[3:]
        if s.startswith("json"):
            s = s[4:]
    s = s.strip() if final else s.lstrip()
    if final:
        return s[:-3].rstrip() if s.endswith("```") else s
    end = len(s)
    while end and (s[end - 1].isspace() or s[end - 1] == "`"):  # the same whitespace that str.strip() removes
        end -= 1
    return s[:end]


class ToolCallStreamParser:
    """Feed model text deltas, get `ContentDelta` / `ToolCallDelta` events; call `finish()` at the end of output.

    Grammar (tokens are the DeepSeek-V3 tool tokens, matched as text; `\\n` is a newline):
      text <｜tool▁calls▁begin｜>
        { <｜tool▁call▁begin｜> TYPE <｜tool▁sep｜> NAME \\n ```json\\n ARGS \\n``` <｜tool▁call▁end｜> }
      <｜tool▁calls▁end｜> text
    Whitespace between calls is dropped; other text there is content. Stray tool tokens are dropped, never shown.
    """

    def __init__(self, id_prefix: str | None = None):
        self.id_prefix = id_prefix
        self.state = "text"  # text | section | head | name | args
        self.pending = ""  # received text not yet consumed (a possible token prefix)
        self.gap = ""  # whitespace seen between calls: dropped if a call follows, content otherwise
        self.buf = ""  # name or argument text of the current call
        self.sent = ""  # arguments of the current call already emitted
        self.n_calls = 0
        self.events: list[ContentDelta | ToolCallDelta] = []

    def feed(self, text: str) -> list[ContentDelta | ToolCallDelta]:
        self.pending += text
        while True:
            hits = [(i, tok) for tok in TOOL_TOKENS if (i := self.pending.find(tok)) != -1]
            if not hits:
                break
            i, tok = min(hits)
            self._text(self.pending[:i])
            self.pending = self.pending[i + len(tok):]
            self._token(tok)
        cut = len(self.pending) - _held_prefix_len(self.pending)
        self._text(self.pending[:cut])
        self.pending = self.pending[cut:]
        return self._take()

    def finish(self) -> list[ContentDelta | ToolCallDelta]:
        """End of output: a held token prefix was plain text after all; an unterminated call is closed."""
        self._text(self.pending)
        self.pending = ""
        self._close_call()
        self.gap = ""
        return self._take()

    def _take(self) -> list[ContentDelta | ToolCallDelta]:
        events, self.events = self.events, []
        return events

    def _content(self, text: str) -> None:
        if text:
            self.events.append(ContentDelta(text))

    def _text(self, text: str) -> None:
        if not text:
            return
        if self.state == "section":
            if not (self.gap + text).strip():
                self.gap += text
                return
            self.state, text, self.gap = "text", self.gap + text, ""
        if self.state == "text":
            self._content(text)
        elif self.state == "head":
            pass  # the call type: DeepSeek-V3 only has "function"
        elif self.state == "name":
            self.buf += text
            name = self.buf.lstrip()
            if "\n" in name:  # the name line is complete: announce the call, the rest is the argument body
                name, body = name.split("\n", 1)
                self._start_call(name.strip())
                self._text(body)
        else:  # args
            self.buf += text
            new = _arguments(self.buf, final=False)
            self._send_arguments(new)

    def _start_call(self, name: str) -> None:
        call_id = f"{self.id_prefix}{self.n_calls}" if self.id_prefix is not None else f"call_{secrets.token_hex(12)}"
        self.events.append(ToolCallDelta(self.n_calls, "", id=call_id, name=name))
        self.state, self.buf, self.sent = "args", "", ""

    def _send_arguments(self, args: str) -> None:
        if len(args) > len(self.sent):
            self.events.append(ToolCallDelta(self.n_calls, args[len(self.sent):]))
            self.sent = args

    def _close_call(self) -> None:
        if self.state == "name" and self.buf.strip():  # cut off before the arguments: a call without arguments
            self._start_call(self.buf.strip())
        if self.state == "args":
            self._send_arguments(_arguments(self.buf, final=True))
            self.n_calls += 1
        if self.state in ("head", "name", "args"):
            self.state, self.buf = "section", ""

    def _token(self, tok: str) -> None:
        if tok == CALL_BEGIN:
            self._close_call()
            self.state, self.gap = "head", ""
        elif tok == CALL_END:
            self._close_call()
        elif tok == CALLS_END:
            self._close_call()
            self.state, self.gap = "text", ""
        elif tok == CALLS_BEGIN and self.state == "text":
            self.state = "section"
        elif tok == TOOL_SEP and self.state == "head":
            self.state, self.buf = "name", ""


def parse_tool_calls(text: str, id_prefix: str | None = None) -> tuple[str, list[dict]]:
    """Complete model output -> (content, OpenAI tool_calls). Ids are `call_<random>`, or id_prefix + index."""
    parser = ToolCallStreamParser(id_prefix)
    content, calls = [], []
    for event in parser.feed(text) + parser.finish():
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif event.name is not None:
            calls.append({"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}})
        else:
            calls[event.index]["function"]["arguments"] += event.arguments
    return "".join(content), calls
