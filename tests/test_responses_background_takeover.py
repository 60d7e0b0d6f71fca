"""A background response whose process was lost is answered again by the process of the API that finds it lost
(``ServiceConfig.background_retries``, workers/background_runs.py ``overseen``): from the start, from its stored
request, by one process only; at most ``background_retries`` times, then it is failed. A process that stops leaves
such answers to the next reader at once; one in a conversation is answered from the conversation as it was, a streamed
one goes on from the events it streamed (once the new answer has repeated them).
Processes of the API here are apps sharing one store in this process; a process "dies" when its tasks are cancelled
without its shutdown."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from service_support import in_process_clients, settled
from vlmguard.workers import background_runs
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.background_runs import page_key, run_key
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.response_store import LocalResponses, ResponseStore

MODEL = "tiny-qwen"
ASK = dict(model=MODEL, input="What is a cat?", max_output_tokens=24)


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(background_runs, "BACKGROUND_POLL_S", 0.05)
    monkeypatch.setattr(background_runs, "STREAM_POLL_S", 0.02)


class Stuck(LocalBackend):
    """A process that takes requests and never answers them (until it dies)."""

    async def generate(self, model, item):
        await asyncio.Event().wait()

    async def stream(self, model, item):
        await asyncio.Event().wait()
        yield {}


class Stalls(LocalBackend):
    """A process whose streams send their first ``AFTER`` events (tokens) and then nothing more (until it dies)."""

    AFTER = 3

    async def stream(self, model, item):
        k = 0
        async with contextlib.aclosing(super().stream(model, item)) as events:  # (the shared worker let go at death)
            async for ev in events:
                if k == self.AFTER:
                    await asyncio.Event().wait()
                yield self.sent(ev)
                k += 1

    def sent(self, ev):
        return ev


class StallsLater(Stalls):
    AFTER = 55  # (a call's name and first pieces of its arguments: 75 tokens in all)


class StallsGarbled(Stalls):
    """Stalls, having sent tokens another answer would not have."""

    def sent(self, ev):
        return {**ev, "text": "zz"}


async def _stalled(shared: LocalResponses, kind: str) -> tuple[str, list[dict]]:
    """The one background response in ``shared`` once the events its run wrote include one whose type ends with
    ``kind`` (a process that stalls: its first tokens out), and those events."""
    for _ in range(600):
        rid = next((k for k in shared.store._entries if "#" not in k), None)
        written = _written(shared.store, rid) if rid is not None else []
        if any(ev["type"].endswith(kind) for ev in written):
            return rid, written
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} event written")


def _events(body: str) -> list[dict]:
    import json

    return [json.loads(ln[6:]) for ln in body.splitlines() if ln.startswith("data: ")]


def _apps(qwen, backends: list[type[LocalBackend]], **config):
    shared = LocalResponses(ResponseStore(1 << 22))
    service = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None,
                            background_lost_s=0.3, **config)
    return shared, [create_api(backend({MODEL: qwen}), service, responses=shared) for backend in backends]


def _die(*clients: asyncio.Task) -> None:
    """Every background task of the apps in this loop cancelled as a process's death ends them: no shutdown runs;
    ``clients``: requests to the process that dies (their connections end with it)."""
    for task in asyncio.all_tasks():
        if "answer_in_background" in getattr(task.get_coro(), "__qualname__", ""):
            task.cancel()
    for task in clients:
        task.cancel()


async def _poll(sdk, rid: str, statuses=("queued", "in_progress")):
    for _ in range(600):
        r = await sdk.responses.retrieve(rid)
        if r.status not in statuses:
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"{rid} still {r.status}")


def test_a_lost_background_response_is_answered_again_by_the_process_that_finds_it(qwen):
    shared, (dead, alive) = _apps(qwen, [Stuck, LocalBackend])

    async def main():
        async with in_process_clients(dead, alive) as (https, (one, two)):
            queued = await one.responses.create(background=True, **ASK)
            await asyncio.sleep(0.2)
            _die()
            await asyncio.sleep(0.5)  # (its heartbeat silent for longer than background_lost_s)
            done = await _poll(two, queued.id)
            foreground = await two.responses.create(**ASK)
            metrics = (await https[1].get("/metrics?format=json")).json()
            return queued, done, foreground, metrics

    queued, done, foreground, metrics = asyncio.run(main())
    assert done.status in ("completed", "incomplete") and done.output_text == foreground.output_text != ""
    assert done.id == queued.id and done.created_at == queued.created_at and done.background
    assert shared.store.get(run_key(queued.id)).response["attempts"] == 2
    assert metrics["background_taken_over"] == 1


def test_only_one_of_the_processes_that_find_it_lost_takes_it_over(qwen):
    shared, apps = _apps(qwen, [Stuck, LocalBackend, LocalBackend, LocalBackend])

    async def main():
        async with in_process_clients(*apps) as (https, sdks):
            queued = await sdks[0].responses.create(background=True, **ASK)
            await asyncio.sleep(0.2)
            _die()
            await asyncio.sleep(0.5)
            seen = await asyncio.gather(*(sdk.responses.retrieve(queued.id) for sdk in sdks[1:]))
            done = await _poll(sdks[1], queued.id)
            counts = [(await h.get("/metrics?format=json")).json()["background_taken_over"] for h in https[1:]]
            return seen, done, counts

    seen, done, counts = asyncio.run(main())
    assert {r.status for r in seen} <= {"queued", "in_progress"} and sum(counts) == 1
    assert done.status in ("completed", "incomplete")


def test_a_response_lost_more_often_than_its_retries_allow_is_failed(qwen):
    shared, (one, two, three) = _apps(qwen, [Stuck, Stuck, LocalBackend], background_retries=1)

    async def main():
        async with in_process_clients(one, two, three) as (_, sdks):
            queued = await sdks[0].responses.create(background=True, **ASK)
            await asyncio.sleep(0.2)
            _die()
            await asyncio.sleep(0.5)
            taken = await sdks[1].responses.retrieve(queued.id)  # (the second process takes it over, and dies too)
            await asyncio.sleep(0.2)
            _die()
            await asyncio.sleep(0.5)
            return taken, await sdks[2].responses.retrieve(queued.id)

    taken, last = asyncio.run(main())
    assert taken.status in ("queued", "in_progress")
    assert last.status == "failed" and last.error.code == "server_lost"


@pytest.mark.parametrize("case", ["streamed", "not streamed"])
def test_responses_lost_without_retries_are_failed(qwen, case):
    shared, (dead, alive) = _apps(qwen, [Stuck, LocalBackend], background_retries=0)

    async def main():
        async with in_process_clients(dead, alive) as (https, (one, two)):
            streaming = None
            if case == "streamed":  # (read on in a task: this transport hands over a body once it is whole)
                streaming = asyncio.create_task(https[0].post("/v1/responses", json={
                    "background": True, "stream": True, **ASK}))
                await asyncio.sleep(0.3)
                rid = next(k for k in shared.store._entries if "#" not in k)
            else:
                rid = (await one.responses.create(background=True, **ASK)).id
            await asyncio.sleep(0.2)
            _die()
            await asyncio.sleep(0.5)
            lost = await two.responses.retrieve(rid)
            ended = (await asyncio.wait_for(streaming, 30)).text if streaming is not None else ""
            return lost, rid, ended

    lost, rid, ended = asyncio.run(main())
    assert lost.status == "failed" and lost.error.code == "server_lost"
    assert case != "streamed" or '"type":"response.failed"' in ended.replace(" ", "")  # (its stream ended so)
    assert "redo" not in shared.store.get(run_key(rid)).response  # (nothing to answer it again with)


def test_a_lost_response_that_continued_a_response_since_deleted_is_failed_with_why(qwen):
    shared, (dead, alive) = _apps(qwen, [Stuck, LocalBackend])

    async def main():
        async with in_process_clients(dead, alive) as (_, (one, two)):
            first = await two.responses.create(model=MODEL, input="hi", max_output_tokens=3)
            queued = await one.responses.create(background=True, previous_response_id=first.id, **ASK)
            await asyncio.sleep(0.2)
            _die()
            await two.responses.delete(first.id)
            await asyncio.sleep(0.5)
            await two.responses.retrieve(queued.id)  # (found lost: taken over, and failed at once)
            return await two.responses.retrieve(queued.id)

    failed = asyncio.run(main())
    assert failed.status == "failed" and failed.error.code == "previous_response_not_found"


def test_a_lost_response_in_a_conversation_is_answered_from_the_conversation_as_it_was(qwen):
    """Its prompt is the conversation's items when it was asked for (not a turn added while it was lost); its turn is
    then added to the conversation, after that one, as the lost process would have added it."""
    shared, (dead, alive) = _apps(qwen, [Stuck, LocalBackend])

    async def main():
        async with in_process_clients(dead, alive) as (https, (one, two)):
            convs = [(await https[1].post("/v1/conversations", json={})).json()["id"] for _ in range(2)]
            for conv in convs:  # (the same first turn in both)
                await two.responses.create(model=MODEL, input="hi", max_output_tokens=4, conversation=conv)
            queued = await one.responses.create(background=True, conversation=convs[0], **ASK)
            await asyncio.sleep(0.2)
            _die()
            meanwhile = await two.responses.create(model=MODEL, input="And a dog?", max_output_tokens=4,
                                                   conversation=convs[0])
            await asyncio.sleep(0.5)
            done = await _poll(two, queued.id)
            expected = await two.responses.create(conversation=convs[1], **ASK)  # the conversation as it was
            items = (await https[1].get(f"/v1/conversations/{convs[0]}/items?order=asc")).json()["data"]
            return done, meanwhile, expected, items

    done, meanwhile, expected, items = asyncio.run(main())
    assert done.status in ("completed", "incomplete") and done.output_text == expected.output_text != ""
    texts = [part.get("text") for it in items for part in it.get("content", [])]
    assert len(items) == 6 and texts[2] == "And a dog?" and texts[3] == meanwhile.output_text
    assert texts[4] == ASK["input"] and texts[5] == done.output_text  # (its turn after the one added meanwhile)


def test_a_lost_response_whose_conversation_lost_items_is_failed_with_why(qwen):
    shared, (dead, alive) = _apps(qwen, [Stuck, LocalBackend])

    async def main():
        async with in_process_clients(dead, alive) as (https, (one, two)):
            conv = (await https[1].post("/v1/conversations", json={})).json()["id"]
            await two.responses.create(model=MODEL, input="hi", max_output_tokens=4, conversation=conv)
            queued = await one.responses.create(background=True, conversation=conv, **ASK)
            await asyncio.sleep(0.2)
            _die()
            first = (await https[1].get(f"/v1/conversations/{conv}/items?order=asc")).json()["data"][0]["id"]
            assert (await https[1].delete(f"/v1/conversations/{conv}/items/{first}")).status_code == 200
            await asyncio.sleep(0.5)
            await two.responses.retrieve(queued.id)  # (found lost: taken over, and failed at once)
            return await two.responses.retrieve(queued.id)

    failed = asyncio.run(main())
    assert failed.status == "failed" and failed.error.code == "conversation_changed"
    assert "lost items" in failed.error.message


WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 8}}}
CALL = dict(model=MODEL, input="What is the weather in Paris?", max_output_tokens=120,
            tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}],
            tool_choice={"type": "function", "name": "get_weather"}, vlmguard={"json_whitespace": "compact"})


DELTAS = {"text": ".output_text.delta", "call": ".function_call_arguments.delta"}


@pytest.mark.parametrize("kind", ["text", "sampled", "call"])
def test_a_lost_streamed_response_goes_on_from_the_events_it_streamed(qwen, kind):
    """The process that takes it over answers it again, checks that the answer repeats the events streamed (3 tokens'
    text, or a call's name and first pieces of its arguments, among them), and adds only those after: a reader sees
    one stream, each event once, and the response is the one a foreground request gets. A sampled answer (no seed
    in the request) repeats its draws: it is answered with the seed its run record keeps."""
    shared, (dead, alive) = _apps(qwen, [StallsLater if kind == "call" else Stalls, LocalBackend])
    ask = {"text": ASK, "sampled": {**ASK, "temperature": 1.0}, "call": CALL}[kind]

    async def main():
        async with in_process_clients(dead, alive) as (https, (one, two)):
            first = asyncio.create_task(https[0].post("/v1/responses", json={"background": True, "stream": True,
                                                                             **ask}))
            rid, streamed = await _stalled(shared, DELTAS["call" if kind == "call" else "text"])
            _die(first)
            await asyncio.sleep(0.5)
            reader = asyncio.create_task(https[1].get(f"/v1/responses/{rid}?stream=true"))  # (reconnected)
            done = await _poll(two, rid)
            again = (await https[1].get(f"/v1/responses/{rid}?stream=true&starting_after=4")).text
            foreground = (await https[1].post("/v1/responses", json=ask)).json()
            metrics = (await https[1].get("/metrics?format=json")).json()
            return rid, streamed, (await asyncio.wait_for(reader, 30)).text, again, done, foreground, metrics

    rid, streamed, read, again, done, foreground, metrics = asyncio.run(main())
    events = _events(read)  # (read live from the store as the new answer went on)
    assert len(streamed) > 4 and events[:len(streamed)] == streamed  # (lost mid-answer; as streamed then)
    assert [ev["sequence_number"] for ev in events] == list(range(len(events))) and _events(again) == events[5:]
    assert done.status in ("completed", "incomplete") and events[-1]["type"] == f"response.{done.status}"
    assert events[-1]["response"]["id"] == rid and {ev["item_id"] for ev in events if "item_id" in ev} == {
        done.output[0].id}
    pieces = "".join(ev["delta"] for ev in events if ev["type"].endswith(".delta"))
    if kind == "text":
        assert pieces == done.output_text == foreground["output"][0]["content"][0]["text"] != ""
    elif kind == "sampled":  # (the foreground request draws with a seed of its own)
        seed = shared.store.get(run_key(rid)).response["redo"]["seed"]
        assert pieces == done.output_text != "" and isinstance(seed, int)
    else:
        call = done.output[0]
        assert call.type == "function_call" and pieces == call.arguments == foreground["output"][0]["arguments"]
        added = next(ev["item"] for ev in events if ev["type"] == "response.output_item.added")
        assert added["call_id"] == call.call_id and call.call_id.startswith("call_") and len(call.call_id) == 29
    assert shared.store.get(run_key(rid)).response["attempts"] == 2 and metrics["background_taken_over"] == 1


def test_a_lost_streamed_response_whose_answer_differs_is_failed(qwen):
    shared, (dead, alive) = _apps(qwen, [StallsGarbled, LocalBackend])

    async def main():
        async with in_process_clients(dead, alive) as (https, (one, two)):
            first = asyncio.create_task(https[0].post("/v1/responses", json={"background": True, "stream": True,
                                                                             **ASK}))
            rid, _ = await _stalled(shared, DELTAS["text"])
            _die(first)
            await asyncio.sleep(0.5)
            failed = await _poll(two, rid)
            return failed, (await https[1].get(f"/v1/responses/{rid}?stream=true")).text

    failed, read = asyncio.run(main())
    assert failed.status == "failed" and failed.error.code == "resume_diverged"
    assert "differed from the one streamed" in failed.error.message
    events = _events(read)
    assert events[-1]["type"] == "response.failed" and "zz" in "".join(ev.get("delta", "") for ev in events)


def test_a_streamed_answer_still_running_when_the_api_stops_goes_on_in_the_next_process(qwen):
    """A redeploy stops a replica mid-stream: its answer is handed over with the events it streamed, and the next
    process that reads it goes on from them; the stream read again there is one stream, the foreground answer."""
    import json

    from fastapi.testclient import TestClient

    shared = LocalResponses(ResponseStore(1 << 22))
    config = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None)
    ask = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 200}
    with TestClient(create_api(Stalls({MODEL: qwen}), config, responses=shared)) as http:
        with http.stream("POST", "/v1/responses", json={**ask, "background": True, "stream": True}) as r:
            first = next(json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: "))
        rid, streamed = asyncio.run(_stalled(shared, DELTAS["text"]))  # (its first tokens' events written)
        assert rid == first["response"]["id"]
    # (the app stopped: its shutdown handed the answer over)
    with TestClient(create_api(LocalBackend({MODEL: qwen}), config, responses=shared)) as other:
        done = settled(other, rid)
        events = _events(other.get(f"/v1/responses/{rid}?stream=true").text)
        foreground = other.post("/v1/responses", json=ask).json()
    text = done["output"][0]["content"][0]["text"]
    assert done["status"] in ("completed", "incomplete") and text == foreground["output"][0]["content"][0]["text"]
    assert [ev["sequence_number"] for ev in events] == list(range(len(events))) and events[:len(streamed)] == streamed
    assert any(ev["type"] == "response.output_text.delta" for ev in streamed)  # (handed over mid-answer)
    assert "".join(ev["delta"] for ev in events if ev["type"] == "response.output_text.delta") == text



def _written(store: ResponseStore, rid: str) -> list[dict]:
    """The events a background response's run has written so far, read from ``store`` directly."""
    record = store.get(run_key(rid))
    pages = record.response.get("pages", []) if record is not None else []
    return [ev for k in range(len(pages)) for ev in store.get(page_key(rid, k)).response["events"]]
