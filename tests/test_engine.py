"""The engine end to end on the CPU (tiny config, fp32): its tokens and logprobs against naive loops of full
forwards, under continuous batching, chunked prefill, preemption, paging and MTP speculation."""

import copy
import functools

import pytest
import torch

import dsv3
from dsv3.engine import Engine, SamplingParams
from dsv3.model import MoE, build_model

CFG = dsv3.ModelConfig.preset("tiny", num_hidden_layers=2)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@functools.cache
def tiny_model() -> dsv3.Transformer:
    return build_model(CFG, seed=0).eval()


@functools.cache
def drafting_model() -> dsv3.Transformer:
    """A model whose MTP drafts are right often but not always: the main blocks' outputs are damped, so the next
    token depends mostly on the current one, and the MTP module passes the embedding of the token it reads straight
    to the head (its eh_proj keeps the embedding half; its block adds nothing), predicting what the main model
    would say after that token."""
    m = copy.deepcopy(tiny_model())
    d = CFG.hidden_size
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
            mlp = layer.mlp
            for w in ([mlp.experts.down_proj, mlp.shared_experts.down_proj.weight] if isinstance(mlp, MoE)
                      else [mlp.down_proj.weight]):
                w.mul_(0.3)
        mtp = m.mtp[0]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :d] = torch.eye(d)
        mtp.block.self_attn.o_proj.weight.zero_()
        mtp.block.mlp.experts.down_proj.zero_()
        mtp.block.mlp.shared_experts.down_proj.weight.zero_()
    return m


def prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@functools.cache
def _naive(model, prompt: tuple, n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt):]


def naive_greedy(model, prompt, n):
    """Greedy decoding by a full forward over the whole sequence for every token: no cache at all."""
    return _naive(model, tuple(prompt), n)


def run_staggered(engine, ps, params, joins):
    """Add prompt i before step joins[i]; step until all finish. -> token ids per prompt."""
    got, step = {}, 0
    while step <= max(joins) or engine.has_unfinished():
        for i, at in enumerate(joins):
            if at == step:
                got[engine.add_request(ps[i], params)] = []
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
    return list(got.values())


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_matches_naive_loop_with_staggered_joins(speculative):
    model = drafting_model() if speculative else tiny_model()
    ps = prompts([3, 19, 30, 8], seed=1)
    # Chunked prefill (8 tokens a step): the 30-token prompt takes four steps while the others decode.
    engine = Engine(model, block_size=4, num_blocks=64, max_prefill_tokens=8, speculative=speculative)
    got = run_staggered(engine, ps, greedy(10), joins=[0, 2, 3, 3])
    assert got == [naive_greedy(model, p, 10) for p in ps]


def test_greedy_matches_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    dsv3.save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ps = prompts([9, 9], seed=12)  # one length: no padding on the transformers side
    ids = torch.tensor(ps)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0)[:, 9:].tolist()
    ours = Engine(model, block_size=4, num_blocks=32).generate(ps, greedy(12))
    assert [c.token_ids for c in ours] == theirs


def test_batch_size_cap_and_continuous_admission():
    model = tiny_model()
    ps = prompts([5, 7, 4, 9, 6], seed=2)
    engine = Engine(model, max_batch_size=2, block_size=4, num_blocks=64)
    for p in ps:
        engine.add_request(p, greedy(6))
    got, most = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        most = max(most, engine.metrics()["running"])
    assert most == 2
    assert list(got.values()) == [naive_greedy(model, p, 6) for p in ps]


@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_recomputes_the_same_tokens(speculative):
    model = drafting_model() if speculative else tiny_model()
    ps = prompts([12, 9, 14], seed=3)
    params = [greedy(20), SamplingParams(max_tokens=20, temperature=0.9, top_k=50, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)]
    roomy = Engine(model, block_size=4, num_blocks=64, speculative=speculative)
    tight = Engine(model, block_size=4, num_blocks=12, speculative=speculative)  # each request needs up to 8
    expected, got = roomy.generate(ps, params), tight.generate(ps, params)
    assert tight.metrics()["preemptions"] > 0 and roomy.metrics()["preemptions"] == 0
    assert got[0].token_ids == naive_greedy(model, ps[0], 20)
    if not speculative:  # a recomputation re-draws the draft, so only greedy is pinned under speculation
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert tight.metrics()["cache_blocks_used"] == 0


def test_speculative_greedy_equals_plain_and_reports_acceptance():
    model = drafting_model()
    ps = prompts([6, 15, 2], seed=4)
    plain = Engine(model, block_size=4, num_blocks=64).generate(ps, greedy(24))
    engine = Engine(model, block_size=4, num_blocks=64, speculative=True)
    spec = engine.generate(ps, greedy(24))
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    m = engine.metrics()
    assert 0 < m["acceptance_rate"] < 1  # both the accepted and the rejected paths ran
    plain_engine = Engine(model, block_size=4, num_blocks=64)
    plain_engine.generate(ps, greedy(24))
    assert m["steps"] < plain_engine.metrics()["steps"]  # accepted drafts save steps


