"""Tool calling (OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``; ``vlmguard/tool_calls.py``): the
Hermes-format reader and the stream filter, the forced-call grammar on every family, the prompt a request with tools
and a tool history is fed, the OpenAI SDK's round trip (a forced call, its result sent back, ``/tokenize`` counting
it), "auto" answers read as calls or as text, streamed and not, and bad requests as 400s naming the field."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import httpx
import jsonschema
import pytest

from vlmguard.api_schema import ChatCompletionRequest
from vlmguard.engine import Engine
from vlmguard.errors import InvalidInput
from vlmguard.images import image_to_data_url
from vlmguard.models.base import Prompt
from vlmguard.results import Request
from vlmguard.guided import allowed_mask, new_matcher
from vlmguard.spec import GenerationSpec, GuidedOutput
from vlmguard.testing import random_image, tiny_engine
from vlmguard.tool_calls import CallStream, Function, ToolUse, parse_calls
from service_support import run_with_sdk
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.openai_compat import chat_item, chat_spec

MODEL = "tiny-qwen"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}}}
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": NO_ARGS}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": NO_ARGS}
FUNCTIONS = (Function("get_weather", "The weather in a city", WEATHER), Function("get_time", None, NO_ARGS))
COMPACT = {"vlmguard": {"json_whitespace": "compact"}}


def _image_message(seed: int = 1, text: str = "What is the weather there?") -> dict:
    return {"role": "user", "content": [{"type": "image_url",
                                         "image_url": {"url": image_to_data_url(random_image(seed, (40, 32)))}},
                                        {"type": "text", "text": text}]}


def _valid_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# ---- reading calls ------------------------------------------------------------------------------------------


def test_calls_are_read_from_hermes_blocks_and_anything_else_is_text():
    names = {"get_weather", "get_time"}
    one = parse_calls('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', names)
    assert one is not None and one.content is None and [(c.name, c.arguments) for c in one.calls] == [("get_time",
                                                                                                          "{}")]
    two = parse_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
                      '\n</tool_call>\n<tool_call>\n{"name": "get_time", "parameters": {}}', names)  # last unclosed
    assert two is not None and two.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in two.calls] == [("get_weather", {"city": "Oslo", "days": 2}),
                                                                       ("get_time", {})]
    assert len({c.id for c in two.calls}) == 2 and all(c.id.startswith("call_") for c in two.calls)
    for text in ("It is sunny.", "<tool_call>\n{not json}\n</tool_call>",
                 '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',  # not offered
                 '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>',  # arguments not an object
                 '<tool_call>\n["get_time"]\n</tool_call>'):
        assert parse_calls(text, names) is None, text
    # without tags: an answer that is only a call's JSON, or a list of them, fenced or not
    bare = parse_calls('{"name": "get_time", "arguments": {}}', names)
    assert bare is not None and bare.content is None and [c.name for c in bare.calls] == ["get_time"]
    fenced = parse_calls('```json\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": '
                         '{"city": "Oslo", "days": 1}}]\n```', names)
    assert fenced is not None and [c.name for c in fenced.calls] == ["get_time", "get_weather"]
    for text in ('{"name": "launch", "arguments": {}}', '{"city": "Oslo"}', "[]", "42", '"get_time"',
                 'Call {"name": "get_time", "arguments": {}}'):
        assert parse_calls(text, names) is None, text
    both = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n' * 2
    assert len(ToolUse(FUNCTIONS, "auto").read(both).calls) == 2
    assert len(ToolUse(FUNCTIONS, "auto", parallel=False).read(both).calls) == 1
    assert ToolUse(FUNCTIONS, "auto").read(both, "length") is None  # cut short: its last call may be cut
    assert ToolUse(FUNCTIONS, "get_weather").read(both) is None  # a named choice reads only that function


def test_a_stream_sends_text_until_a_call_may_begin_and_ends_with_the_calls_or_the_held_text():
    stream = CallStream(ToolUse(FUNCTIONS, "auto"))
    sent = [stream.feed(t) for t in ("Let me ", "look. <to", "ol_c", "all>\n{\"name\": \"get_time\", ",
                                     "\"arguments\": {}}\n</tool_call>")]
    assert sent == [("Let me ", []), ("look. ", []), ("", []), ("", []), ("", [])]
    rest, calls, finish = stream.finish("stop")  # an unconstrained call: read at the end, whole in one piece
    assert rest == "" and finish == "tool_calls" and [(c.index, c.name, c.arguments) for c in calls] == [
        (0, "get_time", "{}")]
    opens_as_json = CallStream(ToolUse(FUNCTIONS, "auto"))
    assert [opens_as_json.feed(t) for t in ("  ", '{"a"', ": 1}")] == [("", [])] * 3
    assert opens_as_json.finish("stop") == ('  {"a": 1}', [], "stop")
    plain = CallStream(ToolUse(FUNCTIONS, "auto"))
    assert [plain.feed(t)[0] for t in ("a <t", "able>", " <to")] == ["a ", "<table>", " "]
    assert plain.finish("stop") == ("<to", [], "stop")  # held back as a possible tag, sent at the end
    forced = CallStream(ToolUse(FUNCTIONS, "required"))
    assert forced.feed("<tool_call>\n{") == ("", []) and forced.finish("length") == ("<tool_call>\n{", [], "length")


HELD = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "O\\"s{lo", "days": 3}}\n</tool_call>\n'
        '<tool_call>\n{ "name" : "get_time", "arguments" : {} }\n</tool_call>')


STRICT_AUTO = ToolUse((Function("get_weather", None, WEATHER, strict=True),) + FUNCTIONS[1:], "auto")


@pytest.mark.parametrize("use, before", [(ToolUse(FUNCTIONS, "required"), ""), (STRICT_AUTO, ""),
                                         (STRICT_AUTO, "Let me {look} <to.\n")],
                         ids=["required", "auto-strict", "auto-strict-after-text"])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_a_held_answers_calls_stream_as_written_and_add_up_to_the_answer_read_whole(use, before, step):
    stream = CallStream(use)
    pieces, sent = [], ""
    answer = before + HELD
    for i in range(0, len(answer), step):
        content, new = stream.feed(answer[i:i + step])
        sent += content  # the text before the first call goes out as content, the calls never
        pieces += new
    rest, last, finish = stream.finish("stop")
    pieces += last
    assert sent == before and rest == "" and finish == "tool_calls"
    firsts = [p for p in pieces if p.id is not None]
    assert [(p.index, p.name) for p in firsts] == [(0, "get_weather"), (1, "get_time")]
    assert all(p.name is None for p in pieces if p.id is None)
    assert len([p for p in pieces if p.index == 0]) > 3 or step == 7  # piece by piece, not whole
    streamed = ["".join(p.arguments for p in pieces if p.index == j) for j in (0, 1)]
    whole = use.read(answer)
    assert whole is not None and whole.whole and whole.finish_reason("stop") == "tool_calls"
    assert whole.content == (before.strip() or None)
    assert streamed == [c.arguments for c in whole.calls] == ['{"city": "O\\"s{lo", "days": 3}', "{}"]  # as written
    assert [c.name for c in whole.calls] == ["get_weather", "get_time"]
    assert ToolUse(FUNCTIONS, "auto").read(HELD).calls[0].arguments == streamed[0]  # read unconstrained: the same


def test_a_held_answer_cut_short_is_its_calls_so_far_with_the_engines_finish_reason():
    use = ToolUse(FUNCTIONS, "required")
    cut = HELD[:HELD.index("days")]
    answer = use.read(cut, "length")
    assert answer is not None and not answer.whole and answer.finish_reason("length") == "length"
    assert [(c.name, c.arguments) for c in answer.calls] == [("get_weather", '{"city": "O\\"s{lo", "')]
    stream = CallStream(use)
    pieces = stream.feed(cut)[1]
    rest, last, finish = stream.finish("length")
    assert (rest, finish) == ("", "length")
    assert "".join(p.arguments for p in pieces + last) == answer.calls[0].arguments
    after_first = HELD[:HELD.index("</tool_call>") + len("</tool_call>\n<tool")]  # cut between two calls
    assert use.read(after_first, "length").finish_reason("length") == "length"
    assert use.read(after_first, "stop").finish_reason("stop") == "tool_calls"  # (a stop string there)
    assert use.read("<tool_call>\n{\"na", "length") is None  # no name yet: the text is the answer
    # a name the choice does not offer ends the calls there, streamed or not (the grammar never writes one)
    other = ToolUse(FUNCTIONS, "get_time")
    assert other.read(HELD) is None
    wrong = CallStream(other)
    assert wrong.feed(HELD) == ("", []) and wrong.finish("stop") == (HELD, [], "stop")


# ---- forced calls on every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_a_forced_call_follows_its_functions_schema_on_every_family(family):
    eng = tiny_engine(family)
    req = Request("weather?", [random_image(3, (40, 32))])
    for choice in ("get_weather", "required"):
        use = ToolUse(FUNCTIONS, choice, parallel=False)
        res = eng.generate([req], GenerationSpec(max_new_tokens=120, guided={"grammar": use.grammar("compact")}))[0]
        answer = use.read(res.text, res.finish_reason)
        assert answer is not None and len(answer.calls) == 1, (family, choice, res.text)
        call = answer.calls[0]
        assert choice == "required" or call.name == "get_weather"
        _valid_call(call.name, call.arguments)


def test_parallel_calls_are_a_newline_apart_and_each_follows_its_schema():
    """The forced grammar's language, read by a matcher token by token: one call or several (``parallel``), each
    held to its function's schema, and nothing else."""
    eng = tiny_engine("qwen2_vl")
    tok, width, eos = eng.adapter.tokenizer, eng.adapter.logits_width, sorted(eng.adapter.eos_token_ids)
    time = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    weather = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","days":%d}}\n</tool_call>'

    def accepts(text: str, choice: str = "required", parallel: bool = True) -> bool:
        grammar = ToolUse(FUNCTIONS, choice, parallel).grammar("compact")
        m = new_matcher(tok, width, eos, GuidedOutput(grammar=grammar))
        return all(m.consume_token(t) for t in tok.encode(text, add_special_tokens=False)) and \
            bool(allowed_mask(m, width)[eos].all())

    assert accepts(time) and accepts(weather % 2) and accepts(f"{time}\n{weather % 2}")
    assert not accepts(f"{time}\n{weather % 2}", parallel=False) and accepts(time, parallel=False)
    assert not accepts(weather % 9)  # days past the schema's maximum
    assert not accepts(time, choice="get_weather") and accepts(weather % 7, choice="get_weather")
    assert not accepts(f"{time}\n{time}", choice="get_time")  # a named function: one call
    assert not accepts(time.replace("\n", " ", 1)) and not accepts("It is sunny.")


