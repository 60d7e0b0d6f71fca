"""The in-flight batcher gathers under load when the engine is idle: after a step that answered several requests
(the batch emptied), their callers get up to ``wait_s`` to send their next request, and those requests share one
prefill. Before, the first one back started a batch alone and the others joined it a group later (closed-loop
clients at 16 tokens: prefill groups of 1 + 15, 12 + 4, ...). A lone client never waits, and a wait under load
ends after ``wait_s`` when fewer callers come back."""
from __future__ import annotations

import asyncio
import time

import pytest

from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.inflight import InflightBatcher

SPEC = GenerationSpec(max_new_tokens=2, min_new_tokens=2)  # every request ends at the same step


def item(i: int) -> WorkItem:
    return WorkItem(prompt=f"describe photo {i}", images=[random_image(i + 1, (40, 32))], spec=SPEC,
                    request_id=f"q{i}")


@pytest.fixture(scope="module")
def worker():
    return EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))


def _prefill_groups(answers: list[dict]) -> list[int]:
    return [a["result"]["timings"]["prefill_batch"] for a in answers]


async def _wave(b: InflightBatcher, ids: range, gap_s: float) -> list[dict]:
    tasks = []
    for i in ids:
        tasks.append(asyncio.ensure_future(b.submit(item(i))))
        await asyncio.sleep(gap_s)
    return await asyncio.wait_for(asyncio.gather(*tasks), 120)


def test_callers_coming_back_after_a_batch_share_one_prefill(worker, monkeypatch):
    b = InflightBatcher(worker, max_batch_size=8, wait_s=2.0)
    # the first wave's four requests are prefilled together, whatever the machine's load: the engine thread's first
    # take waits (releasing the batcher's lock) until all four are queued. Without this it could take the first one
    # alone, answer it before the other three were taken, and the wait would then rightly count three callers back,
    # not four (a gate on the prefill alone did not prevent that: the first batch still held one request)
    take = b._take

    def take_all_four(key, free):
        deadline = time.monotonic() + 30
        while len(b._queue) < 4 and time.monotonic() < deadline:
            b._cv.wait(0.01)
        monkeypatch.setattr(b, "_take", take)  # once
        return take(key, free)

    monkeypatch.setattr(b, "_take", take_all_four)

    async def first_wave():
        tasks = [asyncio.ensure_future(b.submit(item(i))) for i in range(4)]
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    async def main():
        first = await first_wave()
        # the four callers answered by the same step come back one by one, 50 ms apart
        second = await _wave(b, range(4, 8), 0.05)
        return first, second

    first, second = asyncio.run(main())
    assert max(_prefill_groups(first)) > 1  # the first wave ended with several answers in one step: load
    assert _prefill_groups(first) == [4, 4, 4, 4]
    assert _prefill_groups(second) == [4, 4, 4, 4]  # one prefill, not the first back alone


def test_a_lone_client_never_waits(worker):
    b = InflightBatcher(worker, max_batch_size=8, wait_s=5.0)

    async def main():
        await b.submit(item(0))
        t = time.monotonic()
        await asyncio.wait_for(b.submit(item(1)), 60)
        return time.monotonic() - t

    assert asyncio.run(main()) < 2.0  # far below the 5 s window


def test_the_wait_under_load_ends_after_the_window_when_fewer_come_back(worker):
    b = InflightBatcher(worker, max_batch_size=8, wait_s=0.4)

    async def main():
        await _wave(b, range(4), 0.0)
        t = time.monotonic()
        answer = await asyncio.wait_for(b.submit(item(9)), 60)  # one of the four callers comes back
        return time.monotonic() - t, answer

    took, answer = asyncio.run(main())
    assert 0.35 <= took < 5.0 and answer["result"]["token_ids"]
    # the window opens once per emptied batch: the next lone request (its batch answered one) starts at once
    b2 = InflightBatcher(worker, max_batch_size=8, wait_s=5.0)

    async def lone_after_lone():
        await b2.submit(item(2))
        t = time.monotonic()
        await b2.submit(item(3))
        return time.monotonic() - t

    assert asyncio.run(lone_after_lone()) < 2.0
