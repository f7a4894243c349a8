"""dsv3.chat_format: prompts rendered exactly as transformers renders them, tool definitions in the prompt, and the
tool-call parser checked against the template's own rendering and against itself at every streaming split."""

import json
import re

import pytest

from dsv3.chat_format import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP, TOOL_TOKENS, ContentDelta,
                              ToolCallDelta, ToolCallStreamParser, build_prompt, parse_tool_calls, render_chat,
                              tools_system_prompt, validate_tools)
from dsv3.tokenizer import StreamDecoder

EOS = "<｜end▁of▁sentence｜>"


def call(name, args, id="c"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


WEATHER = call("get_weather", {"city": "Paris", "unit": "°C"}, "c1")
TIME = call("get_time", {"tz": "Europe/Paris"}, "c2")
SEARCH = call("search-web", {"q": "DeepSeek <V3> & \"MLA\""}, "c3")
SYS, SYS2 = {"role": "system", "content": "You are terse."}, {"role": "system", "content": "Answer in French."}
USER = {"role": "user", "content": "What's the weather in Paris? 天气"}

CONVERSATIONS = {
    "system+user": [SYS, USER],
    "user only": [USER],
    "two systems": [SYS, USER, SYS2],
    "multi-turn": [SYS, USER, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And now?"}],
    "ends with assistant": [USER, {"role": "assistant", "content": "Sunny."}],
}
# assistant turns whose content is None (tool calls): transformers 5's apply_chat_template drops None-valued keys and
# then fails on this template, so these are compared with its renderer called directly (same Jinja environment)
TOOL_CONVERSATIONS = {
    "one tool call": [SYS, USER, {"role": "assistant", "content": None, "tool_calls": [WEATHER]}],
    "tool result": [USER, {"role": "assistant", "content": None, "tool_calls": [WEATHER]},
                    {"role": "tool", "tool_call_id": "c1", "content": "18°C, sunny"}],
    "consecutive tool results": [
        SYS, USER, {"role": "assistant", "content": None, "tool_calls": [WEATHER, TIME, SEARCH]},
        {"role": "tool", "tool_call_id": "c1", "content": "18°C"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "tool", "tool_call_id": "c3", "content": "[]"}],
    "answer after tools, second round": [
        USER, {"role": "assistant", "content": None, "tool_calls": [WEATHER]},
        {"role": "tool", "tool_call_id": "c1", "content": "18°C"}, {"role": "assistant", "content": "18°C in Paris."},
        {"role": "user", "content": "Time?"}, {"role": "assistant", "content": None, "tool_calls": [TIME]},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"}],
}


def hf_render(hf_tok, messages, add_generation_prompt=True, template=None, **kw):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template or hf_tok.chat_template,
                                        add_generation_prompt=add_generation_prompt, **hf_tok.special_tokens_map, **kw)
    return rendered[0]


def ours(tok, messages, add_generation_prompt=True, **kw):
    return render_chat(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=tok.bos_token, eos_token=tok.eos_token, **kw)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_apply_chat_template(tok, hf_tok, name, gen):
    messages = CONVERSATIONS[name]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours(tok, messages, gen) == expected
    hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert tok.encode(expected) == hf_ids


@pytest.mark.parametrize("name", TOOL_CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_render_tool_turns_match_transformers(tok, hf_tok, name, gen):
    messages = TOOL_CONVERSATIONS[name]
    text = ours(tok, messages, gen)
    assert text == hf_render(hf_tok, messages, gen)
    n_calls = sum(len(m.get("tool_calls", [])) for m in messages)
    assert text.count(CALL_BEGIN) == n_calls
    assert text.count("<｜tool▁output▁begin｜>") == sum(m["role"] == "tool" for m in messages)


def test_template_helpers_match_transformers(hf_tok):
    template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% generation %}[{{ m.role }}] {{ m | tojson }}{% endgeneration %}\n{% endfor %}"
                "{{ tools | tojson(indent=2) }}{{ extra }}{% if add_generation_prompt %}>{% endif %}")
    messages = [{"role": "user", "content": "<b>é & 'x'</b>"}, {"role": "assistant", "content": "ok"}, USER]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    expected = hf_tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                      add_generation_prompt=True, extra="!")
    assert render_chat(template, messages, tools=tools, extra="!") == expected
    assert '"<b>é & \'x\'</b>"' in expected  # not HTML-escaped, not ASCII-escaped


