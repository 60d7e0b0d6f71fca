"""OpenAI's legacy text completions, ``POST /v1/completions`` (workers/completions_api.py): a prompt continued as the
engine continues that text (no chat template), several prompts and choices in one request, ``echo``, the legacy
``logprobs`` object, streaming, and 400s naming the field for what it cannot do. Through the OpenAI SDK."""
from __future__ import annotations

import pytest
import torch

from service_support import qwen_api, run_with_sdk
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec

PROMPT = "Once upon a time"
MODEL = "tiny-qwen"


@pytest.fixture(scope="module")
def app(qwen):
    return qwen_api(qwen)


def _engine(qwen, prompt: str, **spec):
    """What the engine itself answers for ``prompt`` read as it is."""
    return qwen.engine.generate([Request(prompt=prompt, raw_prompt=True)], GenerationSpec(**spec))[0]


def test_a_completion_continues_the_prompt_as_the_engine_does(qwen, app):
    async def scenario(client, http):
        one = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
        default = await client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
        return one, default

    one, default = run_with_sdk(app, scenario)
    alone = _engine(qwen, PROMPT, max_new_tokens=8)
    assert one.object == "text_completion" and one.id.startswith("cmpl-") and one.model == MODEL
    assert one.choices[0].text == alone.text != "" and one.choices[0].finish_reason == alone.finish_reason
    assert one.usage.prompt_tokens == alone.prompt_tokens and one.usage.completion_tokens == len(alone.token_ids)
    assert one.model_extra["vlmguard"]["visual_tokens"] == 0
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"  # (OpenAI's 16)


def test_several_prompts_with_several_choices_each(qwen, app):
    """Answer j = p * n + k is prompt p's k-th, drawn with seed + j: what a request of that prompt alone with that
    seed gets; the usage counts each prompt once."""
    prompts = ["Once upon", "a time"]

    async def scenario(client, http):
        both = await client.completions.create(model=MODEL, prompt=prompts, n=2, temperature=1.0, seed=3,
                                               max_tokens=5)
        alone = [await client.completions.create(model=MODEL, prompt=prompts[j // 2], temperature=1.0, seed=3 + j,
                                                 max_tokens=5) for j in range(4)]
        return both, alone

    both, alone = run_with_sdk(app, scenario)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[2].usage.prompt_tokens
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_echo_and_log_probabilities(qwen, app):
    async def scenario(client, http):
        plain = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6)
        echoed = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, echo=True)
        scored = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2)
        return plain, echoed, scored

    plain, echoed, scored = run_with_sdk(app, scenario)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    lp = scored.choices[0].logprobs
    alone = _engine(qwen, PROMPT, max_new_tokens=6, logprobs=2)
    text = scored.choices[0].text
    # the answer's tokens, then the one that ended it where one did (an end of sequence: vLLM lists it too)
    entries = alone.logprobs + ([alone.end_logprob] if alone.end_logprob else [])
    assert text == plain.choices[0].text and lp.tokens == [e.token for e in entries]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in entries])
    assert [v for top in lp.top_logprobs for v in top.values()] == pytest.approx(
        [t.logprob for e in entries for t in e.top])
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert len(lp.tokens) == scored.usage.completion_tokens + (alone.finish_reason == "stop")
    # each token where it begins in the text; a special token the text leaves out (this model writes some) takes no
    # room: the tokens found at their offsets make up the text
    special = set(qwen.engine.adapter.tokenizer.all_special_tokens)
    assert special & set(lp.tokens)  # (the case is tested)
    assert all(text.startswith(t, o) or t in special for t, o in zip(lp.tokens, lp.text_offset))
    assert "".join(t for t in lp.tokens if t not in special) == text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_text_offsets_where_tokens_and_text_differ():
    """Where each token begins in the text: a dropped leading space, a special token the text leaves out, and a
    character written by two tokens of one byte and more each (their text U+FFFD) do not shift the tokens after."""
    from vlmguard.workers.completions_api import completion_logprobs

    smile = "\U0001F600".encode()  # 4 bytes
    entries = [dict(token=" Hi", logprob=-1.0), dict(token="<|im_end|>", logprob=-2.0),
               dict(token="\ufffd", logprob=-3.0, bytes=list(smile[:1])),
               dict(token="\ufffd", logprob=-3.5, bytes=list(smile[1:])), dict(token=" there", logprob=-4.0)]
    lp = completion_logprobs(entries, "Hi\U0001F600 there", 5)
    assert lp.text_offset == [5, 7, 7, 7, 8] and lp.tokens[1] == "<|im_end|>" and lp.token_logprobs[-1] == -4.0


