"""Log-probabilities of generated tokens (``GenerationSpec.logprobs``, OpenAI's ``logprobs`` / ``top_logprobs``):
the log-softmax of the decoder's final scores, equal to transformers' own logits under plain greedy decoding;
the same entries in results and streams; finite, JSON-safe values under contrastive decoders; token texts and
bytes right on every kind of tokenizer; and the API's OpenAI shape, streaming included."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from vlmguard.images import image_to_data_url
from vlmguard.models.base import Prompt
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine
from vlmguard.token_text import TokenPieces

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


def request(i: int = 0) -> Request:
    return Request(["Is there a dog in the image?", "describe the photo"][i % 2], [random_image(i + 1, (40, 32))])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_logprobs_are_the_models_own_log_softmax(family):
    eng = tiny_engine(family)
    req = request()
    res = eng.generate([req], GenerationSpec(max_new_tokens=6, logprobs=4))[0]
    text = eng.adapter.format_prompt(Prompt(req.prompt, req.images))
    inputs = eng.processor(images=req.images, text=[text], return_tensors="pt")
    out = eng.model.generate(**inputs, max_new_tokens=len(res.token_ids), min_new_tokens=len(res.token_ids),
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == res.token_ids
    assert len(res.logprobs) == len(res.token_ids) == 6
    for entry, logits in zip(res.logprobs, out.logits):
        ref = torch.log_softmax(logits[0].float(), dim=-1)[: eng.adapter.n_tokens or None]
        top_v, top_i = ref.topk(4)
        assert entry.logprob == pytest.approx(ref[entry.token_id].item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == top_i.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        assert entry.top[0].token_id == entry.token_id  # greedy: the chosen token is the most likely


def test_logprobs_off_by_default_and_zero_alternatives():
    eng = tiny_engine("llava")
    assert eng.generate([request()], GenerationSpec(max_new_tokens=3))[0].logprobs is None
    res = eng.generate([request()], GenerationSpec(max_new_tokens=3, logprobs=0))[0]
    assert len(res.logprobs) == 3 and all(e.top == [] for e in res.logprobs)
    with pytest.raises(Exception, match="logprobs"):
        GenerationSpec(logprobs=21)
    with pytest.raises(Exception, match="not a boolean"):  # pydantic would read true as 1 alternative
        GenerationSpec(logprobs=True)


@pytest.mark.parametrize("decoding", ["vcd", "m3id", "vista", "iava", "lqcd"])
def test_contrastive_logprobs_are_finite_json_and_rank_the_chosen_token_first(decoding):
    eng = tiny_engine("llava")
    res = eng.generate([request()], GenerationSpec(max_new_tokens=5, logprobs=5, decoding=decoding))[0]
    assert len(res.logprobs) == len(res.token_ids)
    json.dumps(res.to_dict(), allow_nan=False)  # no NaN or infinity: a ruled-out token reads -9999
    for e in res.logprobs:
        values = [e.logprob] + [t.logprob for t in e.top]
        assert all(-9999.0 <= v <= 0.0 for v in values)
        assert e.top[0].token_id == e.token_id and e.top[0].logprob == e.logprob  # greedy over the final scores
        assert sum(torch.tensor([t.logprob for t in e.top]).exp().tolist()) <= 1.0 + 1e-4


def test_stream_events_carry_each_tokens_entry_once_and_add_up_to_the_result():
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=12, logprobs=1, stop=["an", "th"])  # stop strings hold text back
    reqs = [request(0), request(1)]
    results, per_request = {}, {0: [], 1: []}
    for ev in eng.stream(reqs, spec):
        per_request[ev.index] += ev.logprobs
        if ev.done:
            results[ev.index] = ev.result
    for i in (0, 1):
        assert per_request[i] == results[i].logprobs
        assert [e.token_id for e in results[i].logprobs] == results[i].token_ids


# ---- token texts and bytes -----------------------------------------------------------------------------

def _tokenizers():
    from test_detokenize import _byte_level_bpe, _sentencepiece_style

    return {"byte-level-bpe": _byte_level_bpe(), "sentencepiece-byte-fallback": _sentencepiece_style()}


@pytest.mark.parametrize("name", ["byte-level-bpe", "sentencepiece-byte-fallback"])
def test_token_bytes_add_up_to_the_text_and_texts_keep_their_leading_space(name):
    tok = _tokenizers()[name]
    pieces = TokenPieces(tok)
    for text in ["A red car is parked next to the light.", "Café crème, déjà vu.", "Emoji 😀🚗 and 🍕 ok",
                 "东京 的 猫"]:
        ids = tok.encode(text, add_special_tokens=False)
        data = bytes(b for i in ids for b in pieces.bytes(i))
        # SentencePiece's decoder drops the first token's leading space: the bytes keep it, as the text does
        assert data.decode("utf-8").lstrip(" ") == text
    ascii_ids = tok.encode("A red car is parked next to the light.", add_special_tokens=False)
    texts = [pieces.text(i) for i in ascii_ids]  # as they read inside the text: " red", not "red"
    assert "".join(texts).lstrip(" ") == "A red car is parked next to the light."


def test_bundled_tokenizer_token_texts():
    from vlmguard.engine import Engine

    tok = Engine.load("tiny").adapter.tokenizer
    pieces = TokenPieces(tok)
    ids = tok.encode("There is a spoon.", add_special_tokens=False)
    assert "".join(pieces.text(i) for i in ids).strip() == tok.decode(ids)


# ---- the API -------------------------------------------------------------------------------------------

def _app():
    from test_client import _inprocess_app

    return _inprocess_app()


def test_openai_sdk_logprobs_streamed_and_not():
    import openai

    app = _app()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is there a dog in the image?"},
                                             {"type": "image_url",
                                              "image_url": {"url": image_to_data_url(random_image(1, (40, 32)))}}]}]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            kw = dict(model="tiny-llava", messages=messages, max_tokens=7, logprobs=True, top_logprobs=3,
                      extra_body={"vlmguard": {"decoding": "vcd"}})
            full = await client.chat.completions.create(**kw)
            stream = await client.chat.completions.create(stream=True, **kw)
            chunks = [c async for c in stream]
            plain = await client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=3)
            with pytest.raises(openai.BadRequestError, match="top_logprobs requires logprobs"):
                await client.chat.completions.create(model="tiny-llava", messages=messages, top_logprobs=2)
            return full, chunks, plain

    full, chunks, plain = asyncio.run(scenario())
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert all(c.choices[0].logprobs is None or c.choices[0].logprobs.content for c in chunks if c.choices)
    assert plain.choices[0].logprobs is None


def test_native_generate_returns_logprobs_in_results_and_stream_events():
    from vlmguard.client import AsyncClient

    app = _app()
    img = random_image(2, (36, 36))

    async def scenario():
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as c:
            r = await c.generate("describe the photo", images=[img], max_new_tokens=5, logprobs=2)
            events = [e async for e in c.generate_stream("describe the photo", images=[img], max_new_tokens=5,
                                                         logprobs=2)]
            return r, events

    r, events = asyncio.run(scenario())
    assert [e.token_id for e in r.logprobs] == r.token_ids and all(len(e.top) == 2 for e in r.logprobs)
    assert [e.token_id for ev in events for e in ev.logprobs] == r.token_ids
    assert events[-1].result.logprobs == r.logprobs
