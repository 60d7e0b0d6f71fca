"""Regression tests from an audit of the HTTP API as OpenAI clients use it (the ``openai`` SDK, curl, LangChain):
message shapes, parameters, the ``vlmguard`` extension, ``/v1/generate`` and the response shapes, on the
in-process app (``LocalBackend``, no Ray).

Defects found, each a test below that failed on the code as audited (commit f572713):

* ``/v1/generate`` without ``spec.max_new_tokens`` took GenerationSpec's default of 64 whatever the server's
  ``max_new_tokens_limit``: on a server with a lower limit every such request (``Client.generate`` sends none by
  default) was a 400 "max tokens 64 exceeds this server's limit", a value the client never sent. Chat requests
  already default to the limit; native ones now do too.
* ``/v1/generate`` with ``spec: {"cls": ...}`` or ``{"self": ...}`` was a 500 (``TypeError: build() got multiple
  values for argument 'cls'``): the spec's keys became keyword arguments before being checked.
* ``logprobs``, ``parallel_tool_calls``, ``vlmguard.do_sample`` and ``vlmguard.diagnostics`` read ``1``, ``"yes"``,
  ``"on"`` as true (pydantic's lax booleans), as ``stream`` did before it was made strict: ``logprobs: 1`` (the
  legacy completions API's count of alternatives) silently answered with none, ``do_sample: "no"`` meant false
  but ``"1"`` true. They are refused with a 400 naming the field; so are a ``/v1/generate`` spec's ``do_sample`` and
  ``diagnostics`` (GenerationSpec's fields, which every front end shares).
* A bad content part (a text part without ``text``, an ``image_url`` whose ``url`` is not a string, a ``detail``
  OpenAI does not have) was reported through the union of a string and a list of parts: the first error and
  ``param`` were ``messages.0.content.str: Input should be a valid string``, and the part's own error followed
  under ``list[tagged-union[TextPart,ImagePart]].0.text.text``. The part and its field are now named.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine

IMG = image_to_data_url(random_image(3, (40, 32)))
LIMIT = 8  # the server's max_new_tokens_limit: below GenerationSpec's default of 64


@pytest.fixture(scope="module")
def client():
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:llava", name="tiny", engine=tiny_engine("llava"))
    cfg = ServiceConfig(models=[ModelConfig(name="tiny", model="random:llava", max_new_tokens_limit=LIMIT)],
                        api_key_env=None)
    with TestClient(create_api(LocalBackend({"tiny": worker}), cfg), raise_server_exceptions=False) as c:
        yield c


def chat(**extra) -> dict:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Is there a dog?"}, {"type": "image_url", "image_url": {"url": IMG}}]}], **extra}


def error_of(r) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_a_native_request_without_max_new_tokens_gets_the_servers_limit(client):
    native = {"model": "tiny", "prompt": "describe the photo", "images": [IMG]}
    r = client.post("/v1/generate", json={**native, "spec": {"pruning": "fastv", "budget": 4}})
    assert r.status_code == 200, r.text  # was 400: "max tokens 64 exceeds this server's limit of 8"
    at_limit = client.post("/v1/generate", json={**native, "spec": {"pruning": "fastv", "budget": 4,
                                                                      "max_new_tokens": LIMIT}})
    assert r.json()["token_ids"] == at_limit.json()["token_ids"]  # greedy: the same answer as at the limit
    streamed = client.post("/v1/generate", json={**native, "spec": {}, "stream": True})
    assert streamed.status_code == 200 and '"done":true' in streamed.text, streamed.text[-300:]
    over = error_of(client.post("/v1/generate", json={**native, "spec": {"max_new_tokens": LIMIT + 1}}))
    assert "exceeds this server's limit of 8" in over["message"]  # a length asked for is still bounded


@pytest.mark.parametrize("key", ["cls", "self"])
def test_native_spec_keys_that_are_the_constructors_own_arguments_are_400s(client, key):
    r = client.post("/v1/generate", json={"prompt": "hi", "images": [IMG], "spec": {key: 1, "max_new_tokens": 2}})
    err = error_of(r)  # was 500: TypeError: GenerationSpec.build() got multiple values for argument 'cls'
    assert err["message"] == f"invalid generation spec: {key}: Extra inputs are not permitted"


@pytest.mark.parametrize("key", ["do_sample", "diagnostics"])
def test_native_spec_flags_must_be_booleans(client, key):
    r = client.post("/v1/generate", json={"prompt": "hi", "images": [IMG], "spec": {key: "yes", "max_new_tokens": 2}})
    err = error_of(r)  # was 200: "yes" (and "no", 1, "on") read as a boolean
    assert err["message"] == f"invalid generation spec: {key}: Input should be a valid boolean", err
    ok = client.post("/v1/generate", json={"prompt": "hi", "images": [IMG], "spec": {key: False, "max_new_tokens": 2}})
    assert ok.status_code == 200, ok.text

@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 1}, "logprobs"),  # the legacy completions API's count: answered with no alternatives
    ({"logprobs": "yes"}, "logprobs"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"vlmguard": {"do_sample": "yes"}, "temperature": 0.7}, "vlmguard.do_sample"),
    ({"vlmguard": {"diagnostics": 1}}, "vlmguard.diagnostics"),
])
def test_chat_flags_must_be_booleans(client, extra, param):
    err = error_of(client.post("/v1/chat/completions", json=chat(**extra)))
    assert err["param"] == param and "valid boolean" in err["message"], err


def test_chat_boolean_flags_still_work(client):
    r = client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2, parallel_tool_calls=False,
                                                      vlmguard={"diagnostics": True, "do_sample": False}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert len(body["vlmguard"]["steps"]) == body["usage"]["completion_tokens"]


@pytest.mark.parametrize("content, message", [
    ([{"type": "text"}], "content[0].text: Field required"),
    ([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": 5}}],
     "content[1].image_url.url: Input should be a valid string"),
    ([{"type": "image_url", "image_url": {"url": IMG, "detail": "original"}}],
     "content[0].image_url.detail: Input should be 'auto', 'low' or 'high'"),
    ({"type": "text", "text": "hi"}, "must be a string, a list of content parts or null, got dict"),
    (5, "must be a string, a list of content parts or null, got int"),
])
def test_a_bad_content_part_is_named_by_its_index_and_field(client, content, message):
    body = chat(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": content}])
    err = error_of(client.post("/v1/chat/completions", json=body))
    assert err["param"] == "messages.1.content", err  # was messages.1.content.str
    assert err["message"] == f"invalid request: messages.1.content: {message}"


def test_content_parts_as_strings_lists_and_bare_urls_still_work(client):
    for content in ("Is there a dog?", [{"type": "text", "text": "Is there a dog?"}, {"type": "image_url",
                                                                                       "image_url": IMG}]):
        r = client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": content}]))
        assert r.status_code == 200, r.text
    unknown = error_of(client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}])))
    assert unknown["code"] == "unsupported_value" and "'input_audio' is not supported" in unknown["message"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_conversations_first_turn_reads_as_it_did_when_asked_alone(family):
    """A one-message request is laid out images first (the engine's prompt format), whatever the order of its parts.
    As the first turn of a longer conversation it is laid out the same way, so the conversation's prompt begins with
    that turn's own prompt (what the model saw, and what the prefix cache holds)."""
    from vlmguard.api_schema import ChatCompletionRequest
    from vlmguard.models.base import Prompt
    from vlmguard.workers.openai_compat import chat_item

    adapter = tiny_engine(family).adapter
    image = random_image(4, (56, 84))
    first = [{"role": "user", "content": [{"type": "text", "text": "Is there a dog?"},
                                          {"type": "text", "text": "Answer briefly."},
                                          {"type": "image_url", "image_url": {"url": image_to_data_url(image)}}]}]
    later = first + [{"role": "assistant", "content": "no"}, {"role": "user", "content": "and a cat?"}]

    def item(messages):
        return chat_item(ChatCompletionRequest(model="tiny", messages=messages), lambda url: image, max_images=4,
                         max_new_tokens_limit=8, request_id="r")

    alone = item(first)
    asked = adapter.format_prompt(Prompt(text=alone.prompt, images=alone.images))
    history = adapter.format_messages(item(later).messages)
    turn = asked[:asked.index("Answer briefly.") + len("Answer briefly.")]  # up to its generation prompt
    assert adapter.image_placeholder in turn and history.startswith(turn), (asked, history)
