"""Background responses streamed (``background`` with ``stream``), streamed again from any process of the API
(``GET /v1/responses/{id}?stream=true&starting_after=N``), and failed when the process answering them is lost
(workers/background_runs.py), through the OpenAI SDK on a tiny Qwen2-VL in this process."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from service_support import in_process_clients, qwen_api, run_with_sdk, served
from vlmguard.workers import background_runs
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.background_runs import BackgroundRun, page_key, run_key, run_record
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.response_store import LocalResponses, ResponseStore, StoredResponse

MODEL = "tiny-qwen"
LONG = dict(model=MODEL, input="Tell me a long story.", max_output_tokens=1000)


@pytest.fixture(scope="module")
def app(qwen):
    return qwen_api(qwen)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(background_runs, "BACKGROUND_POLL_S", 0.05)
    monkeypatch.setattr(background_runs, "STREAM_POLL_S", 0.02)


async def _events(stream) -> list[dict]:
    return [ev.model_dump(exclude_none=True) async for ev in stream]


def _text(events: list[dict]) -> str:
    return "".join(ev["delta"] for ev in events if ev["type"] == "response.output_text.delta")


def test_a_background_response_streams_and_streams_again_from_any_sequence_number(app, fast):
    async def scenario(client, http):
        kw = dict(model=MODEL, input="What is a cat?", max_output_tokens=12)
        streamed = await _events(await client.responses.create(background=True, stream=True, **kw))
        rid = streamed[0]["response"]["id"]
        again = await _events(await client.responses.retrieve(rid, stream=True))
        after = await _events(await client.responses.retrieve(rid, stream=True, starting_after=5))
        stored = await client.responses.retrieve(rid)
        foreground = await client.responses.create(**kw)
        return streamed, again, after, stored, foreground

    streamed, again, after, stored, foreground = run_with_sdk(app, scenario)
    assert [ev["type"] for ev in streamed[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert [ev["response"]["status"] for ev in streamed[:3]] == ["queued", "queued", "in_progress"]
    assert [ev["sequence_number"] for ev in streamed] == list(range(len(streamed)))
    assert streamed[-1]["type"] == "response.incomplete" or streamed[-1]["type"] == "response.completed"
    assert again == streamed and after == streamed[6:]  # (the same events, numbered as they were)
    assert _text(streamed) == foreground.output_text == stored.output_text != ""
    assert stored.status == foreground.status and stored.background
    assert streamed[-1]["response"]["output"] == stored.model_dump(exclude_none=True)["output"]


def _sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_background_stream_outlives_its_client_and_is_read_on_from_another_process(qwen, fast):
    shared = LocalResponses(ResponseStore(1 << 22))  # (one store for both processes of the API)
    config = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None)
    one, two = (create_api(LocalBackend({MODEL: qwen}), config, responses=shared) for _ in range(2))

    async def main(first, other):
        kw = dict(model=MODEL, input="What is a dog?", max_output_tokens=600)
        opening = []  # (a client that starts the stream and leaves after the opening events: the answer goes on)
        async with await first.responses.create(background=True, stream=True, **kw) as stream:
            async for ev in stream:
                opening.append(ev.model_dump(exclude_none=True))
                if len(opening) == 4:
                    break
        rid = opening[0]["response"]["id"]
        status = (await other.responses.retrieve(rid)).status
        # Read on from the other process (from the store, as the answering one writes it), while it runs.
        rest = await _events(await other.responses.retrieve(rid, stream=True, starting_after=3))
        whole = await _events(await other.responses.retrieve(rid, stream=True))
        return opening, status, rest, whole, await other.responses.retrieve(rid), await first.responses.create(**kw)

    with served(one, two) as (url_one, url_two):
        opening, status, rest, whole, stored, foreground = asyncio.run(main(_sdk(url_one), _sdk(url_two)))
    assert status == "in_progress"  # (its client had left)
    assert whole == opening + rest and [ev["sequence_number"] for ev in whole] == list(range(len(whole)))
    assert rest[-1]["type"] in ("response.completed", "response.incomplete")
    assert _text(whole) == stored.output_text == foreground.output_text != ""


def test_a_cancelled_background_stream_ends_with_a_cancel_error(app, fast):
    async def main(client):
        events = []
        async with await client.responses.create(background=True, stream=True, **LONG) as stream:
            async for ev in stream:
                events.append(ev.model_dump(exclude_none=True))
                if len(events) == 5:
                    cancelled = await client.responses.cancel(events[0]["response"]["id"])
        again = await _events(await client.responses.retrieve(cancelled.id, stream=True, starting_after=3))
        return events, cancelled, again

    with served(app) as (url,):
        events, cancelled, again = asyncio.run(main(_sdk(url)))
    assert cancelled.status == "cancelled"
    assert events[-1]["type"] == "error" and events[-1]["code"] == "response_cancelled"
    assert [ev["sequence_number"] for ev in events] == list(range(len(events)))
    assert again[-1] == events[-1] and [ev["sequence_number"] for ev in again] == list(range(4, len(events)))
    assert not any(ev["type"] == "response.completed" for ev in events)


@pytest.mark.parametrize("raised, message", [
    (RuntimeError("replica died"), "internal error: RuntimeError: replica died"),
    (asyncio.CancelledError(), "the model's answer was cancelled before it ended"),  # (as Ray Serve cancels a
    # deployment call whose parent request left: the response fails, not left in progress until taken for lost)
])
def test_a_background_stream_that_fails_ends_with_the_failed_response(qwen, fast, raised, message):
    class Failing(LocalBackend):
        async def stream(self, model, item):
            raise raised
            yield  # (an async generator)

    app = create_api(Failing({MODEL: qwen}), ServiceConfig(
        models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None))

    async def scenario(client, http):
        return await _events(await client.responses.create(background=True, stream=True, model=MODEL, input="hi",
                                                           max_output_tokens=2))

    events = run_with_sdk(app, scenario)
    assert [ev["type"] for ev in events] == ["response.created", "response.queued", "response.in_progress",
                                             "response.failed"]
    assert events[-1]["response"]["status"] == "failed" and events[-1]["sequence_number"] == 3
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": message}


def test_a_background_response_whose_process_was_lost_is_failed_when_read(app, fast):
    store = app.state.responses.store
    now = time.time()

    def planted(rid: str, beat: float | None, created: float) -> None:
        store.put(rid, StoredResponse(response={"id": rid, "object": "response", "status": "in_progress",
                                                "background": True, "created_at": int(created), "output": []},
                                      messages=[], items=[]))
        if beat is not None:
            record = run_record(stream=False)
            record.response["beat"] = beat
            store.put(run_key(rid), record)

    planted("resp_silent", now - 100, now - 200)  # (beat long ago: its process died)
    planted("resp_never", None, now - 100)  # (no run record at all, created long ago)
    planted("resp_alive", now - 1, now - 100)  # (beating)

    async def scenario(client, http):
        got = [await client.responses.retrieve(r) for r in ("resp_silent", "resp_never", "resp_alive")]
        follow = await http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                        "previous_response_id": "resp_alive"})
        return got, follow

    (silent, never, alive), follow = run_with_sdk(app, scenario)
    assert silent.status == never.status == "failed" and silent.error.code == "server_lost"
    assert silent.error.message.startswith("the server process answering it stopped")
    assert alive.status == "in_progress" and follow.status_code == 400  # (still running: not continued)
    assert store.get("resp_silent").response["status"] == "failed"  # (moved in the store, for every process)


def test_a_running_background_response_beats_and_is_never_taken_for_lost(qwen, fast):

    class Slow(LocalBackend):  # (an answer that takes 1.5 s: five times the time after which a silent run is lost)
        async def generate(self, model, item):
            await asyncio.sleep(1.5)
            return await super().generate(model, item)

    shared = LocalResponses(ResponseStore(1 << 22))
    config = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None,
                           background_lost_s=0.3)
    one, two = create_api(Slow({MODEL: qwen}), config, responses=shared), create_api(
        LocalBackend({MODEL: qwen}), config, responses=shared)

    async def main():
        async with in_process_clients(one, two) as ((h1, _), (answering, other)):
            queued = await answering.responses.create(background=True, model=MODEL, input="hi", max_output_tokens=3)
            running = (await h1.get("/metrics")).text
            seen = []  # (as the other process reads it: only the run's heartbeat says it is alive)
            while not seen or seen[-1] in ("queued", "in_progress"):
                await asyncio.sleep(0.1)
                seen.append((await other.responses.retrieve(queued.id)).status)
            await asyncio.sleep(0.1)
            return seen, running, (await h1.get("/metrics")).text

    seen, running, after = asyncio.run(main())
    assert seen[-1] in ("completed", "incomplete") and seen[:-1].count("in_progress") >= 10
    assert "\nvlmguard_background_responses 1\n" in running and "\nvlmguard_background_responses 0\n" in after


def test_stream_queries_are_checked(app):
    async def scenario(client, http):
        plain = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
        polled = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2, background=True)
        while (await client.responses.retrieve(polled.id)).status in ("queued", "in_progress"):
            await asyncio.sleep(0.02)
        asks = [f"{plain.id}?stream=maybe", f"{plain.id}?stream=true&starting_after=-1",
                f"{plain.id}?starting_after=3", f"{plain.id}?stream=true", f"{polled.id}?stream=true"]
        answers = [await http.get(f"/v1/responses/{q}") for q in asks]
        fine = await http.get(f"/v1/responses/{plain.id}?stream=false")
        gone = await http.delete(f"/v1/responses/{polled.id}")
        return answers, fine, gone, plain.id

    answers, fine, gone, rid = run_with_sdk(app, scenario)
    errors = [(a.status_code, a.json()["error"]["param"]) for a in answers]
    assert errors == [(400, "stream"), (400, "starting_after"), (400, "starting_after"), (400, "stream"),
                      (400, "stream")]
    assert "was not created with background and stream true" in answers[3].json()["error"]["message"]
    assert fine.status_code == 200 and fine.json()["id"] == rid and gone.status_code == 200


def test_a_run_whose_events_outgrow_the_store_keeps_beating_without_them():
    async def scenario():
        store = LocalResponses(ResponseStore(2000))
        await store.put("resp_a", StoredResponse(response={"id": "resp_a"}, messages=[], items=[]))
        await store.put(run_key("resp_a"), run_record(stream=True))
        run = BackgroundRun("resp_a", stream=True)
        run.add([{"type": "response.output_text.delta", "sequence_number": 0, "delta": "x" * 100}])
        await run.beat(store)
        small = (await store.get(run_key("resp_a"))).response
        page = (await store.get(page_key("resp_a", 0))).response["events"]
        run.add([{"type": "response.output_text.delta", "sequence_number": 1, "delta": "x" * 5000}])
        await run.beat(store)
        dropped = (await store.get(run_key("resp_a"))).response
        followed = [ev async for ev in _until_finished(run)]
        await store.delete("resp_a")
        await store.delete(run_key("resp_a"))
        await run.beat(store)  # (the response deleted: no record is kept for it)
        await store.put("resp_b", StoredResponse(response={"id": "resp_b"}, messages=[], items=[]))
        lost = BackgroundRun("resp_b", stream=True)  # (its record evicted: the page it writes is no record's)
        lost.add([{"type": "response.created", "sequence_number": 0}])
        await lost.beat(store)
        orphan = await store.get(page_key("resp_b", 0)), (await store.get(run_key("resp_b"))).response
        return small, page, dropped, followed, await store.get(run_key("resp_a")), orphan

    async def _until_finished(run):
        run.finish()
        async for ev in run.follow(-1):
            yield ev

    small, page, dropped, followed, after_delete, (orphan, kept_again) = asyncio.run(scenario())
    assert small["pages"] == [0] and not small["dropped"] and [ev["sequence_number"] for ev in page] == [0]
    assert dropped["dropped"] and dropped["pages"] == [0] and dropped["beat"] >= small["beat"]
    assert [ev["sequence_number"] for ev in followed] == [0, 1]  # (this process still has them all)
    assert after_delete is None
    assert orphan is None and kept_again["dropped"] and kept_again["pages"] == []


@pytest.mark.parametrize("case", ["cancelled", "failed", "dropped", "deleted"])
def test_a_stream_read_from_the_store_ends_with_what_became_of_its_response(case):
    from vlmguard.workers.background_runs import replay

    async def scenario():
        store = LocalResponses(ResponseStore(1 << 20))
        await store.put(run_key("resp_x"), run_record(stream=True, dropped=case == "dropped"))
        run = BackgroundRun("resp_x", stream=True)
        run.add([{"type": "response.created", "sequence_number": 0},
                 {"type": "response.output_text.delta", "sequence_number": 1, "delta": "a"}])
        await run.beat(store)
        status = {"cancelled": "cancelled", "failed": "failed"}.get(case, "in_progress")
        response = {"id": "resp_x", "object": "response", "status": status, "background": True}

        async def current():
            if case == "deleted":
                raise LookupError("no stored response 'resp_x'")
            return StoredResponse(response=response, messages=[], items=[])

        return [ev async for ev in replay(store, {}, "resp_x", 0, current)]

    events = asyncio.run(scenario())
    if case == "deleted":  # (the stream ends at once, with why)
        assert [(ev["type"], ev["sequence_number"], ev["code"]) for ev in events] == [("error", 1, "LookupError")]
        return
    assert [ev["sequence_number"] for ev in events] == [1, 2]  # (after 0: the delta, then the end)
    last = events[-1]
    assert {"cancelled": last.get("code") == "response_cancelled",
            "failed": last["type"] == "response.failed" and last["response"]["status"] == "failed",
            "dropped": last.get("code") == "stream_unavailable"}[case]


def test_a_background_stream_has_the_events_of_the_same_request_streamed_in_the_foreground(app):
    weather = {"type": "object", "additionalProperties": False, "required": ["city"],
               "properties": {"city": {"type": "string", "maxLength": 8}}}
    kw = dict(model=MODEL, input="What is the weather in Paris?", max_output_tokens=120,
              tools=[{"type": "function", "name": "get_weather", "parameters": weather}],
              tool_choice={"type": "function", "name": "get_weather"},
              extra_body={"vlmguard": {"json_whitespace": "compact"}})
    text_kw = dict(model=MODEL, input="Hi", max_output_tokens=6, top_logprobs=2,
                   include=["message.output_text.logprobs"])

    def shape(events: list[dict]) -> list[tuple]:
        """What an event says, but ids and the response's status and background flag (which differ)."""
        return [(ev["type"], ev.get("delta"), ev.get("arguments"), ev.get("text"), str(ev.get("logprobs")))
                for ev in events]

    async def scenario(client, http):
        out = []
        for args in (kw, text_kw):
            foreground = await _events(await client.responses.create(stream=True, **args))
            background = await _events(await client.responses.create(stream=True, background=True, **args))
            out.append((foreground, background))
        return out

    pairs = run_with_sdk(app, scenario)
    (calls, _), (text, _) = pairs
    assert any(ev["type"] == "response.function_call_arguments.delta" for ev in calls)  # (a call, piece by piece)
    assert any(ev.get("logprobs") for ev in text if ev["type"] == "response.output_text.delta")
    for foreground, background in pairs:
        assert shape(background[3:]) == shape(foreground[2:])  # (after its opening: created, queued, in_progress)
        assert [ev["sequence_number"] for ev in background[3:]] == [ev["sequence_number"] + 1 for ev in foreground[2:]]
        final_fg, final_bg = foreground[-1]["response"], background[-1]["response"]
        assert [o["type"] for o in final_bg["output"]] == [o["type"] for o in final_fg["output"]]
        assert final_bg["usage"] == final_fg["usage"] and final_bg["background"] and not final_fg["background"]


