"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on the HTTP API (in-process backend): a text's token ids under
the model's tokenizer and back, their options, and bad input as a 4xx naming the field; the ids they give are the
ones ``logit_bias`` takes."""
from __future__ import annotations

import asyncio

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


@pytest.mark.parametrize("path, body, status, param, needle", [
    ("/detokenize", {"tokens": [10 ** 6]}, 400, "tokens", "past the tokenizer's vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0", "greater than or equal to 0"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens", "not a boolean"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "valid string"),
    ("/tokenize", {}, 400, "prompt", "Field required"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens", "valid boolean"),
    ("/tokenize", {"prompt": "x", "messages": []}, 400, "messages", "unrecognized request argument"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, None, "is not served here"),
])
def test_bad_token_requests_are_a_4xx_naming_the_field(app, path, body, status, param, needle):
    (r,) = post(app, (path, body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
