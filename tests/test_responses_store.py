"""Stored Responses (``store``, ``previous_response_id``, ``GET`` / ``DELETE /v1/responses/{id}``, ``input_items``;
workers/response_store.py) through the OpenAI SDK: a conversation continued by id is answered exactly as the same
conversation sent whole (text, images, function calls and their outputs, streamed or not); stored responses are
retrieved, listed, deleted and evicted; what is missing is one clear error."""
from __future__ import annotations

import sqlite3

import openai
import pytest

from service_support import qwen_api, run_with_sdk, settled
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.api import INPUT_ITEMS_ROUTE, RESPONSE_ROUTE, LocalBackend, _route_path, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker
from vlmguard.workers.response_store import (LocalResponses, ResponseStore, SqliteResponseStore, StoredResponse,
                                             open_store)

MODEL = "tiny-qwen"
IMAGE = image_to_data_url(random_image(2, (40, 32)))
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 8}}}
TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]


@pytest.fixture(scope="module")
def app(qwen):
    return qwen_api(qwen)


def _question(text: str) -> dict:
    return {"role": "user", "content": [{"type": "input_image", "image_url": IMAGE},
                                        {"type": "input_text", "text": text}]}


def test_a_conversation_continued_by_id_is_answered_as_the_same_conversation_sent_whole(app):
    async def scenario(client, http):
        first = await client.responses.create(model=MODEL, input=[_question("What is in the image?")],
                                              instructions="Be brief.", max_output_tokens=5)
        second = await client.responses.create(model=MODEL, previous_response_id=first.id,
                                               input="And what colour is it?", max_output_tokens=5)
        whole = await client.responses.create(model=MODEL, max_output_tokens=5, input=[
            _question("What is in the image?"), first.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "And what colour is it?"}])
        counted = await client.responses.input_tokens.count(model=MODEL, previous_response_id=first.id,
                                                            input="And what colour is it?")
        events = [ev async for ev in await client.responses.create(
            model=MODEL, previous_response_id=first.id, input="And what colour is it?", max_output_tokens=5,
            stream=True)]
        streamed = events[-1].response  # (response.incomplete: the SDK's stream helper waits for completed only)
        third = await client.responses.create(model=MODEL, previous_response_id=streamed.id, input="Thanks!",
                                              max_output_tokens=3)
        whole3 = await client.responses.create(model=MODEL, max_output_tokens=3, input=[
            _question("What is in the image?"), first.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "And what colour is it?"}, streamed.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "Thanks!"}])
        return first, second, whole, counted, streamed, third, whole3

    first, second, whole, counted, streamed, third, whole3 = run_with_sdk(app, scenario)
    assert first.store is True and first.previous_response_id is None
    assert second.previous_response_id == first.id and second.store is True
    # the stored conversation (the image, the question, the answer; not the instructions: OpenAI does not carry
    # them over) then the new input: the prompt and the answer of the conversation sent whole
    assert second.usage.input_tokens == whole.usage.input_tokens == counted.input_tokens
    assert second.output_text == whole.output_text
    assert streamed.output_text == second.output_text and streamed.store is True  # streamed: kept too
    assert third.usage.input_tokens == whole3.usage.input_tokens and third.output_text == whole3.output_text


def test_a_function_calls_output_continues_the_response_that_called_it(app):
    async def scenario(client, http):
        kw = dict(model=MODEL, tools=TOOLS, max_output_tokens=120, extra_body={"vlmguard": {"json_whitespace":
                                                                                           "compact"}})
        asked = await client.responses.create(input=[_question("Weather?")], **kw,
                                              tool_choice={"type": "function", "name": "get_weather"})
        (call,) = asked.output
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        after = await client.responses.create(previous_response_id=asked.id, input=[output], **kw)
        whole = await client.responses.create(input=[_question("Weather?"), call.model_dump(exclude_none=True),
                                                     output], **kw)
        return call, after, whole

    call, after, whole = run_with_sdk(app, scenario)
    assert call.type == "function_call" and call.name == "get_weather"
    assert after.usage.input_tokens == whole.usage.input_tokens and after.output_text == whole.output_text


