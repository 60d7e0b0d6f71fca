"""A backend for the HTTP API without Ray: the replica's path, every request through one in-flight batcher; and
the OpenAI SDK on an app in this process."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import httpx

from vlmguard.workers.engine_worker import EngineWorker
from vlmguard.workers.inflight import InflightBatcher


class BatcherBackend:
    """The replica's path without Ray: every request through one in-flight batcher."""

    def __init__(self, worker: EngineWorker, batcher: InflightBatcher, fail_after: int | None = None):
        self.worker, self.batcher, self.fail_after = worker, batcher, fail_after

    def model_names(self):
        return ["tiny-llava"]

    async def info(self, model):
        return self.worker.info()

    async def generate(self, model, item):
        return await self.batcher.submit(item)

    async def stream(self, model, item):
        gen = self.batcher.stream(item)
        try:
            k = 0
            async for ev in gen:
                yield ev
                k += 1
                if self.fail_after is not None and k == self.fail_after:
                    raise RuntimeError("replica died")  # as a Ray handle's stream raises when its replica dies
        finally:
            await gen.aclose()


def run_with_sdk(app: Any, scenario: Callable[[Any, httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """``await scenario(client, http)`` with the OpenAI SDK's async client and an httpx client on ``app`` (the API
    in this process)."""
    import openai

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            return await scenario(client, http)

    return asyncio.run(main())