def test_auto_with_a_strict_function_holds_an_answers_calls_to_the_schemas_after_any_text():
    """OpenAI's promise for ``strict`` functions under "auto": text stays free, and from a call's tag on, wherever
    it comes, the answer is calls whose arguments follow their schemas."""
    eng = tiny_engine("qwen2_vl")
    tok, width, eos = eng.adapter.tokenizer, eng.adapter.logits_width, sorted(eng.adapter.eos_token_ids)
    use = ToolUse((Function("get_weather", None, WEATHER, strict=True), FUNCTIONS[1]), "auto")
    assert use.constrained and not ToolUse(FUNCTIONS, "auto").constrained
    call = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","days":%d}}\n</tool_call>'

    def accepts(text: str, use: ToolUse = use) -> bool:
        m = new_matcher(tok, width, eos, GuidedOutput(grammar=use.grammar("compact")))
        return all(m.consume_token(t) for t in tok.encode(text, add_special_tokens=False)) and \
            bool(allowed_mask(m, width)[eos].all())

    for text in ("", "It is sunny.", "<table> and <tool_cal", '{"a": 1}', call % 2, f"{call % 2}\n{call % 3}",
                 f"I will look.\n{call % 2}", f"Look: {{}} <tool_cal\n{call % 2}\n{call % 3}"):
        assert accepts(text), text
    for text in (call % 9, call.replace("get_weather", "launch") % 2, call.replace("days", "weeks") % 2,
                 f"I will look.\n{call % 9}",  # text, then a call past its schema
                 "It is sunny in <tool_call> land.",  # a tag begins calls
                 f"{call % 2} and more text"):  # and calls end the answer
        assert not accepts(text), text
    single = ToolUse(use.functions, "auto", parallel=False)
    assert not accepts(f"{call % 2}\n{call % 3}", single) and accepts(f"Well.\n{call % 2}", single)


