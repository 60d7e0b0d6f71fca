"""Background responses' runs (``background: true``): their events, their heartbeat, and streaming them again.

A background response is answered by a task of the API process that took it (``workers/api.py``). Beside the response
itself the store keeps a *run record* (key :func:`run_key`) that the task updates every ``BACKGROUND_POLL_S``:

* its **heartbeat** (``beat``, the wall-clock time of the task's last update). Any process of the API that reads a
  queued or in-progress response whose run has not beaten for ``ServiceConfig.background_lost_s`` (the process
  answering it died without shutting down: killed, out of memory, its machine gone) answers it again from the start
  (:func:`overseen`), from the request the record keeps (``redo``; one in a conversation with the conversation's
  items as they were, named by their ids, which it must still begin with; a streamed one going on from the events
  it streamed, which the new answer must repeat first: :meth:`BackgroundRun.resume`, :func:`repeats`), at most
  ``ServiceConfig.background_retries`` times; else it moves it to ``failed`` with ``code: server_lost``, so a client
  polling it is told to send it again instead of waiting for ever;
* for a response created with ``stream: true``, where its **events** as streamed (``response.created`` ...
  ``response.completed``) are: each beat writes the events since the last one as a *page* of their own (key
  :func:`page_key`) and then adds the page's last sequence number to the record's ``pages``, so that a beat writes
  only what is new and a reader reads only the pages after the events it has (a long answer's events are not
  rewritten, nor read again, whole at every beat). With them ``GET /v1/responses/{id}?stream=true&starting_after=N``
  streams them again from any process: live from memory in the process answering it (:class:`BackgroundRun`), else
  read from the store as they are written, a second at a time (:func:`replay`). A stream ends with the response's
  last event; one cancelled or failed before it was written ends with what the response became (an ``error`` event
  ``response_cancelled``, or ``response.failed`` with its error).

Clocks: a heartbeat is compared with the reading process's clock, so the processes of the API (one machine, or a
cluster's machines kept in step by NTP) must agree within a fraction of ``background_lost_s``.
"""
from __future__ import annotations

import asyncio
import bisect
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from vlmguard.workers.response_store import RUNNING, Responses, StoredResponse

BACKGROUND_POLL_S = 1.0  # how often a task beats, writes its new events, and looks for a cancel made elsewhere
STREAM_POLL_S = 0.25  # how often a stream read from the store looks for new events
ENDS = ("response.completed", "response.incomplete", "response.failed", "error")  # a stream's last event
LOST = {"code": "server_lost", "message": "the server process answering it stopped without finishing it; send the "
                                          "request again"}


def run_key(rid: str) -> str:
    """The store's key of a background response's run record (not a response: ``GET /v1/responses/{key}`` is a
    404)."""
    return f"{rid}#run"


def page_key(rid: str, page: int) -> str:
    """The store's key of the ``page``-th page of a background response's events (0 first)."""
    return f"{rid}#run.{page}"


def run_record(stream: bool, dropped: bool = False, redo: Optional[dict[str, Any]] = None) -> StoredResponse:
    """A new run record: beaten now, no events yet (``dropped``: its events no longer fit in the store). ``pages``:
    the last sequence number of each page of events written, in order; ``ended``: whether the last page ends with a
    stream's last event. ``redo``: what another process needs to answer it again when it is lost (the request, its
    model, creation time, input items and the seed a sampled answer draws with; :func:`overseen`), ``attempts`` the
    answers begun."""
    return StoredResponse(response={"object": "response.run", "stream": stream, "dropped": dropped,
                                    "beat": time.time(), "pages": [], "ended": False, "attempts": 1,
                                    **({"redo": redo} if redo is not None else {})}, messages=[], items=[])


def _page(events: list[dict[str, Any]]) -> StoredResponse:
    return StoredResponse(response={"object": "response.events", "events": events}, messages=[], items=[])


