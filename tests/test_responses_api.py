"""OpenAI's Responses API (``POST /v1/responses``, ``workers/responses_api.py``) through the OpenAI SDK: answers equal
to the chat API's for the same conversation, streamed as typed events that add up to the response, function calls
(forced, streamed piece by piece, sent back with their outputs), structured text, and errors naming the Responses
request's own fields."""
from __future__ import annotations

import json

import jsonschema
import pytest

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine
from service_support import run_with_sdk
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker
from vlmguard.workers.responses_api import ParamNames

MODEL = "tiny-qwen"
IMAGE = image_to_data_url(random_image(1, (40, 32)))
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 7}}}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                 "additionalProperties": False}}]
COMPACT = {"vlmguard": {"json_whitespace": "compact"}}
ONE_KEY = {"type": "json_schema", "name": "one", "schema": {"type": "object", "additionalProperties": False,
                                                             "required": ["a"], "properties": {"a": {"enum": [1, 2]}}}}


@pytest.fixture(scope="module")
def app():
    worker = EngineWorker("random:qwen2_vl", name=MODEL, engine=tiny_engine("qwen2_vl", context=2048))
    return create_api(LocalBackend({MODEL: worker}),
                      ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None))


def _question(text: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE},
                                         {"type": "input_text", "text": text}]}]


def test_an_answer_equals_the_chat_apis_for_the_same_conversation(app):
    async def scenario(client, http):
        reply = await client.responses.create(model=MODEL, input=_question(), instructions="Be brief.",
                                              max_output_tokens=6, metadata={"run": "7"})
        counted = await client.responses.input_tokens.count(model=MODEL, input=_question(), instructions="Be brief.")
        with_tools = await client.responses.input_tokens.count(model=MODEL, input=_question(), tools=TOOLS)
        tools_used = await client.responses.create(model=MODEL, input=_question(), tools=TOOLS, max_output_tokens=2)
        bad_count = await http.post("/v1/responses/input_tokens", json={"model": MODEL, "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:xx"}]}]})
        chat = await client.chat.completions.create(model=MODEL, max_tokens=6, messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                         {"type": "text", "text": "What is in the image?"}]}])
        text = await client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4)
        text_chat = await client.chat.completions.create(model=MODEL, max_tokens=4,
                                                         messages=[{"role": "user", "content": "Hello there"}])
        raw = (await http.post("/v1/responses", json={"model": MODEL, "input": "Hello there",
                                                      "max_output_tokens": 4})).json()
        return reply, chat, text, text_chat, raw, (counted, with_tools, tools_used, bad_count)

    reply, chat, text, text_chat, raw, (counted, with_tools, tools_used, bad_count) = run_with_sdk(app, scenario)
    # the input token count, without running the model: what the answer's usage says
    assert counted.input_tokens == reply.usage.input_tokens and counted.object == "response.input_tokens"
    assert with_tools.input_tokens == tools_used.usage.input_tokens > counted.input_tokens + 100  # the tools' block
    assert bad_count.status_code == 400 and bad_count.json()["error"]["param"] == "input.0.content.0"
    assert reply.output_text == chat.choices[0].message.content and reply.output_text
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                     chat.usage.completion_tokens)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"  # (6 tokens)
    (item,) = reply.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert reply.id.startswith("resp_") and reply.metadata == {"run": "7"} and reply.instructions == "Be brief."
    assert reply.model_extra["vlmguard"]["visual_tokens"] > 0  # vlmguard's facts, as in the chat API
    assert text.output_text == text_chat.choices[0].message.content  # a plain text input is one user message
    assert raw["object"] == "response" and raw["store"] is True and raw["error"] is None  # (kept: OpenAI's default)


def test_a_stream_is_typed_events_that_add_up_to_the_response(app):
    kw = dict(model=MODEL, input=_question(), max_output_tokens=30, text={"format": ONE_KEY}, extra_body=COMPACT)

    async def scenario(client, http):
        whole = await client.responses.create(**kw)
        async with client.responses.stream(**kw) as stream:  # the SDK's helper checks the events' coherence
            events = [ev async for ev in stream]
            final = await stream.get_final_response()
        return whole, events, final

    whole, events, final = run_with_sdk(app, scenario)
    assert whole.status == "completed" and json.loads(whole.output_text)["a"] in (1, 2)  # text.format held it
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.output[0].id == events[2].item.id  # one item, the same id from its opening to the end