def test_template_errors():
    with pytest.raises(ValueError, match="chat template: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", [USER])
    with pytest.raises(ValueError, match="does not parse"):
        render_chat("{% if %}", [USER])
    with pytest.raises(ValueError, match="expected a non-empty list"):
        render_chat("x", [])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content: expected JSON data"):
        render_chat("x", [{"role": "user", "content": object()}])
    with pytest.raises(ValueError, match="chat template: .*unsafe"):  # the sandbox keeps templates from internals
        render_chat("{{ messages.__class__.__mro__ }}", [USER])


# ---- tools in the prompt -----------------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["°C", "°F"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}},
]


def test_build_prompt_joins_system_prompt_like_the_template(tok, hf_tok):
    block = tools_system_prompt(TOOLS, "auto")
    got = build_prompt(tok.chat_template, [SYS, USER], TOOLS, "auto", bos_token=tok.bos_token,
                       eos_token=tok.eos_token)
    assert got == hf_tok.apply_chat_template([SYS, {"role": "system", "content": block}, USER], tokenize=False,
                                         add_generation_prompt=True)
    got = build_prompt(tok.chat_template, [USER], TOOLS, bos_token=tok.bos_token)
    assert got == hf_tok.apply_chat_template([{"role": "system", "content": block}, USER], tokenize=False,
                                         add_generation_prompt=True)
    # no tools: the plain template rendering
    assert build_prompt(tok.chat_template, [SYS, USER], bos_token=tok.bos_token) == ours(tok, [SYS, USER])


def test_tools_system_prompt_content():
    auto = tools_system_prompt(TOOLS)
    assert auto == tools_system_prompt(TOOLS, "auto")
    assert json.dumps(TOOLS[0]["function"]["parameters"], ensure_ascii=False) in auto
    assert "### get_weather\nCurrent weather for a city." in auto and "### get_time\n" in auto
    # the format shown is the one the template renders for assistant tool calls, and that the parser reads
    shown = auto[auto.index(CALLS_BEGIN):auto.index(CALLS_END) + len(CALLS_END)]
    assert shown.count(CALL_BEGIN) == 2
    assert "only when they help" in auto
    assert "must call one or more" in tools_system_prompt(TOOLS, "required")
    forced = tools_system_prompt(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert "must call the function get_time, and no other" in forced
    none = tools_system_prompt(TOOLS, "none")
    assert "Do not call any function" in none and not any(t in none for t in TOOL_TOKENS)
    assert tools_system_prompt([], "auto") == tools_system_prompt([], "none") == ""


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, r"^tools: expected a list"),
    ([TOOLS[0], "get_time"], r"^tools\[1\]: expected an object"),
    ([{"type": "retrieval", "function": {"name": "f"}}], r"^tools\[0\]\.type: expected 'function'"),
    ([{"type": "function"}], r"^tools\[0\]\.function: expected an object"),
    ([TOOLS[0], {"type": "function", "function": {"name": "get time"}}], r"^tools\[1\]\.function\.name: 'get time'"),
    ([{"type": "function", "function": {"name": "x" * 65}}], r"^tools\[0\]\.function\.name: 'x{65}' must be 1-64"),
    ([{"type": "function", "function": {"name": ""}}], r"^tools\[0\]\.function\.name: ''"),
    ([TOOLS[1], TOOLS[1]], r"^tools\[1\]\.function\.name: 'get_time' is already defined by tools\[0\]"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], r"^tools\[0\]\.function\.description"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], r"^tools\[0\]\.function\.parameters:"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     r"^tools\[0\]\.function\.parameters\.type: expected 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}],
     r"^tools\[0\]\.function\.parameters\.properties"),
])
def test_validate_tools_names_the_field(tools, message):
    with pytest.raises(ValueError, match=message):
        validate_tools(tools)