@pytest.mark.parametrize("speculative,drafts", [(False, 1), (True, 1), (True, 2), (True, 3)])
def test_greedy_bursts_give_the_tokens_of_single_steps(speculative, drafts):
    # Up to multi_step greedy steps run with one host round trip, each step's rows written by the one before on the
    # device. Requests stopping mid-burst (a stop token, max_tokens), joining later, or short of cache blocks (the
    # tight pool) must come out as one step at a time gives them, and with several drafts a step as with one.
    model = drafting_model() if speculative else tiny_model()
    ps = prompts([6, 15, 2, 9], seed=12)
    stop = naive_greedy(model, ps[1], 12)[7]
    params = [greedy(17), greedy(12, stop_token_ids=(stop,)), greedy(3), greedy(21)]
    joins = [0, 0, 2, 5]

    def run(multi_step, num_blocks):
        engine = Engine(model, block_size=4, num_blocks=num_blocks, speculative=speculative, multi_step=multi_step,
                        num_speculative_tokens=drafts)
        got, step, chunks = {}, 0, []
        while step <= max(joins) or engine.has_unfinished():
            for i, at in enumerate(joins):
                if at == step:
                    got[engine.add_request(ps[i], params[i], request_id=str(i))] = []
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
                chunks.append(len(out.new_token_ids))
            step += 1
        assert engine.metrics()["cache_blocks_used"] == 0
        return [got[str(i)] for i in range(len(ps))], max(chunks), step

    single, most, calls = run(1, 64)
    assert most <= (1 + drafts if speculative else 1)
    assert single[1][-1] == stop and len(single[1]) < 12
    assert single[0] == naive_greedy(model, ps[0], 17)
    burst, most, burst_calls = run(8, 64)
    assert burst == single and most > 2 and burst_calls < calls
    assert run(8, 9)[0] == single  # 9 blocks of 4: preemptions, and bursts that cannot reserve theirs run one step


def test_drafts_are_the_mtp_modules_predictions():
    # White box: after each step, every decoding request's draft is the argmax of MTP depth 1 of a full forward.
    model = tiny_model()
    engine = Engine(model, block_size=4, num_blocks=64, max_prefill_tokens=8, speculative=True)
    for p in prompts([4, 13, 21], seed=5):
        engine.add_request(p, greedy(8))
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for req in engine._requests.values():
            if req.draft is not None:
                with torch.no_grad():
                    out = model(torch.tensor([req.tokens]), mtp=True)
                assert req.draft == out.mtp_logits[0][0, len(req.tokens) - 2].argmax().item()
                checked += 1
    assert checked >= 15


def test_chained_drafts_are_the_mtp_module_run_on_its_own_output():
    # White box: with three drafts a step, a request's second and third drafts come from MTP depth 1 run again on
    # its previous output, at the next positions, over the true depth-1 states before (a full forward's).
    model = drafting_model()
    engine = Engine(model, block_size=4, num_blocks=64, speculative=True, num_speculative_tokens=3)
    for p in prompts([4, 13], seed=6):
        engine.add_request(p, greedy(30))
    mtp, checked = model.mtp[0], 0
    while engine.has_unfinished():
        engine.step()
        for req in engine._requests.values():
            if len(req.chained) != 2:
                continue
            t = len(req.tokens)
            with torch.no_grad():
                out = model(torch.tensor([req.tokens]), mtp=True)
                h, emb = out.mtp_hidden[0][0, : t - 1], model.embed_tokens(torch.tensor(req.tokens[1:]))
                states, ids, guesses = torch.cat([out.hidden[0, : t - 1], h[-1:]]), [], [req.draft, *req.chained]
                for d in guesses[:-1]:  # depth 1 at positions t - 1, t, ...: the last output and the draft after it
                    ids.append(d)
                    emb_d = torch.cat([emb, model.embed_tokens(torch.tensor(ids))])
                    n = emb_d.shape[0]
                    cos, sin = model.rotary(torch.arange(n))
                    y = mtp(emb_d[None], states[None], cos, sin)[0]
                    assert model.lm_head(y[-1]).argmax().item() == guesses[len(ids)]
                    states = torch.cat([states, y[-1:]])
            assert req.draft == model.lm_head(h[-1]).argmax().item()
            checked += 1
    assert checked >= 4 and engine.metrics()["spec_accepted"] > 0


def test_paged_and_contiguous_caches_give_the_same_logprobs():
    model = tiny_model()
    ps = prompts([11, 6], seed=6)
    params = greedy(12, logprobs=5, prompt_logprobs=5)
    paged = Engine(model, block_size=2, num_blocks=40)
    ids = [paged.add_request(p, params) for p in ps]
    got = {rid: ([], None) for rid in ids}
    while paged.has_unfinished():
        for o in paged.step():
            got[o.request_id] = (got[o.request_id][0] + o.new_logprobs, o.prompt_logprobs or got[o.request_id][1])
        if paged.metrics()["steps"] == 3:
            blocks = paged._requests[ids[0]].blocks
            assert blocks != list(range(blocks[0], blocks[0] + len(blocks)))  # decoding side by side interleaves
    contiguous = Engine(model, block_size=64, num_blocks=2).generate(ps, params)  # one block per sequence
    for rid, c in zip(ids, contiguous):
        lps, prompt_lps = got[rid]
        pairs = list(zip(lps, c.logprobs)) + list(zip(prompt_lps[1:], c.prompt_logprobs[1:]))
        assert len(pairs) == 12 + len(ps[ids.index(rid)]) - 1
        for a, b in pairs:
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            torch.testing.assert_close(torch.tensor([a.logprob, *(v for _, v in a.top)]),
                                       torch.tensor([b.logprob, *(v for _, v in b.top)]), atol=1e-5, rtol=0)


