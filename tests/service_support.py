"""A backend for the HTTP API without Ray: the replica's path, every request through one in-flight batcher; and
the OpenAI SDK on an app in this process, or the app served over HTTP (uvicorn) on a thread."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

import httpx

from vlmguard.workers.api import BatchingBackend
from vlmguard.workers.engine_worker import EngineWorker
from vlmguard.workers.inflight import InflightBatcher


class BatcherBackend(BatchingBackend):
    """The replica's path without Ray: every request through one in-flight batcher (``BatchingBackend``); with
    ``fail_after``, a stream that fails after that many events, as a Ray handle's does when its replica dies."""

    def __init__(self, worker: EngineWorker, batcher: InflightBatcher, fail_after: int | None = None):
        super().__init__({"tiny-llava": worker}, {"tiny-llava": batcher})
        self.worker, self.batcher, self.fail_after = worker, batcher, fail_after

    async def stream(self, model, item):
        gen = super().stream(model, item)
        try:
            k = 0
            async for ev in gen:
                yield ev
                k += 1
                if self.fail_after is not None and k == self.fail_after:
                    raise RuntimeError("replica died")
        finally:
            await gen.aclose()


@contextlib.asynccontextmanager
async def in_process_clients(*apps: Any):
    """For each app (a process of the API, in this one), an httpx client on it and the OpenAI SDK's async client on
    that: ``([http, ...], [client, ...])``."""
    import openai

    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=a),
                                                                   base_url=f"http://p{i}"))
                 for i, a in enumerate(apps)]
        yield https, [openai.AsyncOpenAI(base_url=f"http://p{i}/v1", api_key="x", http_client=h, max_retries=0)
                      for i, h in enumerate(https)]


def run_with_sdk(app: Any, scenario: Callable[[Any, httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """``await scenario(client, http)`` with the OpenAI SDK's async client and an httpx client on ``app`` (the API
    in this process)."""

    async def main():
        async with in_process_clients(app) as ([http], [client]):
            return await scenario(client, http)

    return asyncio.run(main())


def settled(http: Any, rid: str) -> dict[str, Any]:
    """A background response once it has left ``queued`` and ``in_progress``, polled through ``http`` (a synchronous
    client of the API, such as FastAPI's ``TestClient``), as JSON."""
    for _ in range(600):
        done = http.get(f"/v1/responses/{rid}").json()
        if done["status"] not in ("queued", "in_progress"):
            return done
        time.sleep(0.05)
    raise AssertionError(f"response {rid} still {done['status']}")


def qwen_worker() -> EngineWorker:
    """A tiny random Qwen2-VL of context 2048, served as ``tiny-qwen``."""
    from vlmguard.testing import tiny_engine

    return EngineWorker("random:qwen2_vl", name="tiny-qwen", engine=tiny_engine("qwen2_vl", context=2048))


def qwen_api(worker: EngineWorker, **config: Any) -> Any:
    """The HTTP API in this process (no Ray, no batching) on ``worker``, with ``config`` for the service."""
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig

    return create_api(LocalBackend({worker.name: worker}), ServiceConfig(
        models=[ModelConfig(name=worker.name, model="random:qwen2_vl")], api_key_env=None, **config))


@contextlib.contextmanager
def served(*apps: Any) -> Iterator[list[str]]:
    """Each app served over HTTP by uvicorn on a thread of its own (its own event loop, as a process of the API
    would have); their base URLs."""
    import uvicorn

    servers = []
    for app in apps:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread, f"http://127.0.0.1:{port}"))
    try:
        while not all(server.started for server, _, _ in servers):
            time.sleep(0.02)
        yield [url for _, _, url in servers]
    finally:
        for server, thread, _ in servers:
            server.should_exit = True
            thread.join(timeout=60)  # (its shutdown done: the app's background answers stopped)