@pytest.mark.parametrize("echo", [False, True])
def test_a_streamed_completion_is_the_completion(app, echo):
    ask = dict(model=MODEL, prompt=["Once upon", "a time"], n=2, temperature=1.0, seed=5, max_tokens=6, echo=echo,
               **({} if echo else {"logprobs": 1}))

    async def scenario(client, http):
        whole = await client.completions.create(**ask)
        chunks = [c async for c in await client.completions.create(
            **ask, stream=True, stream_options={"include_usage": True})]
        return whole, chunks

    whole, chunks = run_with_sdk(app, scenario)
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        if not echo:
            assert [t for c in mine if c.logprobs for t in c.logprobs.tokens] == choice.logprobs.tokens
            assert [o for c in mine if c.logprobs for o in c.logprobs.text_offset] == choice.logprobs.text_offset
        else:
            assert mine[0].text == ask["prompt"][choice.index // 2]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_of_several_that_cannot_be_answered_is_named_by_its_place(app, stream):
    async def scenario(client, http):
        body = {"model": MODEL, "prompt": [PROMPT, "word " * 3000, PROMPT], "n": 2, "max_tokens": 4, "stream": stream}
        return await http.post("/v1/completions", json=body)

    r = run_with_sdk(app, scenario)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt.1" and err["code"] == "context_length_exceeded"
    assert err["message"].startswith("prompt[1]: prompt (") and "exceeds the model's context" in err["message"]


@pytest.mark.parametrize("body, param, says", [
    ({"prompt": [1, "a"]}, "prompt", "a list of token ids (ints >= 0)"),
    ({"prompt": [[1, 2], []]}, "prompt", "at least one id"),
    ({"prompt": [1, 10 ** 9]}, "prompt", "token id 1000000000 is not in the model's vocabulary"),
    ({"prompt": [[1, 2], [10 ** 9]], "echo": True}, "prompt.1", "past the tokenizer's vocabulary"),
    ({"prompt": []}, "prompt", "at least one prompt"),
    ({"prompt": ["a"] * 9, "n": 2}, "prompt", "9 prompts x n=2"),
    ({"prompt": PROMPT, "suffix": "The end."}, "suffix", "does not insert text"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of", "best_of 3"),
    ({"prompt": PROMPT, "logprobs": True}, "logprobs", None),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "with echo (and logprobs) it scores the prompt"),
    ({"prompt": PROMPT, "max_tokens": -1, "echo": True}, "max_tokens", None),
    ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs", None),
    ({"prompt": PROMPT, "prompt_logprobs": True}, "prompt_logprobs", None),
    ({"prompt": PROMPT, "max_tokens": 10 ** 6}, "max_tokens", "exceeds this server's limit"),
    ({"prompt": "Look at <|image_pad|>"}, "prompt", "image placeholder '<|image_pad|>' 1 time(s) for 0 image(s)"),
    ({"prompt": "  "}, "prompt", "empty prompt"),
    ({"prompt": PROMPT, "vlmguard": {"decoding": "nope"}}, "vlmguard.decoding", "nope"),
])
def test_what_it_cannot_answer_is_a_400_naming_the_field(app, body, param, says):
    async def scenario(client, http):
        return await http.post("/v1/completions", json={"model": MODEL, **body})

    r = run_with_sdk(app, scenario)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and (says is None or says in err["message"]), err


def test_a_prompt_of_token_ids_is_answered_as_its_text(qwen, app):
    tok = qwen.engine.adapter.tokenizer
    ids, other = tok(PROMPT)["input_ids"], tok("a time")["input_ids"]

    async def scenario(client, http):
        text = await client.completions.create(model=MODEL, prompt=[PROMPT, "a time"], max_tokens=6, echo=True)
        as_ids = await client.completions.create(model=MODEL, prompt=[ids, other], max_tokens=6, echo=True)
        one = await client.completions.create(model=MODEL, prompt=ids, max_tokens=6)
        return text, as_ids, one

    text, as_ids, one = run_with_sdk(app, scenario)
    assert [c.text for c in as_ids.choices] == [c.text for c in text.choices]  # the echo is the ids' text
    assert as_ids.choices[0].text.startswith(PROMPT) and one.choices[0].text == text.choices[0].text[len(PROMPT):]
    assert as_ids.usage == text.usage


def _reference_logprobs(qwen, ids: list[int]) -> torch.Tensor:
    """transformers' own log-softmax of the model at each position of ``ids``."""
    with torch.no_grad():
        logits = qwen.engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(qwen, app):
    """lm-eval's ``local-completions`` log-likelihood request: context + continuation as token ids, one new token,
    ``echo`` and ``logprobs`` 1. Its reading (``token_logprobs[ctxlen:-1]`` summed, greedy where each equals its
    position's top value) gives the model's own log-likelihood of the continuation."""
    tok = qwen.engine.adapter.tokenizer
    context, continuation = tok("Once upon a")["input_ids"], tok(" time there was")["input_ids"]
    ids, ctxlen = context + continuation, len(context)
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}

    async def scenario(client, http):
        return (await http.post("/v1/completions", json=body)).json()

    out = run_with_sdk(app, scenario)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _reference_logprobs(qwen, ids)
    expected = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
    loglikelihood = sum(lp["token_logprobs"][ctxlen:-1])
    assert loglikelihood == pytest.approx(sum(expected[ctxlen - 1:]), abs=1e-3)
    is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                              lp["top_logprobs"][ctxlen:-1]))
    assert is_greedy == all(ref[p - 1].argmax().item() == ids[p] for p in range(ctxlen, len(ids)))
    pieces = lp["tokens"][:len(ids)]
    assert out["choices"][0]["text"].startswith(tok.decode(ids)) and "".join(pieces) == tok.decode(ids)
    assert lp["text_offset"][:len(ids)] == [len("".join(pieces[:p])) for p in range(len(ids))]