def test_a_format_the_vocabulary_cannot_write_is_refused_before_any_model_work():
    eng = Engine.load("tiny")  # the bundled model: whole words, no "<"
    use = ToolUse(FUNCTIONS, "get_time")
    with pytest.raises(InvalidInput, match="no token that begins an answer"):
        eng.generate([Request("Is there a dog?", [random_image(5, (96, 96))])],
                     GenerationSpec(guided={"grammar": use.grammar()}))


# ---- the prompt -------------------------------------------------------------------------------------------


def test_the_prompt_offers_the_tools_after_the_system_text_and_writes_back_calls_and_results():
    worker = EngineWorker("random:qwen2_vl", name=MODEL, engine=tiny_engine("qwen2_vl", context=2048))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Oslo", "days": 1}'}}
    history = [{"role": "system", "content": "Be brief."}, _image_message(),
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}]

    def prompt(messages: list[dict], **kw: Any) -> str:
        req = ChatCompletionRequest.model_validate({"messages": messages, **kw})
        item = chat_item(req, lambda url: random_image(1, (40, 32)), max_images=4, max_new_tokens_limit=64,
                         request_id="r")
        r = worker._request(item)
        return r.prompt if r.raw_prompt else worker.engine.adapter.format_prompt(
            Prompt(text=r.prompt, images=r.images, system=r.system))

    alone = prompt([_image_message()], tools=TOOLS)
    assert "# Tools" in alone and '"name": "get_weather"' in alone and '"parameters": {"type": "object"' in alone
    assert alone.index("<|im_start|>system\n# Tools") < alone.index("<|vision_start|>")
    full = prompt(history, tools=TOOLS)
    system = full[:full.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and "<tools>" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}'
            '\n</tool_call><|im_end|>') in full
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n12 C\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in full  # both results in one user turn, then the answer
    # tool_choice none: the tools are not offered; the history is written all the same
    none = prompt(history, tools=TOOLS, tool_choice="none")
    assert "# Tools" not in none and "<tool_response>\nsunny" in none
    assert prompt([_image_message()]) == prompt([_image_message()], tools=TOOLS, tool_choice="none")
    # a template that leaves system turns out (the tests' LLaVA one): the block begins the first user turn
    worker = EngineWorker("random:llava", name="tiny-llava", engine=tiny_engine("llava"))
    llava = prompt([{"role": "system", "content": "Be brief."}, _image_message()], tools=TOOLS)
    assert llava.startswith("USER: <image>\n# Tools\n") and "What is the weather there? ASSISTANT:" in llava
    assert "Be brief." not in llava and llava.count("<tools>\n") == 1


