"""In-flight batching: requests that join a running batch between decode steps get exactly the tokens they
get alone (every family, with pruners, with seeded sampling, with every decoder: contrastive branches,
VISTA's steering hooks, LQCD's per-group branch counts), and the replica's in-flight batcher answers every
caller, isolates bad input, runs non-joinable decoders as whole batches and respects its size limit."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from pruning_support import run_joined
from vlmguard.decoding.base import Branch, Combined, DecodeContext, Decoder, StepInputs
from vlmguard.decoding.registry import DECODERS
from vlmguard.decoding.views import image_free_prompt
from vlmguard.engine import Request
from vlmguard.models.base import Prompt
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine, tiny_llava
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.inflight import InflightBatcher

PROMPTS = ["Is there a dog in the image?", "describe the photo", "what color is the car", "count the cats", "hi"]
SIZES = [(40, 32), (64, 40), (32, 64), (48, 48), (36, 52)]


def reqs(lo: int, hi: int) -> list[Request]:
    return [Request(PROMPTS[i], [random_image(i + 1, SIZES[i])], request_id=f"r{i}") for i in range(lo, hi)]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("pruning", ["none", "fastv", "flowcut"])
def test_joined_requests_get_the_tokens_they_get_alone(family, pruning):
    eng = tiny_engine(family)
    spec = GenerationSpec(max_new_tokens=8, pruning=pruning, budget=0.5 if pruning != "none" else None)
    first, later = reqs(0, 3), reqs(3, 5)
    joined = run_joined(eng, spec, first, later, join_after=3)
    alone = [eng.generate([r], spec)[0] for r in first + later]
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]
    assert [r.kept_indices for r in joined] == [r.kept_indices for r in alone]
    assert [r.request_id for r in joined] == [f"r{i}" for i in range(5)]
    # the joiners decoded beside the first batch's survivors: their batch size says so
    assert max(r.timings.batch_size for r in joined[3:]) > 2
    # each was prefilled with its own group only
    assert [r.timings.prefill_batch for r in joined] == [3, 3, 3, 2, 2]


def test_seeded_sampling_joined_equals_alone():
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=8, decoding="sample", temperature=1.3, top_k=20, seed=7)
    joined = run_joined(eng, spec, reqs(0, 2), reqs(2, 4), join_after=2)
    alone = [eng.generate([r], spec)[0] for r in reqs(0, 4)]
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]


@pytest.mark.parametrize("pruning", ["none", "fastv"])
def test_a_batch_that_requests_keep_joining_keeps_a_bounded_cache(pruning):
    """Requests join whenever a slot frees, so the batch never drains: its cache must not grow with the
    number of steps (slots no live row attends to are cut off when rows leave), and every request still
    gets the tokens it gets alone."""
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=3, pruning=pruning, budget=0.5 if pruning != "none" else None)
    stream = [reqs(i % 5, i % 5 + 1)[0] for i in range(30)]
    alone = [eng.generate([r], spec)[0] for r in stream]
    longest = max(r.prompt_tokens for r in alone) + spec.max_new_tokens
    results, nxt = {}, 1
    batch = eng.start_batch(stream[:1], spec)
    try:
        while batch.active:
            if batch.active < 3 and nxt < len(stream):  # one joiner per step: finishing steps stagger
                batch.absorb(eng.start_batch([stream[nxt]], spec, indices=[nxt]))
                nxt += 1
            for layer_valid in batch.state.layer_valid:
                assert layer_valid.shape[1] <= longest
            for ev in batch.advance():
                if ev.done:
                    results[ev.index] = ev.result
    finally:
        batch.close()
    assert nxt == len(stream)
    assert [results[i].token_ids for i in range(len(stream))] == [r.token_ids for r in alone]


class WholeOnly(Decoder):
    """Plain decoding that declares itself not joinable: its batches must run whole."""

    name = "test-whole-only"


@pytest.fixture
def whole_only(monkeypatch):
    monkeypatch.setitem(DECODERS._items, WholeOnly.name, WholeOnly)
    return WholeOnly.name


class ImageFreeContrast(Decoder):
    """A stateless two-branch decoder (main - 0.5 * image-free), joinable: tests the branch-major merge."""

    name = "test-image-free-contrast"
    joinable = True

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        return [Branch(name="noimage", prompt=image_free_prompt(ctx.adapter, prompt))]

    def combine(self, step: StepInputs) -> Combined:
        main = torch.log_softmax(step.logits["main"].float(), dim=-1)
        neg = torch.log_softmax(step.logits["noimage"].float(), dim=-1)
        return Combined(scores=main - 0.5 * neg, main_logprobs=main, contrast_logprobs=neg)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_joined_branch_rows_stay_with_their_requests(family, monkeypatch):
    monkeypatch.setitem(DECODERS._items, ImageFreeContrast.name, ImageFreeContrast)
    eng = tiny_engine(family)
    spec = GenerationSpec(max_new_tokens=8, decoding=ImageFreeContrast.name)
    joined = run_joined(eng, spec, reqs(0, 3), reqs(3, 5), join_after=2)
    alone = [eng.generate([r], spec)[0] for r in reqs(0, 5)]
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]
    plain = eng.generate(reqs(0, 5), GenerationSpec(max_new_tokens=8))
    assert [r.token_ids for r in alone] != [r.token_ids for r in plain]


@pytest.mark.parametrize("decoding, params", [("vcd", {}), ("m3id", {}), ("iava", {}), ("vista", {}), ("lqcd", {}),
                                              ("vista", {"vsv_decode_only": True})])
def test_contrastive_decoders_join_with_their_own_state_and_step(decoding, params):
    """Each joined group keeps its decoder instance (per-request state: VISTA's steering vectors, applied by
    hooks to the group's own rows only), its step index (M3ID's weight decays with it) and its branches
    (LQCD: the first group holds a polar question with two leading variants, three rows per request, the
    joiners one variant, two rows); a request with no image decodes plainly beside image requests."""
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=8, decoding=decoding, decoding_params=params, diagnostics=True)
    first, later = reqs(0, 3), reqs(3, 5)
    later[1] = Request("no image here", [], request_id="r4")
    joined = run_joined(eng, spec, first, later, join_after=3)
    alone = [eng.generate([r], spec)[0] for r in first + later]
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]
    for j, a in zip(joined, alone):
        assert [s.score for s in j.steps] == pytest.approx([s.score for s in a.steps], rel=1e-4, abs=1e-5)
    # a result reports its own group's decoding (batch-level fields such as VCD's ``applied`` list that group)
    cohorts = eng.generate(first, spec) + eng.generate(later, spec)
    assert [r.decoding for r in joined] == [r.decoding for r in cohorts]
    assert max(r.timings.batch_size for r in joined[3:]) > 2


@pytest.mark.parametrize("decoding", ["vcd", "m3id"])
def test_a_text_only_group_without_branch_rows_and_image_joiners_decode_as_alone(decoding):
    """A group of text-only requests runs VCD / M3ID without their extra rows (plain decoding); image requests
    joining it bring their own branch rows, and both groups decode as they do alone."""
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=8, decoding=decoding, diagnostics=True)
    first = [Request("no image here", [], request_id="t0"), Request("what color is the car", [], request_id="t1")]
    later = reqs(0, 2)
    joined = run_joined(eng, spec, first, later, join_after=2)
    alone = [eng.generate([r], spec)[0] for r in first + later]
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]


def test_vista_groups_take_their_hooks_away_when_their_requests_leave():
    """A batch that never drains must not collect one set of steering hooks per group that ever joined."""
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=8, decoding="vista")

    def hooks() -> int:
        return sum(len(layer.mlp._forward_hooks) for layer in eng.adapter.layers)

    batch = eng.start_batch(reqs(0, 2), spec)
    try:
        per_group = hooks()
        assert per_group == eng.adapter.num_layers  # default: every layer steered
        for _ in range(3):
            list(batch.advance())
        first = batch.cohorts[0]
        batch.absorb(eng.start_batch(reqs(2, 4), spec, indices=[2, 3]))
        assert hooks() == 2 * per_group
        while any(lv.cohort is first for lv in batch.lives):
            list(batch.advance())
        assert batch.active and hooks() == per_group  # the joiners decode on with their own hooks only
    finally:
        batch.close()
    assert hooks() == 0


def test_joining_is_refused_for_decoders_that_are_not_joinable(whole_only):
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=4, decoding=whole_only)
    a, b = eng.start_batch(reqs(0, 1), spec), eng.start_batch(reqs(1, 2), spec, indices=[1])
    try:
        assert not a.joinable
        with pytest.raises(ValueError, match="not joinable"):
            a.absorb(b)
    finally:
        a.close()
        b.close()
    g = eng.start_batch(reqs(0, 1), GenerationSpec(max_new_tokens=4))
    other = eng.start_batch(reqs(1, 2), GenerationSpec(max_new_tokens=4, pruning="fastv", budget=4), indices=[1])
    try:
        with pytest.raises(ValueError, match="one pruner and decoder"):
            g.absorb(other)
    finally:
        g.close()
        other.close()


# ---- the replica's in-flight batcher ------------------------------------------------------------

def item(i: int, spec: GenerationSpec) -> WorkItem:
    return WorkItem(prompt=PROMPTS[i % 5], images=[random_image(i % 5 + 1, SIZES[i % 5])], spec=spec,
                    request_id=f"q{i}")


@pytest.fixture(scope="module")
def worker():
    return EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))


def test_batcher_answers_staggered_callers_like_alone(worker):
    spec = GenerationSpec(max_new_tokens=8)
    alone = {i: worker.generate_many([item(i, spec)])[0]["result"]["token_ids"] for i in range(10)}
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)

    async def main():
        tasks = []
        for i in range(10):  # arrivals spread over the decoding of the first requests
            tasks.append(asyncio.ensure_future(b.submit(item(i, spec))))
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    answers = asyncio.run(main())
    assert [a["result"]["token_ids"] for a in answers] == [alone[i] for i in range(10)]
    assert [a["result"]["request_id"] for a in answers] == [f"q{i}" for i in range(10)]
    sizes = [a["result"]["timings"]["batch_size"] for a in answers]
    assert max(sizes) <= 4 and max(sizes) >= 2


def test_an_idle_engine_thread_ends_and_the_next_request_starts_another(worker):
    """No thread is held between bursts of traffic; a request that arrives while the idle thread is ending
    (``idle_exit_s=0``: it ends whenever nothing is queued) still gets a thread and its answer."""
    spec = GenerationSpec(max_new_tokens=4)
    alone = {i: worker.generate_many([item(i, spec)])[0]["result"]["token_ids"] for i in range(5)}
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0, idle_exit_s=0.0)
    threads = set()

    async def main():
        out = []
        for i in range(12):  # one at a time, then two at once: every arrival finds the thread ended or ending
            out.append(await asyncio.wait_for(b.submit(item(i % 5, spec)), 60))
            threads.add(b._thread)
            if i % 3 == 2:
                await asyncio.sleep(0.02)
        out += await asyncio.wait_for(asyncio.gather(*(b.submit(item(i, spec)) for i in range(5))), 60)
        return out

    answers = asyncio.run(main())
    assert [a["result"]["token_ids"] for a in answers] == [alone[i % 5] for i in range(12)] + [alone[i] for i in
                                                                                            range(5)]
    deadline = time.monotonic() + 10
    while b._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b._thread is None  # the last one ended too
    assert not [t for t in threading.enumerate() if t.name == "vlmguard-inflight" and t in threads]


def test_a_closed_batcher_ends_its_thread_and_refuses_new_requests(worker):
    spec = GenerationSpec(max_new_tokens=4)
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)  # the default idle time: only close ends it
    assert asyncio.run(b.submit(item(0, spec)))["result"]["token_ids"]
    thread = b._thread
    assert thread.is_alive()
    b.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(b.submit(item(1, spec)))


def test_batcher_isolates_bad_input_and_runs_other_decoders_whole(worker, whole_only):
    ok, whole = GenerationSpec(max_new_tokens=6), GenerationSpec(max_new_tokens=6, decoding=whole_only)
    too_long = GenerationSpec(max_new_tokens=worker.engine.context_length)  # prompt + this > context
    b = InflightBatcher(worker, max_batch_size=8, wait_s=0.05)

    async def main():
        calls = [b.submit(item(0, ok)), b.submit(item(1, too_long)), b.submit(item(2, ok)),
                 b.submit(item(3, whole)), b.submit(item(4, whole)), b.submit(item(0, ok))]
        return await asyncio.wait_for(asyncio.gather(*calls), 120)

    a = asyncio.run(main())
    assert a[1]["error"]["code"] == "ContextTooLong" and a[1]["error"]["status"] == 400
    for i in (0, 2, 3, 4, 5):
        assert "result" in a[i], a[i]
    assert a[0]["result"]["token_ids"] == a[5]["result"]["token_ids"]
    assert a[3]["result"]["decoding"]["name"] == whole_only
    assert a[3]["result"]["token_ids"] == worker.generate_many([item(3, whole)])[0]["result"]["token_ids"]
    assert b.running == 0


def test_batcher_stops_generating_for_callers_that_left(worker):
    spec = GenerationSpec(max_new_tokens=worker.engine.context_length - 200)  # long: still running when cancelled
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)
    items_before = worker.items

    async def main():
        stay = asyncio.ensure_future(b.submit(item(0, spec)))
        leave = asyncio.ensure_future(b.submit(item(1, spec)))
        for _ in range(2000):
            if b.running == 2:
                break
            await asyncio.sleep(0.005)
        assert b.running == 2
        leave.cancel()
        for _ in range(2000):
            if b.running == 1 or stay.done():
                break
            await asyncio.sleep(0.005)
        assert b.running == 1 or stay.done()
        return await asyncio.wait_for(stay, 300)

    answer = asyncio.run(main())
    assert "result" in answer
    assert worker.items - items_before == 1  # the cancelled request never finished


def test_a_caller_whose_event_loop_closed_does_not_fail_the_others(worker):
    """Answering a caller whose event loop had closed (a forced shutdown, a script's asyncio.run ending) raised in
    the engine thread: the requests beside it got that error instead of their answers."""
    spec = GenerationSpec(max_new_tokens=12)
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)
    dead = asyncio.new_event_loop()

    async def enqueue_only():
        b._enqueue(b._pending(item(0, spec)))  # queued, its future never awaited

    dead.run_until_complete(enqueue_only())
    dead.close()

    async def call(i):
        return await asyncio.wait_for(b.submit(item(i, spec)), 120)

    first = asyncio.run(call(1))
    assert "result" in first, first
    assert first["result"]["token_ids"] == worker.generate_many([item(1, spec)])[0]["result"]["token_ids"]
    assert "result" in asyncio.run(call(2))  # the engine thread goes on


def test_batcher_answers_an_engine_failure_and_keeps_serving(worker, monkeypatch, whole_only):
    """A failure inside a decode step or a whole-batch run reaches its callers as an error (nobody hangs),
    and the engine thread goes on serving the next requests."""
    ok, whole = GenerationSpec(max_new_tokens=4), GenerationSpec(max_new_tokens=4, decoding=whole_only)
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    async def call(spec):
        return await asyncio.wait_for(b.submit(item(0, spec)), 120)

    with monkeypatch.context() as m:
        m.setattr(worker, "advance", broken)
        m.setattr(worker, "generate_many", broken)
        failed = [asyncio.run(call(ok)), asyncio.run(call(whole))]
    for a in failed:
        assert a["error"]["status"] == 500 and "engine exploded" in a["error"]["message"], a
    assert b.running == 0
    assert "result" in asyncio.run(call(ok)) and "result" in asyncio.run(call(whole))


def test_batcher_streams_tokens_of_requests_that_join(worker):
    """Streaming requests join the running batch too: their token events add up to the answer they get alone,
    and a stream the client closes early stops generating."""
    spec = GenerationSpec(max_new_tokens=8)
    alone = [worker.generate_many([item(i, spec)])[0]["result"] for i in range(4)]
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)

    async def collect(i):
        await asyncio.sleep(0.01 * i)  # later streams join the running batch
        return [ev async for ev in b.stream(item(i, spec))]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[collect(i) for i in range(4)]), 120)

    streams = asyncio.run(main())
    for events, want in zip(streams, alone):
        *tokens, last = events
        assert last["done"] and last["result"]["token_ids"] == want["token_ids"]
        assert all(not ev["done"] for ev in tokens) and len(tokens) >= 1
        assert "".join(ev["text"] for ev in tokens).strip() == want["text"]
    assert max(s[-1]["result"]["timings"]["batch_size"] for s in streams) >= 2

    long = GenerationSpec(max_new_tokens=worker.engine.context_length - 200)
    items_before = worker.items

    async def leave_early():
        gen = b.stream(item(0, long))
        first = await gen.__anext__()
        await gen.aclose()
        for _ in range(2000):
            if b.running == 0:
                break
            await asyncio.sleep(0.005)
        return first

    assert not asyncio.run(leave_early())["done"]
    assert b.running == 0 and worker.items == items_before


def test_a_joiner_that_cannot_merge_gets_the_error_and_the_batch_goes_on(worker, monkeypatch):
    from vlmguard.decode_batch import DecodeBatch

    def refuse(self, other):
        raise ValueError("cannot merge")

    monkeypatch.setattr(DecodeBatch, "absorb", refuse)
    spec = GenerationSpec(max_new_tokens=60)  # long: still decoding when the joiner arrives
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)

    async def main():
        first = asyncio.ensure_future(b.submit(item(0, spec)))
        for _ in range(2000):
            if b.running == 1:
                break
            await asyncio.sleep(0.002)
        joiner = await asyncio.wait_for(b.submit(item(1, spec)), 120)
        return await asyncio.wait_for(first, 120), joiner

    first, joiner = asyncio.run(main())
    assert "result" in first and len(first["result"]["token_ids"]) == 60
    assert joiner["error"]["status"] == 500 and "cannot merge" in joiner["error"]["message"]


def test_a_stream_that_runs_alone_and_whose_client_left_while_queued_frees_its_slot_without_a_prefill(worker,
                                                                                                      monkeypatch):
    """Streams of ``batching.mode: whole`` (or no batching, or a decoder that cannot join) run alone, one at
    a time: one whose client left while it waited for the engine held its request slot (admission) until the
    engine was free, then still ran its prefill and a token."""
    import threading
    import time

    from vlmguard.workers.config import BatchingConfig, ModelConfig
    from vlmguard.workers.deployment import ModelReplica

    replica = object.__new__(ModelReplica)  # the replica's stream path, on the module's engine
    replica.config, replica.worker = ModelConfig(batching=BatchingConfig(mode="whole")), worker
    replica.batcher = None
    prefills = []
    real_stream = worker.engine.stream
    monkeypatch.setattr(worker.engine, "stream", lambda *a, **k: (prefills.append(1), real_stream(*a, **k))[1])
    spec = GenerationSpec(max_new_tokens=4)

    async def leave_while_queued():
        gen = replica.stream(item(0, spec))
        worker._lock.acquire()  # the engine is busy (another stream)
        threading.Timer(1.5, worker._lock.release).start()  # ... for 1.5 s
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gen.__anext__(), 0.2)  # the client gives up
        return time.monotonic() - t0

    assert asyncio.run(leave_while_queued()) < 1.0  # the stream ended at once, not when the engine came free
    assert prefills == []  # nothing was computed for it

    async def collect():
        return [ev async for ev in replica.stream(item(0, spec))]

    events = asyncio.run(collect())
    assert events[-1]["done"] and prefills == [1]
    assert events[-1]["result"]["token_ids"] == worker.generate_many([item(0, spec)])[0]["result"]["token_ids"]


def test_a_benchmark_job_has_the_run_identity_of_a_local_run_of_the_same_model():
    """A job's engine stand-in (ServeEngine, built from a replica's info) gives the same run knobs as the local
    Engine, so a job resumes or shares a local run of the same weights and precision (its revision was missing:
    every job started a run of its own)."""
    import torch

    from vlmguard.bench.runner import _engine_knobs
    from vlmguard.engine import Engine
    from vlmguard.workers.bench_job import ServeEngine

    local = Engine.load("tiny")
    assert local.revision
    served = ServeEngine(handle=None, info=EngineWorker(name="tiny", engine=local).info())
    assert _engine_knobs(served, None) == _engine_knobs(local, None) and "dtype" not in _engine_knobs(local, None)
    bf16 = Engine(*tiny_llava(), name="tiny-llava")  # its own model: the shared tiny engine must stay float32
    bf16.model.to(torch.bfloat16)
    info = EngineWorker(name="tiny-llava", engine=bf16).info()
    assert info["dtype"] == "bfloat16" and _engine_knobs(ServeEngine(None, info), None)["dtype"] == "bfloat16"
