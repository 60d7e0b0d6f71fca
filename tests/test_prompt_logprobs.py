"""Prompt log-probabilities (``GenerationSpec.prompt_logprobs``, vlmguard/prompt_logprobs.py), prompts given as token
ids (``Request.prompt_token_ids``) and the entry of the token that ended an answer (``GenerationResult.end_logprob``):
the model's own log-softmax at every prompt position (transformers' logits, the image's tokens seen), unchanged by
batching, copies, a pruner or a decoder, on each request's first stream event; a prompt of ids answered as its text."""
from __future__ import annotations

import asyncio

import pytest
import torch

from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


@pytest.fixture(scope="module")
def llava():
    return tiny_engine("llava")


def _reference(eng, req: Request) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and transformers' own log-softmax at each of its positions (the whole model's forward)."""
    text = eng.adapter.format_prompt(Prompt(req.prompt, req.images, raw=req.raw_prompt))
    inputs = eng.processor(images=req.images or None, text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = eng.model(**inputs).logits[0].float()
    return inputs["input_ids"][0].tolist(), torch.log_softmax(logits, dim=-1)[:, : eng.adapter.n_tokens or None]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logprobs_are_the_models_own_log_softmax_image_tokens_seen(family):
    eng = tiny_engine(family)
    req = Request("Is there a dog in the image?", [random_image(3, (40, 32))])
    res = eng.generate([req], GenerationSpec(max_new_tokens=2, prompt_logprobs=3))[0]
    ids, ref = _reference(eng, req)
    image = eng.adapter.image_token_id
    assert [e.token_id for e in res.prompt_logprobs] == ids and len(ids) == res.prompt_tokens
    assert res.prompt_logprobs[0].logprob is None and res.prompt_logprobs[0].top == []
    scored = 0
    for p, e in enumerate(res.prompt_logprobs[1:], start=1):
        if e.token_id == image:  # a feature, not a token the model predicts
            assert e.logprob is None and e.top == []
            continue
        top_v, top_i = ref[p - 1].topk(3)
        own = ref[p - 1, e.token_id].item()
        assert e.logprob == pytest.approx(own, abs=1e-4)
        # its rank: 1 + the tokens more likely (a near tie may go either way)
        assert 1 + int((ref[p - 1] > own + 1e-4).sum()) <= e.rank <= 1 + int((ref[p - 1] > own - 1e-4).sum())
        assert [t.token_id for t in e.top] == top_i.tolist()
        assert [t.logprob for t in e.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        scored += 1
    # the text after the image is scored too: its first token is predicted from the image's last feature
    assert scored == len(ids) - 1 - sum(1 for t in ids if t == image) and ids.count(image) > 0


def test_off_by_default_validated_and_the_answer_unchanged(llava):
    req = Request("describe the photo", [random_image(5, (32, 40))])
    plain = llava.generate([req], GenerationSpec(max_new_tokens=6))[0]
    assert plain.prompt_logprobs is None and plain.end_logprob is None
    scored = llava.generate([req], GenerationSpec(max_new_tokens=6, prompt_logprobs=0))[0]
    assert scored.token_ids == plain.token_ids and scored.text == plain.text
    assert all(e.top == [] for e in scored.prompt_logprobs) and scored.prompt_logprobs[-1].logprob is not None
    with pytest.raises(Exception, match="prompt_logprobs"):
        GenerationSpec(prompt_logprobs=21)
    with pytest.raises(Exception, match="not a boolean"):
        GenerationSpec(prompt_logprobs=True)


@pytest.mark.parametrize("pruning, decoding", [("fastv", "greedy"), ("flowcut", "greedy"), ("none", "vcd"),
                                               ("adaptinfer", "m3id")])
def test_the_models_own_whatever_prunes_or_contrasts_the_answer(llava, pruning, decoding):
    """A pruner cuts the answer's visual tokens and a decoder contrasts its scores; the prompt's entries stay the
    model's over the whole prompt, the same as under plain decoding."""
    req = Request("Is there a dog in the image?", [random_image(4, (40, 40))])
    plain = llava.generate([req], GenerationSpec(max_new_tokens=2, prompt_logprobs=2))[0]
    spec = GenerationSpec(max_new_tokens=2, prompt_logprobs=2, pruning=pruning, decoding=decoding,
                          **({"budget": 4} if pruning != "none" else {}))
    res = llava.generate([req], spec)[0]
    assert [e.token_id for e in res.prompt_logprobs] == [e.token_id for e in plain.prompt_logprobs]
    assert [e.logprob for e in res.prompt_logprobs] == pytest.approx([e.logprob for e in plain.prompt_logprobs])
    if pruning != "none":
        assert res.visual_tokens_kept[-1] < plain.visual_tokens_kept[-1]  # (the answer was pruned)


