"""The replica's dynamic batcher, without Ray: batches form when the engine is free, follow the load, respect
the size limit, skip callers that left and hand a failed run's error to every caller of the batch."""
from __future__ import annotations

import asyncio
import threading

import pytest

from vlmguard.workers.batcher import EngineBatcher


class FakeEngine:
    """Records each batch; a run blocks while ``gate`` is clear (the engine is busy)."""

    def __init__(self, fail: bool = False):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = fail

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        self.gate.wait(30)
        if self.fail:
            raise RuntimeError("engine failed")
        return [i * 10 for i in items]


async def _until(cond) -> None:
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _queued_behind_a_running_batch(b: EngineBatcher, eng: FakeEngine, items: list[int]):
    """Start a batch of [0], queue ``items`` while it runs, then let the engine go on: (first, rest) futures."""
    eng.gate.clear()
    first = asyncio.ensure_future(b.submit(0))
    await _until(eng.started.is_set)
    rest = [asyncio.ensure_future(b.submit(i)) for i in items]
    await asyncio.sleep(0.05)  # all of them queued behind the running batch
    return first, rest


def test_a_lone_request_does_not_wait_for_the_window():
    async def main():
        eng = FakeEngine()
        b = EngineBatcher(eng, max_batch_size=8, wait_s=60.0)  # a window no test could sit out
        assert await asyncio.wait_for(b.submit(3), 20) == 30
        assert await asyncio.wait_for(b.submit(4), 20) == 40
        assert eng.batches == [[3], [4]]
    asyncio.run(main())


@pytest.mark.parametrize("max_batch, queued, batches", [
    (16, list(range(1, 8)), [[0], list(range(1, 8))]),  # @serve.batch would have split the seven
    (4, list(range(1, 11)), [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]),  # the size limit, in order
])
def test_requests_queued_while_the_engine_runs_form_the_next_batches(max_batch, queued, batches):
    async def main():
        eng = FakeEngine()
        b = EngineBatcher(eng, max_batch_size=max_batch, wait_s=0.0)
        first, rest = await _queued_behind_a_running_batch(b, eng, queued)
        eng.gate.set()
        assert await first == 0 and await asyncio.gather(*rest) == [i * 10 for i in queued]
        assert eng.batches == batches
    asyncio.run(main())


def test_under_load_the_window_gathers_late_requests():
    async def main():
        eng = FakeEngine()
        b = EngineBatcher(eng, max_batch_size=8, wait_s=30.0)
        b.last_batch_size = 5  # as after a batch of five
        late = []

        async def arrive_later():
            await asyncio.sleep(0.05)
            late.extend(asyncio.ensure_future(b.submit(i)) for i in (2, 3))
        arrival = asyncio.ensure_future(arrive_later())
        b.max_batch_size = 3  # the window closes as soon as the batch is full
        assert await asyncio.wait_for(b.submit(1), 20) == 10
        await arrival
        assert await asyncio.gather(*late) == [20, 30]
        assert eng.batches == [[1, 2, 3]]
    asyncio.run(main())


def test_callers_that_left_are_skipped_and_errors_reach_every_caller():
    async def main():
        eng = FakeEngine()
        b = EngineBatcher(eng, max_batch_size=8, wait_s=0.0)
        first, (gone, kept) = await _queued_behind_a_running_batch(b, eng, [1, 2])
        gone.cancel()
        eng.gate.set()
        assert await first == 0 and await kept == 20
        assert eng.batches == [[0], [2]]

        bad = FakeEngine(fail=True)
        b2 = EngineBatcher(bad, max_batch_size=8, wait_s=0.0)
        with pytest.raises(RuntimeError, match="engine failed"):
            await asyncio.wait_for(b2.submit(5), 20)
        assert await asyncio.wait_for(asyncio.gather(b.submit(7)), 20) == [70]  # the loop lives on
    asyncio.run(main())


def test_bad_size_limit_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineBatcher(lambda xs: xs, max_batch_size=0, wait_s=0.0)
