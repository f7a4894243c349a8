"""MTP speculative decoding: the model's own MTP module drafts the next token, one forward verifies it.

How a step goes for a decoding request with tokens t_0..t_{n-1} (t_{n-1} not yet cached) and a draft d for t_n:
1. The main forward feeds [t_{n-1}, d] at positions n-1 and n. Row n-1 gives the target distribution p of t_n,
   row n the distribution p' of t_{n+1} given that t_n = d.
2. Verification (`verify`) is rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d with probability
   min(1, p(d) / q(d)), q being the distribution d was drawn from; on rejection draw t_n from max(p - q, 0)
   renormalised; on acceptance draw a bonus token t_{n+1} from p'. Every emitted token then follows the target
   distribution exactly. Greedy rows are one-hot distributions, so the test becomes "d is the argmax", and greedy
   output is identical with and without speculation.
3. The MTP pass runs MTP depth 1 over the same rows: row j reads the main model's hidden state at j and the
   embedding of t_{j+1}, writes its own cache layer, and its logits predict t_{j+2}. The row of the last cached
   position gives the next draft (`draft`). Rows past the accepted tokens compute garbage that the next step
   overwrites before anyone reads it (attention only sees positions up to each row's own).
Penalties see the tokens before each row: row n's history includes the draft, as it would without speculation.
Here a step verifies one draft: DeepSeek-V3 checkpoints carry one MTP module. Greedy requests in a burst (engine.py)
may take more, verified and drafted on the device (`ModelRunner.greedy_step`): past the first, each draft comes from
the MTP module run on its own previous output.
"""

from __future__ import annotations

import torch

from .request import Request
from .sampling import distributions, draw, penalise, uniforms


def _draft_distributions(reqs: list[Request], vocab: int, device: torch.device) -> torch.Tensor:
    rows = []
    for r in reqs:
        if r.draft_probs is not None:
            rows.append(r.draft_probs)
        else:  # drafted greedily: the draft was the argmax, a one-hot distribution
            rows.append(torch.nn.functional.one_hot(torch.tensor(r.draft, device=device), vocab).float())
    return torch.stack(rows)


def verify(reqs: list[Request], logits: torch.Tensor, logits_next: torch.Tensor) -> list[list[int]]:
    """reqs' drafts against the target logits of their two rows ([B, V] each) -> the tokens each request emits."""
    params = [r.params for r in reqs]
    gens = [r.generator for r in reqs]
    drafts = [r.draft for r in reqs]
    x = penalise(logits, params, [(r.prompt, r.outputs) for r in reqs])
    x_next = penalise(logits_next, params, [(r.prompt, r.outputs + [r.draft]) for r in reqs])
    if all(p.greedy for p in params):
        target, bonus = x.argmax(-1).tolist(), x_next.argmax(-1).tolist()
        return [[d, b] if d == t else [t] for d, t, b in zip(drafts, target, bonus)]
    dev = logits.device
    p, p_next = distributions(x, params), distributions(x_next, params)
    q = _draft_distributions(reqs, logits.shape[-1], dev)
    d = torch.tensor(drafts, device=dev).unsqueeze(1)
    accept = uniforms(params, gens, dev) * q.gather(1, d)[:, 0] < p.gather(1, d)[:, 0]
    residual = (p - q).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # A rejection implies p(d) < q(d), so p > q somewhere; the fallback to p only guards against rounding.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    correction = draw(residual, params, gens).tolist()
    bonus = draw(p_next, params, gens).tolist()
    return [[dr, b] if a else [c] for dr, a, c, b in zip(drafts, accept.tolist(), correction, bonus)]


def draft(reqs: list[Request], mtp_logits: torch.Tensor) -> None:
    """Set each request's draft (and the distribution it came from) from the MTP logits of its last cached row."""
    params = [r.params for r in reqs]
    x = penalise(mtp_logits, params, [(r.prompt, r.outputs) for r in reqs])
    if all(p.greedy for p in params):
        for r, t in zip(reqs, x.argmax(-1).tolist()):
            r.draft, r.draft_probs = t, None
        return
    q = distributions(x, params)
    for i, (r, t) in enumerate(zip(reqs, draw(q, params, [r.generator for r in reqs]).tolist())):
        r.draft, r.draft_probs = t, q[i]