def test_without_a_system_text_the_tools_follow_the_familys_default_or_the_templates_own():
    """The real checkpoints' templates (vlmguard/models/shapes.py): Qwen2-VL's writes "You are a helpful
    assistant." when a conversation has no system turn, which a system turn with the tools would drop, so the tools
    follow it; LLaVA-1.5's llava-hf template gets vicuna_v1's system text, the family's default."""
    from vlmguard.models.shapes import LLAVA_HF_VICUNA_TEMPLATE, QWEN_CHAT_TEMPLATE
    from vlmguard.testing import tiny_llava, tiny_qwen2_vl

    item = WorkItem(prompt="What time is it?", spec=GenerationSpec(), tools=ToolUse(FUNCTIONS, "auto"))
    for build, template, system in ((tiny_qwen2_vl, QWEN_CHAT_TEMPLATE, "You are a helpful assistant."),
                                    (tiny_llava, LLAVA_HF_VICUNA_TEMPLATE, "A chat between a curious user")):
        model, proc = build()
        proc.chat_template = template
        worker = EngineWorker("random", name="m", engine=Engine(model, proc))
        prompt = worker._request(item).prompt
        assert prompt.count(system) == 1 and prompt.index(system) < prompt.index("\n\n# Tools\n"), prompt
        plain = worker._request(WorkItem(prompt="What time is it?", spec=GenerationSpec(), messages=[
            {"role": "user", "content": [{"type": "text", "text": "What time is it?"}]}])).prompt
        assert plain.count(system) == 1  # the same system text as without tools


