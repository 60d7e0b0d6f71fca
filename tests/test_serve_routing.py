"""Routing requests by image (workers/routing.py): the key, rendezvous ranking, the load spill, the Serve router
class driven as Serve drives it, and the config that turns it on. The routing over a live Ray cluster is tested in
tests/test_serve_ray.py."""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest
from PIL import Image

from vlmguard.testing import random_image
from vlmguard.workers.config import parse_config
from vlmguard.workers.routing import (ImageAffinityRouter, affinity_ranks, image_routing_key, rendezvous_order,
                                      routing_key_of)

KEYS = [f"{i:032x}" for i in range(2000)]


def test_the_key_is_the_first_images_and_tells_images_apart():
    a, b = random_image(1, (336, 336)), random_image(2, (336, 336))
    assert image_routing_key([]) is None
    assert image_routing_key([a]) == image_routing_key([a.copy()]) == image_routing_key([a, b])
    assert image_routing_key([a]) != image_routing_key([b])
    assert image_routing_key([b, a]) == image_routing_key([b])
    assert image_routing_key([a]) != image_routing_key([a.convert("L")])  # the mode is part of it
    assert image_routing_key([a]) != image_routing_key([a.resize((337, 336))])  # and the size
    changed = a.copy()
    changed.paste((0, 0, 0), (0, 0, 8, 8))  # a corner that holds a sampled pixel
    assert image_routing_key([changed]) != image_routing_key([a])
    huge = Image.new("RGB", (4000, 3000), (10, 20, 30))
    assert len(image_routing_key([huge])) == 32


def test_rendezvous_order_is_a_stable_permutation_spread_evenly():
    ids = ["r0", "r1", "r2", "r3"]
    for key in KEYS[:50]:
        order = rendezvous_order(key, ids)
        assert sorted(order) == ids
        assert rendezvous_order(key, list(reversed(ids))) == order  # the replicas' order does not matter
    homes = Counter(rendezvous_order(k, ids)[0] for k in KEYS)
    assert set(homes) == set(ids) and all(400 <= n <= 600 for n in homes.values()), homes


def test_a_replica_added_or_removed_moves_only_its_own_images():
    ids = ["r0", "r1", "r2", "r3"]
    before = {k: rendezvous_order(k, ids)[0] for k in KEYS}
    grown = {k: rendezvous_order(k, ids + ["r4"])[0] for k in KEYS}
    moved = [k for k in KEYS if grown[k] != before[k]]
    assert all(grown[k] == "r4" for k in moved) and 300 <= len(moved) <= 500  # ~1/5 of them, all to the new one
    shrunk = {k: rendezvous_order(k, ids[1:])[0] for k in KEYS}
    assert all(shrunk[k] == before[k] for k in KEYS if before[k] != "r0")
    assert all(shrunk[k] == rendezvous_order(k, ids)[1] for k in KEYS if before[k] == "r0")  # to their 2nd choice


def test_the_home_goes_first_unless_its_queue_is_spill_queue_longer():
    ids = ["a", "b", "c"]
    key = KEYS[7]
    home, second, third = rendezvous_order(key, ids)
    assert affinity_ranks(key, ids, {}) == [[home], [second, third]]  # queue lengths unknown: home first
    q = {home: 9, second: 2, third: None}
    assert affinity_ranks(key, ids, q, spill_queue=8) == [[home], [second, third]]  # 7 longer: still home
    assert affinity_ranks(key, ids, q, spill_queue=7) == [[second], [home, third]]  # the image's second home
    q = {home: 9, second: 9, third: 1}
    assert affinity_ranks(key, ids, q, spill_queue=4) == [[third], [home, second]]
    assert affinity_ranks(key, ids, {home: 50}, spill_queue=1) == [[home], [second, third]]  # only its own known
    assert affinity_ranks(key, ["a"], {"a": 99}) == [["a"]]


def _replica(name: str):
    from ray.serve.request_router import ReplicaID

    from ray.serve._private.common import DeploymentID

    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DeploymentID(name="m", app_name="a")),
                           max_ongoing_requests=8)


