"""Stored Responses (``store``, ``previous_response_id``, ``GET`` / ``DELETE /v1/responses/{id}``, ``input_items``).

OpenAI's Responses API keeps each response (``store`` defaults to true) so that the next request can continue the
conversation by naming it (``previous_response_id``) instead of sending it again. vlmguard keeps them least recently
used first out, up to ``ServiceConfig.responses_store_mb`` (0: nothing is kept, every response says ``store: false``
and ``previous_response_id`` is refused), in memory (:class:`ResponseStore`) or, with ``responses_store_path``, in a
SQLite file that outlives the service (:class:`SqliteResponseStore`). Each entry holds what a follow-up needs: the
conversation as chat messages up to and with this answer (the request's ``instructions`` left out: OpenAI does not
carry them over), its input items as the Responses API lists them, and the response itself. The Conversations API's
conversations are entries too (``workers/conversations.py``), changed in place by the store's ``EDITS``, in an LRU of
their own (``conversations_store_mb``; :class:`PooledStore`), and so are background responses' run records
(``workers/background_runs.py``), kept with the responses.

Where the store lives (``ServiceConfig.responses_store``): in the process serving the HTTP API
(:class:`LocalResponses`), or, when the API runs in several processes (replicas of the ingress, or of a model serving
HTTP itself), in one store deployment they all call (``response_store_deployment.py``, :class:`SharedResponses`), so
that a follow-up finds its conversation whichever replica it lands on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from vlmguard.errors import InvalidInput, VlmguardError

log = logging.getLogger(__name__)


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was answered
    messages: list[dict[str, Any]]  # the conversation as chat messages, this answer last (no instructions)
    items: list[dict[str, Any]]  # its input items, each with an id, oldest first (earlier responses' included)
    size: int = 0  # bytes counted against the store's budget

    def __post_init__(self) -> None:
        if not self.size:
            self.size = sum(len(json.dumps(x, default=str)) for x in (self.response, self.messages, self.items))


def _append(entry: StoredResponse, items: list[dict[str, Any]]) -> StoredResponse:
    return StoredResponse(response=entry.response, messages=entry.messages, items=[*entry.items, *items])


def _remove(entry: StoredResponse, item_id: str) -> StoredResponse:
    return StoredResponse(response=entry.response, messages=entry.messages,
                          items=[it for it in entry.items if it.get("id") != item_id])


def _update(entry: StoredResponse, fields: dict[str, Any]) -> StoredResponse:
    return StoredResponse(response={**entry.response, **fields}, messages=entry.messages, items=entry.items)


RUNNING = ["queued", "in_progress"]  # the states of a background response that is not done


def _finish(entry: StoredResponse, done: StoredResponse) -> StoredResponse:
    return entry if entry.response.get("status") == "cancelled" else done


def _move(entry: StoredResponse, move: tuple[list[str], dict[str, Any]]) -> StoredResponse:
    """The response's fields set to ``move[1]`` (its new ``status`` among them) if its status is one of ``move[0]``."""
    before, fields = move
    return _update(entry, fields) if entry.response.get("status") in before else entry


def _beat(record: StoredResponse, change: dict[str, Any]) -> StoredResponse:
    """A background response's run record (workers/background_runs.py) beaten at ``change["beat"]``, the last
    sequence number of the page of events just written (``change["page"]``, None: no new page) added to its pages,
    ``ended`` when that page ends its stream, ``dropped`` when its events no longer fit in the store."""
    run = record.response
    pages = run["pages"] if change["page"] is None else [*run["pages"], change["page"]]
    return StoredResponse(response={**run, "beat": change["beat"], "pages": pages,
                                    "ended": run["ended"] if change["page"] is None else change["ended"],
                                    "dropped": run["dropped"] or change["dropped"]}, messages=[], items=[])


def _claim(record: StoredResponse, claim: tuple[float, float]) -> StoredResponse:
    """A background response's run record taken over (beaten at ``claim[0]``, its ``attempts`` one more) if it has
    not beaten since ``claim[1]``: of the processes that find a run lost, only the first takes it over."""
    now, silent_since = claim
    run = record.response
    if run.get("beat", 0.0) > silent_since:
        return record
    return StoredResponse(response={**run, "beat": now, "attempts": run.get("attempts", 1) + 1}, messages=[],
                          items=[])


