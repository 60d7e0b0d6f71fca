"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on the HTTP API (in-process backend): a text's token ids under
the model's tokenizer and back, their options, and bad input as a 4xx naming the field; the ids they give are the
ones ``logit_bias`` takes."""
from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def app():
    worker = EngineWorker("random:llava", name=MODEL, engine=tiny_engine("llava"))
    cfg = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:llava")], api_key_env=None)
    return create_api(LocalBackend({MODEL: worker}), cfg)


def post(app, *calls: tuple[str, dict]) -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return [await http.post(path, json=body) for path, body in calls]

    return asyncio.run(main())


def test_tokenize_gives_the_tokenizers_ids_and_detokenize_the_text(app):
    tok = tiny_engine("llava").adapter.tokenizer
    plain, bare, back = post(app, ("/tokenize", {"model": MODEL, "prompt": "a red car"}),
                             ("/tokenize", {"prompt": "a red car", "add_special_tokens": False,
                                            "return_token_strs": True}),
                             ("/detokenize", {"tokens": tok("a red car", add_special_tokens=False)["input_ids"]}))
    assert plain.status_code == bare.status_code == back.status_code == 200
    assert plain.json() == {"count": len(tok("a red car")["input_ids"]), "max_model_len": 512,
                            "tokens": tok("a red car")["input_ids"]}  # no token_strs unless asked for
    ids = tok("a red car", add_special_tokens=False)["input_ids"]
    assert bare.json()["tokens"] == ids and bare.json()["token_strs"] == tok.convert_ids_to_tokens(ids)
    assert back.json() == {"prompt": "a red car"}


def test_the_ids_it_gives_are_what_logit_bias_takes(app):
    (tokens,) = post(app, ("/tokenize", {"prompt": "x", "add_special_tokens": False}))
    x = tokens.json()["tokens"][0]
    image = image_to_data_url(random_image(1, (32, 32)))
    (chat,) = post(app, ("/v1/chat/completions", {"model": MODEL, "max_tokens": 3, "logit_bias": {str(x): 100},
                                                  "messages": [{"role": "user", "content": [
                                                      {"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "hi"}]}]}))
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "xxx"


def _chat(image: bool, history: bool = False) -> list[dict]:
    question = [{"type": "text", "text": "Is there a dog?"}]
    if image:
        question.insert(0, {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(1, (40, 32)))}})
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}] if history else []
    return [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": question}]


@pytest.mark.parametrize("image, history", [(True, False), (False, False), (True, True)])
def test_a_chats_tokens_are_what_its_chat_request_is_fed(app, image, history):
    """/tokenize with messages counts what the same messages cost as a chat request (its usage.prompt_tokens):
    the chat template, the generation prompt and every visual token."""
    tokens, chat = post(app, ("/tokenize", {"messages": _chat(image, history), "return_token_strs": True}),
                        ("/v1/chat/completions", {"messages": _chat(image, history), "max_tokens": 2}))
    assert tokens.status_code == 200 and chat.status_code == 200, (tokens.text, chat.text)
    body = tokens.json()
    assert body["count"] == len(body["tokens"]) == chat.json()["usage"]["prompt_tokens"]
    visual = body["token_strs"].count("<image>")
    assert visual == (chat.json()["vlmguard"]["visual_tokens"] if image else 0) and (visual > 1) == image


def test_the_client_tokenizes_a_chat_as_it_would_send_it(app):
    from vlmguard.client import AsyncClient

    img = random_image(1, (40, 32))

    async def scenario():
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as c:
            counted = await c.tokenize_chat("Is there a dog?", images=[img], system="Be brief.")
            reply = await c.chat("Is there a dog?", images=[img], system="Be brief.", max_tokens=2)
            return counted, reply

    counted, reply = asyncio.run(scenario())
    assert counted.count == len(counted.tokens) == reply.usage.prompt_tokens


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_each_family_tokenizes_a_chat_as_its_engine_prefills_it(family):
    """The worker's own copy of the processor gives the ids the engine prefills, images of any size included."""
    from vlmguard.api_schema import ChatCompletionRequest
    from vlmguard.workers.image_intake import make_image_resolver
    from vlmguard.workers.openai_compat import chat_item

    eng = tiny_engine(family)
    worker = EngineWorker(f"random:{family}", name=family, engine=eng)
    img = random_image(2, (52, 36))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_data_url(img)}},
                                             {"type": "text", "text": "what is this?"}]}]
    item = chat_item(ChatCompletionRequest(messages=messages), make_image_resolver([]), max_images=4,
                     max_new_tokens_limit=8, request_id="t")
    ids = worker.tokenize_chat(item)["tokens"]
    result = worker.generate_one(dataclasses.replace(item, spec=item.spec.model_copy(update={"max_new_tokens": 1})))
    assert len(ids) == result["result"]["prompt_tokens"]
    assert worker._own_adapter().processor is not eng.adapter.processor  # a copy: generation's stays its own


@pytest.mark.parametrize("path, body, status, param, needle", [
    ("/detokenize", {"tokens": [10 ** 6]}, 400, "tokens", "past the tokenizer's vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0", "greater than or equal to 0"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens", "not a boolean"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "valid string"),
    ("/tokenize", {}, 400, None, "give prompt (a text) or messages (a chat)"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens", "valid boolean"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, 400, None, "one of them"),
    ("/tokenize", {"messages": []}, 400, "messages", "at least 1 item"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}, 400, None,
     "add_generation_prompt false"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "the last message must"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate",
     "unrecognized request argument"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, None, "is not served here"),
])
def test_bad_token_requests_are_a_4xx_naming_the_field(app, path, body, status, param, needle):
    (r,) = post(app, (path, body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
