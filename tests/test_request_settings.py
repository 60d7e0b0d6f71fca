"""Requests of one pruner and decoder share a batch whatever their own generation settings (length, stop
strings, greedy or sampling, temperature, top-k / top-p / min-p, seed, diagnostics, log-probabilities), and each gets
exactly what it gets alone: in one engine call, in a running batch it joins, and through the replica's
batchers. Requests of another pruner or decoder never share a batch."""
from __future__ import annotations

import asyncio

import pytest

from pruning_support import run_joined
from vlmguard.engine import request_specs
from vlmguard.errors import InvalidInput
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.inflight import InflightBatcher

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
PROMPTS = ["Is there a dog in the image?", "describe the photo", "what color is the car", "Count the objects.",
           "Where is the cup?"]
SIZES = [(40, 32), (64, 40), (32, 64), (48, 48), (36, 44)]


def reqs(n: int) -> list[Request]:
    return [Request(PROMPTS[i], [random_image(i + 1, SIZES[i])]) for i in range(n)]


def mixed_specs(**shared) -> list[GenerationSpec]:
    return [
        GenerationSpec(max_new_tokens=3, ignore_eos=True, **shared),
        GenerationSpec(max_new_tokens=7, do_sample=True, temperature=0.8, top_k=20, seed=5, logprobs=2, **shared),
        GenerationSpec(max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.9, min_p=0.05, seed=11,
                       diagnostics=False, **shared),
        GenerationSpec(max_new_tokens=8, stop=["e"], stop_token_ids=[5, 9], **shared),
    ]


def close_logprobs(a, b) -> None:
    """The same entries, values to float32 round-off (a batch's GEMMs may take other kernels than one row's)."""
    assert (a is None) == (b is None)
    for x, y in zip(a or [], b or []):
        assert (x.token_id, x.token, x.bytes, [t.token_id for t in x.top]) == (
            y.token_id, y.token, y.bytes, [t.token_id for t in y.top])
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [t.logprob for t in x.top] == pytest.approx([t.logprob for t in y.top], abs=1e-4)
    assert len(a or []) == len(b or [])


def same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert len(a.steps) == len(b.steps)
    close_logprobs(a.logprobs, b.logprobs)


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_with_their_own_settings_share_one_batch_and_get_what_they_get_alone(family):
    eng = tiny_engine(family)
    specs = mixed_specs()
    batched = eng.generate(reqs(4), specs)
    for r, req, spec in zip(batched, reqs(4), specs):
        same(r, eng.generate([req], spec)[0])
        assert r.timings.batch_size == 4  # one batch, not one per spec
    assert [len(r.token_ids) <= s.max_new_tokens for r, s in zip(batched, specs)] == [True] * 4
    assert len(batched[0].token_ids) == 3 and batched[2].steps == [] and batched[1].logprobs is not None
    assert batched[0].logprobs is None and "e" not in batched[3].text


@pytest.mark.parametrize("pruning, decoding", [("fastv", "vcd"), ("flowcut", "m3id"), ("adaptinfer", "vista")])
def test_own_settings_with_pruning_and_contrastive_decoding(pruning, decoding):
    eng = tiny_engine("llava")
    specs = mixed_specs(pruning=pruning, budget=6, decoding=decoding)
    batched = eng.generate(reqs(4), specs)
    for r, req, spec in zip(batched, reqs(4), specs):
        same(r, eng.generate([req], spec)[0])


def test_requests_with_other_settings_join_a_running_batch():
    eng = tiny_engine("llava")
    specs = mixed_specs(decoding="vcd")
    alone = [eng.generate([q], s)[0] for q, s in zip(reqs(4), specs)]
    results = run_joined(eng, specs[:2], reqs(4)[:2], reqs(4)[2:], join_after=2, later_spec=specs[2:])
    for i in range(4):
        same(results[i], alone[i])
    assert results[3].timings.batch_size >= 3


def test_specs_of_another_pruner_or_decoder_are_refused_in_one_batch():
    base = GenerationSpec(max_new_tokens=4)
    for other in (GenerationSpec(max_new_tokens=4, decoding="vcd"), GenerationSpec(pruning="fastv", budget=4),
                  GenerationSpec(decoding_params={"alpha": 0.5}, decoding="vcd")):
        with pytest.raises(InvalidInput, match="spec 1: the requests of one batch share their pruning and decoding"):
            request_specs([base, other], 2)
    assert base.batch_key() == GenerationSpec(max_new_tokens=9, seed=3, stop=["x"], logprobs=4, do_sample=True,
                                              temperature=0.5, top_p=0.5, top_k=3, diagnostics=False).batch_key()
    with pytest.raises(InvalidInput, match="1 specs for 2 requests"):
        tiny_engine("llava").generate(reqs(2), [base])
    with pytest.raises(InvalidInput, match="spec 0 must be a GenerationSpec"):
        tiny_engine("llava").generate(reqs(1), [{"max_new_tokens": 3}])


def test_a_context_too_long_is_checked_against_each_requests_own_length():
    eng = tiny_engine("llava")
    ok = GenerationSpec(max_new_tokens=4)
    too_long = GenerationSpec(max_new_tokens=eng.context_length)
    with pytest.raises(InvalidInput, match="request 1: prompt"):
        eng.generate(reqs(2), [ok, too_long])


# ---- the replica: both batchers put such requests in one batch ------------------------------------------

def items(specs) -> list[WorkItem]:
    return [WorkItem(prompt=q.prompt, images=q.images, spec=s, request_id=f"r{i}")
            for i, (q, s) in enumerate(zip(reqs(len(specs)), specs))]


def test_the_worker_runs_requests_with_their_own_settings_as_one_engine_call():
    worker = EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))
    specs = mixed_specs()
    alone = [worker.generate_many([it])[0]["result"] for it in items(specs)]
    before = worker.batches
    answers = worker.generate_many(items(specs))
    assert worker.batches == before + 1
    assert [a["result"]["token_ids"] for a in answers] == [a["token_ids"] for a in alone]
    assert [a["result"]["request_id"] for a in answers] == ["r0", "r1", "r2", "r3"]


def test_the_inflight_batcher_joins_requests_with_their_own_settings():
    worker = EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))
    specs = mixed_specs() * 2
    alone = [worker.generate_many([it])[0]["result"] for it in items(specs[:4])] * 2
    b = InflightBatcher(worker, max_batch_size=8, wait_s=0.0)

    async def main():
        tasks = []
        for it in items(specs[:4]) + items(specs[:4]):  # arrivals spread over the first requests' decoding
            tasks.append(asyncio.ensure_future(b.submit(it)))
            await asyncio.sleep(0.005)
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    answers = asyncio.run(main())
    assert [a["result"]["token_ids"] for a in answers] == [a["token_ids"] for a in alone]
    for a, want in zip(answers, alone):
        got = a["result"]["logprobs"]
        assert (got is None) == (want["logprobs"] is None)
        assert [e["token_id"] for e in got or []] == [e["token_id"] for e in want["logprobs"] or []]
        assert [e["logprob"] for e in got or []] == pytest.approx([e["logprob"] for e in want["logprobs"] or []],
                                                                  abs=1e-4)
    assert max(a["result"]["timings"]["batch_size"] for a in answers) >= 3