# The changes a store makes to an entry in one step (``edit``), by name so that a store deployment makes them too:
# a conversation's items added or one removed, fields of its object replaced (workers/conversations.py); a
# background response finished unless it was cancelled, or moved from a state to the next (queued -> in_progress,
# queued or in_progress -> cancelled, or failed when its server stops) unless it has left the first; a background
# response's run record beaten, with its new page of events, or taken over by another process when it was lost.
EDITS = {"append": _append, "remove": _remove, "update": _update, "finish": _finish, "move": _move, "beat": _beat,
         "claim": _claim}


class ResponseStore:
    """An LRU of :class:`StoredResponse` by response id, within ``max_bytes`` (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, rid: str, entry: StoredResponse) -> bool:
        """Keep ``entry`` (evicting the least recently used ones to make room); False when it alone exceeds the
        budget (it is not kept)."""
        if entry.size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(rid, None)
            if old is not None:
                self._bytes -= old.size
            while self._entries and self._bytes + entry.size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
            self._entries[rid] = entry
            self._bytes += entry.size
        return True

    def get(self, rid: str) -> Optional[StoredResponse]:
        with self._lock:
            entry = self._entries.get(rid)
            if entry is not None:
                self._entries.move_to_end(rid)
            return entry

    def delete(self, rid: str) -> bool:
        with self._lock:
            entry = self._entries.pop(rid, None)
            if entry is not None:
                self._bytes -= entry.size
            return entry is not None

    def edit(self, rid: str, name: str, arg: Any) -> Optional[StoredResponse]:
        """The entry changed by ``EDITS[name](entry, arg)``, in one step (None: no such entry, or the changed one
        no longer fits the budget and is gone)."""
        with self._lock:  # (reentrant: put and delete take it too)
            entry = self._entries.get(rid)
            if entry is None:
                return None
            changed = EDITS[name](entry, arg)
            if changed is entry:  # (nothing to change: a finished response asked to move, ...)
                return entry
            if self.put(rid, changed):
                return changed
            self.delete(rid)
            return None


class SqliteResponseStore:
    """The same LRU of :class:`StoredResponse` in a SQLite file: what it keeps outlives the process, and processes
    on one machine may share the file (WAL journal; each change is one immediate transaction). Thread-safe."""

    def __init__(self, path: Union[str, Path], max_bytes: int, table: str = "responses"):
        self.path = Path(path).expanduser()
        self.max_bytes = max(0, int(max_bytes))
        self.table = table  # (one of POOLS: a name of ours, never a request's)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # (a commit outlives the process at once, and the machine's crash at the next checkpoint: every read
            # is a write here, the LRU's last use, and FULL would sync the disk at each)
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction() as db:
                self._create(db)
        except (OSError, sqlite3.Error) as e:
            raise InvalidInput(f"responses_store_path: cannot keep responses in {self.path}: {e}") from None

    def _create(self, db: sqlite3.Connection) -> None:
        """The pool's table, and beside it its total size, kept by triggers: summing the sizes would read every row
        (their bodies too: 28 ms at 20,000 responses), and each write needs the total. A file written before the
        total was kept has it counted once here."""
        t = self.table
        db.execute(f"CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, body TEXT NOT NULL, size INTEGER NOT NULL, "
                   "used INTEGER NOT NULL)")
        db.execute(f"CREATE INDEX IF NOT EXISTS {t}_by_use ON {t} (used)")
        db.execute(f"CREATE TABLE IF NOT EXISTS {t}_bytes (total INTEGER NOT NULL)")
        db.execute(f"CREATE TRIGGER IF NOT EXISTS {t}_added AFTER INSERT ON {t} "
                   f"BEGIN UPDATE {t}_bytes SET total = total + new.size; END")
        db.execute(f"CREATE TRIGGER IF NOT EXISTS {t}_removed AFTER DELETE ON {t} "
                   f"BEGIN UPDATE {t}_bytes SET total = total - old.size; END")
        db.execute(f"CREATE TRIGGER IF NOT EXISTS {t}_resized AFTER UPDATE OF size ON {t} "
                   f"BEGIN UPDATE {t}_bytes SET total = total - old.size + new.size; END")
        if db.execute(f"SELECT COUNT(*) FROM {t}_bytes").fetchone()[0] == 0:
            db.execute(f"INSERT INTO {t}_bytes SELECT COALESCE(SUM(size), 0) FROM {t}")

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._total(self._db)

    def _total(self, db: sqlite3.Connection) -> int:
        return db.execute(f"SELECT total FROM {self.table}_bytes").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # (the write lock now: another process waits, up to the timeout)
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put(self, rid: str, entry: StoredResponse) -> bool:
        if entry.size > self.max_bytes:
            return False
        with self._transaction() as db:
            self._write(db, rid, entry)
        return True

    def _write(self, db: sqlite3.Connection, rid: str, entry: StoredResponse) -> None:
        """Keep ``entry`` as ``rid`` (within a transaction), the least recently used others out to make room."""
        body = json.dumps({"response": entry.response, "messages": entry.messages, "items": entry.items},
                          default=str)
        db.execute(f"DELETE FROM {self.table} WHERE id = ?", (rid,))
        total = self._total(db)
        while total + entry.size > self.max_bytes:  # a page at a time
            page = db.execute(f"SELECT id, size FROM {self.table} ORDER BY used LIMIT 64").fetchall()
            for old, size in page:
                if total + entry.size <= self.max_bytes:
                    break
                db.execute(f"DELETE FROM {self.table} WHERE id = ?", (old,))
                total -= size
        db.execute(f"INSERT INTO {self.table} (id, body, size, used) VALUES (?, ?, ?, ?)",
                   (rid, body, entry.size, time.time_ns()))

    def _read(self, db: sqlite3.Connection, rid: str) -> Optional[StoredResponse]:
        row = db.execute(f"SELECT body, size FROM {self.table} WHERE id = ?", (rid,)).fetchone()
        return None if row is None else StoredResponse(**json.loads(row[0]), size=row[1])

    def get(self, rid: str) -> Optional[StoredResponse]:
        with self._transaction() as db:
            entry = self._read(db, rid)
            if entry is not None:
                db.execute(f"UPDATE {self.table} SET used = ? WHERE id = ?", (time.time_ns(), rid))
        return entry

    def delete(self, rid: str) -> bool:
        with self._transaction() as db:
            return db.execute(f"DELETE FROM {self.table} WHERE id = ?", (rid,)).rowcount > 0

    def adopt(self, table: str, prefix: str) -> None:
        """The rows of the file's ``table`` (another pool's) whose id begins with ``prefix`` moved into this one."""
        with self._transaction() as db:
            found = f"FROM {table} WHERE substr(id, 1, ?) = ?"
            db.execute(f"INSERT OR IGNORE INTO {self.table} SELECT * {found}", (len(prefix), prefix))
            db.execute(f"DELETE {found}", (len(prefix), prefix))

    def edit(self, rid: str, name: str, arg: Any) -> Optional[StoredResponse]:
        with self._transaction() as db:
            entry = self._read(db, rid)
            if entry is None:
                return None
            changed = EDITS[name](entry, arg)
            if changed is entry:  # (nothing to change: the row stays as it is)
                return entry
            if changed.size > self.max_bytes:
                db.execute(f"DELETE FROM {self.table} WHERE id = ?", (rid,))
                return None
            self._write(db, rid, changed)
        return changed


Store = Union[ResponseStore, SqliteResponseStore]
POOLS = ("responses", "conversations")  # each its own LRU and budget


def pool_of(key: str) -> str:
    """The pool an entry is kept in, by its key: a conversation's (``conv_...``) or the responses' (responses and
    background responses' run records)."""
    return "conversations" if key.startswith("conv_") else "responses"


class PooledStore:
    """Responses and conversations, each in an LRU of its own budget (one store of either kind per pool), so that a
    busy server's responses (every one is stored unless the request says ``store: false``) never evict a
    conversation, nor conversations the responses."""

    def __init__(self, pools: dict[str, Store]):
        self.pools = pools

    @property
    def enabled(self) -> bool:
        return self.pools["responses"].enabled

    @property
    def on_disk(self) -> bool:
        return isinstance(self.pools["responses"], SqliteResponseStore)

    def __len__(self) -> int:
        return sum(len(p) for p in self.pools.values())

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.pools.values())

    def get(self, rid: str) -> Optional[StoredResponse]:
        return self.pools[pool_of(rid)].get(rid)

    def put(self, rid: str, entry: StoredResponse) -> bool:
        return self.pools[pool_of(rid)].put(rid, entry)

    def delete(self, rid: str) -> bool:
        return self.pools[pool_of(rid)].delete(rid)

    def edit(self, rid: str, name: str, arg: Any) -> Optional[StoredResponse]:
        return self.pools[pool_of(rid)].edit(rid, name, arg)


