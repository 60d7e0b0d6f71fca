"""Copies of one request (the ``n`` choices of a chat request: the same prompt and image objects) are prefilled
once and decoded as separate rows, each with its own spec: every copy gets exactly what it gets alone. Only for
decoders without per-request state (plain greedy / sampling); contrastive decoders prefill every copy."""
from __future__ import annotations

import pytest

from pruning_support import run_joined
from vlmguard.results import Request
from vlmguard.runner import LayerRunner
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


@pytest.fixture
def prefilled_rows(monkeypatch):
    rows: list[int] = []
    original = LayerRunner.prefill

    def prefill(self, seq, *a, **k):
        rows.append(seq.batch_size)
        return original(self, seq, *a, **k)

    monkeypatch.setattr(LayerRunner, "prefill", prefill)
    return rows


def sampled(seed: int, n: int = 6, **kw) -> GenerationSpec:
    return GenerationSpec(max_new_tokens=n, do_sample=True, temperature=0.9, seed=seed, logprobs=1, **kw)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_copies_of_a_request_are_prefilled_once_and_answer_as_alone(family, prefilled_rows):
    eng = tiny_engine(family)
    req = Request("describe the photo", [random_image(1, (40, 32))])
    specs = [sampled(5), sampled(6, n=3), sampled(7), GenerationSpec(max_new_tokens=4)]
    alone = [eng.generate([req], s)[0] for s in specs]
    prefilled_rows.clear()
    got = eng.generate([req] * 4, specs)
    assert prefilled_rows == [1]  # one prefill row for the four copies
    for g, a in zip(got, alone):
        assert (g.token_ids, g.text, g.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert g.visual_tokens_kept == a.visual_tokens_kept and g.timings.batch_size == 4
        assert g.timings.prefill_batch == 4 and a.timings.prefill_batch == 1  # requests served by the prefill
    assert len({tuple(g.token_ids) for g in got}) > 1  # sampled with their own seeds
    assert [len(g.logprobs or []) for g in got] == [len(g.token_ids) if g.logprobs is not None else 0 for g in got]


def test_copies_among_other_requests_and_with_a_pruner(prefilled_rows):
    eng = tiny_engine("llava")
    a = Request("describe the photo", [random_image(1, (40, 32))])
    b = Request("what color is the car", [random_image(2, (40, 32))])
    reqs = [a, b, a, b, a]
    specs = [sampled(i, pruning="fastv", budget=6) for i in range(5)]
    alone = [eng.generate([r], s)[0] for r, s in zip(reqs, specs)]
    prefilled_rows.clear()
    got = eng.generate(reqs, specs)
    assert prefilled_rows == [2]
    assert [g.token_ids for g in got] == [x.token_ids for x in alone]
    assert [g.kept_indices for g in got] == [x.kept_indices for x in alone]


def test_same_looking_requests_are_not_copies_and_contrastive_decoders_prefill_each(prefilled_rows):
    eng = tiny_engine("llava")
    img = random_image(1, (40, 32))
    twin = random_image(1, (40, 32))  # equal pixels, another object: not taken for a copy
    eng.generate([Request("hi", [img]), Request("hi", [twin])], GenerationSpec(max_new_tokens=2))
    assert prefilled_rows[-1] == 2
    req = Request("describe the photo", [img])
    specs = [GenerationSpec(max_new_tokens=4, decoding="vcd", seed=s, do_sample=True) for s in (1, 2)]
    alone = [eng.generate([req], s)[0].token_ids for s in specs]
    prefilled_rows.clear()
    got = eng.generate([req, req], specs)
    assert prefilled_rows == [4]  # two requests x (main + VCD's noisy branch): no sharing
    assert [g.token_ids for g in got] == alone


def test_copies_join_a_running_batch_and_the_context_check_uses_the_longest_copy(prefilled_rows):
    from vlmguard.errors import ContextTooLong

    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(3, (40, 32))])
    done = run_joined(eng, GenerationSpec(max_new_tokens=12), [Request("what color is the car",
                      [random_image(4, (40, 32))])], [req, req], join_after=0, later_spec=[sampled(1), sampled(2)])
    assert [done[1].token_ids, done[2].token_ids] == [eng.generate([req], sampled(s))[0].token_ids for s in (1, 2)]
    with pytest.raises(ContextTooLong):
        eng.generate([req, req], [GenerationSpec(max_new_tokens=2), GenerationSpec(max_new_tokens=eng.context_length)])
