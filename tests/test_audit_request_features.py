"""Regression tests from an audit of per-request settings, log-probabilities, penalties and ``n`` choices.

Each test failed on the code as audited (commits c4f55ae, 9c15dfe) because of the defect it names."""
from __future__ import annotations

import asyncio
import json

import httpx

from vlmguard.images import image_to_data_url
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


# ---- benchmarks: a run with penalties ----------------------------------------------------------------------

def test_a_benchmark_run_with_penalties_is_recorded_and_labelled(tmp_path):
    """``spec_knobs`` now adds ``presence_penalty`` & co. to a run's knobs, but ``db.RUN_COLUMNS`` has no such
    columns: ``ensure_run`` raises ``ValueError: unknown run knobs`` and every benchmark or sweep run with a
    penalty (sweep configs accept them) dies before its first sample. The run rows also need the penalties for
    ``report.method_label`` / ``compare`` to tell such runs from plain ones."""
    from test_bench_runner import SYNTH, FakeEngine

    from vlmguard.bench import db as dbm
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.report import method_label
    from vlmguard.bench.runner import default_spec, run_benchmark

    db = tmp_path / "r.sqlite"
    spec = default_spec("pope", presence_penalty=0.5)
    out = run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), spec, db, split="random", limit=2,
                        progress=False)
    plain = run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope"), db, split="random",
                          limit=2, progress=False)
    assert out.run_id != plain.run_id
    labels = {r["run_id"]: method_label(r) for r in dbm.list_runs(db)}
    assert labels[out.run_id] == "penalty[presence=0.5]" and labels[plain.run_id] == "base"


# ---- batch keys -----------------------------------------------------------------------------------------------

def test_equal_specs_have_equal_batch_keys_and_share_a_batch():
    """``GenerationSpec.batch_key`` is ``model_dump_json``: dict key order and 1 vs 1.0 in ``decoding_params`` /
    ``pruning_params`` change it although the specs are equal (pydantic ``==``) and resolve to the same decoder.
    ``request_specs`` then refuses a batch of equal specs with InvalidInput, and the batchers never join such
    requests (different clients serialise their JSON objects in different orders)."""
    from vlmguard.engine import request_specs

    a = GenerationSpec(decoding="vcd", decoding_params={"alpha": 1.0, "beta": 0.1}, max_new_tokens=3)
    b = GenerationSpec(decoding="vcd", decoding_params={"beta": 0.1, "alpha": 1.0}, max_new_tokens=5)
    c = GenerationSpec(decoding="vcd", decoding_params={"alpha": 1, "beta": 0.1}, max_new_tokens=5)
    assert a.model_copy(update={"max_new_tokens": 5}) == b == c
    assert a.batch_key() == b.batch_key() == c.batch_key()
    request_specs([a, b, c], 3)  # raises InvalidInput "spec 1: the requests of one batch share ..."


# ---- in-flight batching: what a finished request leaves behind ------------------------------------------------

def test_a_running_batch_releases_the_row_samplers_of_requests_that_finished():
    """``DecodeBatch.absorb`` appended the joiners' ``RowSampler`` s (each sampling one owns a seeded
    ``torch.Generator``) to the batch's sampler, and nothing removed a finished or dropped request's row: an
    in-flight batch under steady load never drains, so it grew by one row per request served, without bound.
    A request's sampler now lives with the request and leaves the batch with it."""
    import gc
    import weakref

    eng = tiny_engine("llava")
    img = random_image(1, (40, 32))
    batch = eng.start_batch([Request("describe the photo", [img])], GenerationSpec(max_new_tokens=20))
    gone = []
    try:
        for k in range(4):
            joiner = eng.start_batch([Request("describe the photo", [random_image(k + 2, (40, 32))])],
                                     GenerationSpec(max_new_tokens=1, do_sample=True, temperature=0.8, seed=k),
                                     indices=[k + 1])
            gone.append(weakref.ref(joiner.lives[0].sampler))
            batch.absorb(joiner)
            del joiner
            done = [ev.index for ev in batch.advance() if ev.done]
            assert k + 1 in done  # the one-token joiner has finished and left the batch
        assert batch.active == 1
        gc.collect()
        assert [r() for r in gone] == [None] * 4  # nothing holds the finished requests' samplers
    finally:
        batch.close()


# ---- the OpenAI wire format --------------------------------------------------------------------------------

def test_chat_accepts_n_null_as_openai_and_vllm_do():
    """OpenAI's ``n`` is "integer or null" (default 1) and vLLM's ``n: Optional[int] = 1``; clients that send
    every parameter (null when unset) get a 400 "n: Input should be a valid integer" (``ChatCompletionRequest.n``
    is a plain ``int``), while ``logprobs`` / ``top_logprobs`` / penalties beside it accept null."""
    from test_client import _inprocess_app

    app = _inprocess_app()
    body = {"model": "tiny-llava", "max_tokens": 2, "n": None, "logprobs": None, "top_logprobs": None,
            "presence_penalty": None, "frequency_penalty": None,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "describe the photo"},
                {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(1, (40, 32)))}}]}]}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", content=json.dumps(body),
                                   headers={"content-type": "application/json"})

    r = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


# ---- repetition penalty: on what scores --------------------------------------------------------------------

def test_repetition_penalty_under_plain_greedy_decoding_is_transformers_on_the_generated_tokens():
    """``apply_penalties`` runs on the decoder's final scores, which for plain decoding are log-probabilities
    (``Decoder.combine``: ``log_softmax``, all <= 0), not logits. The multiplicative repetition penalty of
    transformers / vLLM is defined on logits and is not shift-invariant: on log-probabilities every seen token is
    multiplied (never divided), and a confident repeat (log-prob near 0) is hardly penalised at all, so the engine
    picks other tokens than transformers' ``RepetitionPenaltyLogitsProcessor`` restricted to the generated tokens
    (the reference the module doc names). Presence / frequency penalties are shift-invariant and unaffected."""
    from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    from vlmguard.models.base import Prompt

    class OnGenerated(LogitsProcessor):  # transformers' processor, on the answer's tokens only (as documented)
        def __init__(self, p: float, n_prompt: int):
            self.proc, self.n = RepetitionPenaltyLogitsProcessor(p), n_prompt

        def __call__(self, input_ids, scores):
            gen = input_ids[:, self.n:]
            return scores if gen.shape[1] == 0 else self.proc(gen, scores)

    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(1, (40, 32))])
    res = eng.generate([req], GenerationSpec(max_new_tokens=10, repetition_penalty=1.3))[0]
    inputs = eng.processor(images=req.images, text=[eng.adapter.format_prompt(Prompt(req.prompt, req.images))],
                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    out = eng.model.generate(**inputs, max_new_tokens=len(res.token_ids), min_new_tokens=len(res.token_ids),
                             do_sample=False, logits_processor=LogitsProcessorList([OnGenerated(1.3, n)]))
    assert res.token_ids == out[0, n:].tolist()
