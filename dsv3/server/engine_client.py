"""The server's asyncio client of the inference engine, which runs in a process of its own.

Notable features:
- The engine is single-threaded; one loop in a child process owns it: between two `step()`s it takes the server's
  commands (add a group of requests, abort, report metrics, stop), and after each step it sends every output of
  that step in one message. A process rather than a thread: the engine's Python work and the server's (HTTP,
  detokenizing, JSON) then run on two cores instead of taking turns on one interpreter lock.
- `submit` sends the requests of one API call (n choices x prompts) as a group that the engine admits whole or not
  at all; its `Generation` yields the outputs of the group's requests as they come, several per wake-up when the
  consumer lags. Closing it (normal end, a client that went away, an error) aborts what is unfinished, which frees
  its cache blocks at once.
- `shutdown` drains: new submissions are refused, in-flight groups may finish (up to a deadline), then the engine
  process stops. A dead engine process (crash, OOM kill) fails every in-flight group with `EngineError`.
- The child ignores SIGINT: Ctrl-C reaches the whole process group, and the server decides when the engine stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..engine import Engine, RequestOutput, SamplingParams

START_TIMEOUT_S = 1800  # loading a large checkpoint takes a while
log = logging.getLogger("dsv3.server")


class EngineError(RuntimeError):
    """The engine cannot serve: it failed to start, died, or is shutting down."""


@dataclass(frozen=True)
class EngineInfo:
    max_seq_len: int
    vocab_size: int
    max_batch_size: int
    moe_layers: tuple[int, ...]  # transformer layer index of each entry of metrics()["expert_load"]
    device: str
    dtype: str


def _info(engine: Engine) -> EngineInfo:
    cfg = engine.cfg
    return EngineInfo(engine.max_seq_len, cfg.vocab_size, engine.scheduler.max_batch_size,
                      tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), str(engine.device),
                      str(engine.model.embed_tokens.weight.dtype).removeprefix("torch."))


# ---- the engine process ------------------------------------------------------------------------------------------
def _engine_main(conn, make_engine: Callable[[], Engine]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = make_engine()
        conn.send(("ready", _info(engine)))
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        return
    stopping = False
    try:
        while not stopping or engine.has_unfinished():
            if not engine.has_unfinished():
                conn.poll(None)  # idle: sleep until the server says something
            while conn.poll():
                stopping |= _command(engine, conn, conn.recv())
            if engine.has_unfinished():
                outputs = engine.step()
                if outputs:
                    conn.send(("outputs", outputs))
    except (EOFError, BrokenPipeError):
        return  # the server is gone
    except Exception:
        conn.send(("dead", traceback.format_exc()))


def _command(engine: Engine, conn, msg: tuple) -> bool:
    """Run one command from the server; True for "stop"."""
    kind = msg[0]
    if kind == "add":
        _, group_id, jobs = msg
        added = []
        try:
            for request_id, prompt, params in jobs:
                engine.add_request(prompt, params, request_id)
                added.append(request_id)
        except ValueError as e:
            for request_id in added:  # all of the group or none of it
                engine.abort(request_id)
            conn.send(("rejected", group_id, str(e)))
        else:
            conn.send(("added", group_id))
    elif kind == "abort":
        for request_id in msg[1]:
            engine.abort(request_id)
    elif kind == "metrics":
        conn.send(("metrics", msg[1], engine.metrics()))
    elif kind == "stop":
        return True
    else:
        raise ValueError(f"unknown engine command {kind!r}")
    return False


# ---- the server side ---------------------------------------------------------------------------------------------
class Generation:
    """The engine requests of one API call; iterate `batches()` for (index, output) pairs, then `close()`."""

    def __init__(self, client: EngineClient, group_id: str, n: int):
        self._client = client
        self.group_id = group_id
        self.request_ids = [f"{group_id}-{i}" for i in range(n)]
        self._index = {rid: i for i, rid in enumerate(self.request_ids)}
        self.unfinished = set(self.request_ids)
        self.queue: asyncio.Queue[list[tuple[int, RequestOutput]] | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False

    def _put(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.unfinished.discard(out.request_id)
        self.queue.put_nowait([(self._index[out.request_id], out) for out in outputs])

    async def batches(self):
        """Yield lists of (index, output) until every request has finished: all that has arrived since the last
        list, so a consumer that falls behind catches up in one go."""
        pending = len(self.request_ids)
        while pending:
            items = []
            lists = [await self.queue.get()]
            while not self.queue.empty():
                lists.append(self.queue.get_nowait())
            for item in lists:
                if isinstance(item, BaseException):
                    raise item
                items += item
            pending -= sum(out.finished for _, out in items)
            yield items

    def abort(self, index: int) -> None:
        """Stop one request (its final output, finish_reason "abort", still arrives)."""
        rid = self.request_ids[index]
        if rid in self.unfinished:
            self._client._send(("abort", [rid]))

    def close(self) -> None:
        """Abort what is unfinished and forget the group; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.unfinished and self._client.alive:
            self._client._send(("abort", sorted(self.unfinished)))
        self._client._forget(self)