def test_stored_responses_are_retrieved_listed_and_deleted(app):
    async def scenario(client, http):
        first = await client.responses.create(model=MODEL, input=[_question("What is here?")], max_output_tokens=3)
        second = await client.responses.create(model=MODEL, previous_response_id=first.id, input="More?",
                                               max_output_tokens=3)
        got = await client.responses.retrieve(first.id)
        items = [it async for it in client.responses.input_items.list(second.id)]
        oldest_first = (await client.responses.input_items.list(second.id, order="asc", limit=2))
        after = (await client.responses.input_items.list(second.id, order="asc", after=oldest_first.data[0].id))
        bad = [await http.get(f"/v1/responses/{second.id}/input_items", params=p)
               for p in ({"limit": "0"}, {"order": "sideways"}, {"after": "msg_nope"})]
        await client.responses.delete(first.id)
        errors = []
        for call in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id),
                     lambda: client.responses.create(model=MODEL, previous_response_id=first.id, input="x")):
            try:
                await call()
            except openai.APIStatusError as e:
                errors.append((e.status_code, e.body))
        still = await client.responses.create(model=MODEL, previous_response_id=second.id, input="Again?",
                                              max_output_tokens=3)
        unstored = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
        gone = await http.get(f"/v1/responses/{unstored.id}")
        return first, second, got, items, oldest_first, after, bad, errors, still, unstored, gone

    first, second, got, items, oldest_first, after, bad, errors, still, unstored, gone = run_with_sdk(app, scenario)
    assert got.model_dump() == first.model_dump()
    # newest first: the second request's input, the first's answer, the first's input
    assert [it.type for it in items] == ["message", "message", "message"]
    assert items[0].content[0].text == "More?" and items[1].id == first.output[0].id
    assert items[2].content[1].text == "What is here?" and items[2].id.startswith("msg_")
    assert [it.id for it in oldest_first.data] == [items[2].id, items[1].id] and oldest_first.has_more
    assert [it.id for it in after.data] == [items[1].id, items[0].id] and not after.has_more
    assert [(r.status_code, r.json()["error"]["param"]) for r in bad] == [(400, "limit"), (400, "order"),
                                                                          (400, "after")]
    (s1, b1), (s2, b2), (s3, b3) = errors
    assert (s1, s2, b1["code"]) == (404, 404, "response_not_found") and "no stored response" in b1["message"]
    assert s3 == 400 and b3["param"] == "previous_response_id" and b3["code"] == "previous_response_not_found"
    assert still.usage.input_tokens > second.usage.input_tokens  # the second keeps the whole conversation
    assert unstored.store is False and gone.status_code == 404