@pytest.mark.parametrize("choice, message", [
    ("sometimes", r"^tool_choice: expected 'none', 'auto', 'required'"),
    ({"type": "function", "function": {"name": "fly"}}, r"^tool_choice\.function\.name: 'fly' is not one of"),
    ({"type": "function"}, r"^tool_choice: expected"),
])
def test_bad_tool_choice(choice, message):
    with pytest.raises(ValueError, match=message):
        tools_system_prompt(TOOLS, choice)
    with pytest.raises(ValueError, match="'required' needs at least one tool"):
        tools_system_prompt([], "required")


def test_build_prompt_accepts_openai_request_shapes(tok):
    dict_args = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]}
    parts = {"role": "user", "content": [{"type": "text", "text": "What's the weather "},
                                         {"type": "text", "text": "in Paris? 天气"}]}
    got = build_prompt(tok.chat_template, [SYS, parts, dict_args], bos_token=tok.bos_token, eos_token=tok.eos_token)
    expected = ours(tok, [SYS, USER, {"role": "assistant", "content": None,
                                      "tool_calls": [{**WEATHER, "function": {**WEATHER["function"],
                                                      "arguments": json.dumps({"city": "Paris", "unit": "°C"},
                                                                              ensure_ascii=False)}}]}])
    assert got == expected and CALL_BEGIN in got
    with pytest.raises(ValueError, match=r"messages\[1\]\.content\[0\]: only text parts"):
        build_prompt(tok.chat_template, [SYS, {"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]: expected an object with a string 'role'"):
        build_prompt(tok.chat_template, [{"content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content: missing"):
        build_prompt(tok.chat_template, [{"role": "user"}])


# ---- tool calls in model output ----------------------------------------------------------------------------------
def assemble(events):
    """OpenAI client-side assembly of streamed deltas, checking the protocol on the way."""
    content, calls = "", []
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text
            content += e.text
            continue
        d = e.to_openai()
        if e.name is not None:  # a new call: announced with its id, type, name and empty arguments
            assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["arguments"] == ""
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            assert set(d) == {"index", "function"} and d["index"] == len(calls) - 1 and d["function"]["arguments"]
            calls[-1]["function"]["arguments"] += d["function"]["arguments"]
    return content, calls


def model_output(rendered):
    """What the model generated in the first assistant turn of a rendered chat (EOS is the stop token)."""
    return rendered.split("<｜Assistant｜>", 1)[1].split(EOS, 1)[0]


@pytest.mark.parametrize("calls", [[WEATHER], [WEATHER, TIME], [SEARCH, TIME]])
def test_parser_reads_what_the_template_renders(tok, calls):
    text = model_output(ours(tok, [USER, {"role": "assistant", "content": None, "tool_calls": calls}], False))
    content, parsed = parse_tool_calls(text, id_prefix="call_")
    assert content == ""
    assert parsed == [{"id": f"call_{i}", "type": "function", "function": c["function"]}
                      for i, c in enumerate(calls)]


W_ARGS = WEATHER["function"]["arguments"]
W_BLOCK = f"{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{W_ARGS}\n```{CALL_END}"
T_BLOCK = f"{CALL_BEGIN}function{TOOL_SEP}get_time\n```json\n{TIME['function']['arguments']}\n```{CALL_END}"
# (model output, expected content, expected [(name, arguments)]) written out by hand
SCRIPTED = [
    ("Plain answer with a < sign, <b>tags</b>, <｜other｜> and `code```.",
     "Plain answer with a < sign, <b>tags</b>, <｜other｜> and `code```.", []),
    (f"Let me check.\n\n{CALLS_BEGIN}{W_BLOCK}\n{T_BLOCK}{CALLS_END}",
     "Let me check.\n\n", [("get_weather", W_ARGS), ("get_time", '{"tz": "Europe/Paris"}')]),
    (f"{CALLS_BEGIN}{W_BLOCK}", "", [("get_weather", W_ARGS)]),  # EOS before the closing token
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\": \"Pa",
     "", [("get_weather", '{"city": "Pa')]),  # cut off inside the arguments
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{W_ARGS}\n``",
     "", [("get_weather", W_ARGS + "\n``")]),  # an incomplete fence is not a fence
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_time", "", [("get_time", "")]),
    (f"{CALLS_BEGIN}{CALL_BEGIN}funct", "", []),  # no name yet: nothing to call
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}  get_time \n  {{\"tz\": \"UTC\"}}  {CALL_END} \n{CALLS_END}"
     " Done.", " Done.", [("get_time", '{"tz": "UTC"}')]),  # no fence, loose whitespace, text after the calls
    (f"{W_BLOCK}{CALLS_END}", "", [("get_weather", W_ARGS)]),  # no calls-begin (the template's later turns)
    (f"{CALLS_BEGIN}{W_BLOCK} oops {T_BLOCK}{CALLS_END}", " oops ",
     [("get_weather", W_ARGS), ("get_time", '{"tz": "Europe/Paris"}')]),
    (f"a{CALL_END}b{TOOL_SEP}c{CALLS_END}d", "abcd", []),  # stray tokens are dropped, never shown
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}f\n```json\n{{\"s\": \"x```\"}}```{CALL_END}",
     "", [("f", '{"s": "x```"}')]),
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}f\n```json\n{{\"a\": [1,\n 2]}}\u3000\n```\n{CALL_END}<｜tool",
     "<｜tool", [("f", '{"a": [1,\n 2]}')]),  # a token prefix at the very end is text after all
]


