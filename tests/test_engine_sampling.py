"""Sampling and speculative verification against hand computations and the distributions they must follow."""

import math

import pytest
import torch

from dsv3.engine.request import Request, SamplingParams
from dsv3.engine.sampling import distributions, draw, penalise, sample, token_logprobs
from dsv3.engine.speculative import verify


def test_penalties_follow_the_hand_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams()]
    prompt, generated = [4, 0], [2, 2, 1]
    got = penalise(logits, params, [(prompt, generated), ([0], [0])])
    # token 0 (prompt, positive): 2 / 2; token 1 (generated once, negative): -1 * 2 - 0.25 - 0.5;
    # token 2 (generated twice, positive): 0.5 / 2 - 0.5 - 0.5; token 3 unseen; token 4 (prompt, negative): -2 * 2
    assert got[0].tolist() == pytest.approx([1.0, -2.75, -0.75, 3.0, -4.0])
    assert torch.equal(got[1], logits[1])  # no penalties: untouched


def _filtered_by_hand(logits: list[float], p: SamplingParams) -> list[float]:
    z = [x / p.temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[: p.top_k] if p.top_k else order
    total = sum(math.exp(z[i]) for i in keep)
    mass, kept = 0.0, []
    for i in keep:
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += math.exp(z[i]) / total
    total = sum(math.exp(z[i]) for i in kept)
    probs = [math.exp(z[i]) / total if i in kept else 0.0 for i in range(len(z))]
    top = max(probs)
    probs = [q if q >= p.min_p * top else 0.0 for q in probs]
    return [q / sum(probs) for q in probs]


@pytest.mark.parametrize("p", [SamplingParams(temperature=0.7), SamplingParams(top_k=3), SamplingParams(top_p=0.6),
                               SamplingParams(temperature=1.5, top_k=4, top_p=0.8),
                               SamplingParams(min_p=0.3), SamplingParams(top_k=5, top_p=0.9, min_p=0.2)])
def test_filters_match_the_hand_rule(p):
    logits = torch.tensor([1.0, 3.0, -0.5, 2.2, 0.0, 2.9, -3.0])
    got = distributions(logits.unsqueeze(0), [p])[0]
    assert got.tolist() == pytest.approx(_filtered_by_hand(logits.tolist(), p), abs=1e-6)


def test_greedy_rows_are_one_hot_and_sample_takes_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=10.0)]
    assert distributions(logits, params).tolist() == [[0, 1, 0], [1, 0, 0]]
    # The penalty pushes token 0 (seen in the prompt) below token 1.
    assert sample(logits, params, [([], []), ([0], [])], [None, None]).tolist() == [1, 1]


def test_draws_follow_the_distribution_and_seeds_repeat():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 20000
    params = [SamplingParams()] * n
    gen = torch.Generator().manual_seed(0)
    tokens = draw(probs.expand(n, -1), params, [gen] * n)
    freq = torch.bincount(tokens, minlength=5).float() / n
    assert freq[4] == 0
    assert (freq - probs).abs().max() < 0.015  # about 4 standard deviations at n = 20000
    again = draw(probs.expand(50, -1), params[:50], [torch.Generator().manual_seed(0)] * 50)
    assert torch.equal(again, tokens[:50])


def test_token_logprobs_are_the_raw_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    (lp,) = token_logprobs(logits, [2], [2])
    ref = torch.log_softmax(logits[0], 0)
    assert lp.token_id == 2 and lp.logprob == pytest.approx(ref[2].item())
    assert [t for t, _ in lp.top] == [1, 0] and [v for _, v in lp.top] == pytest.approx(ref[[1, 0]].tolist())


def _requests(n, params, draft_of, q):
    reqs = []
    for i in range(n):
        r = Request(str(i), [0], params, frozenset())
        r.generator = torch.Generator().manual_seed(i)
        r.draft, r.draft_probs = draft_of(r), q
        reqs.append(r)
    return reqs


def test_rejection_sampling_emits_the_target_distribution():
    p = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.0])
    q = torch.tensor([0.4, 0.1, 0.1, 0.2, 0.2])
    p_next = torch.tensor([0.25, 0.25, 0.0, 0.0, 0.5])
    n = 20000
    # Drafts drawn from q, then verified against p (row 1) and p_next (row 2); logits are log-probabilities.
    drafts = iter(torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(1)).tolist())
    reqs = _requests(n, SamplingParams(), lambda r: next(drafts), q)
    emitted = verify(reqs, p.log().expand(n, -1), p_next.log().expand(n, -1))
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=5).float() / n
    assert (first - p).abs().max() < 0.015
    accepted = [e for e in emitted if len(e) == 2]
    assert len(accepted) / n == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.015)
    bonus = torch.bincount(torch.tensor([e[1] for e in accepted]), minlength=5).float() / len(accepted)
    assert (bonus - p_next).abs().max() < 0.02


def test_greedy_verification_accepts_exactly_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    logits_next = torch.tensor([[0.0, 0.0, 4.0], [0.0, 5.0, 1.0]])
    drafts = iter([1, 2])  # right for the first request, wrong for the second
    reqs = _requests(2, SamplingParams(temperature=0), lambda r: next(drafts), None)
    assert verify(reqs, logits, logits_next) == [[1, 2], [0]]
    # In a batch with a sampled request the greedy rows go through the general path, with the same answer.
    mixed = reqs + _requests(1, SamplingParams(), lambda r: 0, torch.tensor([1.0, 0.0, 0.0]))
    assert verify(mixed, torch.cat([logits, logits[:1]]), torch.cat([logits_next, logits_next[:1]]))[:2] == [[1, 2],
                                                                                                            [0]]