class BackgroundRun:
    """One background response answered by this process: its task, and the events it has streamed so far (in
    memory, followed live by this process's streams; written to the store at each beat)."""

    def __init__(self, rid: str, stream: bool):
        self.rid, self.stream = rid, stream
        self.task: Optional[asyncio.Task] = None
        self.events: list[dict[str, Any]] = []
        self.written = 0  # events already in the store, in ``self.pages`` pages
        self.pages = 0
        self.logging = stream  # False once the record dropped its events (they outgrew the store)
        self.finished = False
        self._changed = asyncio.Event()  # (replaced at each change: every follower waiting on it wakes)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def add(self, events: list[dict[str, Any]]) -> None:
        self.events += events
        self._wake()

    def resume(self, events: list[dict[str, Any]], pages: int) -> None:
        """Go on from the events a lost process streamed (all of them, in the store's ``pages`` pages): the answer
        given again repeats them first (:func:`repeats`), and only its later events are added."""
        self.events, self.written, self.pages = list(events), len(events), pages

    def finish(self) -> None:
        self.finished = True
        self._wake()

    async def follow(self, after: int) -> AsyncIterator[dict[str, Any]]:
        """Its events numbered after ``after``, as they come, until it finishes."""
        i = max(0, after + 1)
        while True:
            changed = self._changed
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.finished:
                return
            await changed.wait()

    async def beat(self, store: Responses) -> None:
        """The run record beaten now, the events since the last beat written first as a page of their own (when a
        page does not fit in the store, or the record is gone, the record is kept again without events, marked
        ``dropped``, while the response is kept: the heartbeat goes on)."""
        fresh = self.events[self.written:] if self.logging else []
        if fresh and not await store.put(page_key(self.rid, self.pages), _page(fresh)):
            self.logging, fresh = False, []
        change = {"beat": time.time(), "page": fresh[-1]["sequence_number"] if fresh else None,
                  "ended": bool(fresh) and fresh[-1]["type"] in ENDS, "dropped": not self.logging and self.stream}
        if await store.edit(run_key(self.rid), "beat", change) is not None:
            if fresh:
                self.written, self.pages = self.written + len(fresh), self.pages + 1
            return
        if fresh:  # (the page no record lists: gone with it)
            await store.delete(page_key(self.rid, self.pages))
        self.logging = False
        if await store.get(self.rid) is not None:  # (not when the response was deleted)
            await store.put(run_key(self.rid), run_record(self.stream, dropped=self.stream))

    async def flush(self, store: Responses) -> None:
        """The events not yet in the store written there (nothing to write: no store call)."""
        if self.logging and self.written < len(self.events):
            await self.beat(store)


async def forget(store: Responses, rid: str) -> None:
    """A background response's run record and its pages of events deleted (nothing when it has none)."""
    record = await store.get(run_key(rid))
    if record is None:
        return
    await store.delete(run_key(rid))
    for page in range(len(record.response.get("pages", []))):
        await store.delete(page_key(rid, page))


async def logged_events(store: Responses, rid: str) -> Optional[tuple[list[dict[str, Any]], int]]:
    """Every event a background response's run has written, and in how many pages; None when they are not all kept
    (dropped, or a page evicted)."""
    record = await store.get(run_key(rid))
    if record is None or record.response.get("dropped"):
        return None
    events, missing = await _logged(store, rid, record, -1)
    return None if missing else (events, len(record.response.get("pages", [])))


def repeats(event: dict[str, Any], logged: dict[str, Any]) -> bool:
    """Whether an event of a response answered again is the one a lost process streamed with its number: the same
    but for log-probabilities and the response objects' figures (usage, timings), which may differ in their last
    digits from one run of an answer to the next."""
    def bare(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: bare(v) for k, v in x.items() if k not in ("logprobs", "response")}
        return [bare(v) for v in x] if isinstance(x, list) else x

    return bare(event) == bare(logged)


def redoable(run: dict[str, Any], retries: int) -> bool:
    """Whether a run record's response may be answered again when lost: it keeps its request (``redo``) and has been
    begun at most ``retries`` times more."""
    return bool(run.get("redo")) and run.get("attempts", 1) <= retries


async def hand_over(store: Responses, rid: str, retries: int) -> bool:
    """When this process stops: a background response it answered that may be answered again (:func:`redoable`) left
    to the next process that reads it, its heartbeat set back so that it is found lost at once; False for the
    others (the caller fails them)."""
    record = await store.get(run_key(rid))
    if record is None or not redoable(record.response, retries):
        return False
    await store.edit(run_key(rid), "beat", {"beat": 0.0, "page": None, "ended": False, "dropped": False})
    return True