def test_tool_choice_maps_to_the_spec_and_conflicts_are_refused():
    def spec(**kw: Any) -> GenerationSpec:
        return chat_spec(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                               **kw}), 64)

    assert spec(tools=TOOLS).guided is None and spec(tools=TOOLS, tool_choice="none").guided is None
    strict = [TOOLS[0], {"type": "function", "function": {**TOOLS[1]["function"], "strict": True}}]
    auto = spec(tools=strict).guided  # a strict function: "auto" answers are held too
    assert auto is not None and auto.grammar.startswith("start: TEXT | head ")
    named = spec(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}).guided
    assert named is not None and '"const": "get_time"' in named.grammar and "get_weather" not in named.grammar
    required = spec(tools=TOOLS, tool_choice="required").guided.grammar
    assert "fn_0 | fn_1" in required and 'start: call ("\\n" call)*' in required
    assert "start: call\n" in spec(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).guided.grammar
    for kw, param in ((dict(response_format={"type": "json_object"}), "response_format"),
                      (dict(guided_regex="a"), "guided_regex"), (dict(guided_choice=["a"]), "guided_choice")):
        with pytest.raises(InvalidInput, match="give tools or an answer format") as e:
            spec(tools=TOOLS, **kw)
        assert e.value.param == param
    assert spec(tools=TOOLS, tool_choice="none", guided_regex="a").guided.regex == "a"


# ---- over the API -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker():
    return EngineWorker("random:qwen2_vl", name=MODEL, engine=tiny_engine("qwen2_vl", context=2048))


@pytest.fixture(scope="module")
def app(worker):
    cfg = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None)
    return create_api(LocalBackend({MODEL: worker}), cfg)


def _streamed_calls(chunks, index: int = 0) -> list[dict[str, Any]]:
    """A choice's streamed calls as a client adds them up: the first piece of each names it (id, type, name), the
    pieces after it carry only the next text of its arguments."""
    calls: list[dict[str, Any]] = []
    for chunk in chunks:
        for tc in (tc for ch in chunk.choices if ch.index == index for tc in ch.delta.tool_calls or []):
            if tc.id is not None:
                assert tc.index == len(calls) and tc.type == "function" and tc.function.name
                calls.append({"id": tc.id, "name": tc.function.name, "arguments": "", "pieces": 0})
            else:
                assert tc.index == len(calls) - 1 and tc.function.name is None and tc.type is None
            calls[tc.index]["arguments"] += tc.function.arguments
            calls[tc.index]["pieces"] += 1
    return calls


