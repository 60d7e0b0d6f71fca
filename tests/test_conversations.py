"""OpenAI's Conversations API (``/v1/conversations``, workers/conversations.py) through the OpenAI SDK: a conversation
continued by a Responses request that names it is answered as the same conversation sent whole and grows by the
request's input and answer; its items are listed, added, retrieved and deleted, its metadata replaced; bad items and
missing conversations are one clear error each; the store's edits are single steps in memory and in a file."""
from __future__ import annotations

import pytest

from service_support import qwen_api, run_with_sdk
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image
from vlmguard.workers.api import _route_path
from vlmguard.workers.response_store import ResponseStore, SqliteResponseStore, StoredResponse

MODEL = "tiny-qwen"
IMAGE = image_to_data_url(random_image(4, (40, 32)))
QUESTION = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": IMAGE},
                                                           {"type": "input_text", "text": "What is in the image?"}]}


@pytest.fixture(scope="module")
def app(qwen):
    return qwen_api(qwen)


def test_a_response_in_a_conversation_is_answered_after_its_items_and_added_to_it(app):
    async def scenario(client, http):
        conv = await client.conversations.create(items=[QUESTION], metadata={"user": "u1"})
        first = await client.responses.create(model=MODEL, conversation=conv.id, input="And its colour?",
                                              max_output_tokens=5)
        whole = await client.responses.create(model=MODEL, max_output_tokens=5, input=[
            QUESTION, {"role": "user", "content": "And its colour?"}])
        second = await client.responses.create(model=MODEL, conversation={"id": conv.id}, input="Thanks!",
                                               max_output_tokens=4)
        whole2 = await client.responses.create(model=MODEL, max_output_tokens=4, input=[
            QUESTION, {"role": "user", "content": "And its colour?"}, first.output[0].model_dump(exclude_none=True),
            {"role": "user", "content": "Thanks!"}])
        streamed = [ev async for ev in await client.responses.create(
            model=MODEL, conversation=conv.id, input="Bye.", max_output_tokens=3, stream=True)]
        counted = await client.responses.input_tokens.count(model=MODEL, conversation=conv.id, input="Again?")
        items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
        got = await client.conversations.retrieve(conv.id)
        follow = await client.responses.create(model=MODEL, previous_response_id=second.id, input="More?",
                                               max_output_tokens=2)
        return conv, first, whole, second, whole2, streamed[-1].response, counted, items, got, follow

    conv, first, whole, second, whole2, streamed, counted, items, got, follow = run_with_sdk(app, scenario)
    assert conv.object == "conversation" and conv.id.startswith("conv_") and conv.metadata == {"user": "u1"}
    assert first.conversation.id == conv.id and whole.conversation is None
    assert first.usage.input_tokens == whole.usage.input_tokens and first.output_text == whole.output_text
    assert second.usage.input_tokens == whole2.usage.input_tokens and second.output_text == whole2.output_text
    assert streamed.conversation.id == conv.id and streamed.usage.input_tokens > second.usage.input_tokens
    assert counted.input_tokens > streamed.usage.input_tokens
    # the first item, then each request's input and its answer (the count of input tokens added nothing)
    assert [it.type for it in items] == ["message"] * 7
    assert [it.role for it in items] == ["user", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert items[2].id == first.output[0].id and items[4].id == second.output[0].id
    assert items[3].content[0].text == "Thanks!" and items[0].content[0].type == "input_image"
    assert got.model_dump() == conv.model_dump()
    # a response made in a conversation keeps it: continued by id, it is answered after the whole of it
    assert follow.usage.input_tokens > second.usage.input_tokens


def test_conversation_items_are_added_listed_retrieved_and_deleted(app):
    async def scenario(client, http):
        conv = await client.conversations.create()
        added = await client.conversations.items.create(conv.id, items=[
            {"type": "message", "role": "user", "content": "Hello"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]}])
        more = await client.conversations.items.create(conv.id, items=[{"role": "user", "content": "Weather?"}])
        newest = await client.conversations.items.list(conv.id, limit=2)
        after = await client.conversations.items.list(conv.id, order="asc", after=added.data[0].id)
        one = await client.conversations.items.retrieve(added.data[1].id, conversation_id=conv.id)
        left = await client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
        remaining = [it.id async for it in client.conversations.items.list(conv.id, order="asc")]
        updated = await client.conversations.update(conv.id, metadata={"topic": "weather"})
        deleted = await client.conversations.delete(conv.id)
        gone = [await http.get(f"/v1/conversations/{conv.id}"),
                await http.post("/v1/responses", json={"model": MODEL, "input": "x", "conversation": conv.id}),
                await http.get(f"/v1/conversations/{conv.id}/items")]
        return conv, added, more, newest, after, one, left, remaining, updated, deleted, gone

    conv, added, more, newest, after, one, left, remaining, updated, deleted, gone = run_with_sdk(app, scenario)
    assert conv.metadata == {} and [it.id[:4] for it in added.data] == ["msg_", "msg_"]
    assert [it.id for it in newest.data] == [more.data[0].id, added.data[1].id] and newest.has_more
    assert [it.id for it in after.data] == [added.data[1].id, more.data[0].id] and not after.has_more
    assert one.role == "assistant" and one.content[0].text == "Hi."
    assert left.id == conv.id and remaining == [added.data[1].id, more.data[0].id]
    assert updated.metadata == {"topic": "weather"} and updated.created_at == conv.created_at
    assert deleted.deleted and deleted.object == "conversation.deleted"
    for r in gone:
        assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found", r.text
        assert r.json()["error"]["message"].startswith(f"no conversation {conv.id!r}: it was deleted")