def test_the_store_keeps_the_most_recent_within_its_budget(qwen):
    small = qwen_api(qwen, responses_store_mb=0.006)  # about 6 KB: a few text responses, no image conversation
    none = qwen_api(qwen, responses_store_mb=0)

    async def scenario(client, http):
        texts = [await client.responses.create(model=MODEL, input=f"Hello {i}", max_output_tokens=2)
                 for i in range(12)]
        found = [(await http.get(f"/v1/responses/{r.id}")).status_code for r in texts]
        photo = image_to_data_url(random_image(3, (96, 96)))  # (random pixels: tens of KB as a PNG)
        big = await client.responses.create(model=MODEL, max_output_tokens=2, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": photo}, {"type": "input_text", "text": "Look"}]}])
        return texts, found, big

    store = small.state.responses.store.pools["responses"]
    texts, found, big = run_with_sdk(small, scenario)
    assert store.bytes <= store.max_bytes and 1 < len(store) < 12
    assert found == [404] * (12 - len(store)) + [200] * len(store)  # the oldest went first
    assert big.store is False  # larger than the whole budget: answered, not kept

    async def nothing_kept(client, http):
        r = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
        follow = await http.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": r.id})
        return r, follow

    r, follow = run_with_sdk(none, nothing_kept)
    assert r.store is False and follow.status_code == 400
    assert "stores no responses (responses_store_mb: 0)" in follow.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_store_is_a_least_recently_used_cache_of_bytes(kind, tmp_path):
    store = ResponseStore(1000) if kind == "memory" else SqliteResponseStore(tmp_path / "r.sqlite", 1000)
    entry = lambda n: StoredResponse(response={"id": "x"}, messages=[], items=[], size=n)  # noqa: E731
    assert store.put("a", entry(400)) and store.put("b", entry(400))
    assert store.get("a") is not None  # a is now the most recent
    assert store.put("c", entry(400)) and store.get("b") is None and store.get("a") is not None
    assert store.bytes == 800 and not store.put("d", entry(1001)) and len(store) == 2
    assert store.delete("a") and not store.delete("a") and store.bytes == 400
    assert StoredResponse(response={"id": "y"}, messages=[{"role": "user", "content": "hi"}], items=[]).size > 20
    assert not ResponseStore(0).enabled and ResponseStore(1).enabled


def test_a_file_store_outlives_its_process_and_is_shared_by_processes_on_one_machine(tmp_path):
    path = tmp_path / "keep" / "responses.sqlite"  # (its folder is made)
    first = open_store(10_000, str(path))
    entry = StoredResponse(response={"id": "r1", "output": []}, messages=[{"role": "user", "content": "hi"}],
                           items=[{"id": "msg_1", "type": "message"}])
    assert first.put("r1", entry)
    other = open_store(10_000, str(path))  # another process on the file (or the same one after a restart)
    got = other.get("r1")
    assert (got.response, got.messages, got.items, got.size) == (entry.response, entry.messages, entry.items,
                                                                entry.size)
    assert other.put("r2", entry) and first.get("r2") is not None and len(first) == 2
    assert first.delete("r1") and other.get("r1") is None
    assert isinstance(open_store(10, None).pools["responses"], ResponseStore)
    assert not open_store(0, str(tmp_path / "none.sqlite")).enabled and not (tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_conversations_have_a_budget_of_their_own_that_responses_never_evict(kind, tmp_path):
    path = None if kind == "memory" else str(tmp_path / "r.sqlite")
    store = open_store(1000, path, conversation_bytes=500)
    entry = lambda n: StoredResponse(response={"id": "x"}, messages=[], items=[], size=n)  # noqa: E731
    assert store.put("conv_1", entry(400))
    for i in range(10):  # (a busy server: ten times the responses' budget)
        assert store.put(f"resp_{i}", entry(400))
    assert store.get("conv_1") is not None and store.get("resp_0") is None and store.get("resp_9") is not None
    assert store.put("conv_2", entry(400)) and store.get("conv_1") is None  # (conversations evict conversations)
    assert not store.put("conv_3", entry(600)) and store.put("resp_x", entry(600))  # (each within its own budget)
    assert len(store) == 3 and store.bytes == 400 + 400 + 600
    assert store.edit("conv_2", "update", {"metadata": {"a": "b"}}).response["metadata"] == {"a": "b"}


def test_a_store_file_with_conversations_among_its_responses_moves_them_to_their_own_table(tmp_path):
    path = tmp_path / "r.sqlite"
    old = SqliteResponseStore(path, 10_000)  # (a file written before conversations had their table)
    entry = StoredResponse(response={"id": "x", "object": "conversation"}, messages=[], items=[{"id": "msg_1"}])
    assert old.put("conv_1", entry) and old.put("resp_1", entry)
    store = open_store(10_000, str(path), conversation_bytes=10_000)
    assert store.get("conv_1").items == [{"id": "msg_1"}] and store.get("resp_1") is not None
    assert len(store.pools["conversations"]) == len(store.pools["responses"]) == 1


def test_a_store_files_total_size_is_kept_by_the_file_and_counted_once_for_a_file_without_it(tmp_path):
    path = tmp_path / "r.sqlite"

    def summed(table: str) -> int:  # (what the kept total must equal)
        with sqlite3.connect(path) as db:
            return db.execute(f"SELECT COALESCE(SUM(size), 0) FROM {table}").fetchone()[0]

    entry = lambda n: StoredResponse(response={"id": "x"}, messages=[], items=[], size=n)  # noqa: E731
    with sqlite3.connect(path) as db:  # (a file of before: its table, no total)
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, body TEXT NOT NULL, size INTEGER NOT NULL, "
                   "used INTEGER NOT NULL)")
        db.executemany("INSERT INTO responses VALUES (?, ?, ?, ?)", [
            (key, '{"response": {}, "messages": [], "items": []}', 300, n) for n, key in
            enumerate(["resp_old", "conv_old"])])
    store = open_store(1000, str(path), conversation_bytes=1000)
    assert store.pools["responses"].bytes == 300 and store.pools["conversations"].bytes == 300  # (counted, moved)
    other = SqliteResponseStore(path, 1000)  # (a second process on the file: the same total, not counted twice)
    for i in range(6):  # (puts that evict, replacements, edits that grow an entry, deletes)
        assert store.put(f"resp_{i}", entry(200 + 50 * i)) and other.put("resp_1", entry(100))
        store.edit("resp_1", "update", {"metadata": {"n": "x" * 40 * i}})
        store.delete(f"resp_{i - 2}")
        assert other.bytes == store.pools["responses"].bytes == summed("responses") <= 1000
    assert store.pools["conversations"].bytes == summed("conversations") == 300


def test_a_store_file_that_cannot_be_kept_is_one_clear_error(tmp_path):
    from vlmguard.errors import InvalidInput
    from vlmguard.workers.config import parse_config

    (tmp_path / "not-sqlite").write_text("hello, I am a text file" * 100)
    with pytest.raises(InvalidInput, match="responses_store_path: cannot keep responses in .*not-sqlite: "):
        SqliteResponseStore(tmp_path / "not-sqlite", 1000)
    with pytest.raises(InvalidInput, match="responses_store_path: cannot keep responses in .*not-sqlite/r: "):
        SqliteResponseStore(tmp_path / "not-sqlite" / "r", 1000)  # (its folder is a file)
    with pytest.raises(InvalidInput, match="responses_store_path: .* is a folder; name a file in it"):
        parse_config({"responses_store_path": str(tmp_path)})


def test_responses_kept_in_a_file_continue_after_a_restart(qwen, tmp_path):
    path = str(tmp_path / "responses.sqlite")

    async def first_run(client, http):
        return await client.responses.create(model=MODEL, input=[_question("What is here?")], max_output_tokens=3)

    first = run_with_sdk(qwen_api(qwen, responses_store_path=path), first_run)

    async def after_restart(client, http):
        follow = await client.responses.create(model=MODEL, previous_response_id=first.id, input="More?",
                                               max_output_tokens=3)
        whole = await client.responses.create(model=MODEL, max_output_tokens=3, input=[
            _question("What is here?"), first.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "More?"}])
        got = await client.responses.retrieve(first.id)
        await client.responses.delete(first.id)
        gone = await http.get(f"/v1/responses/{first.id}")
        return follow, whole, got, gone

    restarted = qwen_api(qwen, responses_store_path=path)
    follow, whole, got, gone = run_with_sdk(restarted, after_restart)
    assert follow.usage.input_tokens == whole.usage.input_tokens and follow.output_text == whole.output_text
    assert got.model_dump() == first.model_dump()
    assert gone.status_code == 404 and gone.json()["error"]["message"] == (
        f"no stored response {first.id!r}: it was deleted or evicted to make room (responses_store_mb)")
    with sqlite3.connect(path) as db:  # the two answers since the restart are in the file; the deleted one is not
        assert {r for (r,) in db.execute("SELECT id FROM responses")} == {follow.id, whole.id}


