"""The inference engine: token ids in, token ids out, for many requests at once.

Notable features:
- `add_request` queues a prompt with its `SamplingParams`; each `step` runs one forward over every running request
  and returns the new tokens of each (streaming); `abort` drops a request and frees its cache at once.
- Continuous batching with chunked prefill and preemption by recomputation (scheduler.py) over a paged latent
  cache (cache.py) read by absorbed MLA (attention.py).
- Per-request sampling (sampling.py) with seeds that make a request reproducible, top-n logprobs and prompt
  logprobs.
- On CUDA: steps of up to 128 rows (decode rows, short prompts) replay CUDA graphs (graphs.py) and decode
  attention runs the Triton kernel (ops/mla_decode.py); `cuda_graphs=False` and `decode_kernel="torch"` switch
  back to eager and the reference.
- `compile=True` compiles each decode bucket's step with torch.compile (fusing its many small kernels) before the
  CUDA graph captures it; on the CPU the compiled steps run without graphs.
- `speculative=True`: the model's MTP module drafts a token per step and one forward verifies it by rejection
  sampling (speculative.py); `metrics()` reports the acceptance rate, cache use, queue sizes and expert load.
- Greedy bursts: when every running request decodes greedily without penalties or logprobs, up to `multi_step`
  steps run back to back, each step's function writing the next one's input rows on the device, with one host
  round trip for all of them. At batch 1 the host's share of a step (Python, the copies in and out, the graph
  launch) is otherwise time the GPU sits idle. A burst delays the admission of new requests by its length and
  streams its tokens together. Speculating, a burst's requests feed `num_speculative_tokens` drafts a step, the
  MTP module chained on its own output past the first (`ModelRunner.greedy_step`).
The engine is single-threaded and not thread-safe: drive it from one thread. It switches on `keep_routing` of the
model's MoE layers (to count expert load over real tokens) and owns the model while it runs.
"""

from __future__ import annotations

import operator

import torch

from ..model import Transformer
from ..ops.grouped import fused_available
from ..ops.mla_decode import triton, triton_available
from .cache import LatentCache, blocks_for
from .graphs import DecodeGraphs
from .request import Completion, Request, RequestOutput, SamplingParams, TokenLogprob
from .runner import ModelRunner, Work, rows_for
from .sampling import sample, token_logprobs
from .scheduler import Scheduler
from .speculative import draft, verify

DEFAULT_MAX_SEQ_LEN = 8192  # the default cap on max_position_embeddings (163840 for DeepSeek-V3)
CPU_CACHE_BYTES = 1 << 30  # default cache size on the CPU, at most
GPU_CACHE_FRACTION = 0.9  # of the free GPU memory, less GPU_RESERVED_BYTES for activations and graphs
GPU_RESERVED_BYTES = 4 << 30
DEFAULT_MULTI_STEP = 8  # greedy decode steps a burst runs at most between host round trips (see `_greedy`)
LOGPROB_CHUNK = 256  # prompt-logprob rows per head matmul: bounds the [rows, vocab] logits in memory


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and not p.penalised and p.logprobs is None