def test_log_probabilities_come_with_the_text_whole_and_streamed(app):
    kw = dict(model=MODEL, input=_question(), max_output_tokens=5, top_logprobs=2,
              include=["message.output_text.logprobs", "reasoning.encrypted_content"])  # (the second adds nothing)

    async def scenario(client, http):
        whole = await client.responses.create(**kw)
        chat = await client.chat.completions.create(model=MODEL, max_tokens=5, logprobs=True, top_logprobs=2,
                                                    messages=[{"role": "user", "content": [
                                                        {"type": "image_url", "image_url": {"url": IMAGE}},
                                                        {"type": "text", "text": "What is in the image?"}]}])
        async with client.responses.stream(**kw) as stream:
            events = [ev async for ev in stream]
        return whole, chat, events

    whole, chat, events = run_with_sdk(app, scenario)
    entries = whole.output[0].content[0].logprobs
    assert len(entries) == whole.usage.output_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert [e.token for e in entries] == [e.token for e in chat.choices[0].logprobs.content]  # the chat API's
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in chat.choices[0].logprobs.content])
    streamed = [e.token for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert streamed == [e.token for e in entries]  # each delta with the entries of the tokens that wrote it
    (done,) = [ev for ev in events if ev.type == "response.output_text.done"]
    assert [e.token for e in done.logprobs] == streamed


def test_function_calls_forced_streamed_piece_by_piece_and_sent_back(app):
    named = {"type": "function", "name": "get_weather"}
    kw = dict(model=MODEL, input=_question("What is the weather there?"), tools=TOOLS, tool_choice=named,
              max_output_tokens=120, extra_body=COMPACT)

    async def scenario(client, http):
        whole = await client.responses.create(**kw)
        async with client.responses.stream(**kw) as stream:
            events = [ev async for ev in stream]
            final = await stream.get_final_response()
        (call,) = whole.output
        history = [*_question("What is the weather there?"), call.model_dump(exclude_none=True),
                   {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 12 C"}]
        after = await client.responses.create(model=MODEL, input=history, tools=TOOLS, max_output_tokens=4)
        chat_after = await client.chat.completions.create(model=MODEL, max_tokens=4, tools=[
            {"type": "function", "function": {k: v for k, v in t.items() if k != "type"} | {"strict": True}}
            for t in TOOLS], messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                         {"type": "text", "text": "What is the weather there?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name,
                                                                      "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 12 C"}])
        return whole, events, final, after, chat_after

    whole, events, final, after, chat_after = run_with_sdk(app, scenario)
    (call,) = whole.output
    assert whole.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)  # strict by default: held to the schema
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2 and "".join(deltas) == call.arguments  # piece by piece, the same greedy call
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(d.name, d.arguments) for d in done] == [("get_weather", call.arguments)]
    assert final.output[0].arguments == call.arguments and final.output[0].name == "get_weather"
    assert [e.type for e in events].count("response.output_item.added") == 1  # no message item: calls only
    # the call and its output sent back: the prompt the chat API builds from the same history
    assert after.usage.input_tokens == chat_after.usage.prompt_tokens
    assert after.output_text == chat_after.choices[0].message.content


@pytest.mark.parametrize("body, status, param, needle", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:xx"}]}]}, 400,
     "input.0.content.0", "input.0.content[0]: data URL"),
    ({"input": "hi", "max_output_tokens": 100000}, 400, "max_output_tokens", "exceeds this server's limit"),
    ({"input": "hi", "temperature": 50}, 400, "temperature", "less than or equal to 10"),
    ({"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id", "no stored response 'resp_1'"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input.0.type", "item type 'reasoning'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400,
     "input.0.content.0.type", "part type 'input_file'"),
    ({"input": [{"role": "user"}]}, 400, "input.0.content", "Field required"),
    ({"input": [{"type": ["message"], "role": "user", "content": "hi"}]}, 400, "input.0.type",
     "item type ['message']"),  # (a list or an object where a name goes: an error, not a 500)
    ({"input": [{"role": "user", "content": [{"type": {"a": 1}, "text": "hi"}]}]}, 400, "input.0.content.0.type",
     "part type {'a': 1}"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": IMAGE}]}]}, 400,
     "input.0.content.0", "holds text only"),
    ({"input": []}, 400, "input", "empty list"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]}, 400,
     "tools.0.parameters", "JSON schema of an object"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice",
     "tools do not offer"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools.0.type", None),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, 400,
     "text.format", None),
    ({"input": "hi", "reasoning": {"effort": "low"}}, 400, "reasoning", None),
    ({"input": "hi", "truncation": "middle"}, 400, "truncation", None),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, 400, "input.0.tool_call_id",
     "answers no call"),
    ({"input": "hi", "model": "gpt-9"}, 404, None, "not served here"),
    ({"input": "hi", "include": ["reasoning.encrypted_content", "message.output_text.everything"]}, 400,
     "include.1", "no value of OpenAI's include"),  # (the first: accepted, as it adds nothing here)
    ({"input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 21}, 400, "top_logprobs", None),
])
def test_bad_requests_name_the_responses_field(app, body, status, param, needle):
    async def scenario(client, http):
        return await http.post("/v1/responses", json={"model": MODEL, **body})

    r = run_with_sdk(app, scenario)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert needle is None or needle in error["message"], error


def test_chat_fields_are_renamed_as_the_responses_request_spells_them():
    names = ParamNames(["instructions", "input.0", "input.2"])
    assert names.rename("messages.2.content.1.image_url.url") == "input.2.content.1.image_url"
    assert names.rename("messages.0") == "instructions" and names.rename("messages.9") == "input"
    assert names.rename("max_tokens") == "max_output_tokens" and names.rename("response_format") == "text.format"
    assert names.rename("tools.1.function.parameters") == "tools.1.parameters"
    assert names.rename("tool_choice.function.name") == "tool_choice.name" and names.rename("top_p") == "top_p"
    assert names.message("messages[1]: bad; messages.2.content: worse") == "input.0: bad; input.2.content: worse"