def test_a_stream_asked_for_after_its_last_event_is_empty(app, fast):
    async def scenario(client, http):
        done = await _events(await client.responses.create(model=MODEL, input="hi", max_output_tokens=3,
                                                           background=True, stream=True))
        last = done[-1]["sequence_number"]
        return done, [await _events(await client.responses.retrieve(done[0]["response"]["id"], stream=True,
                                                                    starting_after=n)) for n in (last - 1, last, 999)]

    done, (one, none, beyond) = run_with_sdk(app, scenario)
    assert one == done[-1:] and none == [] and beyond == []



class _CountedStore(ResponseStore):
    """A store that lists the keys read from it."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self.read: list[str] = []

    def get(self, rid):
        self.read.append(rid)
        return super().get(rid)


def _paged_run(status: str) -> tuple[list[dict], dict]:
    response = {"id": "resp_p", "object": "response", "status": status, "background": True}
    events = [{"type": "response.output_text.delta", "sequence_number": i, "delta": "x" * 50} for i in range(40)]
    return events + [{"type": "response.completed", "sequence_number": 40, "response": response}], response


def test_a_runs_events_are_written_a_page_a_beat_and_read_from_the_page_after_the_reader():
    from vlmguard.workers.background_runs import forget, replay

    events, response = _paged_run("completed")

    async def scenario():
        inner = _CountedStore(1 << 22)
        store = LocalResponses(inner)
        await store.put("resp_p", StoredResponse(response=response, messages=[], items=[]))
        await store.put(run_key("resp_p"), run_record(stream=True))
        run, sizes = BackgroundRun("resp_p", stream=True), []
        for start in range(0, len(events), 7):  # (7 events a beat: 6 pages)
            run.add(events[start:start + 7])
            await run.beat(store)
            sizes.append(inner.get(run_key("resp_p")).size)
        pages = [inner.get(page_key("resp_p", k)).response["events"] for k in range(6)]
        record = inner.get(run_key("resp_p")).response
        reads = {}
        for after in (-1, 0, 6, 7, 20, 39):
            inner.read.clear()
            reads[after] = ([ev async for ev in replay(store, {}, "resp_p", after, lambda: store.get("resp_p"))],
                            [k for k in inner.read if "#run." in k])
        await forget(store, "resp_p")
        return sizes, pages, record, reads, list(inner._entries)

    sizes, pages, record, reads, left = asyncio.run(scenario())
    assert pages == [events[k:k + 7] for k in range(0, 41, 7)]  # (each beat's events, once)
    assert record["pages"] == [6, 13, 20, 27, 34, 40] and record["ended"]
    assert sizes[-1] - sizes[0] < 30  # (the record holds where the pages end, not the events)
    for after, (got, pages_read) in reads.items():
        assert got == events[after + 1:]
        wanted = [k for k, last in enumerate(record["pages"]) if last > after]  # (none before the reader's events)
        assert pages_read == [page_key("resp_p", k) for k in wanted] and len(wanted) == 6 - (after + 1) // 7
    assert left == ["resp_p"]  # (forget: the run record and its six pages gone, the response kept)


@pytest.mark.parametrize("status", ["in_progress", "completed"])
def test_a_stream_whose_page_was_evicted_ends_where_the_page_begins(status):
    from vlmguard.workers.background_runs import replay

    events, response = _paged_run(status)

    async def scenario():
        store = LocalResponses(ResponseStore(1 << 22))
        await store.put("resp_p", StoredResponse(response=response, messages=[], items=[]))
        await store.put(run_key("resp_p"), run_record(stream=True))
        run = BackgroundRun("resp_p", stream=True)
        for start in range(0, 21, 7):
            run.add(events[start:start + 7])
            await run.beat(store)
        await store.delete(page_key("resp_p", 1))  # (as the store's LRU evicts it to make room)
        return [ev async for ev in replay(store, {}, "resp_p", 2, lambda: store.get("resp_p"))]

    got = asyncio.run(scenario())
    assert got[:-1] == events[3:7]  # (page 0 after the reader's event 2; page 1 is gone)
    end = got[-1]
    assert end["sequence_number"] == 7
    if status == "in_progress":  # (told to GET it when it has finished)
        assert end["type"] == "error" and end["code"] == "stream_unavailable"
    else:  # (finished: the response as it ended)
        assert end["type"] == "response.completed" and end["response"] == response