class _BrokenStore(ResponseStore):
    def get(self, rid):
        raise RuntimeError("disk on fire")

    put = delete = get


def test_a_store_that_fails_loses_no_answer_and_reads_are_503(qwen):
    from vlmguard.workers.response_store import StoreUnavailable

    app = create_api(LocalBackend({MODEL: qwen}), ServiceConfig(
        models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None),
        responses=LocalResponses(_BrokenStore(1000)))

    async def scenario(client, http):
        answer = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
        read = await http.get(f"/v1/responses/{answer.id}")
        follow = await http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                        "previous_response_id": answer.id})
        return answer, read, follow

    answer, read, follow = run_with_sdk(app, scenario)
    assert answer.output_text and answer.store is False  # answered; not kept
    for r in (read, follow):
        assert r.status_code == 503 and r.json()["error"]["message"] == (
            "the stored responses cannot be read now: RuntimeError: disk on fire")
    assert StoreUnavailable.http_status == 503


@pytest.mark.parametrize("config, shared", [
    ({}, False),  # one model replica serving HTTP: one process
    ({"models": [{"model": "tiny", "num_replicas": 2, "routing": "power_of_two"}]}, True),  # two replicas serve HTTP
    ({"models": [{"model": "tiny", "num_replicas": 2}]}, False),  # image affinity: one separate ingress
    ({"ingress_replicas": 3}, True),
    ({"ingress_replicas": 3, "responses_store": "process"}, False),
    ({"responses_store": "shared"}, True),
    ({"responses_store": "shared", "responses_store_mb": 0}, False),  # nothing kept: no store
])
def test_the_api_processes_share_one_store_when_there_are_several(config, shared):
    from vlmguard.workers.app import build_app
    from vlmguard.workers.config import parse_config

    cfg = parse_config(config)
    assert cfg.responses_shared is shared
    deployment = build_app(cfg)._bound_deployment
    store = deployment.init_args[-1]
    assert (store is not None) is shared
    if shared:
        assert store._bound_deployment.name == "ResponseStore"
        assert store._bound_deployment.init_args == (int(cfg.responses_store_mb * 2**20), None,
                                                     int(cfg.conversations_store_mb * 2**20))