def test_openai_sdk_round_trip_a_forced_call_its_result_and_the_tokenized_count(app):
    named = {"type": "function", "function": {"name": "get_weather"}}

    async def scenario(client, http):
        kw = dict(model=MODEL, tools=TOOLS, max_tokens=120, extra_body=COMPACT)
        first = await client.chat.completions.create(messages=[_image_message()], tool_choice=named, **kw)
        call = first.choices[0].message.tool_calls[0]
        history = [_image_message(), first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny, 12 C"}]
        second = await client.chat.completions.create(messages=history, **{**kw, "max_tokens": 8})
        count = (await http.post("/tokenize", json={"model": MODEL, "messages": history, "tools": TOOLS})).json()
        chunks = [c async for c in await client.chat.completions.create(
            messages=[_image_message(2)], tool_choice="required", parallel_tool_calls=False, stream=True, **kw)]
        first_streamed = [c async for c in await client.chat.completions.create(
            messages=[_image_message()], tool_choice=named, stream=True, **kw)]
        several = [c async for c in await client.chat.completions.create(
            messages=[_image_message(3)], tool_choice=named, n=2, temperature=1.0, seed=5, stream=True, **kw)]
        strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]
        held = [await client.chat.completions.create(messages=[_image_message(seed)], tools=strict, max_tokens=60,
                                                     extra_body=COMPACT, model=MODEL) for seed in (4, 5, 6)]
        async with client.chat.completions.stream(  # the SDK's own stream helper adds up the pieces and parses
                messages=[_image_message()], tools=strict, tool_choice=named, model=MODEL, max_tokens=120,
                extra_body=COMPACT) as helper:
            events = [ev.type async for ev in helper]
            helped = await helper.get_final_completion()
        raw = (await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [_image_message()], "tools": TOOLS, "tool_choice": named, "max_tokens": 120,
            **COMPACT})).json()
        return first, second, count, chunks, raw, several, held, first_streamed, (events, helped)

    first, second, count, chunks, raw, several, held, first_streamed, (events, helped) = run_with_sdk(app, scenario)
    for answer in held:  # "auto" with strict functions: text, or calls that follow their schemas
        finish = answer.choices[0].finish_reason
        assert finish in ("stop", "length", "tool_calls")
        for call in answer.choices[0].message.tool_calls or []:
            assert finish != "stop"  # ("length": a held call cut short, its arguments where the answer ended)
            if finish == "tool_calls":
                _valid_call(call.function.name, call.function.arguments)
    by_choice = {k: _streamed_calls(several, k) for k in (0, 1)}  # n=2 sampled: each choice its own call
    for calls in by_choice.values():
        (only,) = calls
        _valid_call(only["name"], only["arguments"])
    assert by_choice[0][0]["id"] != by_choice[1][0]["id"]
    assert sorted(ch.index for c in several for ch in c.choices if ch.finish_reason) == [0, 1]
    message = raw["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["type"] == "function"  # null, as OpenAI's
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _valid_call(call.function.name, call.function.arguments)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content  # the random model
    assert count["count"] == second.usage.prompt_tokens  # the tools' block and the history are counted
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(not d.content for d in deltas)  # a forced call is never content
    (streamed,) = _streamed_calls(chunks)
    assert streamed["id"].startswith("call_") and streamed["pieces"] > 2  # its arguments piece by piece
    _valid_call(streamed["name"], streamed["arguments"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the same request streamed: the same call, its arguments the same text
    (again,) = _streamed_calls(first_streamed)
    assert (again["name"], again["arguments"]) == (call.function.name, call.function.arguments)
    assert first_streamed[-1].choices[0].finish_reason == "tool_calls"
    assert events.count("tool_calls.function.arguments.delta") > 2 and "tool_calls.function.arguments.done" in events
    (parsed,) = helped.choices[0].message.tool_calls
    assert parsed.function.arguments == call.function.arguments  # strict: the same greedy call, parsed by the SDK
    assert parsed.function.parsed_arguments == json.loads(call.function.arguments)


def test_the_python_client_calls_and_counts_tools(app):
    from vlmguard.client import AsyncClient

    img = random_image(6, (40, 32))

    async def scenario():
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as c:
            answer = await c.chat("What time is it?", images=[img], tools=TOOLS, max_tokens=120,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}},
                                  json_whitespace="compact")
            with_tools = await c.tokenize_chat("What time is it?", images=[img], tools=TOOLS)
            without = await c.tokenize_chat("What time is it?", images=[img], tools=TOOLS, tool_choice="none")
            return answer, with_tools, without

    answer, with_tools, without = asyncio.run(scenario())
    (call,) = answer.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert answer.choices[0].finish_reason == "tool_calls" and answer.usage.prompt_tokens == with_tools.count
    assert with_tools.count > without.count + 100  # the tools' block


class CannedAnswer(LocalBackend):
    """The real worker's result with the answer's text replaced (a random model never writes a call of its own
    accord), streamed three characters an event."""

    def __init__(self, workers: dict[str, EngineWorker], text: str):
        super().__init__(workers)
        self.text = text

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]:
        answer = await super().generate(model, item)
        return {**answer, "result": {**answer["result"], "text": self.text, "finish_reason": "stop"}}

    async def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        async for ev in super().stream(model, item):
            if ev.get("done"):
                for i in range(0, len(self.text), 3):
                    yield {"token_id": 0, "text": self.text[i:i + 3], "done": False}
                yield {**ev, "result": {**ev["result"], "text": self.text, "finish_reason": "stop"}}