@pytest.mark.parametrize("text, content, calls", SCRIPTED)
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text, content, calls", SCRIPTED)
def test_stream_parser_at_every_split(text, content, calls):
    expected = parse_tool_calls(text, id_prefix="id")
    for cut in range(len(text) + 1):
        parser = ToolCallStreamParser(id_prefix="id")
        events = parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()
        assert assemble(events) == expected, cut
    parser = ToolCallStreamParser(id_prefix="id")
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert assemble(events) == expected
    for e in events:
        if isinstance(e, ContentDelta):
            assert not any(t in e.text for t in TOOL_TOKENS)


def test_stream_parser_holds_only_possible_tokens():
    parser = ToolCallStreamParser()
    assert parser.feed("Hi <") == [ContentDelta("Hi ")]
    assert parser.feed("｜tool") == []
    assert parser.feed("s") == [ContentDelta("<｜tools")]  # no tool token starts with "<｜tools"
    assert parser.feed(CALLS_BEGIN + CALL_BEGIN + "function" + TOOL_SEP + "get_time") == []
    first = parser.feed("\n```json\n{")
    assert first[0].to_openai()["function"] == {"name": "get_time", "arguments": ""}
    assert first[1:] == [ToolCallDelta(0, "{")]
    assert parser.feed('"tz": 1}\n``') == [ToolCallDelta(0, '"tz": 1}')]  # the fence-like tail waits
    assert parser.feed("`" + CALL_END + CALLS_END) == []
    assert parser.finish() == []


def test_stream_from_token_ids(tok):
    # end to end as the server streams: ids -> StreamDecoder -> ToolCallStreamParser
    text = SCRIPTED[1][0]
    decoder, parser = StreamDecoder(tok), ToolCallStreamParser(id_prefix="id")
    ids = tok.encode(text)
    assert tok.token_id(CALL_BEGIN) in ids  # the tool tokens are single ids here
    events = [e for i in ids for e in parser.feed(decoder.feed(i))] + parser.feed(decoder.finish()) + parser.finish()
    assert assemble(events) == parse_tool_calls(text, id_prefix="id")
