"""Audit of the service's behaviour when things go wrong at run time, without Ray: an engine that raises in a
prefill or a decode step, callers that leave or time out, mixed specs in one queue, and the metrics of it.

Defects found (each test here failed on the code as audited):
- an engine error that is a ``BaseException`` but not an ``Exception`` killed the in-flight batcher's engine
  thread (the requests it had taken waited for ever), ended the whole-batch batcher's loop (its callers waited
  for ever) and escaped ``EngineWorker`` (no JSON error: the ASGI app raised);
- a request that left while queued (timeout, client gone) still held back, until the running batch drained,
  the requests behind it that could have joined that batch;
- a stream that failed after it started counted nowhere in the metrics (a 200, no failed result);
- ``LocalBackend.stream`` ran the whole generation before it sent the first event, so closing the stream (a
  client gone, a first-token timeout) did not stop the engine;
- a non-streaming request answered alone (``LocalBackend.generate``, a replica with batching off) went on
  generating after its request timed out or its client left.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from vlmguard.testing import random_image, tiny_engine
from vlmguard.spec import GenerationSpec
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.batcher import EngineBatcher
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.inflight import InflightBatcher

CONFIG = ServiceConfig(api_key_env=None, host="127.0.0.1")


class Boom(BaseException):
    """An engine error that is not an ``Exception`` (as some libraries raise)."""


class Engine:
    """The shared tiny engine (never mutated) with failures injected by the test."""

    def __init__(self, fail=None):
        self._engine = tiny_engine("llava")
        self.fail = fail or (lambda where, reqs: None)
        self.streamed = 0  # events an engine stream produced

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, reqs, spec):
        self.fail("generate", reqs)
        return self._engine.generate(reqs, spec)

    def start_batch(self, reqs, specs, indices=None):
        self.fail("prefill", reqs)
        return self._engine.start_batch(reqs, specs, indices)

    def stream(self, reqs, spec):
        self.fail("stream", reqs)
        for ev in self._engine.stream(reqs, spec):
            self.streamed += 1
            yield ev


def boom_on(where: str, request_id: str):
    def fail(at, reqs):
        if at == where and any(r.request_id == request_id for r in reqs):
            raise Boom("engine broke")
    return fail


def item(i: int, request_id: str | None = None, **spec) -> WorkItem:
    spec.setdefault("max_new_tokens", 4)
    return WorkItem(prompt=f"describe photo {i}", images=[random_image(i + 1)], spec=GenerationSpec(**spec),
                    request_id=request_id or f"r{i}")


async def _until(cond) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)


async def _settled(tasks, timeout_s: float = 20.0):
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    assert not pending, f"{len(pending)} callers still waiting"
    return [t.result() for t in tasks]


def test_an_engine_base_exception_in_a_prefill_or_a_step_answers_every_caller_and_the_thread_goes_on():
    fail = {"at": None}
    worker = EngineWorker(name="tiny", engine=Engine(lambda where, reqs: fail["at"] and fail["at"](where, reqs)))
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)
    orig_advance = worker.advance

    def advance(batch):
        if fail.get("step"):
            raise Boom("step broke")
        return orig_advance(batch)

    worker.advance = advance  # this test's own worker

    async def main():
        fail["at"] = boom_on("prefill", "bad")
        prefill = await _settled([asyncio.ensure_future(b.submit(it)) for it in (item(0), item(1, "bad"), item(2))])
        fail["at"], fail["step"] = None, True
        step = await _settled([asyncio.ensure_future(b.submit(item(i))) for i in range(3)])
        fail["step"] = False
        after = await _settled([asyncio.ensure_future(b.submit(item(3)))])
        await _until(lambda: b.running == 0)
        return prefill, step, after

    prefill, step, after = asyncio.run(main())
    assert "result" in prefill[0] and "result" in prefill[2], prefill
    assert prefill[1]["error"]["status"] == 500 and "Boom: engine broke" in prefill[1]["error"]["message"]
    for a in step:
        assert a["error"]["status"] == 500 and "Boom: step broke" in a["error"]["message"], a
    assert "result" in after[0] and b._thread.is_alive() and b.running == 0


def test_the_whole_batcher_hands_an_engine_base_exception_to_its_callers_and_goes_on():
    def run(items):
        if "bad" in items:
            raise Boom("engine broke")
        return [f"{x}!" for x in items]

    async def main():
        b = EngineBatcher(run, max_batch_size=4, wait_s=0.0)
        bad = asyncio.ensure_future(b.submit("bad"))
        await asyncio.wait([bad], timeout=20)
        assert bad.done(), "the caller waits for ever"
        with pytest.raises(RuntimeError, match="Boom: engine broke"):
            bad.result()
        assert await asyncio.wait_for(b.submit("ok"), 20) == "ok!"

    asyncio.run(main())


def test_an_engine_base_exception_is_a_json_500_for_its_request_only():
    worker = EngineWorker(name="tiny", engine=Engine(boom_on("generate", "bad")))
    good, bad = worker.generate_many([item(0), item(1, "bad")])
    assert "result" in good and bad["error"]["status"] == 500 and "Boom" in bad["error"]["message"]

    broken = EngineWorker(name="tiny", engine=Engine(lambda where, reqs: (_ for _ in ()).throw(Boom("broke"))))
    app = create_api(LocalBackend({"tiny": broken}), CONFIG)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [await http.post("/v1/chat/completions", json={**body, "stream": s}) for s in (False, True)]

    for r in asyncio.run(main()):
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "internal error: Boom: broke"


def test_a_request_that_left_while_queued_holds_no_joiner_back():
    worker = EngineWorker(name="tiny", engine=Engine())
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)
    n = worker.engine.context_length - 200

    async def main():
        running = asyncio.ensure_future(b.submit(item(0, max_new_tokens=n, min_new_tokens=n)))
        await _until(lambda: b.running)
        other = asyncio.ensure_future(b.submit(item(1, pruning="fastv", budget=4)))  # waits for the drain
        await asyncio.sleep(0)
        other.cancel()  # its client left (or its request timed out) while queued
        with contextlib.suppress(asyncio.CancelledError):
            await other
        joiner = await asyncio.wait_for(b.submit(item(2)), 60)
        joined_while_running = not running.done()
        running.cancel()
        await _until(lambda: b.running == 0)
        return joiner, joined_while_running

    joiner, joined_while_running = asyncio.run(main())
    assert "result" in joiner and joiner["result"]["timings"]["batch_size"] == 2
    assert joined_while_running and b.running == 0


def test_a_stream_that_fails_after_it_started_is_counted_as_a_failed_result():
    worker = EngineWorker(name="tiny", engine=Engine())
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)
    orig_advance, steps = worker.advance, []

    def advance(batch):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("CUDA out of memory")
        return orig_advance(batch)

    worker.advance = advance

    class Backend:
        def model_names(self):
            return ["tiny"]

        async def info(self, model):
            return worker.info()

        async def generate(self, model, it):
            return await b.submit(it)

        def stream(self, model, it):
            return b.stream(it)

    app = create_api(Backend(), CONFIG)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "min_tokens": 8,
            "stream": True}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            r = await http.post("/v1/chat/completions", json=body)
            return r, (await http.get("/metrics", params={"format": "json"})).json(), (await http.get("/metrics")).text

    r, metrics, prometheus = asyncio.run(main())
    events = [e[len("data: "):] for e in r.text.strip().split("\n\n")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "CUDA out of memory" in json.loads(events[-2])["error"]["message"]
    assert metrics["results_failed"] == 1 and "vlmguard_failed_results_total 1" in prometheus


def _local_backend():
    """An engine that counts the events it streams, its worker, a LocalBackend, and a length no request of the
    tests reaches once stopped (the tiny model's context less a margin)."""
    engine = Engine()
    worker = EngineWorker(name="tiny", engine=engine)
    return engine, worker, LocalBackend({"tiny": worker}), worker.engine.context_length - 200


def test_closing_a_local_stream_stops_its_generation():
    engine, worker, backend, n = _local_backend()
    items = worker.items

    async def main():
        gen = backend.stream("tiny", item(0, max_new_tokens=n, min_new_tokens=n))
        first = await asyncio.wait_for(gen.__anext__(), 60)  # a first-token timeout: it comes at once
        await gen.aclose()  # the client left, or the request timed out
        await _until(lambda: not worker._lock.locked())
        return first

    first = asyncio.run(main())
    assert first["done"] is False and not worker._lock.locked()
    assert worker.items == items and engine.streamed < n // 2  # it stopped, nowhere near its max tokens


def test_a_request_that_times_out_or_is_dropped_stops_its_generation():
    """A non-streaming request answered alone (``LocalBackend``, and a replica with batching off) ran to its last
    token in a thread after its caller had gone (a 504, a client that left), holding the engine from the requests
    behind it. Its generation now stops at the next token (``answer_alone``)."""
    engine, worker, backend, n = _local_backend()
    items = worker.items

    async def main():
        task = asyncio.create_task(backend.generate("tiny", item(0, max_new_tokens=n, min_new_tokens=n)))
        await _until(lambda: engine.streamed > 0)
        task.cancel()  # what the API's request timeout (asyncio.wait_for) or a dropped connection does
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until(lambda: not worker._lock.locked())
        return await backend.generate("tiny", item(1))  # the engine is free for the next request

    after = asyncio.run(main())
    assert "result" in after and not worker._lock.locked()
    assert worker.items == items + 1 and engine.streamed < n // 2  # it stopped, nowhere near its max tokens