def open_store(max_bytes: int, path: Optional[str] = None, conversation_bytes: int = 0) -> PooledStore:
    """The store of a service: ``max_bytes`` of responses and ``conversation_bytes`` of conversations, in memory or
    in two tables of the SQLite file at ``path`` (nothing at all is kept when ``max_bytes`` is 0). A file written
    before conversations had a table of their own has them moved there."""
    budgets = {"responses": max_bytes, "conversations": conversation_bytes if max_bytes > 0 else 0}
    if path is None or max_bytes <= 0:
        return PooledStore({pool: ResponseStore(budgets[pool]) for pool in POOLS})
    pools = {pool: SqliteResponseStore(path, budgets[pool], table=pool) for pool in POOLS}
    pools["conversations"].adopt("responses", "conv_")
    return PooledStore(pools)


class StoreUnavailable(VlmguardError):
    """The stored responses cannot be read now (the store deployment is down, the file cannot be read)."""

    http_status = 503


class _Responses:
    """What the API calls: a store's methods, awaited. A failure to read is a 503; a failure to keep an answer only
    leaves it unkept (``store: false``): the answer itself is not lost."""

    async def _call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def get(self, rid: str) -> Optional[StoredResponse]:
        return await self._read("get", rid)

    async def delete(self, rid: str) -> bool:
        return await self._read("delete", rid)

    async def edit(self, rid: str, name: str, arg: Any) -> Optional[StoredResponse]:
        return await self._read("edit", rid, name, arg)

    async def _read(self, method: str, *args: Any) -> Any:
        try:
            return await self._call(method, *args)
        except Exception as e:  # (Ray's errors of a dead store replica, SQLite's of a file)
            raise StoreUnavailable(f"the stored responses cannot be read now: {type(e).__name__}: {e}") from None

    async def put(self, rid: str, entry: StoredResponse) -> bool:
        try:
            return await self._call("put", rid, entry)
        except Exception as e:
            log.warning("response %s not stored: %s: %s", rid, type(e).__name__, e)
            return False