def test_stored_response_routes_are_one_metrics_series_each():
    assert _route_path({"path": "/v1/responses/resp_1"}) == RESPONSE_ROUTE
    assert _route_path({"path": "/v1/responses/resp_1/input_items"}) == INPUT_ITEMS_ROUTE
    assert _route_path({"path": "/v1/responses/input_tokens"}) == "/v1/responses/input_tokens"
    assert _route_path({"path": "/v1/responses/resp_1/other"}) == "other"
    assert _route_path({"path": "/v1/responses/a/b/c"}) == "other"


def test_an_input_continuing_a_text_answer_with_calls_leaves_the_stored_conversation_as_it_was():
    import copy

    from vlmguard.responses_schema import ResponsesRequest
    from vlmguard.workers.responses_api import chat_request

    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    kept = copy.deepcopy(earlier)
    req = ResponsesRequest(instructions="Be brief.", input=[
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "x"}])
    form = chat_request(req, earlier)
    assert earlier == kept  # the stored messages are not written to
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    tool = {"role": "tool", "tool_call_id": "c1", "content": "x"}
    assert form.body["messages"] == [{"role": "system", "content": "Be brief."}, *earlier, call, tool]
    assert form.new_messages == [call, tool]  # what the next stored conversation adds: the call included
    assert form.names.messages == ["instructions", "previous_response_id", "previous_response_id", "input.0",
                                   "input.1"]


def test_truncation_auto_fits_a_long_conversation_by_leaving_out_its_middle_turns():
    context, kw = 200, dict(model=MODEL, max_output_tokens=8)
    worker = EngineWorker("random:qwen2_vl", name=MODEL, engine=tiny_engine("qwen2_vl", context=context))
    app = create_api(LocalBackend({MODEL: worker}), ServiceConfig(
        models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None))

    async def scenario(client, http):
        chain = [await client.responses.create(input=[_question("What is in the image?")], **kw)]
        for i in range(3):
            chain.append(await client.responses.create(previous_response_id=chain[-1].id,
                                                       input=f"Tell me more, part {i}.", **kw))
        too_long = await http.post("/v1/responses", json={**kw, "previous_response_id": chain[-1].id, "input": "And?"})
        cut = await client.responses.create(previous_response_id=chain[-1].id, input="And?", truncation="auto", **kw)
        counted = await client.responses.input_tokens.count(  # (fitted to leave room for max_output_tokens)
            model=MODEL, previous_response_id=chain[-1].id, input="And?", truncation="auto",
            extra_body={"max_output_tokens": 8})
        # the same conversation without its second turn (the first follow-up and its answer), sent whole
        turn = lambda k: [{"role": "user", "content": f"Tell me more, part {k - 1}."},  # noqa: E731
                          chain[k].output[0].model_dump(exclude_none=True)]
        whole = await client.responses.create(input=[
            _question("What is in the image?"), chain[0].output[0].model_dump(exclude_none=True), *turn(2), *turn(3),
            {"role": "user", "content": "And?"}], **kw)
        later = await client.responses.create(previous_response_id=cut.id, input="Last?", truncation="auto", **kw)
        items = [it async for it in client.responses.input_items.list(cut.id, limit=100)]
        return chain, too_long, cut, counted, whole, later, items

    chain, too_long, cut, counted, whole, later, items = run_with_sdk(app, scenario)
    assert chain[-1].usage.input_tokens + 8 <= context and chain[-1].truncation == "disabled"
    assert too_long.status_code == 400 and "exceeds the model's context of 200 tokens" in too_long.json()["error"][
        "message"]
    assert cut.truncation == "auto" and cut.usage.input_tokens + 8 <= context
    assert cut.usage.input_tokens == whole.usage.input_tokens == counted.input_tokens
    assert cut.output_text == whole.output_text
    assert later.usage.input_tokens + 8 <= context  # fitted again: the stored conversation was not cut
    assert len(items) == 9  # 4 earlier questions + 4 answers + "And?": the whole conversation is kept