def take(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """t[idx]; a slice when idx is a run of consecutive rows, so no index tensor goes to the device."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return t[idx[0]:idx[0] + len(idx)]
    return t[torch.tensor(idx, dtype=torch.long, device=t.device)]


class Engine:
    def __init__(self, model: Transformer, *, max_batch_size: int = 64, max_seq_len: int | None = None,
                 block_size: int = 64, num_blocks: int | None = None, max_prefill_tokens: int = 2048,
                 speculative: bool = False, cuda_graphs: bool | None = None, decode_kernel: str = "auto",
                 compile: bool = False, multi_step: int = DEFAULT_MULTI_STEP, num_speculative_tokens: int = 1):
        cfg = model.cfg
        for name, value in (("max_batch_size", max_batch_size), ("block_size", block_size),
                            ("max_prefill_tokens", max_prefill_tokens), ("max_seq_len", max_seq_len),
                            ("num_blocks", num_blocks), ("multi_step", multi_step),
                            ("num_speculative_tokens", num_speculative_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        if speculative and len(model.mtp) == 0:
            raise ValueError("speculative=True needs the model's MTP module: num_nextn_predict_layers is 0 (a "
                             "checkpoint without MTP weights, or one loaded with mtp=False)")
        if decode_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"decode_kernel must be 'auto', 'triton' or 'torch', got {decode_kernel!r}")
        weight = model.embed_tokens.weight
        self.device, dtype = weight.device, weight.dtype
        if decode_kernel == "triton" and triton is None:
            raise ValueError("decode_kernel='triton' needs the triton package")

        self.model = model.eval()
        self.cfg = cfg
        self.speculative = speculative
        self.multi_step = multi_step
        self.num_speculative_tokens = num_speculative_tokens
        self.eos_token_id: int | None = cfg.eos_token_id
        layers = cfg.num_hidden_layers + int(speculative)  # the drafter's attention has a cache layer of its own
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        if num_blocks is None:
            per_block = LatentCache.bytes_per_block(layers, block_size, width, dtype)
            num_blocks = self._default_num_blocks(per_block, max_batch_size, block_size)
        self.cache = LatentCache(layers, num_blocks, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype,
                                 self.device)
        use_triton = decode_kernel == "triton" or (decode_kernel == "auto" and triton_available(self.device))
        self.runner = ModelRunner(model, self.cache, use_triton, self.max_seq_len)
        self.scheduler = Scheduler(self.cache, max_batch_size, max_prefill_tokens, speculative)
        # Neither a graph nor a whole compiled function can hold a host sync: the experts need the fused grouped
        # GEMM (bf16 on Hopper, any dtype on the CPU), not the loop over experts.
        fused = not self.runner.moes or fused_available(weight)
        capturable = self.device.type == "cuda" and fused
        if cuda_graphs and not capturable:
            raise ValueError(f"cuda_graphs=True needs a CUDA model whose experts run the fused grouped GEMM (bf16 on "
                             f"compute capability >= 9.0); this one is {dtype} on {self.device}")
        if compile and self.runner.moes and not (fused and dtype == torch.bfloat16):
            # torch._grouped_mm traces in bf16 only (its meta kernel refuses fp32, which the CPU kernel would run).
            raise ValueError(f"compile=True needs bf16 experts that run the fused grouped GEMM (compute capability "
                             f">= 9.0, or the CPU); this model is {dtype} on {self.device} (load it in bf16: "
                             f"--dtype bfloat16 for dsv3 generate, chat and serve)")
        self.graphs = None
        capture = cuda_graphs if cuda_graphs is not None else capturable
        if capture or compile:
            max_rows = max_batch_size * (1 + num_speculative_tokens if speculative else 1)
            self.graphs = DecodeGraphs(self.runner, max_rows, blocks_for(self.max_seq_len, block_size), capture=capture,
                                       compile=compile, drafts=num_speculative_tokens if speculative else 0)

        self._requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        self._next_id = 0
        self._stats = dict(steps=0, generated=0, drafted=0, accepted=0, rounds=0)
        moes = self.runner.moes
        self._load = (torch.zeros(len(moes), cfg.n_routed_experts, device=self.device) if moes else None)

    def _default_num_blocks(self, per_block: int, max_batch_size: int, block_size: int) -> int:
        want = max_batch_size * blocks_for(self.max_seq_len, block_size)  # every slot of the batch at full length
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * GPU_CACHE_FRACTION) - GPU_RESERVED_BYTES
        else:
            budget = CPU_CACHE_BYTES
        fit = budget // per_block
        if fit < 1:
            raise ValueError(f"no memory left for the KV cache ({budget} bytes free for blocks of {per_block})")
        return int(min(want, fit))

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        auto_id = request_id is None  # a generated id skips ids the caller chose
        try:
            prompt = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise ValueError("prompt_ids must be a list of integer token ids") from None
        if not prompt:
            raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
        vocab = self.cfg.vocab_size
        for name, ids in (("prompt_ids", prompt), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} holds {len(bad)} id(s) outside the vocabulary [0, {vocab}), e.g. {bad[0]}")
        total = len(prompt) + params.max_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_seq_len {self.max_seq_len}")
        need, have = blocks_for(total, self.cache.block_size), self.cache.allocator.num_blocks
        if need > have:
            raise ValueError(f"prompt + max_tokens = {total} tokens need {need} cache blocks of "
                             f"{self.cache.block_size}; the cache holds {have}")
        while request_id is None or (request_id in self._requests and auto_id):
            request_id, self._next_id = f"req-{self._next_id}", self._next_id + 1
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop.add(self.eos_token_id)
        req = Request(request_id, prompt, params, frozenset(stop))
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request and free its cache; its final output (finish_reason "abort") comes with the next step.
        Unknown or already finished ids are ignored: a request may finish while its abort is on the way."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.remove(req)
        req.finish_reason = "abort"
        self._aborted.append(req.take_output())

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    # ---- stepping ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        works = self.scheduler.schedule()
        if works:
            self._stats["steps"] += self._forward(works)
        for w in works:
            req = w.req
            if req.new_tokens or req.finish_reason is not None:
                self._stats["generated"] += len(req.new_tokens)
                outputs.append(req.take_output())
            if req.finish_reason is not None:
                self.scheduler.remove(req)
                del self._requests[req.id]
        return outputs

    def _forward(self, works: list[Work]) -> int:
        """Run this step's works -> the number of forwards run (more than one for a greedy burst)."""
        g = 1 + self.num_speculative_tokens if self.speculative else 1  # rows a request feeds in a greedy burst
        greedy = all(w.decode and _plain_greedy(w.req.params) and (g == 1 or len(w.tokens) > 1) for w in works)
        n = self._reserve_burst(works, g) if greedy else 0
        for w in works:
            if not (self.speculative and w.decode):
                continue
            if n:
                # Fill the drafts up (a request may have fewer, e.g. after a step that was no burst): the
                # verification rejects a filler unless it is right.
                w.tokens += [w.tokens[-1]] * (g - len(w.tokens))
            else:
                del w.tokens[2:]  # one draft outside bursts
            w.req.chained = w.tokens[2:]
        rows = sum(len(w.tokens) for w in works)
        size = self.graphs.bucket(rows) if self.graphs else None
        host = rows_for(works, self.cache, pad_to=size, width=self.graphs.width if size else None)
        starts, r = [], 0
        for w in works:
            starts.append(r)
            r += len(w.tokens)
        if n:
            self._greedy(works, starts, host, size, n, g - 1)
            return n
        step = None
        if size:
            all_logits, hidden, load = self.graphs.main(host)

            def logits(idx: list[int]) -> torch.Tensor:
                return take(all_logits, idx)
        else:
            step = self.runner.to_device(host)
            hidden, load = self.runner.forward(step)

            def logits(idx: list[int]) -> torch.Tensor:
                return self.runner.logits(take(hidden, idx))
        if load is not None:
            self._load += load
        self._prompt_logprobs(works, starts, logits)
        self._sample(works, starts, logits)
        if self.speculative:
            self._draft(works, starts, size, step, hidden)
        return 1

    def _reserve_burst(self, works: list[Work], g: int) -> int:
        """How many greedy steps to run back to back (see `_greedy`) with each request feeding g rows, with cache
        blocks reserved for all of them; 0 if not one.

        No request may pass its max_tokens: a plain step emits one token, a speculative one 1 to g and writes rows
        up to g - 1 positions past its first, so a request with `left` tokens to go takes at most left (plain) or
        (left + 1) // g steps. Blocks the pool cannot give make it one step."""
        n = self.multi_step
        for w in works:
            left = w.req.params.max_tokens - w.req.num_generated
            n = min(n, (left + 1) // g if self.speculative else left)
        if n > 1 and all(self.cache.reserve(w.req.blocks, w.start + n * g) for w in works):
            return n
        return int(n > 0 and all(self.cache.reserve(w.req.blocks, w.start + g) for w in works))

    def _prompt_logprobs(self, works: list[Work], starts: list[int], logits) -> None:
        for w, r0 in zip(works, starts):
            req, done = w.req, w.req.prompt_logprobs
            if done is None or w.decode:
                continue
            # The row at position j scores prompt[j + 1]; positions before len(done) - 1 are done (a recomputation
            # after preemption passes over them again).
            first, end = max(w.start, len(done) - 1), min(w.start + len(w.tokens), len(req.prompt) - 1)
            for c in range(first, end, LOGPROB_CHUNK):
                js = range(c, min(c + LOGPROB_CHUNK, end))
                lg = logits([r0 + j - w.start for j in js])
                done.extend(token_logprobs(lg, [req.prompt[j + 1] for j in js], [req.params.prompt_logprobs] * len(js)))

    def _sample(self, works: list[Work], starts: list[int], logits) -> None:
        plain: list[tuple[Request, int]] = []
        spec: list[tuple[Work, int]] = []
        for w, r0 in zip(works, starts):
            req, end = w.req, w.start + len(w.tokens)
            if w.decode and len(w.tokens) == 2:
                spec.append((w, r0))
                continue
            req.num_computed = end
            if end < len(req.tokens):
                continue  # a prefill chunk with more to come
            if req.params.max_tokens == 0:
                req.finish_reason = "length"  # prompt only, e.g. for its logprobs
            else:
                plain.append((req, r0 + len(w.tokens) - 1))
        if plain:
            reqs = [req for req, _ in plain]
            lg = logits([row for _, row in plain])
            tokens = sample(lg, [r.params for r in reqs], [(r.prompt, r.outputs) for r in reqs],
                            [r.generator for r in reqs]).tolist()
            for req, t, lp in zip(reqs, tokens, self._logprobs(reqs, lg, tokens)):
                req.append(t, lp)
        if spec:
            reqs = [w.req for w, _ in spec]
            lg, lg_next = logits([r0 for _, r0 in spec]), logits([r0 + 1 for _, r0 in spec])
            emitted = verify(reqs, lg, lg_next)
            first = self._logprobs(reqs, lg, [e[0] for e in emitted])
            second = self._logprobs(reqs, lg_next, [e[-1] for e in emitted])
            for req, toks, lp1, lp2 in zip(reqs, emitted, first, second):
                self._emit_verified(req, 1, toks, [lp1, lp2][:len(toks)])

    def _emit_verified(self, req: Request, drafted: int, toks: list[int],
                       logprobs: list[TokenLogprob | None] | None = None) -> None:
        """Verified drafts: toks is the accepted ones, then the token chosen after them (a correction or a bonus).
        The request fed its last token at position num_computed and its `drafted` drafts after it."""
        self._stats["drafted"] += drafted
        self._stats["accepted"] += len(toks) - 1
        self._stats["rounds"] += 1
        req.num_computed += len(toks)
        req.draft = req.draft_probs = None
        req.chained = []
        for t, lp in zip(toks, logprobs or [None] * len(toks)):
            if req.finish_reason is not None:
                break
            req.append(t, lp)

    def _greedy(self, works: list[Work], starts: list[int], host, size: int | None, n: int, k: int) -> None:
        """n decode steps of plain greedy requests with one host round trip (`ModelRunner.greedy_step`).

        Each step's function ends by rewriting its input rows into the next step's (the chosen tokens at the next
        positions), so the n steps are launched back to back and the device never waits for the host in between;
        their tokens come back in one copy. A request that stops within the burst ignores the steps after: they
        only wrote cache slots it owns, and the expert load, counted once the host knows which rows were live, leaves
        them out. Speculating with k drafts, each step verifies them, emits 1 to k + 1 tokens per request and
        drafts the next k, all on the device."""
        step = None if size else self.runner.to_device(host)
        history = routes = None
        for i in range(n):
            if size:
                out, routing = self.graphs.greedy(host if i == 0 else None, size, k > 0)
            else:
                out, routing = self.runner.greedy_step(step, k)
            if history is None:
                history = out.new_empty(n, *out.shape)  # [n, 1 or 2, rows]
                routes = None if routing is None else routing.new_empty(n, *routing.shape)  # [n, L, rows, K]
            # A graph's outputs are overwritten by its next replay.
            history[i].copy_(out)
            if routes is not None:
                routes[i].copy_(routing)
        live = []  # [n][rows]: the rows whose request had not stopped before the step
        for out in history.tolist():
            tokens = out[0]
            live.append([False] * len(tokens))
            for w, r0 in zip(works, starts):
                req = w.req
                if req.finish_reason is not None:
                    continue
                live[-1][r0:r0 + len(w.tokens)] = [True] * len(w.tokens)
                if not k:
                    req.num_computed += 1
                    req.append(tokens[r0], None)
                    continue
                drafts, a = [req.draft, *req.chained], 0
                while a < k and drafts[a] == tokens[r0 + a]:
                    a += 1
                self._emit_verified(req, k, drafts[:a] + [tokens[r0 + a]])
                if req.finish_reason is None:
                    req.draft, req.chained = out[1][r0], out[1][r0 + 1:r0 + k]
        if routes is not None:
            valid = torch.tensor(live).flatten().to(self.device, non_blocking=True)
            self._load += self.runner.expert_load(routes.transpose(0, 1).flatten(1, 2), valid)

    def _logprobs(self, reqs: list[Request], lg: torch.Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(reqs)
        if rows:
            lps = token_logprobs(lg[torch.tensor(rows, device=lg.device)], [tokens[i] for i in rows],
                                 [reqs[i].params.logprobs for i in rows])
            for i, lp in zip(rows, lps):
                out[i] = lp
        return out

    def _draft(self, works: list[Work], starts: list[int], size: int | None, step, hidden: torch.Tensor) -> None:
        """The MTP pass over this step's rows, then a draft for every request now decoding (see speculative.py)."""
        next_ids, targets = [], []
        for w, r0 in zip(works, starts):
            toks = w.req.tokens
            next_ids += [toks[p + 1] if p + 1 < len(toks) else 0 for p in range(w.start, w.start + len(w.tokens))]
            if w.req.finish_reason is None and w.req.decoding:
                targets.append((w.req, r0 + w.req.num_computed - 1 - w.start))
        ids = torch.tensor(next_ids, dtype=torch.int64)
        rows = [row for _, row in targets]
        if size:
            mtp_logits = take(self.graphs.mtp(size, ids), rows)
        else:
            h = self.runner.forward_mtp(step, hidden, ids.to(self.device))
            mtp_logits = self.runner.logits(take(h, rows))
        if targets:
            draft([req for req, _ in targets], mtp_logits)

    # ---- convenience ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run prompts to completion on an idle engine; the completions come back in prompt order."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; this one has requests in flight")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = []
        try:
            for prompt, p in zip(prompts, plist):
                ids.append(self.add_request(prompt, p))
        except ValueError:
            for rid in ids:
                self.abort(rid)
            self._aborted.clear()
            raise
        done = {rid: Completion([], [] if p.logprobs is not None else None, "", None) for rid, p in zip(ids, plist)}
        while self.has_unfinished():
            for out in self.step():
                c = done[out.request_id]
                c.token_ids += out.new_token_ids
                if out.new_logprobs is not None:
                    c.logprobs += out.new_logprobs
                if out.prompt_logprobs is not None:
                    c.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    c.finish_reason = out.finish_reason
        return [done[rid] for rid in ids]

    def metrics(self) -> dict:
        s, alloc = self._stats, self.cache.allocator
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "cache_blocks_used": alloc.num_used, "cache_blocks_total": alloc.num_blocks,
            "block_size": self.cache.block_size, "preemptions": self.scheduler.num_preemptions,
            "steps": s["steps"], "generated_tokens": s["generated"],
            "spec_drafted": s["drafted"], "spec_accepted": s["accepted"], "spec_rounds": s["rounds"],
            "acceptance_rate": s["accepted"] / s["drafted"] if s["drafted"] else None,
            # drafts accepted per verification of a request's drafts: a speculative step emits 1 + this tokens
            "accepted_per_step": s["accepted"] / s["rounds"] if s["rounds"] else None,
            # tokens routed to each expert, per MoE layer of the main model, since the engine started
            "expert_load": self._load.long().tolist() if self._load is not None else [],
            "cuda_graphs": self.graphs is not None and self.graphs.capture,
            "compiled": self.graphs is not None and self.graphs.compile,
            "decode_kernel": "triton" if self.runner.use_triton else "torch",
        }
