"""Structured output over the chat API (in-process backend): OpenAI's ``response_format`` (``json_object``,
``json_schema``; the OpenAI SDK's ``parse`` with a pydantic model) and vLLM's ``guided_json`` / ``guided_regex`` /
``guided_grammar``, streamed and not; the mapping to ``GenerationSpec.guided``; bad formats as a 400 naming the
request's field, a format the vocabulary cannot finish as a 400 too."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field, ValidationError

from vlmguard.api_schema import ChatCompletionRequest
from vlmguard.errors import InvalidInput
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker
from vlmguard.workers.openai_compat import chat_spec

MODEL = "tiny-qwen"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["animal", "count"],
          "properties": {"animal": {"enum": ["dog", "cat", "none"]}, "count": {"type": "integer", "minimum": 0,
                                                                               "maximum": 5}}}


class Sighting(BaseModel):
    animal: str = Field(max_length=8)
    count: int = Field(ge=0, le=5)


@pytest.fixture(scope="module")
def app():
    worker = EngineWorker("random:qwen2_vl", name=MODEL, engine=tiny_engine("qwen2_vl"))
    cfg = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None)
    return create_api(LocalBackend({MODEL: worker}), cfg)


def _messages(seed: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": image_to_data_url(random_image(seed, (40, 32)))}},
                                         {"type": "text", "text": "What animal is in the picture?"}]}]


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_each_way_of_asking_for_a_format_maps_to_the_spec():
    cases = {"json_object": (dict(response_format={"type": "json_object"}), {"json_object": True}),
             "json_schema": (dict(response_format={"type": "json_schema", "json_schema": {
                 "name": "s", "schema": SCHEMA, "strict": True}}), {"json_schema": SCHEMA}),
             "json_schema, not strict": (dict(response_format={"type": "json_schema", "json_schema": {
                 "name": "s", "schema": SCHEMA}}), {"json_schema": SCHEMA, "strict": False}),
             "schema-less json_schema": (dict(response_format={"type": "json_schema", "json_schema": {"name": "s"}}),
                                         {"json_object": True}),
             "guided_json": (dict(guided_json=SCHEMA), {"json_schema": SCHEMA}),
             "guided_json as text": (dict(guided_json=json.dumps(SCHEMA)), {"json_schema": SCHEMA}),
             "guided_regex": (dict(guided_regex="(yes|no)"), {"regex": "(yes|no)"}),
             "guided_grammar": (dict(guided_grammar='start: "a"'), {"grammar": 'start: "a"'}),
             "compact": (dict(guided_json=SCHEMA, vlmguard={"json_whitespace": "compact"}),
                         {"json_schema": SCHEMA, "whitespace": "compact"})}
    for name, (kw, fields) in cases.items():
        guided = chat_spec(_req(**kw), 64).guided
        assert guided is not None and guided.model_dump(exclude_defaults=True) == fields, name
    assert chat_spec(_req(response_format={"type": "text"}), 64).guided is None
    for kw, needle, param in (
            (dict(guided_json="{not json"), "guided_json is not JSON", "guided_json"),
            (dict(guided_json="[1]"), "must be a JSON schema", "guided_json"),
            (dict(response_format={"type": "json_object"}, guided_regex="a"), "one answer format, not "
             "response_format and guided_regex", "guided_regex"),
            (dict(guided_regex="a", guided_choice=["a"]), "guided and choices cannot go together", "guided_regex"),
            (dict(guided_json=SCHEMA, min_tokens=2), "min_new_tokens", "guided_json"),
            (dict(guided_regex=""), "at least 1 character", "guided_regex")):
        with pytest.raises(InvalidInput, match=needle) as e:
            chat_spec(_req(**kw), 64)
        assert e.value.param == param, kw
    for rf in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_object", "json_schema": {"name": "s"}},
               {"type": "json_schema", "json_schema": {"schema": SCHEMA}}):
        with pytest.raises(ValidationError):
            _req(response_format=rf)


def test_openai_sdk_json_schema_parse_json_object_and_a_stream(app):
    import openai

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            kw = dict(model=MODEL, messages=_messages(), max_tokens=64)
            schema = await client.chat.completions.create(
                response_format={"type": "json_schema", "json_schema": {"name": "sighting", "schema": SCHEMA}},
                extra_body={"vlmguard": {"json_whitespace": "compact"}}, **kw)
            parsed = await client.chat.completions.parse(
                response_format=Sighting, extra_body={"vlmguard": {"json_whitespace": "compact"}}, **kw)
            obj = await client.chat.completions.create(response_format={"type": "json_object"},
                                                       extra_body={"vlmguard": {"json_whitespace": "compact"}}, **kw)
            stream = await client.chat.completions.create(stream=True, extra_body={"guided_regex": "(yes|no), [0-9]"},
                                                          **kw)
            chunks = [c async for c in stream]
            return schema, parsed, obj, chunks

    schema, parsed, obj, chunks = asyncio.run(scenario())
    assert schema.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(schema.choices[0].message.content), SCHEMA)
    assert isinstance(parsed.choices[0].message.parsed, Sighting)  # the SDK validated it against the model
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content), dict)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert re.fullmatch(r"(yes|no), [0-9]", text), text


def test_bad_formats_are_a_400_naming_the_field_and_a_dead_end_is_a_400_too(app):
    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            out = []
            for extra in ({"guided_regex": "[a-"}, {"guided_grammar": "start: foo"},
                          {"response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                                      "schema": {"type": "nope"}}}},
                          {"guided_json": {"type": "nope"}},
                          {"guided_regex": "éa"}, {"guided_regex": "yes é"}):
                r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": _messages(),
                                                                  "max_tokens": 8, **extra})
                out.append(r)
            return out

    # "éa": no token of the test vocabulary (ASCII) begins it, past the space allowed first; "yes é": " yes" does,
    # then nothing writes "é"
    regex, grammar, schema, vllm_schema, no_start, dead_end = asyncio.run(scenario())
    for r, needle, param in ((regex, "unclosed character class", "guided_regex"),
                             (grammar, 'unknown name: \\"foo\\"', "guided_grammar"),
                             (schema, "Invalid type: nope", "response_format"),
                             (vllm_schema, "Invalid type: nope", "guided_json"),  # the field it came as
                             (no_start, "no token that begins an answer", "guided_regex")):
        assert r.status_code == 400 and needle in r.text and r.json()["error"]["param"] == param, r.text
    assert dead_end.status_code == 400, dead_end.text
    err = dead_end.json()["error"]
    assert err["code"] == "FormatDeadEnd" and "continues the answer in its format" in err["message"]
    assert err["param"] == "guided_regex"


def test_the_python_client_asks_for_formats_on_both_routes(app):
    from vlmguard.client import AsyncClient

    img = random_image(3, (40, 32))

    async def scenario():
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as c:
            chat = await c.chat("How many?", images=[img], max_tokens=40, json_whitespace="compact",
                                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
            native = await c.generate("How many?", images=[img], max_new_tokens=8, guided={"regex": "[0-9] (cat|dog)"})
            return chat, native

    chat, native = asyncio.run(scenario())
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    assert re.fullmatch("[0-9] (cat|dog)", native.text) and native.finish_reason == "stop"


def test_n_sampled_choices_each_follow_the_format(app):
    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": _messages(4), "max_tokens": 12, "n": 4, "temperature": 1.0, "seed": 7,
                "guided_regex": "(yes|no|maybe), [0-9]{2}"})

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert len(texts) == 4 and all(re.fullmatch(r"(yes|no|maybe), [0-9]{2}", t) for t in texts), texts
    assert len(set(texts)) > 1  # each choice draws its own tokens, each with its own matcher