def test_truncation_candidates_leave_out_whole_turns_from_the_middle_then_the_first():
    from vlmguard.responses_schema import ResponsesRequest
    from vlmguard.workers.responses_api import chat_request, truncations

    earlier = [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
               {"role": "user", "content": "q1"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "x"}, {"role": "assistant", "content": "a1"},
               {"role": "developer", "content": "Be brief from now on."},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    form = chat_request(ResponsesRequest(instructions="Hi.", input=[{"role": "user", "content": "q3"}]), earlier)
    options = truncations(form)
    said = [[m.get("content") or m["role"] for m in o.body["messages"]] for o in options]
    assert said == [["Hi.", "q0", "a0", "Be brief from now on.", "q2", "a2", "q3"],  # the turn with its call, out
                    ["Hi.", "q0", "a0", "Be brief from now on.", "q3"],
                    ["Hi.", "Be brief from now on.", "q3"]]  # the first turn last; instructions always stay
    assert options[1].names.messages == ["instructions", "previous_response_id", "previous_response_id",
                                         "previous_response_id", "input.0"]
    assert all(o.new_messages == form.new_messages for o in options)
    assert truncations(chat_request(ResponsesRequest(input="only one turn"))) == []


async def _until_done(client, rid: str, timeout_s: float = 60.0):
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        got = await client.responses.retrieve(rid)
        if got.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


def test_a_background_response_is_answered_later_and_polled(app):
    async def scenario(client, http):
        kw = dict(model=MODEL, input=[_question("What is in the image?")], max_output_tokens=6)
        queued = await client.responses.create(background=True, **kw)
        queued_items = [it.id async for it in client.responses.input_items.list(queued.id)]
        done = await _until_done(client, queued.id)
        foreground = await client.responses.create(**kw)
        follow = await client.responses.create(model=MODEL, previous_response_id=queued.id, input="More?",
                                               max_output_tokens=2)
        items = [it async for it in client.responses.input_items.list(queued.id)]
        assert [it.id for it in items] == queued_items  # (one id for the input, queued or answered)
        late = await http.post(f"/v1/responses/{queued.id}/cancel")
        plain = await http.post(f"/v1/responses/{foreground.id}/cancel")
        bad = [await http.post("/v1/responses", json={"model": MODEL, "input": "x", "background": True, **extra})
               for extra in ({"store": False},)]
        return queued, done, foreground, follow, items, late, plain, bad

    queued, done, foreground, follow, items, late, plain, bad = run_with_sdk(app, scenario)
    assert queued.status == "queued" and queued.background and queued.output == []
    assert done.status == foreground.status and done.background and done.output_text == foreground.output_text
    assert done.usage.input_tokens == foreground.usage.input_tokens
    assert follow.usage.input_tokens > done.usage.input_tokens  # continued like any stored response
    assert [it.type for it in items] == ["message"]
    assert late.status_code == 400 and f"is {done.status}: only a queued or in-progress" in late.json()["error"][
        "message"]
    assert plain.status_code == 400 and "only a background response" in plain.json()["error"]["message"]
    assert [(r.status_code, r.json()["error"]["param"]) for r in bad] == [(400, "store")]


def test_a_background_response_is_cancelled_here_or_by_another_process(app, monkeypatch):
    from vlmguard.workers import background_runs

    monkeypatch.setattr(background_runs, "BACKGROUND_POLL_S", 0.05)
    store = app.state.responses

    async def scenario(client, http):
        kw = dict(model=MODEL, input="Tell me a long story.", max_output_tokens=1000, background=True)
        first = await client.responses.create(**kw)
        early = await http.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": first.id})
        cancelled = await client.responses.cancel(first.id)
        again = await client.responses.cancel(first.id)
        elsewhere = await client.responses.create(**kw)
        import asyncio

        await asyncio.sleep(0.2)
        await store.edit(elsewhere.id, "move", (["queued", "in_progress"], {"status": "cancelled"}))  # (a cancel by
        # another process of the API)
        await asyncio.sleep(0.5)
        return first, early, cancelled, again, elsewhere, [await client.responses.retrieve(r.id)
                                                           for r in (first, elsewhere)]

    first, early, cancelled, again, elsewhere, final = run_with_sdk(app, scenario)
    assert early.status_code == 400 and early.json()["error"]["message"].endswith(
        "only a finished response can be continued")  # (1000 tokens: still queued or in progress)
    assert cancelled.status == again.status == "cancelled" and cancelled.id == first.id
    assert [r.status for r in final] == ["cancelled", "cancelled"] and all(r.output == [] for r in final)


def test_a_background_response_that_fails_says_why(qwen):
    from vlmguard.workers.api import LocalBackend

    class Failing(LocalBackend):
        async def generate(self, model, item):
            raise RuntimeError("replica died")

    app = create_api(Failing({MODEL: qwen}), ServiceConfig(
        models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None))

    async def scenario(client, http):
        queued = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2, background=True)
        return await _until_done(client, queued.id)

    failed = run_with_sdk(app, scenario)
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.error.message == "internal error: RuntimeError: replica died"