def test_logprobs_match_the_full_forward():
    model = tiny_model()
    prompt = prompts([14], seed=7)[0]
    engine = Engine(model, block_size=4, num_blocks=32, max_prefill_tokens=5)  # prompt logprobs across chunks
    c = engine.generate([prompt], greedy(6, logprobs=3, prompt_logprobs=2))[0]
    ids = prompt + c.token_ids
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].log_softmax(-1)
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(prompt)
    checks = [(c.prompt_logprobs[t], t - 1, 2) for t in range(1, len(prompt))]
    checks += [(x, len(prompt) - 1 + i, 3) for i, x in enumerate(c.logprobs)]
    for got, pos, n in checks:
        assert got.token_id == ids[pos + 1]
        assert got.logprob == pytest.approx(lp[pos, ids[pos + 1]].item(), abs=1e-5)
        top = lp[pos].topk(n)
        assert [t for t, _ in got.top] == top.indices.tolist()
        assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("speculative", [False, True])
def test_seeds_reproduce_whatever_the_batch(speculative):
    model = drafting_model() if speculative else tiny_model()
    prompt, other, third = prompts([9, 5, 12], seed=8)
    p = SamplingParams(max_tokens=15, temperature=0.8, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)

    def run(ps, params):
        return Engine(model, block_size=4, num_blocks=64, speculative=speculative).generate(ps, params)

    alone = run([prompt], p)[0].token_ids
    crowd = run([other, prompt, third], [SamplingParams(max_tokens=7), p, SamplingParams(max_tokens=20, seed=9)])
    assert crowd[1].token_ids == alone
    assert run([prompt], SamplingParams(**{**p.__dict__, "seed": 1235}))[0].token_ids != alone


def test_stops_on_stop_tokens_eos_and_max_tokens():
    model = tiny_model()
    prompt = prompts([7], seed=9)[0]
    full = naive_greedy(model, prompt, 10)
    stop = full[4]
    cut = full[:full.index(stop) + 1]
    engine = Engine(model, block_size=4, num_blocks=32)
    c = engine.generate([prompt], greedy(10, stop_token_ids=(stop,)))[0]
    assert (c.token_ids, c.finish_reason) == (cut, "stop")
    engine.eos_token_id = stop
    c = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    assert (c.token_ids, c.finish_reason) == (cut, "stop")
    c = engine.generate([prompt], greedy(10))[0]  # ignore_eos
    assert (c.token_ids, c.finish_reason) == (full, "length")
    c = engine.generate([prompt], greedy(0, prompt_logprobs=1))[0]  # echo only
    assert (c.token_ids, c.finish_reason, len(c.prompt_logprobs)) == ([], "length", len(prompt))


def test_abort_frees_the_cache_and_reports():
    engine = Engine(tiny_model(), block_size=4, num_blocks=32)
    a = engine.add_request(prompts([20], seed=10)[0], greedy(40))
    b = engine.add_request(prompts([5], seed=11)[0], greedy(3))
    engine.step()
    used = engine.metrics()["cache_blocks_used"]
    engine.abort(a)
    assert engine.metrics()["cache_blocks_used"] < used
    outs = engine.step()
    assert any(o.request_id == a and o.finished and o.finish_reason == "abort" for o in outs)
    engine.abort("no-such-request")
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs if o.request_id == b and o.finished] == ["length"]
    m = engine.metrics()
    assert m["cache_blocks_used"] == 0 and m["running"] == m["waiting"] == 0
    assert sum(sum(layer) for layer in m["expert_load"]) > 0


def test_bad_requests_are_refused_with_the_numbers():
    engine = Engine(tiny_model(), max_seq_len=64, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(1))
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {CFG.vocab_size}\)"):
        engine.add_request([1, CFG.vocab_size], greedy(1))
    with pytest.raises(ValueError, match="= 70 exceeds max_seq_len 64"):
        engine.add_request([1] * 60, greedy(10))
    with pytest.raises(ValueError, match="need 10 cache blocks of 4; the cache holds 8"):
        engine.add_request([1] * 30, greedy(10))
    engine.add_request([1, 2], greedy(1), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], greedy(1), request_id="x")
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        Engine(build_model(CFG.replace(num_nextn_predict_layers=0)), speculative=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(tiny_model(), max_seq_len=CFG.max_position_embeddings + 1)
    for bad, field in [(dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"), (dict(logprobs=21), "logprobs"),
                       (dict(seed=-1), "seed"), (dict(max_tokens=1.5), "max_tokens"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**bad)
