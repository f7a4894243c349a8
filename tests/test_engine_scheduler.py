"""The scheduler on its own (no model): chunked-prefill budget, batch cap, block accounting and preemption order."""

import torch

from dsv3.engine.cache import BlockAllocator, LatentCache
from dsv3.engine.request import Request, SamplingParams
from dsv3.engine.scheduler import Scheduler


def _setup(num_blocks, block_size=4, max_batch=8, budget=8):
    cache = LatentCache(1, num_blocks, block_size, 2, 2, torch.float32, torch.device("cpu"))
    return cache, Scheduler(cache, max_batch, budget, speculative=False)


def _req(name, n_prompt, max_tokens=4):
    return Request(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), frozenset())


def _advance(works):
    """What the engine does after a forward: the fed tokens are cached; a request with all tokens cached samples."""
    for w in works:
        w.req.num_computed = w.start + len(w.tokens)
        if w.req.num_computed == len(w.req.tokens):
            w.req.tokens.append(7)


def _check_blocks(cache, sched):
    held = [b for r in sched.running for b in r.blocks]
    assert len(held) == len(set(held)) and 0 not in held  # no block twice, scratch block never handed out
    assert len(held) + cache.allocator.num_free == cache.allocator.num_blocks
    for r in sched.running:
        assert len(r.blocks) * cache.block_size >= r.num_computed


def test_allocator_hands_out_and_takes_back():
    a = BlockAllocator(3)
    got = a.allocate(2)
    assert got == [1, 2] and a.num_free == 1 and a.allocate(2) is None and a.num_free == 1
    a.free(got)
    assert sorted(a.allocate(3)) == [1, 2, 3]


def test_chunked_prefill_budget_and_decode_first():
    cache, sched = _setup(num_blocks=64, budget=8)
    a, b = _req("a", 3), _req("b", 13)
    sched.add(a)
    sched.add(b)
    works = sched.schedule()
    assert [(w.req.id, len(w.tokens), w.decode) for w in works] == [("a", 3, False), ("b", 5, False)]
    _advance(works)
    works = sched.schedule()  # a decodes first; b's next chunk gets the budget
    assert [(w.req.id, len(w.tokens), w.start, w.decode) for w in works] == [("a", 1, 3, True), ("b", 8, 5, False)]
    _advance(works)
    _check_blocks(cache, sched)


def test_batch_cap():
    cache, sched = _setup(num_blocks=64, max_batch=2, budget=100)
    for i in range(4):
        sched.add(_req(str(i), 3))
    works = sched.schedule()
    assert [w.req.id for w in works] == ["0", "1"] and len(sched.waiting) == 2


def test_preemption_takes_the_newest_and_the_oldest_progresses():
    cache, sched = _setup(num_blocks=6, budget=100)  # 24 token slots
    reqs = [_req(str(i), 7, max_tokens=8) for i in range(3)]  # each needs up to 4 blocks
    for r in reqs:
        sched.add(r)
    order = []
    for _ in range(40):
        works = sched.schedule()
        if not works:
            break
        _advance(works)
        _check_blocks(cache, sched)
        for r in list(sched.running):
            if r.num_generated >= r.params.max_tokens:  # the engine removes finished requests
                sched.remove(r)
                order.append(r.id)
    assert order == ["0", "1", "2"] and sched.num_preemptions > 0
    assert cache.allocator.num_free == 6


def test_prefilling_requests_cannot_starve_each_other():
    cache, sched = _setup(num_blocks=6, budget=6)
    a = _req("a", 22, max_tokens=1)
    sched.add(a)
    _advance(sched.schedule())  # a: 6 of 22 tokens cached, in 2 blocks
    # b, newer, holds the other 4 blocks mid-prefill: the pool is empty and neither request is decoding.
    b = _req("b", 22, max_tokens=1)
    cache.reserve(b.blocks, 16)
    b.num_computed = 16
    sched.running.append(b)
    works = sched.schedule()  # the older request takes the newer one's blocks
    assert [w.req.id for w in works] == ["a"] and sched.num_preemptions == 1
    assert b.num_computed == 0 and list(sched.waiting) == [b]
    _check_blocks(cache, sched)