@pytest.mark.parametrize("call, status, param, needle", [
    (("post", "/v1/conversations", {"items": [{"type": "reasoning"}]}), 400, "items.0.type", "item type 'reasoning'"),
    (("post", "/v1/conversations", {"items": [{"role": "user", "content": [{"type": "input_file"}]}]}), 400,
     "items.0.content.0.type", "part type 'input_file'"),
    (("post", "/v1/conversations", {"items": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]}),
     400, "items.0.tool_call_id", "answers no call"),
    (("post", "/v1/conversations", {"items": ["hi"]}), 400, "items.0", "an item is a JSON object"),
    (("post", "/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21}), 400, "items", None),
    (("post", "/v1/conversations", {"metadata": {str(k): "v" for k in range(17)}}), 400, "metadata", None),
    (("post", "/v1/conversations", {"metadata": {"k": "v" * 513}}), 400, "metadata.k", None),
    (("post", "/v1/conversations", {"title": "x"}), 400, "title", None),
    (("post", "/v1/conversations/conv_nope/items", {"items": [{"role": "user", "content": "x"}]}), 404,
     "conversation", "no conversation 'conv_nope'"),
    (("post", "/v1/conversations/conv_nope/items", {"items": []}), 400, "items", None),
    (("get", "/v1/conversations/conv_nope/items/msg_1", None), 404, "conversation", None),
    (("post", "/v1/conversations/conv_nope", {}), 400, "metadata", "Field required"),
])
def test_bad_conversation_requests_name_the_field(app, call, status, param, needle):
    method, url, body = call

    async def scenario(client, http):
        return await (http.post(url, json=body) if method == "post" else http.get(url))

    r = run_with_sdk(app, scenario)
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param, r.text
    assert needle is None or needle in err["message"], err["message"]


def test_a_conversation_and_a_previous_response_cannot_both_be_continued_and_items_must_continue_it(app):
    async def scenario(client, http):
        conv = await client.conversations.create(items=[{"role": "user", "content": "Hi"}])
        r = await client.responses.create(model=MODEL, input="x", max_output_tokens=2)
        both = await http.post("/v1/responses", json={"model": MODEL, "input": "y", "conversation": conv.id,
                                                      "previous_response_id": r.id})
        missing = await http.get(f"/v1/conversations/{conv.id}/items/msg_nope")
        as_response = [await http.get(f"/v1/conversations/{r.id}"),  # a response's id is no conversation ...
                       await http.get(f"/v1/responses/{conv.id}"),  # ... nor a conversation's a response
                       await http.post("/v1/responses", json={"model": MODEL, "input": "y",
                                                              "previous_response_id": conv.id})]
        orphan = await http.post(f"/v1/conversations/{conv.id}/items", json={"items": [
            {"type": "function_call_output", "call_id": "c9", "output": "x"}]})
        call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
        ok = await client.conversations.items.create(conv.id, items=[call])
        output = await client.conversations.items.create(conv.id, items=[
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])  # answers the call added before
        return both, missing, as_response, orphan, ok, output

    both, missing, as_response, orphan, ok, output = run_with_sdk(app, scenario)
    assert both.status_code == 400 and both.json()["error"]["param"] == "conversation"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "item_not_found"
    assert [x.status_code for x in as_response] == [404, 404, 400]
    assert as_response[2].json()["error"]["code"] == "previous_response_not_found"
    assert orphan.status_code == 400 and orphan.json()["error"]["param"] == "items.0.tool_call_id"
    assert ok.data[0].id.startswith("fc_") and output.data[0].id.startswith("fco_")


def test_no_conversations_where_none_or_no_responses_are_stored(qwen):
    async def scenario(client, http):
        return await http.post("/v1/conversations", json={})

    r = run_with_sdk(qwen_api(qwen, responses_store_mb=0), scenario)
    assert r.status_code == 400 and "stores no conversations (responses_store_mb: 0)" in r.json()["error"]["message"]
    r = run_with_sdk(qwen_api(qwen, conversations_store_mb=0), scenario)
    assert r.status_code == 400 and "stores no conversations (conversations_store_mb: 0)" in r.json()["error"][
        "message"]


def test_a_busy_server_keeps_its_conversations(qwen):
    async def scenario(client, http):
        conv = await client.conversations.create(items=[{"role": "user", "content": "Hi"}])
        for i in range(12):  # (each response stored, as by default: the responses' budget fills many times over)
            await client.responses.create(model=MODEL, input=f"Hello {i}", max_output_tokens=2)
        reply = await client.responses.create(model=MODEL, conversation=conv.id, input="More?", max_output_tokens=2)
        return reply, [it async for it in client.conversations.items.list(conv.id)]

    reply, items = run_with_sdk(qwen_api(qwen, responses_store_mb=0.006), scenario)  # (about 6 KB of responses)
    assert reply.conversation.id and len(items) == 1 + 2  # (its first item, then the request's input and answer)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_stores_edit_an_entry_in_one_step(kind, tmp_path):
    store = ResponseStore(2000) if kind == "memory" else SqliteResponseStore(tmp_path / "r.sqlite", 2000)
    conv = {"id": "conv_1", "object": "conversation", "metadata": {}}
    assert store.put("conv_1", StoredResponse(response=conv, messages=[], items=[{"id": "a"}]))
    grown = store.edit("conv_1", "append", [{"id": "b"}, {"id": "c"}])
    assert [it["id"] for it in grown.items] == ["a", "b", "c"] and grown.size > 0
    assert [it["id"] for it in store.edit("conv_1", "remove", "b").items] == ["a", "c"]
    assert store.edit("conv_1", "update", {"metadata": {"k": "v"}}).response["metadata"] == {"k": "v"}
    assert [it["id"] for it in store.get("conv_1").items] == ["a", "c"]
    assert store.edit("conv_nope", "append", []) is None
    assert store.edit("conv_1", "append", [{"id": "x" * 3000}]) is None and store.get("conv_1") is None  # outgrew


def test_conversation_routes_are_one_metrics_series_each():
    assert _route_path({"path": "/v1/conversations"}) == "/v1/conversations"
    assert _route_path({"path": "/v1/conversations/conv_1"}) == "/v1/conversations/{conversation_id}"
    assert _route_path({"path": "/v1/conversations/conv_1/items"}) == "/v1/conversations/{conversation_id}/items"
    assert _route_path({"path": "/v1/conversations/c/items/m"}) == "/v1/conversations/{conversation_id}/items/{item_id}"
    assert _route_path({"path": "/v1/conversations/c/other/m"}) == "other"
    assert _route_path({"path": "/v1/conversations/c/items/m/x"}) == "other"