def test_batched_copies_and_others_equal_alone(llava):
    """Requests of different lengths in one batch (left padding), copies of one request (n), and a request without
    prompt log-probabilities beside them: each gets its own prompt's entries, as alone, with its own count."""
    a = Request("Is there a dog in the image?", [random_image(1, (40, 32))])
    b = Request("describe", [random_image(2, (32, 32))])
    alone = [llava.generate([r], GenerationSpec(max_new_tokens=2, prompt_logprobs=2))[0] for r in (a, b)]
    specs = [GenerationSpec(max_new_tokens=2, prompt_logprobs=2), GenerationSpec(max_new_tokens=2, prompt_logprobs=1),
             GenerationSpec(max_new_tokens=2, prompt_logprobs=2), GenerationSpec(max_new_tokens=2)]
    together = llava.generate([a, a, b, b], specs)
    for res, ref, k in [(together[0], alone[0], 2), (together[1], alone[0], 1), (together[2], alone[1], 2)]:
        assert [e.token_id for e in res.prompt_logprobs] == [e.token_id for e in ref.prompt_logprobs]
        assert [e.logprob for e in res.prompt_logprobs] == pytest.approx(
            [e.logprob for e in ref.prompt_logprobs], abs=1e-4)
        assert max(len(e.top) for e in res.prompt_logprobs) == k
    assert together[3].prompt_logprobs is None


def test_a_stream_sends_them_once_on_its_first_event(llava):
    reqs = [Request("Is there a dog?", [random_image(1, (40, 32))]), Request("describe", [random_image(2)])]
    spec = GenerationSpec(max_new_tokens=8, prompt_logprobs=1, ignore_eos=True)
    seen: dict[int, list] = {0: [], 1: []}
    results = {}
    for ev in llava.stream(reqs, spec):
        seen[ev.index].append(ev.prompt_logprobs)
        if ev.done:
            results[ev.index] = ev.result
    for i in (0, 1):
        assert seen[i][0] == results[i].prompt_logprobs and all(x is None for x in seen[i][1:])
        assert len(seen[i]) > 1


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_prompt_of_token_ids_is_answered_as_its_text(family):
    eng = tiny_engine(family)
    text = "Once upon a time there was"
    ids = eng.adapter.tokenizer(text)["input_ids"]
    spec = GenerationSpec(max_new_tokens=6, prompt_logprobs=1, logprobs=1)
    for decoding in ("greedy", "m3id"):
        as_text = eng.generate([Request(text, raw_prompt=True)], spec.model_copy(update={"decoding": decoding}))[0]
        as_ids = eng.generate([Request("", prompt_token_ids=ids)], spec.model_copy(update={"decoding": decoding}))[0]
        assert as_ids.token_ids == as_text.token_ids and as_ids.text == as_text.text
        assert as_ids.prompt_tokens == len(ids) and [e.token_id for e in as_ids.prompt_logprobs] == ids
        assert [e.logprob for e in as_ids.prompt_logprobs] == pytest.approx(
            [e.logprob for e in as_text.prompt_logprobs], abs=1e-5)
    # ids the tokenizer would not make of any text are fed as they are (no special token added)
    odd = ids[1:] + ids[:1]
    res = eng.generate([Request("", prompt_token_ids=odd)], GenerationSpec(max_new_tokens=2, prompt_logprobs=0))[0]
    assert [e.token_id for e in res.prompt_logprobs] == odd


def test_a_bad_prompt_of_token_ids_is_refused_naming_it(llava):
    vocab = llava.adapter.embed_tokens.num_embeddings
    image_id = llava.adapter.image_token_id
    cases = [([], "non-empty list"), ([1, "a"], "non-empty list"), ([1, True], "non-empty list"),
             ([1, vocab], f"token id {vocab} is not in the model's vocabulary"), ([-1], "token id -1"),
             ([1, image_id, 2], "image placeholder id")]
    for ids, says in cases:
        with pytest.raises(InvalidInput, match=says) as e:
            llava.generate([Request("", prompt_token_ids=ids)])
        assert e.value.param == "prompt"
    with pytest.raises(InvalidInput, match="takes no image") as e:
        llava.generate([Request("", [random_image(1)], prompt_token_ids=[1, 2])])
    assert e.value.param == "images"


