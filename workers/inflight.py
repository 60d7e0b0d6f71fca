"""In-flight batching for one engine: requests join the running batch between two decode steps.

With whole-batch scheduling (``batcher.EngineBatcher``) a request that arrives while a batch decodes waits
for the whole batch to finish, and under closed-loop load the engine idles while a batch's answers go out
and the next requests come in. Here one thread owns the engine and loops:

1. take the queued requests that may join (the running batch's pruner and decoder, ``GenerationSpec.batch_key``:
   their lengths, stop strings, sampling settings and seeds may differ; FIFO, up to the free slots),
2. prefill them as one batch and merge it into the running one (``DecodeBatch.absorb``),
3. advance every request by one token; finished requests are answered at once and leave the batch, and
   requests whose caller has gone (disconnected, timed out) leave it too.

``stream(item)`` is the same with an answer per token: a streaming request joins the batch like any other
and its tokens are sent as they are chosen (events as ``EngineWorker.stream`` yields them).

Joining is only for *joinable* decoders (``Decoder.joinable``: every built-in one);
requests of other decoders run as whole batches, one batch key at a time, after the running batch drains (the
queue is served in order: nobody joins past a request of another pruner or decoder). Joiners are prefilled
together: a join happens when the free slots are filled or the oldest joiner has waited ``wait_s``. With an
idle engine a request starts at once, except under load: when the batch emptied after answering several requests
since the last request arrived, their callers are given up to ``wait_s`` (from the first one back) to send their
next request, so that they share one prefill instead of the first one back starting a batch alone and the others
joining it a group later (as ``batcher.EngineBatcher`` gathers under load; a lone client never waits: its own
next request is the arrival after its answer). A request that fails to prefill (bad input) gets its error alone;
an unexpected error during a step fails the requests of that batch and the loop goes on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from vlmguard.spec import GenerationSpec
from vlmguard.workers.engine_worker import EngineWorker, WorkItem, error_answer, event_dict

log = logging.getLogger("vlmguard.workers")

IDLE_EXIT_S = 60.0  # an engine thread with nothing to run for this long ends; the next request starts another
_IDLE = object()  # ``_iteration``'s answer when its thread should end


@dataclass
class _Pending:
    item: WorkItem
    key: str  # GenerationSpec.batch_key: only requests of one pruner and decoder share a batch
    fut: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)
    events: asyncio.Queue | None = None  # a streaming caller's queue: one event per token, then the answer

    def answer(self, value: dict[str, Any]) -> None:
        def _set() -> None:
            if not self.fut.done():
                self.fut.set_result(value)

        if self.events is not None:
            self._send(self.events.put_nowait, value)
        self._send(_set)

    def token(self, event: dict[str, Any]) -> None:
        """A streaming caller's token event (``engine_worker.event_dict``)."""
        if self.events is not None:
            self._send(self.events.put_nowait, event)

    def _send(self, fn: Any, *args: Any) -> None:
        """Run ``fn`` on the caller's event loop; a loop that has closed (its caller is gone for good) is
        skipped: raising here would fail the engine thread and every other caller of its batch."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # "Event loop is closed"
            if not self.loop.is_closed():
                raise

    @property
    def gone(self) -> bool:  # the caller was cancelled (client left) or its event loop closed: nothing to compute
        return self.fut.done() or self.loop.is_closed()


class InflightBatcher:
    """``await submit(item)`` -> the item's answer dict; one engine thread per batcher (started lazily)."""

    def __init__(self, worker: EngineWorker, max_batch_size: int, wait_s: float, idle_exit_s: float = IDLE_EXIT_S):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.worker = worker
        self.max_batch_size = max_batch_size
        self.wait_s = max(0.0, wait_s)
        self.idle_exit_s = idle_exit_s
        self._closed = False
        self._queue: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._joinable: dict[str, bool] = {}
        self._next_index = 0
        self._key: str | None = None  # the running batch's batch key
        self.running = 0  # requests in the running batch (for metrics and tests)
        # callers that may be about to send their next request: those answered since the last arrival (under the
        # lock), and their number when the last batch emptied (read by _await_returning)
        self._since_arrival = 0
        self._expected_back = 0
        self._taken: list[_Pending] = []  # the engine thread's requests taken from the queue this iteration

    async def submit(self, item: WorkItem) -> dict[str, Any]:
        return await self._enqueue(self._pending(item)).fut

    async def stream(self, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"token_id", "text", "done": False}`` per token, then ``{"token_id": None, "text": "",
        "done": True, "result"}``, or one ``{"error"}``. Closing the iterator (client gone) stops the request."""
        p = self._pending(item)
        p.events = asyncio.Queue()
        self._enqueue(p)
        try:
            while True:
                ev = await p.events.get()
                if "result" in ev and "done" not in ev:  # the final answer
                    yield {"token_id": None, "text": "", "done": True, "result": ev["result"]}
                    return
                yield ev
                if "error" in ev:
                    return
        finally:
            if not p.fut.done():
                p.fut.cancel()  # the engine thread sees ``gone`` and drops the request

    def _pending(self, item: WorkItem) -> _Pending:
        loop = asyncio.get_running_loop()
        return _Pending(item=item, key=item.spec.batch_key(), fut=loop.create_future(), loop=loop)

    def _enqueue(self, p: _Pending) -> _Pending:
        with self._cv:
            if self._closed:
                raise RuntimeError("this batcher is closed")
            self._queue.append(p)
            self._since_arrival = 0
            if self._thread is None or not self._thread.is_alive():  # none yet, or it ended idle
                self._thread = threading.Thread(target=self._loop, name="vlmguard-inflight", daemon=True)
                self._thread.start()
            self._cv.notify()
        return p

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new requests, let the engine thread finish what it runs and end; wait for it up to ``timeout``
        seconds. A thread left idle ends by itself after ``idle_exit_s``, so a replica's batcher holds no
        thread between bursts of traffic."""
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def joins(self, spec: GenerationSpec) -> bool:
        """Whether requests of ``spec`` join running batches (else they run as whole batches, or alone)."""
        name = spec.decoding  # joinability is the decoder's: one entry per method name
        if name not in self._joinable:
            try:
                self._joinable[name] = self.worker.joinable(spec)
            except Exception:  # noqa: BLE001 - an invalid spec: the whole-batch / alone path reports its error
                return False
        return self._joinable[name]

    # ---- the engine thread ---------------------------------------------------------------------

    def _drop_left_head(self) -> None:
        """Under the lock: drop the requests at the queue's head whose callers left while queued (they hold no
        joiner back and count for no wait)."""
        while self._queue and self._queue[0].gone:
            self._queue.popleft()

    def _take(self, key: str | None, free: int) -> list[_Pending]:
        """Under the lock: the queue's head run of requests with batch key ``key`` (the head's when None)."""
        self._drop_left_head()
        if not self._queue or free <= 0:
            return []
        key = key if key is not None else self._queue[0].key
        out = []
        while self._queue and len(out) < free and self._queue[0].key == key:
            p = self._queue.popleft()
            if not p.gone:
                out.append(p)
        return out

    def _head_run(self, limit: int) -> int:
        """Under the lock: how many queued requests, from the head, share the head's batch key (at most ``limit``)."""
        n = 0
        for p in self._queue:
            if p.key != self._queue[0].key or n >= limit:
                break
            n += 1
        return n

    def _await_returning(self) -> None:
        """Under the lock, the engine idle and a request queued: after a batch that emptied having answered several
        callers since the last arrival, wait until as many are queued (up to a full batch) or the first has waited
        ``wait_s``."""
        expected = min(self.max_batch_size, self._expected_back)
        self._expected_back = 0  # once: the next batch's own end decides the next wait
        while self._queue and self._head_run(expected) < expected:
            left = self._queue[0].queued_at + self.wait_s - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)
            self._drop_left_head()

    def _answered(self, n: int, emptied: bool) -> None:
        """``n`` callers were just answered; ``emptied``: the engine has nothing left to run."""
        if not n and not emptied:  # most decode steps: nothing to record, no lock taken
            return
        with self._cv:
            self._since_arrival += n
            if emptied:
                self._expected_back = self._since_arrival

    def _ready_to_join(self, running: int) -> bool:
        """Under the lock: join now, or wait a little for more joiners to share one prefill."""
        if not self._queue:
            return False
        free = self.max_batch_size - running
        return self._head_run(free) >= free or time.monotonic() - self._queue[0].queued_at >= self.wait_s

    def _loop(self) -> None:
        batch = None
        owners: dict[int, _Pending] = {}
        while True:
            try:
                batch = self._iteration(batch, owners)
                if batch is _IDLE:
                    return
            except BaseException as e:  # noqa: BLE001 - never let the engine thread die: fail what was running
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise  # the process is stopping
                log.exception("in-flight batching loop failed")
                for p in [*owners.values(), *self._taken]:  # those taken but not yet running would wait for ever
                    p.answer(error_answer(e))
                owners.clear()
                if batch is not None:
                    try:
                        batch.close()
                    except BaseException:  # noqa: BLE001
                        log.exception("closing the failed batch failed")
                batch, self.running = None, 0
            self._taken = []

    def _iteration(self, batch, owners: dict[int, _Pending]):
        with self._cv:
            while batch is None and not self._queue:
                if self._closed or (not self._cv.wait(self.idle_exit_s) and not self._queue):
                    # under the lock: a request enqueued from now on sees no thread and starts one
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return _IDLE
            self._drop_left_head()
            if batch is None and self._queue and self._expected_back > 1:
                self._await_returning()
            if batch is None:
                joiners = self._take(None, self.max_batch_size)
            elif self._queue and self._queue[0].key == self._key and self._ready_to_join(batch.active):
                joiners = self._take(self._key, self.max_batch_size - batch.active)
            else:
                joiners = []
            self._taken = joiners
        if batch is None:
            if not joiners:
                return None
            if not self.joins(joiners[0].item.spec):
                self._run_whole(joiners)
                return None
            self._key = joiners[0].key
        if joiners:
            batch = self._join(batch, joiners, owners)
        return None if batch is None else self._step(batch, owners)

    def _run_whole(self, group: list[_Pending]) -> None:
        gone = [lambda p=p: p.gone for p in group]  # a request whose caller leaves stops generating
        try:  # generate_many answers errors per request; this guards its own failure (no caller may hang)
            answers = self.worker.generate_many([p.item for p in group], gone)
        except BaseException as e:  # noqa: BLE001
            log.exception("whole-batch generation failed")
            answers = [error_answer(e)] * len(group)
        for p, ans in zip(group, answers):
            if ans is not None:  # None: its caller left
                p.answer(ans)
        self._answered(sum(ans is not None for ans in answers), emptied=True)

    def _start(self, group: list[_Pending], owners: dict[int, _Pending]):
        """Prefill ``group``; on a failure each request is tried alone so only the bad one gets the error."""
        indices = list(range(self._next_index, self._next_index + len(group)))
        self._next_index += len(group)
        try:
            started = [self.worker.start_batch([p.item for p in group], indices)]
        except BaseException as e:  # noqa: BLE001 - answered per request (an engine's BaseException too)
            if len(group) == 1:
                if not hasattr(e, "http_status"):
                    log.exception("prefill failed")
                group[0].answer(error_answer(e))
                return []
            return [b for p in group for b in self._start([p], owners)]
        owners.update(zip(indices, group))
        return started

    def _join(self, batch, joiners: list[_Pending], owners: dict[int, _Pending]):
        for new in self._start(joiners, owners):
            if batch is None:
                batch = new
                continue
            try:
                batch.absorb(new)
            except BaseException as e:  # noqa: BLE001 - the joiners get the error; the running batch goes on
                log.exception("merging a joining batch failed")
                self._fail(new, owners, e)
        if batch is not None:
            self.running = batch.active
        return batch

    @staticmethod
    def _fail(batch, owners: dict[int, _Pending], e: BaseException) -> None:
        """Answer every request of ``batch`` with the error ``e`` and close the batch."""
        for lv in batch.lives:
            p = owners.pop(lv.index, None)
            if p is not None:
                p.answer(error_answer(e))
        batch.close()

    def _step(self, batch, owners: dict[int, _Pending]):
        """One token for every request of ``batch``; None once the batch is done."""
        left = {lv.index for lv in batch.lives if lv.index in owners and owners[lv.index].gone}
        if left:  # callers gone (client disconnected, timeout): stop generating for them
            batch.drop(left)
            for i in left:
                owners.pop(i, None)
            if not batch.active:
                batch.close()
                self.running = 0
                return None
        try:
            events = self.worker.advance(batch)
        except BaseException as e:  # noqa: BLE001 - the batch's requests get the error, the loop goes on
            log.exception("decode step failed")
            self._fail(batch, owners, e)
            self.running = 0
            return None
        answered = 0
        for ev in events:
            if ev.done:
                p = owners.pop(ev.index, None)
                if p is not None:
                    p.answer({"result": ev.result.to_dict()})
                    answered += 1
            elif ev.index in owners:
                owners[ev.index].token(event_dict(ev))
        self.running = batch.active
        self._answered(answered, emptied=not batch.active)
        if not batch.active:
            batch.close()
            return None
        return batch