class EngineClient:
    def __init__(self, make_engine: Callable[[], Engine]):
        """`make_engine` runs in the engine process: a module-level function (or a functools.partial of one), so
        that it pickles."""
        self.make_engine = make_engine
        self.info: EngineInfo | None = None
        self.error: str | None = None  # why the engine cannot serve, once it cannot
        self.closing = False
        self._groups: dict[str, Generation] = {}
        self._routes: dict[str, Generation] = {}
        self._metrics: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._conn = self._process = self._reader = self._loop = self._started = None

    @property
    def alive(self) -> bool:
        return self.info is not None and self.error is None

    @property
    def pid(self) -> int | None:
        """The engine process's id, once started."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> EngineInfo:
        """Start the engine process and wait until its engine is built."""
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_engine_main, args=(child, self.make_engine), name="dsv3-engine",
                                    daemon=True)
        self._process.start()
        child.close()
        self._started = self._loop.create_future()
        self._reader = threading.Thread(target=self._read, name="dsv3-engine-reader", daemon=True)
        self._reader.start()
        try:
            self.info = await asyncio.wait_for(self._started, START_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._process.kill()
            raise EngineError(f"the engine did not start within {START_TIMEOUT_S} s") from None
        return self.info

    async def submit(self, jobs: list[tuple[list[int], SamplingParams]]) -> Generation:
        """Queue the requests of one API call; raises ValueError if the engine refuses them (the engine's own
        message), EngineError if it cannot serve."""
        if self.closing:
            raise EngineError("the server is shutting down")
        if not self.alive:
            raise EngineError(f"the engine is not running: {self.error or 'not started'}")
        gen = Generation(self, uuid.uuid4().hex, len(jobs))
        self._groups[gen.group_id] = gen
        for rid in gen.request_ids:
            self._routes[rid] = gen
        self._send(("add", gen.group_id, [(rid, p, params) for rid, (p, params) in zip(gen.request_ids, jobs)]))
        try:
            await gen.accepted
        except BaseException:
            gen.close()
            raise
        return gen

    async def metrics(self, timeout: float = 10.0) -> dict:
        """The engine's `metrics()` now (it answers between two steps)."""
        if not self.alive:
            raise EngineError(f"the engine is not running: {self.error or 'not started'}")
        token = next(self._tokens)
        fut = self._metrics[token] = self._loop.create_future()
        self._send(("metrics", token))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._metrics.pop(token, None)

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new work, let in-flight groups finish for up to drain_timeout seconds, then stop the engine."""
        self.closing = True
        deadline = time.monotonic() + drain_timeout
        while self._groups and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for gen in list(self._groups.values()):
            gen.close()
        if self._process is None:
            return
        if self.alive:
            self._send(("stop",))
        await self._loop.run_in_executor(None, self._process.join, 30)
        if self._process.is_alive():
            self._process.kill()
            await self._loop.run_in_executor(None, self._process.join)
        self._conn.close()

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        # Runs on the event loop. A send blocks only while the pipe is full, i.e. for at most one engine step.
        try:
            self._conn.send(msg)
        except (OSError, ValueError) as e:
            self._dead(f"the engine process is gone ({e})")

    def _forget(self, gen: Generation) -> None:
        self._groups.pop(gen.group_id, None)
        for rid in gen.request_ids:
            self._routes.pop(rid, None)

    def _read(self) -> None:
        """The reader thread: hand every message of the engine process to the event loop."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if not self._call(self._on_message, msg):
                return
        self._process.join(5)
        self._call(self._dead, f"the engine process exited (exit code {self._process.exitcode})")

    def _call(self, fn, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            if not self._started.done():
                self._started.set_result(msg[1])
        elif kind == "failed":
            self.error = f"the engine failed to start:\n{msg[1]}"
            if not self._started.done():
                self._started.set_exception(EngineError(self.error))
        elif kind == "outputs":
            per_group: dict[Generation, list[RequestOutput]] = {}
            for out in msg[1]:
                gen = self._routes.get(out.request_id)
                if gen is None:
                    continue  # its group was closed: the final output of an abort, say
                if out.finished:
                    del self._routes[out.request_id]
                per_group.setdefault(gen, []).append(out)
            for gen, outs in per_group.items():
                gen._put(outs)
        elif kind in ("added", "rejected"):
            gen = self._groups.get(msg[1])
            if gen is None or gen.accepted.done():
                return
            if kind == "added":
                gen.accepted.set_result(None)
            else:
                gen.accepted.set_exception(ValueError(msg[2]))
        elif kind == "metrics":
            fut = self._metrics.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "dead":
            self._dead(f"the engine failed:\n{msg[1]}")

    def _dead(self, reason: str) -> None:
        if self.error is None:
            self.error = "the engine has stopped" if self.closing else reason
            if not self.closing:
                log.error("%s", reason)
        err = EngineError(self.error)
        if not self._started.done():
            self._started.set_exception(err)
        for gen in list(self._groups.values()):
            if not gen.accepted.done():
                gen.accepted.set_exception(err)
            gen.queue.put_nowait(err)
        for fut in self._metrics.values():
            if not fut.done():
                fut.set_exception(err)