class _Handle:
    """A Serve DeploymentHandle's shape over a store in this process: ``handle.get.remote(rid)`` is awaitable."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        method = getattr(self.store, name)

        class Method:
            @staticmethod
            def remote(*args):
                async def call():
                    return method(*args)

                return call()

        return Method


def test_two_api_processes_with_one_shared_store_continue_each_others_responses(qwen):
    from vlmguard.workers.response_store import SharedResponses, api_responses

    handle = _Handle(ResponseStore(1 << 20))
    config = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None,
                           ingress_replicas=2)
    shared = api_responses(config, handle)  # (what each ingress replica makes of the store's handle)
    assert isinstance(shared, SharedResponses) and config.responses_shared
    one, two = (create_api(LocalBackend({MODEL: qwen}), config, responses=shared) for _ in range(2))

    async def first(client, http):
        return await client.responses.create(model=MODEL, input=[_question("What is here?")], max_output_tokens=3)

    answer = run_with_sdk(one, first)

    async def follow(client, http):
        conv = await client.conversations.create(items=[{"role": "user", "content": "Hi"}])
        return (await client.responses.create(model=MODEL, previous_response_id=answer.id, input="More?",
                                              max_output_tokens=2), conv)

    follow_up, conv = run_with_sdk(two, follow)

    async def back(client, http):
        return await client.conversations.retrieve(conv.id), await client.responses.retrieve(follow_up.id)

    got_conv, got_follow = run_with_sdk(one, back)
    assert follow_up.usage.input_tokens > answer.usage.input_tokens and got_follow.id == follow_up.id
    assert got_conv.id == conv.id and len(handle.store) == 3


@pytest.mark.parametrize("retries", [0, 1])
def test_background_answers_still_running_when_the_api_stops_are_failed_or_handed_over(qwen, retries):
    """Without retries they are kept as failed; with them (the default), left to the next process that reads them,
    which answers them at once (a replica stopped by a redeploy: its answers go on elsewhere)."""
    from fastapi.testclient import TestClient

    app = qwen_api(qwen, background_retries=retries)
    ask = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 200, "background": True}
    with TestClient(app) as http:  # (runs the app's lifespan: its shutdown when the block ends)
        queued = http.post("/v1/responses", json=ask).json()
        assert queued["status"] == "queued"
    store = app.state.responses.store  # (what a client polling another replica, or after a restart, would read)
    stopped = store.get(queued["id"]).response
    if not retries:
        assert stopped["status"] == "failed" and stopped["error"]["code"] == "server_stopped"
        assert stopped["error"]["message"].startswith("the server stopped before it answered")
        return
    assert stopped["status"] in ("queued", "in_progress") and store.get(f"{queued['id']}#run").response["beat"] == 0
    config = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None)
    with TestClient(create_api(LocalBackend({MODEL: qwen}), config, responses=app.state.responses)) as other:
        done = settled(other, queued["id"])
        foreground = other.post("/v1/responses", json={**ask, "background": False}).json()
    assert done["status"] in ("completed", "incomplete") and done["output"][0]["content"][0]["text"] == \
        foreground["output"][0]["content"][0]["text"]