def _router(**kwargs):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    router = ImageAffinityRouter(deployment_id=DeploymentID(name="m", app_name="a"),
                                 handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def _pending(*args):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    return PendingRequest(args=list(args), kwargs={}, metadata=RequestMetadata(request_id="r", internal_request_id="i"))


def test_the_router_ranks_as_serve_asks_it_to():
    from vlmguard.workers.engine_worker import WorkItem
    from vlmguard.spec import GenerationSpec

    replicas = [_replica(f"rep{i}") for i in range(3)]
    item = WorkItem(prompt="hi", spec=GenerationSpec(), images=[random_image(3, (64, 64))])
    item.routing_key = image_routing_key(item.images)

    async def run():
        router = _router(spill_queue=4)
        pending = _pending(item)
        assert routing_key_of(pending) == item.routing_key
        ranks = await router.choose_replicas(replicas, pending)
        home, *others = rendezvous_order(item.routing_key, [r.replica_id.unique_id for r in replicas])
        assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [[home], others]
        assert pending.routing_context.should_backoff  # every rank tried: Serve backs off, no busy loop
        by_id = {r.replica_id.unique_id: r for r in replicas}
        router.replica_queue_len_cache.update(by_id[home].replica_id, 6)
        router.replica_queue_len_cache.update(by_id[others[0]].replica_id, 1)
        ranks = await router.choose_replicas(replicas, _pending(item))
        assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [others[:1], [home, others[1]]]
        # without a key (a templated benchmark prompt, a caller-made batch): power of two choices
        for args in ((WorkItem(prompt="hi", spec=GenerationSpec()),), ([item, item],), ()):
            ranks = await router.choose_replicas(replicas, _pending(*args))
            assert len(ranks) == 1 and len(ranks[0]) == 2 and len({id(r) for r in ranks[0]}) == 2
        assert await router.choose_replicas([], _pending(item)) == []
        assert await router.choose_replicas(replicas[:1], _pending(item)) == [replicas[:1]]

    asyncio.run(run())


def test_calls_of_one_request_each_get_a_replica_and_their_images_home():
    """A chat request's n choices are n calls that share Serve's internal request id; Serve's router matched a
    routed request by that id alone, so all but the first waited for ever (a 504 over HTTP)."""
    from vlmguard.spec import GenerationSpec
    from vlmguard.workers.engine_worker import WorkItem

    class FakeReplica(SimpleNamespace):
        async def get_queue_len(self, deadline_s: float) -> int:
            return 0

    replicas = [FakeReplica(**vars(_replica(f"rep{i}"))) for i in range(3)]
    items = [WorkItem(prompt="hi", spec=GenerationSpec(), images=[random_image(9, (64, 64))]) for _ in range(4)]
    for it in items:
        it.routing_key = image_routing_key(it.images)
    home = rendezvous_order(items[0].routing_key, [r.replica_id.unique_id for r in replicas])[0]

    async def run():
        router = _router()
        router.update_replicas(replicas)
        chosen = await asyncio.wait_for(
            asyncio.gather(*(router._choose_replica_for_request(_pending(it)) for it in items)), timeout=20)
        assert [r.replica_id.unique_id for r in chosen] == [home] * 4

    asyncio.run(run())


def test_a_replica_routed_for_no_waiting_request_goes_to_the_oldest_waiting():
    """Ray 2.59's routing loop also routes without a request, and relies on FIFO for a request whose routing task
    ended early: a replica chosen where no waiting request has the routed id goes to the oldest one waiting."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    def pending(rid: str) -> PendingRequest:
        return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=rid, internal_request_id=rid))

    async def run():
        router = _router()
        old, new, mine = pending("old"), pending("new"), pending("mine")
        router._pending_requests_to_fulfill.extend([old, new, mine])
        rep = _replica("rep0")
        router._fulfill_next_pending_request(rep, mine.metadata)
        assert mine.future.done() and not old.future.done()  # the routed request's own id first
        router._fulfill_next_pending_request(rep, None)
        assert old.future.done() and not new.future.done()
        router._fulfill_next_pending_request(rep, pending("gone").metadata)
        assert new.future.result() is rep
        router._fulfill_next_pending_request(rep, None)  # nobody waits: nothing to do

    asyncio.run(run())


def test_the_router_refuses_a_bad_spill_queue():
    with pytest.raises(ValueError, match="spill_queue"):
        _router(spill_queue=0)


def test_routing_by_image_is_on_where_several_replicas_keep_a_cache():
    from vlmguard.workers.app import build_app, model_deployment
    from vlmguard.workers.routing import ImageAffinityRouter

    def cfg(**model):
        return parse_config({"models": [{"model": "tiny", **model}]})

    two = cfg(num_replicas=2)
    assert two.models[0].routes_by_image and not two.ingress_in_model  # auto: a separate ingress, which reads images
    assert build_app(two)._bound_deployment.name == "Ingress"
    router = model_deployment(two.models[0], 0)._bound_deployment._deployment_config.request_router_config
    assert router.request_router_class.endswith(ImageAffinityRouter.__qualname__)
    assert router.request_router_kwargs == {"spill_queue": 2}
    assert cfg(num_replicas=2, routing_spill_queue=3).models[0].routing_spill_queue == 3
    for off in (cfg(), cfg(num_replicas=2, prefix_cache_mb=0), cfg(num_replicas=2, share_prefixes=False),
                cfg(num_replicas=2, routing="power_of_two")):
        assert not off.models[0].routes_by_image and off.ingress_in_model
        default = model_deployment(off.models[0], 0)._bound_deployment._deployment_config.request_router_config
        assert "ImageAffinityRouter" not in str(default.request_router_class)
    assert cfg(routing="image_affinity").models[0].routes_by_image  # asked for: one replica too
    assert not cfg(routing="image_affinity").ingress_in_model
    # the model as ingress: the proxy routes unread, so auto resolves to power of two and image_affinity is refused
    mine = parse_config({"ingress": "model", "models": [{"model": "tiny", "num_replicas": 2}]})
    assert mine.ingress_in_model
    config = build_app(mine)._bound_deployment.init_args[0]
    assert config["routing"] == "power_of_two"
    from vlmguard.errors import InvalidInput

    with pytest.raises(InvalidInput, match="image_affinity needs a separate ingress"):
        parse_config({"ingress": "model", "models": [{"model": "tiny", "routing": "image_affinity"}]})
    with pytest.raises(InvalidInput, match="routing"):
        cfg(routing="nearest")
    with pytest.raises(InvalidInput, match="routing_spill_queue"):
        cfg(routing_spill_queue=0)


def test_a_request_without_images_is_keyed_by_its_conversations_opening():
    """Every turn of a text-only chat repeats its system text and first user turn: one key for all of them, another
    for another chat; a one-message request keys as the first turn of its chat does. Images key by the first image;
    benchmark jobs' templated prompts get no key."""
    from vlmguard.spec import GenerationSpec
    from vlmguard.workers.engine_worker import WorkItem
    from vlmguard.workers.routing import request_routing_key

    def text(t):
        return [{"type": "text", "text": t}]

    def chat(*turns, system=None):
        messages = [{"role": "system", "content": text(system)}] if system else []
        for k, t in enumerate(turns):
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": text(t)})
        return WorkItem(prompt="", spec=GenerationSpec(), messages=messages)

    first = WorkItem(prompt="Tell me a story.", spec=GenerationSpec(), system="Be brief.")
    key = request_routing_key(first)
    assert key is not None and len(key) == 32
    assert request_routing_key(chat("Tell me a story.", "Once...", "And then?", system="Be brief.")) == key
    assert request_routing_key(chat("Tell me a story.", "Once, a cat.", "Why?", "Because.", "Go on.",
                                    system="Be brief.")) == key
    plain = request_routing_key(WorkItem(prompt="Tell me a story.", spec=GenerationSpec()))
    assert request_routing_key(chat("Tell me a story.", "Once...", "And then?")) == plain  # no system text either way
    others = [chat("Tell me a poem.", "Roses...", "More?", system="Be brief."),
              chat("Tell me a story.", "Once...", "And then?", system="Be long.")]
    assert len({key, plain, *(request_routing_key(o) for o in others)}) == 4
    image = random_image(3, (64, 64))
    assert request_routing_key(WorkItem(prompt="Tell me a story.", spec=GenerationSpec(), images=[image])) == \
        image_routing_key([image])
    # a chat whose image came with a later question stays with its opening's replica, which holds the history
    later = chat("Tell me a story.", "Once...", "Is it here?", system="Be brief.")
    later.messages[-1]["content"].insert(0, {"type": "image"})
    later.images = [image]
    assert request_routing_key(later) == key
    opened = chat("Tell me a story.", "Once...", "And then?", system="Be brief.")
    opened.messages[1]["content"].insert(0, {"type": "image"})  # the first user turn (after the system one)
    opened.images = [image]
    assert request_routing_key(opened) == image_routing_key([image])
    assert request_routing_key(WorkItem(prompt="USER: hi", spec=GenerationSpec(), raw_prompt=True)) is None
    assert request_routing_key(WorkItem(prompt="", spec=GenerationSpec())) is None
