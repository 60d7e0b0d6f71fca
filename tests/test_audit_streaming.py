"""Streaming answers of the HTTP API over the replica's in-flight batcher: a backend that fails after a stream
started ends every kind of stream (one choice, several, native) with an error event and ``[DONE]`` (the
one-choice and native streams broke off mid-body, the server logging a traceback); a client that disconnects
mid-stream stops its generation while the requests beside it get the tokens they get alone."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from service_support import BatcherBackend
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.api import create_api
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker
from vlmguard.workers.inflight import InflightBatcher

IMAGE = image_to_data_url(random_image(1, (40, 32)))


def chat(text: str = "describe the photo", **kw) -> dict:
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": IMAGE}}]}], **kw}


def sse(raw: str) -> list[str]:
    """The ``data:`` payloads of a complete SSE body (every event well-formed)."""
    assert raw.endswith("\n\n"), raw[-200:]
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


@pytest.fixture(scope="module")
def worker():
    return EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))


def _app(worker, batcher, **kw):
    return create_api(BatcherBackend(worker, batcher, **kw), ServiceConfig(api_key_env=None, host="127.0.0.1"))


def test_a_backend_that_fails_mid_stream_ends_every_stream_with_an_error_event_and_done(worker):
    b = InflightBatcher(worker, 8, 0.0)
    app = _app(worker, b, fail_after=2)
    native = {"prompt": "describe the photo", "images": [IMAGE], "spec": {"max_new_tokens": 12}, "stream": True}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            answers = [await http.post("/v1/chat/completions", json=chat(max_tokens=12, stream=True)),
                       await http.post("/v1/chat/completions", json=chat(max_tokens=12, stream=True, n=2)),
                       await http.post("/v1/generate", json=native)]
        for _ in range(500):  # the engine drops the rows of the failed streams at its next step
            if b.running == 0:
                break
            await asyncio.sleep(0.01)
        return answers

    for r in asyncio.run(main()):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        *_, error, done = sse(r.text)
        assert done == "[DONE]"
        assert json.loads(error)["error"] == {"message": "internal error: RuntimeError: replica died",
                                              "type": "server_error"}
    assert b.running == 0


def test_a_client_that_disconnects_mid_stream_stops_its_generation_and_the_others_get_their_tokens(worker):
    import uvicorn

    b = InflightBatcher(worker, 8, 0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(worker, b), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    long = worker.engine.context_length - 200  # still generating when its client leaves
    url = f"http://127.0.0.1:{port}"

    async def leave(body, after):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= after:
                        break

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            alone = (await http.post("/v1/chat/completions", json=chat(max_tokens=24))).json()
            text = alone["choices"][0]["message"]["content"]
            items = worker.items
            streamed, plain, *_ = await asyncio.gather(
                http.post("/v1/chat/completions", json=chat(max_tokens=24, stream=True)),
                http.post("/v1/chat/completions", json=chat(max_tokens=24)),
                leave(chat("hi", max_tokens=long, stream=True), 4),
                leave(chat("hi", max_tokens=long, stream=True, n=2), 6))
            for _ in range(500):  # the engine drops the rows of the clients that left
                if b.running == 0:
                    break
                await asyncio.sleep(0.01)
            return text, streamed, plain, worker.items - items

    try:
        text, streamed, plain, finished = asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
    assert b.running == 0 and finished == 2  # the streams whose clients left never ran to their end
    chunks = [json.loads(d) for d in sse(streamed.text)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert plain.json()["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", chat(max_tokens=4, stream="yes")),
    ("/v1/chat/completions", chat(max_tokens=4, stream=1)),
    ("/v1/chat/completions", chat(max_tokens=4, stream=True, stream_options={"include_usage": "true"})),
    ("/v1/generate", {"prompt": "hi", "images": [IMAGE], "spec": {"max_new_tokens": 4}, "stream": 1}),
])
def test_stream_flags_must_be_booleans(worker, path, body):
    """"stream": "yes" or 1 was read as true (a client that meant something else got an event stream)."""
    app = _app(worker, InflightBatcher(worker, 8, 0.0))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post(path, json=body)

    r = asyncio.run(main())
    assert r.status_code == 400, r.text
    assert "boolean" in r.json()["error"]["message"]


def test_a_request_timeout_under_a_second_is_reported_as_set(worker):
    """A 0.2 s request_timeout_s was reported as 'timed out after 0 s'."""

    class Slow(BatcherBackend):
        async def generate(self, model, item):
            await asyncio.sleep(2)

    app = create_api(Slow(worker, InflightBatcher(worker, 8, 0.0)),
                     ServiceConfig(api_key_env=None, host="127.0.0.1", request_timeout_s=0.2))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json=chat(max_tokens=4))

    r = asyncio.run(main())
    assert r.status_code == 504 and r.json()["error"]["message"] == "request timed out after 0.2 s"


class _Tracked:
    """A backend stream that records whether the API closed it."""

    def __init__(self, agen):
        self.agen, self.closed = agen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    async def aclose(self):
        self.closed = True
        await self.agen.aclose()


def test_every_backend_stream_is_closed_when_its_answer_ends(worker):
    """A one-choice chat stream and a native stream left their backend stream to the garbage collector: the
    replica's admission slot (freed when its stream closes) stayed taken after the answer had gone out."""
    opened: list[_Tracked] = []

    class Tracking(BatcherBackend):
        def stream(self, model, item):
            opened.append(_Tracked(super().stream(model, item)))
            return opened[-1]

    app = create_api(Tracking(worker, InflightBatcher(worker, 8, 0.0)),
                     ServiceConfig(api_key_env=None, host="127.0.0.1"))
    native = {"prompt": "describe the photo", "images": [IMAGE], "spec": {"max_new_tokens": 4}, "stream": True}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for path, body in [("/v1/chat/completions", chat(max_tokens=4, stream=True)),
                               ("/v1/chat/completions", chat(max_tokens=4, stream=True, n=2)),
                               ("/v1/generate", native)]:
                r = await http.post(path, json=body)
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
                assert opened and all(t.closed for t in opened), path

    asyncio.run(main())
    assert len(opened) == 4
