"""Audit for resource leaks in a long-running process: memory, tensors, hooks, threads, file handles or caches that
would grow with the number of requests served instead of staying bounded.

How: seeded, varied requests (prompts, image sizes, pruners fastv / adaptinfer / flowcut / random with budgets,
decoders greedy / sample / vcd / m3id / vista (both modes) / iava / lqcd, seeded sampling, ``n`` copies of one
request, stop strings, log-probabilities, penalties, invalid budgets, streams closed after a few events, requests
dropped and joined mid-batch) were driven through (a) the engine's Python API (``generate``, ``stream``,
``start_batch`` / ``advance`` / ``drop`` / ``absorb`` / ``close``) on all three tiny families, (b) a batch that
never drains (a request joins every few steps, 400 steps, every decoder) and (c) the service path:
``InflightBatcher`` over ``EngineWorker``, bare and under ``create_api`` (httpx ASGI transport, streams the client
leaves), and ``LocalBackend``. Between rounds (over 5,000 requests in all) these stayed flat: live torch tensors
(gc), forward hooks / pre-hooks on every module of the model, live ``DecodeBatch`` / ``Cohort`` / ``LiveRequest``
/ ``GrowingCache`` / ``GrowingLayer`` objects, the thread-locals of score probes and row owners, threads, open
files, and RSS once glibc's arenas had reached their peak (with ``MALLOC_ARENA_MAX=1`` within 0.5 MB over 8 rounds
of 50 HTTP requests; without it ``LocalBackend`` grows a few MB per round only because every ``asyncio.run`` of
the harness starts fresh executor threads, each of which may take another malloc arena, up to glibc's cap).
Bounded by design: ``values_on`` (lru_cache of 512 small index tensors), the per-tokenizer ``TokenPieces`` cache
(at most one entry per vocabulary id), the in-flight KV buffers of a running batch (rows of the largest batch it
held, slots of its longest live request plus headroom). An idle ``InflightBatcher`` holds no cache: the batch and
its buffers (spare rows included) are released when it drains.

Defects found: none. The tests below are count-based guards of those invariants.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import threading
import warnings

import httpx
import pytest
import torch

from service_support import BatcherBackend
from vlmguard.attention import _LOCAL
from vlmguard.decode_batch import Cohort, DecodeBatch, LiveRequest
from vlmguard.decoding import base as decoding_base
from vlmguard.errors import VlmguardError
from vlmguard.images import image_to_data_url
from vlmguard.kv_cache import GrowingCache, GrowingLayer
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.api import create_api
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.inflight import InflightBatcher

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNERS = [("none", None), ("fastv", 8), ("adaptinfer", 0.5), ("flowcut", 6), ("random", 5), ("fastv", 10 ** 6)]
DECODERS = [("greedy", {}), ("sample", {}), ("vcd", {}), ("m3id", {}), ("vista", {}),
            ("vista", {"vsv_decode_only": True}), ("iava", {}), ("lqcd", {})]
PROMPTS = ["Describe the image.", "What color is the cat?", "Is there a dog in the picture? Answer yes or no.",
           "Surely the red car is parked, right?", "Count the objects."]
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks")
LIVE = (DecodeBatch, Cohort, LiveRequest, GrowingCache, GrowingLayer)


def hooks(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, d, None) or {}) for m in model.modules() for d in HOOK_DICTS)


def census(model: torch.nn.Module) -> dict[str, int]:
    """What must not grow with requests served (after a collection)."""
    gc.collect()
    objs = gc.get_objects()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op alias warns
        warnings.simplefilter("ignore", FutureWarning)
        out = {cls.__name__: sum(1 for o in objs if isinstance(o, cls)) for cls in LIVE}
        tensors = sum(1 for o in objs if isinstance(o, torch.Tensor))
    out.update(tensors=tensors, hooks=hooks(model),
               threads=threading.active_count(), fds=len(os.listdir("/proc/self/fd")),
               probes=len(getattr(_LOCAL, "requests", None) or {}),
               owners=len(getattr(decoding_base._FORWARD, "owners", None) or {}))
    return out


def spec(rng: random.Random, **kw) -> GenerationSpec:
    pr, budget = rng.choice(PRUNERS)
    dec, params = rng.choice(DECODERS)
    fields = dict(pruning=pr, budget=budget, decoding=dec, decoding_params=params, max_new_tokens=rng.randint(1, 6),
                  do_sample=rng.random() < 0.4, seed=rng.randrange(100), stop=rng.choice([[], ["a"], ["the", "x"]]),
                  logprobs=rng.choice([None, 2]), diagnostics=rng.random() < 0.5,
                  presence_penalty=rng.choice([0.0, 0.5]))
    fields.update(kw)
    return GenerationSpec(**fields)


def image(rng: random.Random):
    return random_image(rng.randrange(10 ** 6), (rng.choice([24, 40, 64]), rng.choice([24, 32, 48])))


def engine_round(eng, seed: int, n: int) -> tuple[int, int]:
    """``n`` varied calls of the engine's Python API; (completed, refused)."""
    rng = random.Random(seed)
    done = refused = 0
    for _ in range(n):
        k = rng.randint(1, 3)
        reqs = [Request(prompt=rng.choice(PROMPTS), images=[image(rng)]) for _ in range(k)]
        if rng.random() < 0.2:  # the n choices of one request: copies prefilled once
            reqs = [reqs[0]] * k
        s = spec(rng)
        specs = [s.model_copy(update={"max_new_tokens": rng.randint(1, 6), "seed": rng.randrange(100)})
                 for _ in reqs]
        mode = rng.random()
        try:
            if mode < 0.35:
                eng.generate(reqs, specs)
            elif mode < 0.65:  # a stream its caller leaves after a few events
                events = eng.stream(reqs, specs)
                stop = rng.randint(0, 3)
                for i, _ in enumerate(events):
                    if i >= stop:
                        break
                events.close()
            else:
                b = eng.start_batch(reqs, specs)
                try:
                    for _ in range(rng.randint(1, 6)):
                        if b.active:
                            list(b.advance())
                    if b.active and rng.random() < 0.5:
                        b.drop({b.lives[0].index})
                    if b.active and b.joinable:
                        b.absorb(eng.start_batch([Request(prompt=rng.choice(PROMPTS), images=[image(rng)])],
                                                 [specs[0].model_copy(update={"max_new_tokens": 3})], indices=[99]))
                    while b.active and rng.random() < 0.8:
                        list(b.advance())
                finally:
                    b.close()
            done += 1
        except VlmguardError:
            refused += 1
    return done, refused


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_engine_api_rounds_leave_nothing_behind(family):
    eng = tiny_engine(family)
    engine_round(eng, 0, 40)  # warm: first-use caches (token pieces, index tensors, templates)
    engine_round(eng, 1, 40)
    before = census(eng.model)
    assert before["hooks"] == 0 and not any(before[c.__name__] for c in LIVE), before
    assert before["probes"] == 0 and before["owners"] == 0
    for _ in range(2):  # the same requests again: every cache hit, so every count exactly as before
        done, refused = engine_round(eng, 1, 40)
        assert census(eng.model) == before
    assert done > 20 and refused >= 1  # the budget of 10**6 visual tokens is refused (and cleaned up)


