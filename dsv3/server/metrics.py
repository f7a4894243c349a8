"""Prometheus metrics, written in the text exposition format (version 0.0.4) by hand: counters, gauges, histograms.

Notable features:
- A labelled series appears on first use; `render()` writes HELP and TYPE once per metric, then one line per series
  with label values escaped as the format requires; histograms as cumulative `_bucket{le=...}`, `_sum`, `_count`.
- Not thread-safe on purpose: the server updates and renders them on its event loop only.
- `ServerMetrics` is the server's set: requests by endpoint and status, tokens in and out, cost, finish reasons,
  time to first token, time per output token and request latency, and the engine's own numbers (running and
  waiting requests, cache blocks, preemptions, steps, draft acceptance, tokens routed to each expert of each MoE
  layer and the layer's imbalance), refreshed from an engine snapshot at each scrape.
"""

from __future__ import annotations

import bisect
import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.series: dict[tuple[str, ...], object] = {}

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def _labels(self, key: tuple[str, ...], extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = list(zip(self.labels, key)) + list(extra)
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""

    def value(self, **labels):
        return self.series.get(self._key(labels))

    def lines(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.lines()]


class _Scalar(_Metric):
    def set(self, value: float, **labels) -> None:
        self.series[self._key(labels)] = value

    def _add(self, amount: float, labels: dict) -> None:
        key = self._key(labels)
        self.series[key] = self.series.get(key, 0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{self._labels(k)} {_number(v)}" for k, v in self.series.items()]


class Counter(_Scalar):
    """Goes up only; `set` mirrors a running total that another process keeps (the engine's)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up, got {amount}")
        self._add(amount, labels)


class Gauge(_Scalar):
    kind = "gauge"

    def inc(self, amount: float = 1.0, **labels) -> None:
        self._add(amount, labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must be strictly increasing, got {buckets}")
        self.buckets = tuple(buckets)

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        counts, total = self.series.get(key, ([0] * (len(self.buckets) + 1), 0.0))
        counts[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket with value <= le
        self.series[key] = (counts, total + value)

    def lines(self) -> list[str]:
        out = []
        for key, (counts, total) in self.series.items():
            running = 0
            for le, c in zip((*self.buckets, math.inf), counts):
                running += c
                out.append(f"{self.name}_bucket{self._labels(key, (('le', _number(le)),))} {running}")
            out.append(f"{self.name}_sum{self._labels(key)} {_number(total)}")
            out.append(f"{self.name}_count{self._labels(key)} {running}")
        return out


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric):
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} is already registered")
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "".join(line + "\n" for m in self.metrics for line in m.render())


class ServerMetrics:
    def __init__(self):
        r = self.registry = Registry()
        self.requests = r.add(Counter("dsv3_requests_total", "HTTP requests by endpoint and status code",
                                      ("endpoint", "status")))
        self.in_flight = r.add(Gauge("dsv3_requests_in_flight", "completion requests being served"))
        self.prompt_tokens = r.add(Counter("dsv3_prompt_tokens_total", "prompt tokens of served requests"))
        self.generation_tokens = r.add(Counter("dsv3_generation_tokens_total", "tokens generated for clients"))
        self.finished = r.add(Counter("dsv3_choices_finished_total", "completion choices by finish_reason",
                                      ("reason",)))
        self.cost = r.add(Counter("dsv3_cost_usd_total", "cost of the served tokens at the configured prices",
                                  ("direction",)))
        self.ttft = r.add(Histogram("dsv3_time_to_first_token_seconds",
                                    "from the request's arrival to its first generated token", TTFT_BUCKETS))
        self.tpot = r.add(Histogram("dsv3_time_per_output_token_seconds",
                                    "mean time between the tokens of a choice after its first", TPOT_BUCKETS))
        self.latency = r.add(Histogram("dsv3_request_latency_seconds", "from arrival to the last token",
                                       LATENCY_BUCKETS))
        self.running = r.add(Gauge("dsv3_engine_running_requests", "requests in the engine's running batch"))
        self.waiting = r.add(Gauge("dsv3_engine_waiting_requests", "requests queued in the engine"))
        self.blocks_used = r.add(Gauge("dsv3_cache_blocks_used", "paged latent-cache blocks in use"))
        self.blocks_total = r.add(Gauge("dsv3_cache_blocks_total", "paged latent-cache blocks"))
        self.cache_usage = r.add(Gauge("dsv3_cache_usage_ratio", "fraction of the cache blocks in use"))
        self.preemptions = r.add(Counter("dsv3_engine_preemptions_total", "requests preempted for cache space"))
        self.steps = r.add(Counter("dsv3_engine_steps_total", "engine forward steps"))
        self.drafted = r.add(Counter("dsv3_spec_draft_tokens_total", "MTP draft tokens proposed"))
        self.accepted = r.add(Counter("dsv3_spec_accepted_tokens_total", "MTP draft tokens accepted"))
        self.expert_tokens = r.add(Counter("dsv3_expert_tokens_total", "tokens routed to each routed expert",
                                           ("layer", "expert")))
        self.expert_imbalance = r.add(Gauge("dsv3_expert_load_imbalance",
                                            "max over mean of the tokens routed to the layer's experts (1 = even)",
                                            ("layer",)))

    def update_engine(self, m: dict, moe_layers: tuple[int, ...]) -> None:
        """Copy an engine `metrics()` snapshot into the engine gauges and counters."""
        self.running.set(m["running"])
        self.waiting.set(m["waiting"])
        self.blocks_used.set(m["cache_blocks_used"])
        self.blocks_total.set(m["cache_blocks_total"])
        self.cache_usage.set(m["cache_blocks_used"] / max(m["cache_blocks_total"], 1))
        self.preemptions.set(m["preemptions"])
        self.steps.set(m["steps"])
        self.drafted.set(m["spec_drafted"])
        self.accepted.set(m["spec_accepted"])
        for layer, load in zip(moe_layers, m["expert_load"]):
            for expert, tokens in enumerate(load):
                self.expert_tokens.set(tokens, layer=layer, expert=expert)
            mean = sum(load) / len(load)
            if mean > 0:
                self.expert_imbalance.set(max(load) / mean, layer=layer)

    def render(self) -> str:
        return self.registry.render()