@pytest.mark.parametrize("text, content, names", [
    ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
     '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "I will check.",
     ["get_weather", "get_time"]),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None, ["get_time"]),
    ("It is sunny in <tool_call> land.", "It is sunny in <tool_call> land.", []),  # not a call: text
    ('{"name": "get_time", "arguments": {}}', None, ["get_time"]),  # a bare call
    ('{"sunny": true}', '{"sunny": true}', []),  # JSON that is no call: held, then sent as text
])
def test_auto_answers_are_read_as_calls_or_as_text_streamed_and_not(worker, text, content, names):
    cfg = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None)
    app = create_api(CannedAnswer({MODEL: worker}, text), cfg)

    async def scenario(client, http):
        kw = dict(model=MODEL, messages=[_image_message()], tools=TOOLS, max_tokens=4)
        whole = await client.chat.completions.create(**kw)
        chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
        return whole, chunks

    whole, chunks = run_with_sdk(app, scenario)
    message = whole.choices[0].message
    assert message.content == content
    assert [c.function.name for c in message.tool_calls or []] == names
    assert whole.choices[0].finish_reason == ("tool_calls" if names else "stop")
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_text = "".join(d.content or "" for d in deltas)
    assert streamed_text.strip() == (content or "")
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert [tc.function.name for tc in streamed] == names and [tc.index for tc in streamed] == list(range(len(names)))
    assert [json.loads(tc.function.arguments) for tc in streamed] == [json.loads(c.function.arguments)
                                                                      for c in message.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.parametrize("body, param, needle", [
    ({"tool_choice": "required"}, "tool_choice", "tool_choice: 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "names function 'launch', which tools do not offer"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "get_weather repeated"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "'function'"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice",
     """must be 'none', 'auto', 'required' or {"type": "function", "function": {"name": ...}}, got 'any'"""),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "function: Field required"),
    ({"tools": ["get_time"], "tool_choice": "auto"}, "tools.0", "valid dictionary"),  # not also "needs tools"
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "must be a JSON schema of an object (type 'string')"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "give tools or an answer format"),
    ({"tools": TOOLS, "tool_choice": "required", "min_tokens": 3}, "min_tokens", "min_tokens does not go with calls"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "see <|image_pad|>"}}]}, "tools",
     "tools contains the model's image placeholder"),
    ({"tools": [TOOLS[1], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}],
      "tool_choice": "required"}, "tools.1.function.parameters", "cannot hold a call: Invalid type: nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]},  # auto, strict
     "tools.0.function.parameters",
     "Unimplemented keys"),  # strict: a keyword llguidance lacks is an error (not strict: left out)
    ({"messages": [_image_message(), {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages.1.tool_call_id", "answers no call of the assistant message before it"),
    ({"messages": [_image_message(), {"role": "tool", "content": "x"}]}, "messages.1", "needs the tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "x"}]},
     "messages.1.tool_calls.0.function.arguments", "must be a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": [
            {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(1, (40, 32)))}}]}]},
     "messages.2", "images are only accepted in user messages"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(app, body, param, needle):
    async def scenario(client, http):
        return await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [_image_message()],
                                                             "max_tokens": 4, **body})

    r = run_with_sdk(app, scenario)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == param, r.text
    assert "needs tools" not in r.json()["error"]["message"] or "tools" not in body


def test_a_forced_call_the_bundled_models_vocabulary_cannot_write_is_a_400_naming_tool_choice():
    worker = EngineWorker("tiny", name="tiny", engine=Engine.load("tiny"))
    cfg = ServiceConfig(models=[ModelConfig(name="tiny", model="tiny")], api_key_env=None)
    app = create_api(LocalBackend({"tiny": worker}), cfg)

    async def scenario(client, http):
        return await http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Is there a dog?"}], "max_tokens": 8,
            "tools": TOOLS, "tool_choice": "required"})

    r = run_with_sdk(app, scenario)
    assert r.status_code == 400 and "no token that begins an answer" in r.text, r.text
    assert r.json()["error"]["param"] == "tool_choice"
