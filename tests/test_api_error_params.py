"""An error's ``param`` names the request field at fault, as the request spells it, for errors found past the
request's schema too: by the spec's checks, the method registries, a pruner's budget against the image, the
engine's context check and the request's images. A chat request's vlmguard-object fields are ``vlmguard.*``,
OpenAI's own keep their names (``max_tokens``, ``stop``, ``messages``); a native request's spec fields are
``spec.*``. Before, all of these answered ``param: null``."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image

IMAGE = image_to_data_url(random_image(0, (32, 32)))


def _post(path: str, body: dict) -> dict:
    from test_client import _inprocess_app

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_inprocess_app()), base_url="http://t") as c:
            return await c.post(path, json=body)

    r = asyncio.run(main())
    assert r.status_code == 400, r.text
    return r.json()["error"]


def _chat(options: dict | None = None, text: str = "Is there a dog?", image: bool = True, **fields) -> dict:
    content = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": IMAGE}}] if image else [])
    return _post("/v1/chat/completions", {"model": "tiny-llava", "max_tokens": 4, "vlmguard": options or {},
                                          "messages": [{"role": "user", "content": content}], **fields})


def _native(spec: dict, prompt: str = "Is there a dog?", images: list[str] | None = None) -> dict:
    return _post("/v1/generate", {"prompt": prompt, "images": [IMAGE] if images is None else images,
                                  "spec": {"max_new_tokens": 4, **spec}})


@pytest.mark.parametrize("options,chat_param,native_param,code", [
    ({"decoding": "nope"}, "vlmguard.decoding", "spec.decoding", "UnknownMethod"),
    ({"pruning": "nope", "budget": 8}, "vlmguard.pruning", "spec.pruning", "UnknownMethod"),
    ({"pruning": "random"}, "vlmguard.budget", "spec.budget", "InvalidInput"),  # no budget
    ({"budget": 8}, "vlmguard.budget", "spec.budget", "InvalidInput"),  # a budget without a pruner
    ({"pruning": "fastv", "budget": 100000}, "vlmguard.budget", "spec.budget", "InvalidInput"),  # found by the engine
    ({"decoding": "vcd", "decoding_params": {"alpha": -1}}, "vlmguard.decoding_params.alpha",
     "spec.decoding_params.alpha", "InvalidInput"),
    ({"decoding": "vcd", "decoding_params": {"nope": 1}}, "vlmguard.decoding_params.nope",
     "spec.decoding_params.nope", "InvalidInput"),
    ({"pruning": "adaptinfer", "budget": 8, "pruning_params": {"schedule": "/etc/passwd"}},
     "vlmguard.pruning_params.schedule", "spec.pruning_params.schedule", "InvalidInput"),
])
def test_method_and_budget_errors_name_their_field(options, chat_param, native_param, code):
    chat = _chat(options)
    assert (chat["param"], chat["code"]) == (chat_param, code), chat
    native = _native(options)
    assert (native["param"], native["code"]) == (native_param, code), native


def test_openais_own_fields_keep_their_names():
    assert _chat(max_tokens=100000)["param"] == "max_tokens"  # over the server's limit
    assert _native({"max_new_tokens": 100000})["param"] == "spec.max_new_tokens"
    assert _chat(stop=["x"] * 17)["param"] == "stop"
    assert _native({"stop": ["x"] * 17})["param"] == "spec.stop"
    long = "x " * 600  # over the model's context: OpenAI names the messages
    chat = _chat(text=long, image=False)
    assert (chat["param"], chat["code"]) == ("messages", "context_length_exceeded"), chat
    native = _native({}, prompt=long, images=[])
    assert (native["param"], native["code"]) == ("prompt", "context_length_exceeded"), native


def test_request_level_errors_name_the_message_or_image():
    bad = "data:image/png;base64,bm90IGFuIGltYWdl"
    chat = _post("/v1/chat/completions", {"model": "tiny-llava", "max_tokens": 4, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": bad}}]}]})
    assert chat["param"] == "messages.1.content.1" and "messages[1].content[1]" in chat["message"], chat
    native = _native({}, images=[IMAGE, bad])
    assert native["param"] == "images.1" and native["message"].startswith("images[1]: "), native
    last = _post("/v1/chat/completions", {"model": "tiny-llava", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert last["param"] == "messages", last
    assert _native({"nope": 1, "alsonope": 2})["param"] == "spec.nope"


def test_the_python_client_carries_the_param():
    from test_client import _inprocess_app

    from vlmguard.client import APIError, AsyncClient

    async def main():
        async with AsyncClient("http://t", transport=httpx.ASGITransport(app=_inprocess_app())) as c:
            await c.chat("Is there a dog?", max_tokens=4, decoding="vcd", decoding_params={"alpha": -1})

    with pytest.raises(APIError) as e:
        asyncio.run(main())
    assert e.value.param == "vlmguard.decoding_params.alpha" and e.value.code == "InvalidInput"
