"""The service's one store of Responses when its HTTP API runs in several processes (``responses_store: shared``).

Every replica of the API (the separate ingress, or a model serving HTTP itself) holds a handle to this deployment and
keeps and looks up responses through it (:class:`~vlmguard.workers.response_store.SharedResponses`), so a follow-up
(``previous_response_id``, ``GET`` / ``DELETE /v1/responses/{id}``) finds its conversation whichever replica it lands
on. One replica, no CPU of its own reserved: each call is a dictionary operation, or a row of the SQLite file of
``responses_store_path``.
"""
from __future__ import annotations

from typing import Any, Optional

from ray import serve

from vlmguard.workers.response_store import StoredResponse, open_store


@serve.deployment(name="ResponseStore", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=1024, health_check_period_s=10)
class ResponseStoreReplica:
    def __init__(self, max_bytes: int, path: Optional[str] = None, conversation_bytes: int = 0):
        self.store = open_store(max_bytes, path, conversation_bytes)

    def get(self, rid: str) -> Optional[StoredResponse]:
        return self.store.get(rid)

    def put(self, rid: str, entry: StoredResponse) -> bool:
        return self.store.put(rid, entry)

    def delete(self, rid: str) -> bool:
        return self.store.delete(rid)

    def edit(self, rid: str, name: str, arg: Any) -> Optional[StoredResponse]:
        return self.store.edit(rid, name, arg)