def test_a_batch_that_never_drains_keeps_hooks_cohorts_and_cache_bounded():
    """A request joins every few steps for 240 steps (VISTA: hooks per cohort; FastV: a cut cache): hooks and
    cohorts are those of the live requests only, and the cache is as long as its longest live request."""
    eng = tiny_engine("llava")
    rng = random.Random(5)
    longest = 0

    def start(k: int, idx: int) -> DecodeBatch:
        nonlocal longest
        specs = [GenerationSpec(decoding="vista", pruning="fastv", budget=6, max_new_tokens=rng.randint(2, 12),
                                do_sample=rng.random() < 0.5, seed=idx + i) for i in range(k)]
        new = eng.start_batch([Request(prompt=rng.choice(PROMPTS), images=[image(rng)]) for _ in range(k)], specs,
                              indices=list(range(idx, idx + k)))
        longest = max(longest, max(lv.prompt_len + lv.spec.max_new_tokens for lv in new.lives))
        return new

    b, idx, rows_seen = start(2, 0), 2, 2
    try:
        for step in range(240):
            if step % 3 == 0 or b.active < 3:
                k = rng.randint(1, 2)
                b.absorb(start(k, idx))
                idx += k
            if rng.random() < 0.1 and b.active > 1:
                b.drop({b.lives[rng.randrange(b.active)].index})
            list(b.advance())
            assert b.active, "the batch must keep requests (joins outpace answers)"
            live = {id(lv.cohort) for lv in b.lives}
            assert {id(c) for c in b.cohorts} == live and {id(c) for c in b._owned} == live
            assert hooks(eng.model) == sum(len(c.decoder._handles) for c in b.cohorts) == 4 * len(live)
            rows_seen = max(rows_seen, b.active)
            for layer in b.state.cache.layers:
                assert layer.keys.shape[-2] <= longest
                if layer._kbuf is not None:
                    assert layer._kbuf.shape[0] <= rows_seen + 2  # (+ a joiner block written beside them)
                    assert layer._kbuf.shape[-2] <= longest + max(64, longest // 4) + 1
        assert idx > 150
    finally:
        b.close()
    assert hooks(eng.model) == 0


class ProbeWorker(EngineWorker):
    """Counts what is alive when the marker request's prefill starts: by then the engine thread has let go of
    every earlier batch (an answer is sent after its request left the batch, so the marker starts a new one)."""

    seen: dict[str, int] | None = None
    fail_next_step = False

    def start_batch(self, items, indices):
        if items[0].request_id == "marker":
            self.seen = census(self.engine.model)
        return super().start_batch(items, indices)

    def advance(self, batch):
        if self.fail_next_step:  # an unexpected failure mid-batch: its requests get the error, hooks go
            self.fail_next_step = False
            raise RuntimeError("step failed")
        return super().advance(batch)


def service_round(b: InflightBatcher, worker: ProbeWorker, app, seed: int, n: int) -> dict[str, int]:
    rng = random.Random(seed)
    urls = [image_to_data_url(random_image(i, s)) for i, s in enumerate([(40, 32), (64, 48), (24, 24)])]

    async def direct(k: int):
        s = spec(rng, decoding=rng.choice(["greedy", "vista", "vcd"]), decoding_params={}, pruning="fastv", budget=8)
        item = WorkItem(prompt=rng.choice(PROMPTS), images=[image(rng)], spec=s, request_id=f"r{k}")
        await asyncio.sleep(0)
        if rng.random() < 0.6:
            return await b.submit(item)
        events = b.stream(item)
        stop = rng.randint(0, 3)
        async for ev in events:
            if stop == 0:
                break
            stop -= 1
        await events.aclose()

    async def http_call(http: httpx.AsyncClient):
        body = {"model": "tiny-llava", "max_tokens": rng.randint(1, 6), "n": rng.choice([1, 2]),
                "vlmguard": {"pruning": "fastv", "budget": 8, "decoding": rng.choice(["greedy", "vista", "m3id"])},
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": rng.choice(PROMPTS)},
                    {"type": "image_url", "image_url": {"url": rng.choice(urls)}}]}]}
        if rng.random() < 0.5:
            body.update(temperature=0.7, seed=rng.randrange(100))
        if rng.random() < 0.5:
            async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    break  # the client leaves mid-stream
            return
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as http:
            await asyncio.gather(*(direct(k) for k in range(n)), *(http_call(http) for _ in range(n // 2)))
        worker.fail_next_step = True  # the next batch fails at its first step
        failed = await b.submit(WorkItem(prompt="x", images=[image(rng)], spec=GenerationSpec(
            decoding="vista", max_new_tokens=4)))
        assert failed["error"]["message"] == "internal error: RuntimeError: step failed"
        marker = WorkItem(prompt="marker", spec=GenerationSpec(max_new_tokens=1), request_id="marker")
        assert "result" in await b.submit(marker)

    asyncio.run(main())
    seen, worker.seen = worker.seen, None
    return seen


def test_an_idle_inflight_batcher_and_api_hold_no_batch_hooks_or_threads(monkeypatch):
    # pytest's log capture keeps each record, and the failed step's record its traceback (frames -> the batch)
    monkeypatch.setattr(logging.getLogger("vlmguard.workers"), "disabled", True)
    engine_threads = _inflight_threads()  # those of batchers earlier tests left (one each)
    worker = ProbeWorker(name="tiny-llava", engine=tiny_engine("llava"))
    b = InflightBatcher(worker, max_batch_size=6, wait_s=0.0)
    app = create_api(BatcherBackend(worker, b), ServiceConfig(api_key_env=None, host="127.0.0.1"))
    first = service_round(b, worker, app, 0, 24)
    assert first["hooks"] == 0 and not any(first[c.__name__] for c in LIVE), first  # drained: cache released
    for seed in (1, 2):
        seen = service_round(b, worker, app, seed, 24)
        assert seen["hooks"] == 0 and not any(seen[c.__name__] for c in LIVE), seen
        assert seen["threads"] == first["threads"] and seen["fds"] == first["fds"]
        assert seen["tensors"] <= first["tensors"] + 8  # (values_on's index tensors of new row layouts, bounded)
    assert _inflight_threads() == engine_threads + 1  # this batcher's one engine thread, whatever it served


def _inflight_threads() -> int:
    return [t.name for t in threading.enumerate()].count("vlmguard-inflight")
