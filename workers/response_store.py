"""Stored Responses (``store``, ``previous_response_id``, ``GET`` / ``DELETE /v1/responses/{id}``, ``input_items``).

OpenAI's Responses API keeps each response (``store`` defaults to true) so that the next request can continue the
conversation by naming it (``previous_response_id``) instead of sending it again. vlmguard keeps them in the memory
of the process that serves the HTTP API, least recently used first out, up to ``ServiceConfig.responses_store_mb``
(0: nothing is kept, every response says ``store: false`` and ``previous_response_id`` is refused). Each entry holds
what a follow-up needs: the conversation as chat messages up to and with this answer (the request's
``instructions`` left out: OpenAI does not carry them over), its input items as the Responses API lists them, and
the response itself. A service whose HTTP API runs in several processes (several replicas of the ingress, or of a
model serving HTTP itself) keeps one store in each: a follow-up that lands on another one is told so.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was answered
    messages: list[dict[str, Any]]  # the conversation as chat messages, this answer last (no instructions)
    items: list[dict[str, Any]]  # its input items, each with an id, oldest first (earlier responses' included)
    size: int = 0  # bytes counted against the store's budget

    def __post_init__(self) -> None:
        if not self.size:
            self.size = sum(len(json.dumps(x, default=str)) for x in (self.response, self.messages, self.items))


class ResponseStore:
    """An LRU of :class:`StoredResponse` by response id, within ``max_bytes`` (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

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


def missing(rid: str, store: ResponseStore) -> str:
    """Why ``rid`` is not in ``store``, in one line."""
    if not store.enabled:
        return "this server stores no responses (responses_store_mb: 0): send the conversation's items in input"
    return (f"no stored response {rid!r}: responses are kept in this server's memory, so it was deleted, evicted to "
            "make room (responses_store_mb), lost with a restart, or answered by another replica of the HTTP API")