def test_a_streamed_echo_with_logprobs_is_the_completion(app):
    ask = dict(model=MODEL, prompt=["Once upon", "a time"], n=2, temperature=1.0, seed=5, max_tokens=5, echo=True,
               logprobs=2)

    async def scenario(client, http):
        whole = await client.completions.create(**ask)
        chunks = [c async for c in await client.completions.create(**ask, stream=True)]
        return whole, chunks

    whole, chunks = run_with_sdk(app, scenario)
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert mine[0].text == ask["prompt"][choice.index // 2] and mine[0].logprobs.token_logprobs[0] is None
        assert "".join(c.text for c in mine) == choice.text
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for c in mine if c.logprobs for x in getattr(c.logprobs, key)] == \
                getattr(choice.logprobs, key), key


def test_a_continuations_text_is_what_its_tokens_write():
    """On a SentencePiece tokenizer (the tiny LLaVA's), which drops the first token's leading space when it decodes an
    answer alone, a completion keeps it and strips nothing (the engine's ``exact_text``): the text is what the tokens
    write after the prompt, so ``echo`` reads as one text, whole and streamed. A chat answer stays stripped."""
    from vlmguard.testing import tiny_engine
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))
    app = create_api(LocalBackend({"tiny-llava": worker}), ServiceConfig(
        models=[ModelConfig(name="tiny-llava", model="random:llava")], api_key_env=None))
    tok = worker.engine.adapter.tokenizer
    spoon = "There is a spoon"  # (its answer's first token begins with a space)
    ask = dict(model="tiny-llava", prompt=spoon, max_tokens=8, temperature=0)

    async def scenario(client, http):
        whole = await client.completions.create(**ask, echo=True)
        chunks = [c async for c in await client.completions.create(**ask, stream=True)]
        chat = await client.chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0,
                                                    messages=[{"role": "user", "content": spoon}])
        return whole, chunks, chat

    whole, chunks, chat = run_with_sdk(app, scenario)
    prompt_ids = tok(spoon)["input_ids"]
    answer = worker.engine.generate([Request(spoon, raw_prompt=True)], GenerationSpec(max_new_tokens=8))[0]
    written = tok.decode(prompt_ids + answer.token_ids, skip_special_tokens=True)
    assert answer.text == answer.text.strip() and written.startswith(spoon + " ")  # (the case is tested)
    assert whole.choices[0].text == written
    assert "".join(c.choices[0].text for c in chunks if c.choices) == written[len(spoon):]
    assert chat.choices[0].message.content == chat.choices[0].message.content.strip()


