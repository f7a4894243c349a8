"""Which tokens of which requests the next forward runs: continuous batching, chunked prefill, preemption.

Each step:
1. Every running request that is decoding (all but its last token cached) feeds its last token, plus its drafts when
   speculating. Its blocks grow as needed; when the pool is empty the newest running request is preempted (its
   blocks freed, its cache to be recomputed later), down to the request itself if it is the newest. The oldest
   request therefore always progresses.
2. A token budget (max_prefill_tokens) goes to prefill chunks: first to running requests still prefilling, then to
   waiting requests, admitted in arrival order while the batch has room (max_batch_size) and blocks are free.
   A chunk shrinks to the free blocks; only a running request with no room at all preempts (newer requests, as in
   1). After a preemption nothing new is admitted that step.
A preempted request goes back to the front of the queue and later prefills its prompt and its generated tokens in
one go (recomputation), then continues sampling where it stopped.
Works come out decode first, then prefill chunks, as `runner.rows_for` lays the rows out.
"""

from __future__ import annotations

from collections import deque

from .cache import LatentCache
from .request import Request
from .runner import Work


class Scheduler:
    def __init__(self, cache: LatentCache, max_batch_size: int, max_prefill_tokens: int, speculative: bool):
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.speculative = speculative
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order, oldest first
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and give its blocks back."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.cache.release(req.blocks)

    def schedule(self) -> list[Work]:
        decode, prefill = [], []
        budget = self.max_prefill_tokens
        preempted_before = self.num_preemptions
        for req in list(self.running):
            if req not in self.running:  # preempted earlier in this loop
                continue
            if req.decoding:
                tokens = [req.tokens[-1]]
                if self.speculative and req.draft is not None:
                    # No row past the request's last position: it has `left` tokens to go.
                    left = req.params.max_tokens - req.num_generated
                    tokens += [req.draft, *req.chained][:left]
                if self._reserve(req, req.num_computed + len(tokens)):
                    decode.append(Work(req, tokens, req.num_computed, decode=True))
            elif budget > 0:
                n = self._prefill_chunk(req, budget, may_preempt=True)
                if n:
                    start = req.num_computed
                    prefill.append(Work(req, req.tokens[start:start + n], start, decode=False))
                    budget -= n
        if self.num_preemptions == preempted_before:
            while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
                req = self.waiting[0]
                n = self._prefill_chunk(req, budget, may_preempt=False)
                if not n:
                    break
                self.waiting.popleft()
                self.running.append(req)
                prefill.append(Work(req, req.tokens[:n], 0, decode=False))
                budget -= n
        return decode + prefill

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        while not self.cache.reserve(req.blocks, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _room(self, req: Request) -> int:
        return (len(req.blocks) + self.cache.allocator.num_free) * self.cache.block_size - req.num_computed

    def _prefill_chunk(self, req: Request, budget: int, may_preempt: bool) -> int:
        """Reserve blocks for the next chunk of req's uncached tokens, as many as the budget and free blocks allow.
        A running request out of room preempts newer ones for one token's room, as decoding does, so prefills
        cannot hold each other's blocks forever."""
        if may_preempt and self._room(req) < 1 and not self._reserve(req, req.num_computed + 1):
            return 0
        n = min(len(req.tokens) - req.num_computed, budget, self._room(req))
        if n <= 0:
            return 0
        self.cache.reserve(req.blocks, req.num_computed + n)
        return n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.cache.release(req.blocks)
        req.num_computed = 0
        req.draft = req.draft_probs = None
        req.chained = []
        self.waiting.appendleft(req)
        self.num_preemptions += 1
