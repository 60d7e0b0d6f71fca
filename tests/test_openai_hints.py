"""OpenAI request parameters that clients and frameworks send and that ask nothing this server does differently
(``service_tier`` "auto" / "default", ``prompt_cache_key``, ``safety_identifier``, a Responses ``reasoning`` or
``prompt`` of null, ``stream_options.include_obfuscation``, ``max_tool_calls``; in chat ``store`` false,
``metadata``, ``modalities`` ["text"], ``reasoning_effort`` null) are accepted and answered as without them; a value
that asks for what the server does not do is a 400 ``unsupported_value`` naming the parameter."""
from __future__ import annotations

import pytest

from service_support import qwen_api, run_with_sdk

MODEL = "tiny-qwen"
ACCEPTED = {"responses": [{"service_tier": "auto"}, {"service_tier": "default"}, {"prompt_cache_key": "chat-42"},
                          {"safety_identifier": "user-hash"}, {"reasoning": None}, {"reasoning": {}},
                          {"reasoning": {"effort": None}}, {"prompt": None}, {"max_tool_calls": 3},
                          {"stream_options": {"include_obfuscation": False}}],
            "chat": [{"service_tier": "auto"}, {"prompt_cache_key": "chat-42"}, {"safety_identifier": "user-hash"},
                     {"store": False}, {"metadata": {"team": "a"}}, {"modalities": ["text"]},
                     {"reasoning_effort": None}, {"verbosity": "medium"}]}
REFUSED = {"responses": [({"service_tier": "priority"}, "service_tier", "this server has one tier"),
                         ({"reasoning": {"effort": "high"}}, "reasoning", "this server's models do not reason"),
                         ({"reasoning": {"summary": "auto"}}, "reasoning", "this server's models do not reason"),
                         ({"prompt": {"id": "pmpt_1"}}, "prompt", "keeps no prompt templates"),
                         ({"max_tool_calls": 0}, "max_tool_calls", "greater than or equal to 1")],
           "chat": [({"service_tier": "flex"}, "service_tier", "this server has one tier"),
                    ({"store": True}, "store", "does not keep chat completions"),
                    ({"reasoning_effort": "low"}, "reasoning_effort", "this server's models do not reason"),
                    ({"modalities": ["text", "audio"]}, "modalities", "answer in text only")]}


@pytest.fixture(scope="module")
def app(qwen):
    return qwen_api(qwen)


async def _ask(http, endpoint: str, extra: dict):
    if endpoint == "responses":
        return await http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 3, **extra})
    return await http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra})


def _text(endpoint: str, answer: dict) -> str:
    return answer["output"][0]["content"][0]["text"] if endpoint == "responses" else \
        answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize("endpoint", ["responses", "chat"])
def test_hints_that_ask_nothing_are_accepted_and_change_nothing(app, endpoint):
    async def scenario(client, http):
        plain = (await _ask(http, endpoint, {})).json()
        return plain, [await _ask(http, endpoint, extra) for extra in ACCEPTED[endpoint]]

    plain, answers = run_with_sdk(app, scenario)
    assert [a.status_code for a in answers] == [200] * len(answers), [a.json() for a in answers]
    assert {_text(endpoint, a.json()) for a in answers} == {_text(endpoint, plain)}


@pytest.mark.parametrize("endpoint", ["responses", "chat"])
def test_values_that_ask_for_what_the_server_does_not_do_are_refused_naming_them(app, endpoint):
    async def scenario(client, http):
        return [await _ask(http, endpoint, extra) for extra, _, _ in REFUSED[endpoint]]

    for answer, (_, param, needle) in zip(run_with_sdk(app, scenario), REFUSED[endpoint]):
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == param and needle in error["message"], error


def test_answers_echo_them_as_openais_do(app):
    async def scenario(client, http):
        chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        return (await client.responses.create(model=MODEL, input="hi", max_output_tokens=2, service_tier="auto",
                                              prompt_cache_key="chat-42", safety_identifier="user-hash",
                                              max_tool_calls=3),
                await client.chat.completions.create(service_tier="auto", **chat),
                [c async for c in await client.chat.completions.create(service_tier="default", stream=True, **chat)],
                await client.chat.completions.create(**chat))

    r, chat, chunks, plain = run_with_sdk(app, scenario)
    assert chat.service_tier == "default" and {c.service_tier for c in chunks} == {"default"}
    assert plain.service_tier is None  # (not asked: not said, as before)
    assert (r.service_tier, r.prompt_cache_key, r.safety_identifier, r.max_tool_calls) == (
        "default", "chat-42", "user-hash", 3)
    assert r.reasoning.effort is None and r.reasoning.summary is None
