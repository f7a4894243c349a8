"""The server's text layer and its Prometheus writer: a choice's text, tool calls and token count do not depend on how
the engine's tokens were split into outputs, stop strings cut exactly, and the exposition matches hand counts."""

import random

import pytest

from dsv3.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP
from dsv3.engine import RequestOutput
from dsv3.server.metrics import Counter, Histogram, Registry
from dsv3.server.output import ChoiceText, Delta

TEXT = "Le temps à Paris: 18°C, 天气很好. "
CALL = (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{CALL_END}"
        f"{CALLS_END}")


def run(tok, ids: list[int], cuts: list[int], reason: str, **kw) -> tuple:
    """Feed ids to a ChoiceText as engine outputs ending at the given cut points; return what a client would get."""
    choice = ChoiceText(tok, tool_id_prefix="call_", **kw)
    text, calls, pieces = "", [], []
    bounds = [0, *cuts, len(ids)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        last = k == len(bounds) - 2
        out = RequestOutput("r", ids[a:b], None, None, last, reason if last else None, 3, b)
        d = Delta()
        choice.add(out, float(k), d)
        text += d.text
        pieces.append(d.text)
        for t in d.tool_calls:
            if t.name is not None:
                calls.append([t.name, t.arguments])
            else:
                calls[t.index][1] += t.arguments
        if choice.finished:
            break
    return text, calls, choice.finish_reason, choice.num_tokens, pieces


def splits(n: int, rng: random.Random) -> list[list[int]]:
    return [[], list(range(1, n)), sorted(rng.sample(range(1, n), n // 3)), sorted(rng.sample(range(1, n), 3))]


def test_split_invariance_with_tool_calls(tok):
    ids = tok.encode(TEXT + CALL) + [tok.eos_id]
    rng = random.Random(0)
    results = {tuple(map(str, run(tok, ids, cuts, "stop", tools=True)[:4])) for cuts in splits(len(ids), rng)}
    assert len(results) == 1
    text, calls, reason, n, _ = run(tok, ids, [], "stop", tools=True)
    assert text == TEXT and calls == [["get_weather", '{"city": "Paris"}']]
    assert reason == "tool_calls" and n == len(ids)  # the EOS is counted, not shown


def test_stop_strings_cut_exactly_and_never_leak(tok):
    ids = tok.encode(TEXT) + [tok.eos_id]
    rng = random.Random(1)
    for stop in ("°C", "天气", "Paris: 18", "s à"):
        for cuts in splits(len(ids), rng):
            text, _, reason, n, pieces = run(tok, ids, cuts, "stop", stop=(stop, "never there"))
            assert text == TEXT[:TEXT.index(stop)] and reason == "stop"
            shown = ""
            for p in pieces:  # what was shown so far is always a prefix of the cut text
                shown += p
                assert TEXT.startswith(shown) and stop not in shown
            # tokens up to the one that completed the stop string are counted
            assert n == next(k for k in range(1, len(ids)) if stop in tok.decode(ids[:k]))


def test_length_finish_shows_everything(tok):
    ids = tok.encode(TEXT)
    text, _, reason, n, _ = run(tok, ids, [2, 5], "length", stop=("zzz",))
    assert (text, reason, n) == (TEXT, "length", len(ids))


def test_prometheus_exposition():
    reg = Registry()
    h = reg.add(Histogram("lat_seconds", "latency", (1.0, 2.0, 5.0)))
    c = reg.add(Counter("req_total", "requests", ("path",)))
    for v in (0.5, 1.0, 1.5, 7.0):
        h.observe(v)
    c.inc(path='a"b\\c\nd')
    c.inc(2, path="x")
    assert reg.render().splitlines() == [
        "# HELP lat_seconds latency", "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{le="1"} 2', 'lat_seconds_bucket{le="2"} 3', 'lat_seconds_bucket{le="5"} 3',
        'lat_seconds_bucket{le="+Inf"} 4', "lat_seconds_sum 10", "lat_seconds_count 4",
        "# HELP req_total requests", "# TYPE req_total counter",
        'req_total{path="a\\"b\\\\c\\nd"} 1', 'req_total{path="x"} 2']
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, path="x")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add(Counter("req_total", "again"))
