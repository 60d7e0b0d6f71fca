"""Which replica of a model deployment takes a request: the one that has seen its image (or its conversation).

Each replica keeps its own prefix cache (``vlmguard/prefix_cache.py``): a chat's next turn, or another question
about an image, is prefilled from the cache only on a replica that prefilled that image before. Serve's default
router (power of two choices) spreads requests without looking at them, so a next turn finds its image only
where the queues happen to send it. :class:`ImageAffinityRouter` routes by the request's first image:

* **Key.** The ingress hashes the first image's pixels once (:func:`image_routing_key`) into
  ``WorkItem.routing_key``. A conversation keeps its first image from turn to turn, so all its turns share a key.
  A request without images is keyed by its conversation's opening instead, its system text and first user turn
  (:func:`request_routing_key`), which every later turn repeats: a text-only chat's turns meet the replica whose
  cache holds its history (the prefix cache anchors such prompts by their first tokens). So is a chat whose image
  came with a later question: that question takes the history before the image from the same replica.
* **Ranking.** Rendezvous (highest random weight) hashing: each replica scores ``hash(key, replica id)`` and the
  highest score is the image's home. Every ingress replica ranks alike with no shared state, and adding or
  removing a replica moves only the images that replica gains or held (about ``1/n`` of them).
* **Load.** A home whose queue is ``spill_queue`` or more requests longer than the shortest queue (Serve's cached
  queue lengths) yields to the next replica of the image's order that is not, so one image's spilled requests
  meet on one second home. A full replica (Serve's ``max_ongoing_requests``) is passed over by Serve itself for
  the next rank, all the other replicas, of which the least loaded wins.
* **No key.** Benchmark jobs' requests (already templated) and caller-made batches go by power of two choices.

The router runs in the caller's process (the ingress's deployment handle), as Ray Serve's custom request routers
do (``RequestRouterConfig``, alpha API of Ray Serve; see docs/architecture.md).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping, Optional, Sequence

from PIL import Image
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from vlmguard.workers.config import DEFAULT_ROUTING_SPILL_QUEUE as DEFAULT_SPILL_QUEUE


# The key hashes a nearest-neighbour thumbnail of this side, not every pixel: a few microseconds for any image.
# Images alike in every sampled pixel share a home, which costs nothing but balance (the cache compares in full).
_KEY_SIDE = 64


def image_routing_key(images: Sequence[Image.Image]) -> Optional[str]:
    """The routing key of a request: a hash of its first image's mode, size and sampled pixels (None without
    images)."""
    if not images:
        return None
    first = images[0]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{first.mode}:{first.size[0]}x{first.size[1]}:".encode())
    h.update(first.resize((_KEY_SIDE, _KEY_SIDE), Image.Resampling.NEAREST).tobytes())
    return h.hexdigest()


def request_routing_key(item: Any) -> Optional[str]:
    """The routing key of a ``WorkItem``: its first image's (:func:`image_routing_key`); without images, or in a
    conversation whose image came after its first user turn, a hash of its conversation's opening (the system text
    and the first user turn's text, the same in every later turn of the conversation: the replica that holds its
    history before the image); None for a prompt a benchmark job templated itself (``raw_prompt``) or an empty
    one."""
    if item.images and not _image_came_later(item.messages):
        return image_routing_key(item.images)
    if item.raw_prompt:
        return None
    if item.messages:
        system = "\n".join(_text(m) for m in item.messages if m.get("role") == "system")
        first = next((_text(m) for m in item.messages if m.get("role") == "user"), "")
    else:
        system, first = item.system or "", item.prompt
    if not first:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"text\0{system}\0{first}".encode())
    return h.hexdigest()


def _image_came_later(messages: Optional[Sequence[Mapping[str, Any]]]) -> bool:
    """A conversation whose first user turn holds no image (its images came with later questions)."""
    first = next((m for m in messages or () if m.get("role") == "user"), None)
    content = None if first is None else first.get("content")
    return first is not None and (isinstance(content, str)
                                  or not any(part.get("type") == "image" for part in content or ()))


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or () if part.get("type") == "text")


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` from the key's home to its last choice (highest random weight first)."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def affinity_ranks(key: str, replica_ids: Sequence[str], queue_lens: Mapping[str, Optional[int]],
                   spill_queue: int = DEFAULT_SPILL_QUEUE) -> list[list[str]]:
    """The ranks Serve tries in turn for a request with ``key``: first the earliest replica in the key's rendezvous
    order whose queue is less than ``spill_queue`` longer than the shortest known queue (the key's home unless it
    is that busy; an unknown queue length counts as fitting), then all the others, of which Serve picks the one
    with the shortest queue. Spilled requests of one image thus go to one second home, which caches it too."""
    order = rendezvous_order(key, replica_ids)
    shortest = min((q for q in (queue_lens.get(r) for r in order) if q is not None), default=None)

    def fits(rid: str) -> bool:
        q = queue_lens.get(rid)
        return shortest is None or q is None or q - shortest < spill_queue

    first = next((r for r in order if fits(r)), order[0])
    rest = [r for r in order if r != first]
    return [[first], rest] if rest else [[first]]


def routing_key_of(pending_request: Optional[PendingRequest]) -> Optional[str]:
    """The routing key a request carries (its first argument's ``routing_key``), or None."""
    if pending_request is None or not pending_request.args:
        return None
    key = getattr(pending_request.args[0], "routing_key", None)
    return key if isinstance(key, str) else None


class ImageAffinityRouter(RequestRouter):
    """Ray Serve request router: a request goes to its first image's home replica (see the module's docstring)."""

    def initialize_state(self, spill_queue: int = DEFAULT_SPILL_QUEUE, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        if not isinstance(spill_queue, int) or spill_queue < 1:
            raise ValueError(f"spill_queue must be an integer >= 1, got {spill_queue!r}")
        self.spill_queue = spill_queue

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # every rank of this call was tried: Serve backs off before asking again (no busy loop when all are full)
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        key = routing_key_of(pending_request)
        if key is None or len(candidate_replicas) == 1:
            k = min(2, len(candidate_replicas))
            return [random.sample(list(candidate_replicas), k)]  # power of two choices
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        queue_lens = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        ranks = affinity_ranks(key, list(by_id), queue_lens, getattr(self, "spill_queue", DEFAULT_SPILL_QUEUE))
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        """Hand ``replica`` to the oldest waiting request with the routed request's internal id, or, if none waits,
        to the oldest waiting request (as Serve's ``FIFOMixin`` does).

        Serve's router without its FIFO mixin matches a routed request by that id alone, and the calls a replica
        makes while serving one request all carry the request's id: a chat request's ``n`` choices are ``n`` calls
        with one id. Serve indexes only the first, so the others were never handed a replica (the request hung
        until its timeout). Ray 2.59's routing loop also routes without a request (``request_metadata`` None) and
        relies on the FIFO fallback for a request whose routing task ended early. This is the hook ``FIFOMixin``
        overrides, with the router members that the mixin relies on (and, from Ray 2.60, the routing task's
        cancellation, as the base class does). Calls that share an id are one request's choices, about the same
        image; the fallback costs at most that request's affinity, never a replica choice left unused."""
        waiting = getattr(self, "_pending_requests_to_fulfill", None)  # a Serve without it: Serve's own matching
        if waiting is None:
            super()._fulfill_next_pending_request(replica, request_metadata)
            return
        rid = None if request_metadata is None else request_metadata.internal_request_id
        chosen = None
        for pending in waiting:
            if pending.future.done():
                continue
            if pending.metadata.internal_request_id == rid:
                chosen = pending
                break
            chosen = chosen or pending  # the oldest waiting, if none has the id
        if chosen is None:
            return
        cancel = getattr(self, "_cancel_routing_task_for_pending_request", None)  # Ray >= 2.60
        if cancel is not None:  # its own routing task is no longer needed
            cancel(chosen)
        self._record_queue_wait_time(chosen)
        chosen.future.set_result(replica)
        self._remove_pending_request_from_indices(chosen)


__all__ = ["DEFAULT_SPILL_QUEUE", "ImageAffinityRouter", "affinity_ranks", "image_routing_key", "rendezvous_order",
           "request_routing_key", "routing_key_of"]
