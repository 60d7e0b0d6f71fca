"""The Ray Serve model deployment: one :class:`EngineWorker` per replica, dynamic batching via ``@serve.batch``.

Concurrent ``generate`` calls on a replica are collected by ``@serve.batch`` (up to ``max_batch_size``,
waiting at most ``batch_wait_timeout_s``) and run as one ``Engine.generate`` per distinct spec in a worker
thread, so the replica's event loop stays free to accept requests and answer health checks. Streaming
calls run alone (one request per engine call) and stop generating when the client goes away.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator

from ray import serve

from vlmguard.workers.config import ModelConfig
from vlmguard.workers.engine_worker import EngineWorker, WorkItem

_DONE = object()


@serve.deployment(name="ModelWorker")
class ModelWorker:
    def __init__(self, config: dict[str, Any]):
        cfg = ModelConfig(**config)
        self.config = cfg
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        self.worker = EngineWorker(cfg.model, name=cfg.served_name, device=cfg.device, dtype=cfg.dtype,
                                   attn_implementation=cfg.attn_implementation,
                                   trust_remote_code=cfg.trust_remote_code, torch_threads=threads)
        self._batched.set_max_batch_size(cfg.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return {**self.worker.info(), "batching": self.config.batching.model_dump()}

    async def generate(self, item: WorkItem) -> dict[str, Any]:
        if self.config.batching.enabled:
            return await self._batched(item)
        return (await asyncio.to_thread(self.worker.generate_many, [item]))[0]

    async def generate_batch(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        """A caller-made batch (benchmark jobs): one engine call per distinct spec."""
        return await asyncio.to_thread(self.worker.generate_many, items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.worker.generate_many, items)

    async def stream(self, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            try:
                for ev in self.worker.stream(item, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        task = loop.run_in_executor(None, produce)
        try:
            while True:
                ev = await queue.get()
                if ev is _DONE:
                    break
                yield ev
        finally:
            cancel.set()  # the client left (or we finished): stop generating
            await task

    def check_health(self) -> None:
        if self.worker.engine is None:
            raise RuntimeError("engine not loaded")