def _check_vllm_prompt_logprobs(places: list, ids: list[int], k: int) -> int:
    """vLLM's ``prompt_logprobs``: per prompt position None, or {token id: {logprob, rank, decoded_token}} holding the
    prompt's token with its rank and the ``k`` most likely with ranks 1..k. Returns the positions with none."""
    assert len(places) == len(ids) and places[0] is None
    for tid, place in zip(ids, places):
        if place is None:
            continue
        own = place[str(tid)]
        ranked = sorted(place.values(), key=lambda v: v["rank"])
        assert [v["rank"] for v in ranked if v is not own or own["rank"] <= k] == list(range(1, k + 1))
        assert all(v["logprob"] <= ranked[0]["logprob"] for v in place.values())
        assert (own["rank"] == 1) == (own["logprob"] == ranked[0]["logprob"]) and own["decoded_token"]
    return sum(p is None for p in places)


def test_vllms_prompt_logprobs_on_a_chat_with_an_image_and_a_completion(qwen, app):
    """vLLM's ``prompt_logprobs`` extension: a chat (image included: its tokens, features, have none) gets them at the
    response's top level, a completion on each choice, beside the legacy ``logprobs`` of ``echo``."""
    from vlmguard.images import image_to_data_url
    from vlmguard.testing import random_image

    image = image_to_data_url(random_image(2, (40, 40)))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "Is there a dog?"}]}]

    async def scenario(client, http):
        chat = (await http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                              "prompt_logprobs": 3})).json()
        ids = (await http.post("/tokenize", json={"model": MODEL, "messages": messages})).json()["tokens"]
        done = (await http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                                         "prompt_logprobs": 2, "echo": True, "logprobs": 0})).json()
        return chat, ids, done

    chat, ids, done = run_with_sdk(app, scenario)
    missing = _check_vllm_prompt_logprobs(chat["prompt_logprobs"], ids, 3)
    assert missing == 1 + chat["vlmguard"]["visual_tokens"] and chat["usage"]["prompt_tokens"] == len(ids)
    choice = done["choices"][0]
    prompt_ids = qwen.engine.adapter.tokenizer(PROMPT)["input_ids"]
    assert _check_vllm_prompt_logprobs(choice["prompt_logprobs"], prompt_ids, 2) == 1
    legacy = choice["logprobs"]
    assert legacy["top_logprobs"][1:len(prompt_ids)] == [{}] * (len(prompt_ids) - 1)  # (echo's own count, 0)
    assert legacy["token_logprobs"][1:len(prompt_ids)] == [
        place[str(t)]["logprob"] for t, place in zip(prompt_ids[1:], choice["prompt_logprobs"][1:])]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": PROMPT}),
])
def test_prompt_logprobs_with_a_stream_is_a_400(app, route, body):
    async def scenario(client, http):
        return await http.post(route, json={"model": MODEL, **body, "stream": True, "prompt_logprobs": 1})

    r = run_with_sdk(app, scenario)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt_alone(qwen, app, stream):
    """OpenAI's legacy scoring request (older harnesses send it): ``max_tokens`` 0, ``echo``, ``logprobs``: the prompt
    and its tokens' entries, nothing after them, ``finish_reason`` length, no completion tokens."""
    ids = qwen.engine.adapter.tokenizer(PROMPT)["input_ids"]
    ask = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1}

    async def scenario(client, http):
        one = await client.completions.create(**ask, max_tokens=1, temperature=0)
        if not stream:
            return one, [await client.completions.create(**ask, max_tokens=0)]
        return one, [c async for c in await client.completions.create(
            **ask, max_tokens=0, stream=True, stream_options={"include_usage": True})]

    one, got = run_with_sdk(app, scenario)
    choices = [c.choices[0] for c in got if c.choices]
    assert "".join(c.text for c in choices) == PROMPT and [c.finish_reason for c in choices][-1] == "length"
    tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert len(tokens) == len(ids) and values == one.choices[0].logprobs.token_logprobs[:len(ids)]
    assert got[-1].usage.completion_tokens == 0 and got[-1].usage.prompt_tokens == len(ids)