class LocalResponses(_Responses):
    """The API's stored responses in its own process (a file's store is read and written off the event loop)."""

    def __init__(self, store: Union[Store, PooledStore]):
        self.store = store
        self.enabled = store.enabled
        self.on_disk = isinstance(store, SqliteResponseStore) or getattr(store, "on_disk", False)
        self.lost = ("deleted or evicted to make room (responses_store_mb)" if self.on_disk
                     else "deleted, evicted to make room (responses_store_mb), lost with a restart "
                          "(responses_store_path keeps them on disk), or answered by another process of the HTTP "
                          "API (responses_store: shared keeps one store for all)")

    async def _call(self, method: str, *args: Any) -> Any:
        if self.on_disk:
            return await asyncio.to_thread(getattr(self.store, method), *args)
        return getattr(self.store, method)(*args)


class SharedResponses(_Responses):
    """The API's stored responses in the service's store deployment, which every process of the API calls."""

    enabled = True  # (the service has a store deployment only when it keeps responses)

    def __init__(self, handle: Any, on_disk: bool):
        self.handle = handle
        self.lost = ("deleted or evicted to make room (responses_store_mb)" if on_disk
                     else "deleted, evicted to make room (responses_store_mb), or lost with a restart of the "
                          "service (responses_store_path keeps them on disk)")

    async def _call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)


Responses = Union[LocalResponses, SharedResponses]


def api_responses(config: Any, handle: Any = None) -> Responses:
    """The stored Responses of a process serving the HTTP API of ``config`` (a ``ServiceConfig``): the service's
    store deployment when ``handle`` is one (``responses_shared``), else a store of its own."""
    if handle is not None:
        return SharedResponses(handle, on_disk=config.responses_store_path is not None)
    return LocalResponses(open_store(int(config.responses_store_mb * 2**20), config.responses_store_path,
                                     int(config.conversations_store_mb * 2**20)))


def missing(rid: str, responses: Responses) -> str:
    """Why ``rid`` is not in ``responses``, in one line."""
    if not responses.enabled:
        return "this server stores no responses (responses_store_mb: 0): send the conversation's items in input"
    return f"no stored response {rid!r}: it was {responses.lost}"