def test_the_token_that_ended_the_answer_has_an_entry(llava):
    """The end of sequence or stop token id that ends an answer is left out of it (text, ids, ``logprobs``): its
    entry is ``end_logprob``, the decoder's final scores' as every other."""
    req = Request("describe the photo", [random_image(6)])
    free = llava.generate([req], GenerationSpec(max_new_tokens=4, logprobs=2))[0]
    assert free.finish_reason == "length" and free.end_logprob is None
    stop_id = free.token_ids[0]  # (the answer's first token ends it)
    res = llava.generate([req], GenerationSpec(max_new_tokens=4, logprobs=2, stop_token_ids=[stop_id]))[0]
    assert res.finish_reason == "stop" and res.token_ids == [] and res.logprobs == [] and res.text == ""
    assert res.end_logprob.token_id == stop_id and res.end_logprob == free.logprobs[0]
    quiet = llava.generate([req], GenerationSpec(max_new_tokens=4, stop_token_ids=[stop_id]))[0]
    assert quiet.end_logprob is None  # (no logprobs asked for)


def test_the_native_api_returns_them_whole_and_streamed(qwen):
    """``POST /v1/generate`` with spec ``prompt_logprobs``: the result's entries (the first without a value), and on
    a stream's first event the same."""
    import json

    from service_support import qwen_api, run_with_sdk

    body = {"model": "tiny-qwen", "prompt": "Describe the picture.", "spec": {"max_new_tokens": 4,
                                                                           "prompt_logprobs": 2, "ignore_eos": True}}

    async def scenario(client, http):
        whole = (await http.post("/v1/generate", json=body)).json()
        streamed = await http.post("/v1/generate", json={**body, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        return whole, events

    whole, events = run_with_sdk(qwen_api(qwen), scenario)
    entries = whole["prompt_logprobs"]
    assert len(entries) == whole["prompt_tokens"] and entries[0]["logprob"] is None
    assert all(e["logprob"] is not None and len(e["top"]) == 2 for e in entries[1:])
    assert [{"logprob": None, **e} for e in events[0]["prompt_logprobs"]] == entries  # (SSE leaves out nulls)
    assert all(e.get("prompt_logprobs") is None for e in events[1:])
    from vlmguard.api_schema import GenerateStreamEvent
    assert GenerateStreamEvent(**events[0]).prompt_logprobs[0].logprob is None  # what the client parses


def test_the_replicas_inflight_batcher_passes_them_on_joined_and_streamed():
    """A served model's requests run in the in-flight batcher (``workers/inflight.py``): a request of token ids with
    prompt log-probabilities that joins a running batch gets them as alone, and a stream's first event carries them."""
    from vlmguard.workers.engine_worker import EngineWorker, WorkItem
    from vlmguard.workers.inflight import InflightBatcher

    worker = EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))
    ids = worker.engine.adapter.tokenizer("Once upon a time")["input_ids"]
    long = WorkItem(prompt="describe the photo", images=[random_image(1)],
                    spec=GenerationSpec(max_new_tokens=300, ignore_eos=True))
    scored = WorkItem(prompt="", prompt_token_ids=ids, raw_prompt=True,
                      spec=GenerationSpec(max_new_tokens=3, prompt_logprobs=1))
    alone = worker.generate_many([scored])[0]["result"]
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)

    async def main():
        first = asyncio.ensure_future(b.submit(long))
        await asyncio.sleep(0.05)
        joined = await b.submit(scored)
        events = [ev async for ev in b.stream(scored)]
        await first
        return joined["result"], events

    try:
        joined, events = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        b.close()
    assert joined["token_ids"] == alone["token_ids"] and len(joined["prompt_logprobs"]) == len(ids)
    assert joined["timings"]["batch_size"] == 2  # (it joined the running batch)
    assert [e["logprob"] for e in joined["prompt_logprobs"]] == pytest.approx(
        [e["logprob"] for e in alone["prompt_logprobs"]], abs=1e-5)
    assert [e["token_id"] for e in events[0]["prompt_logprobs"]] == ids
    assert all("prompt_logprobs" not in ev for ev in events[1:])