async def overseen(store: Responses, rid: str, entry: StoredResponse, lost_after_s: float, retries: int = 0,
                   take_over: Optional[Callable[[str, dict[str, Any]], Awaitable[None]]] = None) -> StoredResponse:
    """A stored background response as it stands. When it is queued or in progress but its run has not beaten for
    ``lost_after_s`` (the caller knows that no task of its own runs it), it is lost: answered again from the start
    by this process (``take_over(rid, redo)``) while its record can be (``redo``) and it has been begun at most
    ``retries`` times more, else moved to ``failed`` (``server_lost``). Of several processes that find it lost at
    once, the first to claim its record takes it over (the store's ``claim`` edit, in one step)."""
    response = entry.response
    if not response.get("background") or response.get("status") not in RUNNING:
        return entry
    record = await store.get(run_key(rid))
    last = record.response.get("beat", 0.0) if record is not None else response.get("created_at", 0)
    now = time.time()
    if now - last <= lost_after_s:
        return entry
    run = record.response if record is not None else {}
    if take_over is not None and redoable(run, retries):
        claimed = await store.edit(run_key(rid), "claim", (now, now - lost_after_s))
        if claimed is not None and claimed.response.get("beat") == now:  # (ours: answered again here)
            await take_over(rid, run["redo"])
        return entry  # (ours, or another process's that claimed it first: running again either way)
    moved = await store.edit(rid, "move", (RUNNING, {"status": "failed", "error": LOST}))
    return moved if moved is not None else entry


def ending(response: dict[str, Any], seq: int) -> dict[str, Any]:
    """The event that ends a stream whose response ended without writing its last event (cancelled, lost, failed
    before its answer started)."""
    status = response.get("status")
    if status == "cancelled":
        return error_event(seq, "response_cancelled", f"response {response.get('id')!r} was cancelled")
    kind = status if status in ("completed", "incomplete", "failed") else "failed"
    return {"type": f"response.{kind}", "sequence_number": seq, "response": response}


async def replay(store: Responses, runs: dict[str, BackgroundRun], rid: str, after: int,
                 current: Callable[[], Awaitable[StoredResponse]]) -> AsyncIterator[dict[str, Any]]:
    """A background response's events numbered after ``after``, up to its last: live from ``runs`` while this
    process answers it, else from its run record in the store (``current``: the response as it stands now)."""
    seen = after
    while True:
        run = runs.get(rid)
        if run is not None:
            async for ev in run.follow(seen):
                yield ev
                seen = ev["sequence_number"]
                if ev["type"] in ENDS:
                    return
        try:
            response = (await current()).response  # (before the log: a task writes its last events, then its end)
            record = await store.get(run_key(rid))
        except Exception as e:  # (deleted meanwhile, the store unavailable: the stream ends with why)
            yield error_event(seen + 1, getattr(e, "code", None) or type(e).__name__, getattr(e, "message", str(e)))
            return
        logged, missing = await _logged(store, rid, record, seen)
        for ev in logged:
            yield ev
            seen = ev["sequence_number"]
            if ev["type"] in ENDS:
                return
        if response.get("status") not in RUNNING:
            if missing or not record or not record.response.get("ended"):  # (else it ended at or before ``after``)
                yield ending(response, seen + 1)
            return
        if record is None or record.response.get("dropped") or missing:
            yield error_event(seen + 1, "stream_unavailable", f"the events of response {rid!r} are no longer kept "
                                                              "(responses_store_mb): GET it when it has finished")
            return
        await asyncio.sleep(STREAM_POLL_S)


async def _logged(store: Responses, rid: str, record: Optional[StoredResponse],
                  after: int) -> tuple[list[dict[str, Any]], bool]:
    """The events of ``record``'s pages numbered after ``after``, in order, up to the first page the store no longer
    has (evicted to make room); and whether one was missing."""
    ends = record.response.get("pages", []) if record is not None else []
    events: list[dict[str, Any]] = []
    for page in range(bisect.bisect_right(ends, after), len(ends)):
        kept = await store.get(page_key(rid, page))
        if kept is None:
            return events, True
        events += [ev for ev in kept.response["events"] if ev["sequence_number"] > after]
    return events, False


def error_event(seq: int, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "sequence_number": seq, "code": code, "message": message, "param": None}
