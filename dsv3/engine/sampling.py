"""From logits to tokens, one row per request: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

The order is that of HF's and vLLM's logits processors:
1. repetition penalty over the prompt and the generated tokens (a seen token's logit is divided by the penalty if
   positive, multiplied if negative), then OpenAI's presence and frequency penalties over the generated tokens
   (logit -= frequency * count + presence * [count > 0]);
2. temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass reaches top_p, computed
   after top-k's renormalisation), then min-p (drop tokens below min_p times the most likely one's probability).
Greedy rows (temperature 0) take the argmax of the penalised logits; as a distribution they are one-hot there, which
is what speculative verification needs.

Draws use the exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d., which picks i with probability p_i.
The noise of each row comes from its request's own generator, so a seeded request draws the same numbers whatever
else shares the batch.
"""

from __future__ import annotations

import torch

from .request import SamplingParams, TokenLogprob

History = tuple[list[int], list[int]]  # (prompt, generated so far) of the request a row belongs to


def _counts(lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    # -> [len(lists), vocab] occurrences of each token id; the padding id `vocab` lands in a dropped column
    width = max(1, max(len(x) for x in lists))
    ids = torch.tensor([x + [vocab] * (width - len(x)) for x in lists], device=device)
    ones = torch.ones(ids.shape, device=device)
    return torch.zeros(len(lists), vocab + 1, device=device).scatter_add_(1, ids, ones)[:, :vocab]


def penalise(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> torch.Tensor:
    # logits: [M, V] fp32 -> [M, V] (a new tensor only when some row has penalties)
    rows = [i for i, p in enumerate(params) if p.penalised]
    if not rows:
        return logits
    vocab, dev = logits.shape[-1], logits.device
    ps = [params[i] for i in rows]
    idx = torch.tensor(rows, device=dev)
    x = logits[idx]
    counts = _counts([histories[i][1] for i in rows], vocab, dev)
    if any(p.repetition_penalty != 1 for p in ps):
        seen = (counts + _counts([histories[i][0] for i in rows], vocab, dev)) > 0
        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev).unsqueeze(1)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([p.frequency_penalty for p in ps], device=dev).unsqueeze(1)
    presence = torch.tensor([p.presence_penalty for p in ps], device=dev).unsqueeze(1)
    x = x - freq * counts - presence * (counts > 0).float()
    out = logits.clone()
    out[idx] = x
    return out


def _top_k_top_p(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # x: [M, V] tempered logits -> the same with the tokens outside top-k / top-p set to -inf
    vocab, dev = x.shape[-1], x.device
    k = torch.tensor([p.top_k or vocab for p in params], device=dev).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
    ordered, order = x.sort(dim=-1, descending=True)
    drop = torch.arange(vocab, device=dev) >= k
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one; 0 for the first, always kept
    ordered = ordered.masked_fill(above >= top_p, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, order, ordered)


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Penalised logits [M, V] -> the distributions the rows sample from [M, V] (one-hot for greedy rows)."""
    dev = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev).unsqueeze(1)
    x = logits / temps
    if any(p.top_k or p.top_p < 1 for p in params):
        x = _top_k_top_p(x, params)
    probs = x.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=dev)
        probs[idx] = torch.nn.functional.one_hot(logits[idx].argmax(-1), logits.shape[-1]).float()
    return probs


def draw(probs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row [M] from distributions [M, V]; greedy rows take the argmax without drawing."""
    tokens = probs.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        noise = torch.empty(len(rows), probs.shape[-1], device=probs.device)
        for j, i in enumerate(rows):
            noise[j].exponential_(generator=generators[i])
        idx = torch.tensor(rows, device=probs.device)
        tokens[idx] = (probs[idx] / noise.clamp_min_(1e-30)).argmax(dim=-1)
    return tokens


def uniforms(params: list[SamplingParams], generators: list[torch.Generator | None],
             device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row; greedy rows need none and get 0.5, which decides a one-hot test the same way."""
    return torch.stack([torch.rand((), generator=g, device=device) if not p.greedy else torch.tensor(0.5, device=device)
                        for p, g in zip(params, generators)])


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[History],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """Raw logits [M, V] -> the next token of each row [M]."""
    x = penalise(logits, params, histories)
    if all(p.greedy for p in params):
        return x.argmax(dim=-1)
    return draw(distributions(x, params), params, generators)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """Logprob of each row's token under the raw distribution log_softmax(logits), with the top_n[i] most likely."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1))[:, 0].tolist()
    k = max(top_n, default=0)
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, c, list(zip(i[:n], v[:n]))) for t, c, i, v, n in zip(tokens, chosen, ids, values, top_n)]
