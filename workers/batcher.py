"""Dynamic batching for one engine: concurrent requests become one engine call, formed when the engine is free.

Ray's ``@serve.batch`` forms a batch as soon as its window closes, whether or not the previous batch is still
running; with a model that takes longer than the window (every LVLM), the requests that arrive during one
engine call end up split into several small batches queued behind it. Here one loop owns the engine: it
waits for the engine call to finish, then takes everything queued (up to ``max_batch_size``) as the next
batch, so the batch size follows the load by itself.

With ``cancellable``, ``run`` is told which callers have left (a timeout, a client gone: their futures are
cancelled), so that a running batch stops generating for them instead of running on for nobody.

The ``wait_s`` window only opens under load (the previous batch held more than one request): a lone client
never waits, while under load the batch gathers requests still on their way (clients answered by the last
batch sending their next request) instead of leaving them for a batch of their own.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class EngineBatcher(Generic[T, R]):
    """``await submit(item)`` -> the item's result; ``run(items) -> results`` runs in a worker thread.

    ``cancellable``: ``run(items, gone)`` instead, ``gone[i]()`` true once the caller of ``items[i]`` has left
    (its result is then dropped, whatever it is)."""

    def __init__(self, run: Callable[..., list[R]], max_batch_size: int, wait_s: float, *,
                 cancellable: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run = run
        self.cancellable = cancellable
        self.max_batch_size = max_batch_size
        self.wait_s = max(0.0, wait_s)
        self.last_batch_size = 0
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()  # first use, or a new event loop: a queue bound to this one
            self._task = loop.create_task(self._loop())
        elif self._task.done():  # the loop died: restart it on the same queue, so nobody queued is lost
            self._task = loop.create_task(self._loop())
        fut: asyncio.Future = loop.create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> list[tuple[T, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.wait_s if self.last_batch_size > 1 else 0.0)
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # callers gone: nothing to compute

    def _run_batch(self, batch: list[tuple[T, asyncio.Future]]) -> list[R]:
        """In the worker thread: ``run`` on the batch's items. Only the batch's own caller cancels a future
        before this loop answers it, so a done future means its caller has left."""
        items = [item for item, _ in batch]
        if self.cancellable:
            return self.run(items, [fut.done for _, fut in batch])
        return self.run(items)

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.last_batch_size = len(batch)
            try:
                results: list[Any] = await asyncio.to_thread(self._run_batch, batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"batch run returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001 - every caller of the batch gets the error
                if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    raise  # the loop itself is stopped
                # an engine's BaseException (not an Exception) would end this loop: its callers waiting for ever
                err = e if isinstance(e, Exception) else RuntimeError(f"{type(e).__name__}: {e}")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
