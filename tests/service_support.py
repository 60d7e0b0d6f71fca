"""A backend for the HTTP API without Ray: the replica's path, every request through one in-flight batcher."""
from __future__ import annotations

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
