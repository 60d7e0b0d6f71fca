"""Audit of what a batch holds on to after its callers or its prefill are done, without Ray.

Defects found (each test here failed on the code as audited):
- in ``batching.mode: whole`` (``EngineBatcher``, and the in-flight batcher's whole batches of decoders that
  cannot join), a request whose caller had left (a timeout, a client gone) went on generating with its batch to
  the batch's end, and a batch whose callers had all left ran on for nobody; a gone request's rows now leave the
  batch at the next decode step (``EngineWorker.generate_many(gone=...)``), its batch-mates' answers unchanged;
- a decode state kept the prefill's final sequence, its (B, L, D) hidden states included, for as long as the
  state lived: in the in-flight batcher, a batch that never drains pinned its first prefill's hidden states for
  its whole life. The state now keeps the sequence's layout only (``DecodeState.final_seq``: no hidden states)
  and the hidden dtype, and a merged state no layout at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import weakref

import pytest

from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.deployment import ModelReplica
from vlmguard.workers.engine_worker import EngineWorker, WorkItem
from vlmguard.workers.inflight import InflightBatcher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared 2-core machine

LENGTH = 12  # tokens every request generates (min_new_tokens: no early end of sequence)


class SteppedEngine:
    """The tiny engine, recording how many requests each decode step of a batch advances; the step numbered
    ``hold_at`` (1-based) waits, once it has been counted, until the test sets ``go``."""

    def __init__(self, hold_at: int | None = None):
        self._engine = tiny_engine("llava")
        self.sizes: list[int] = []
        self.hold_at = hold_at
        self.held, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, reqs, spec):
        """``Engine.generate`` through this engine's ``start_batch`` (its steps counted)."""
        batch = self.start_batch(reqs, spec)
        try:
            done = batch.finish()
        finally:
            batch.close()
        return [done[i] for i in range(len(reqs))]

    def start_batch(self, reqs, specs, indices=None):
        batch = self._engine.start_batch(reqs, specs, indices)
        advance = batch.advance

        def counted_advance():
            self.sizes.append(batch.active)
            if len(self.sizes) == self.hold_at:
                self.held.set()
                assert self.go.wait(60), "the test never let the step go on"
            return advance()

        batch.advance = counted_advance  # this batch's own attribute: the shared engine is not touched
        return batch


def whole_mode_replica(engine: SteppedEngine) -> ModelReplica:
    """A replica of ``batching.mode: whole``, as the deployment builds it (no Ray), serving ``engine``."""
    replica = ModelReplica({"model": "random:llava", "device": "cpu", "torch_threads": 1,
                            "batching": {"mode": "whole", "max_batch_size": 4, "batch_wait_timeout_s": 0.0}})
    replica.worker.engine = engine
    return replica


def item(i: int, length: int = LENGTH) -> WorkItem:
    return WorkItem(prompt=f"describe photo {i}", images=[random_image(i + 1)], request_id=f"r{i}",
                    spec=GenerationSpec(max_new_tokens=length, min_new_tokens=length))


async def _wait_for(event: threading.Event) -> None:
    for _ in range(6000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batch never reached the held step")


async def _leave(tasks: list[asyncio.Task]) -> None:
    """What a request timeout (asyncio.wait_for) or a dropped connection does to the awaiting tasks."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def run_with_leavers(submit, engine: SteppedEngine, items: list[WorkItem], leavers: list[int], gate) -> list:
    """Submit ``items`` together (under ``gate``, a lock that keeps the batcher from taking only some of them);
    once the batch holds at ``engine.hold_at``, the callers of ``leavers`` leave. Returns the answers (None for a
    leaver)."""
    async def main():
        with gate:
            tasks = [asyncio.ensure_future(submit(it)) for it in items]
            await asyncio.sleep(0)  # each submit runs up to its wait for an answer: all are queued
        await _wait_for(engine.held)
        await _leave([tasks[i] for i in leavers])
        engine.go.set()
        done, pending = await asyncio.wait([t for i, t in enumerate(tasks) if i not in leavers], timeout=120)
        assert not pending, "callers still waiting"
        return [None if i in leavers else t.result() for i, t in enumerate(tasks)]

    return asyncio.run(main())


def assert_same_answers(got: dict, want: dict) -> None:
    got, want = got["result"], want["result"]
    assert (got["token_ids"], got["text"], got["finish_reason"]) == (
        want["token_ids"], want["text"], want["finish_reason"])


@pytest.mark.parametrize("path", ["whole_batcher", "inflight_whole_batch"])
def test_a_caller_that_leaves_a_whole_batch_stops_its_generation_and_the_others_answer_unchanged(path):
    engine = SteppedEngine()
    items = [item(i) for i in range(3)]
    if path == "whole_batcher":  # the replica's ``batching.mode: whole``
        replica = whole_mode_replica(engine)
        worker, submit = replica.worker, replica.generate
        gate = contextlib.nullcontext()  # its batch forms on this event loop, after the submits
    else:  # a decoder that cannot join runs as a whole batch in the in-flight batcher
        worker = EngineWorker(name="tiny", engine=engine)
        worker.joinable = lambda spec: False  # this test's own worker
        batcher = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)
        submit, gate = batcher.submit, batcher._cv  # its engine thread would start the first request at once, alone
    want = worker.generate_many(items)  # an uninterrupted run
    engine.sizes, engine.hold_at = [], 3
    items_before = worker.items

    got = run_with_leavers(submit, engine, items, [1], gate)

    # the leaver's rows left the batch at the step after it left; the others ran to their full length
    assert engine.sizes == [3] * 3 + [2] * (LENGTH - 3)
    assert got[1] is None
    for i in (0, 2):
        assert_same_answers(got[i], want[i])
    assert worker.items == items_before + 2  # the leaver was not answered


def test_a_whole_batch_whose_callers_all_left_stops_between_decode_steps():
    engine = SteppedEngine(hold_at=2)
    replica = whole_mode_replica(engine)
    worker = replica.worker
    items = [item(i, length=4 * LENGTH) for i in range(2)]

    async def main():
        tasks = [asyncio.ensure_future(replica.generate(it)) for it in items]
        await _wait_for(engine.held)
        await _leave(tasks)
        engine.go.set()
        # the engine is free again for the next request, long before the gone batch could have ended
        return await asyncio.wait_for(replica.generate(item(5, length=1)), 120)

    after = asyncio.run(main())
    assert "result" in after and not worker._lock.locked()
    assert engine.sizes[:2] == [2, 2] and engine.sizes[2:] == [1]  # no third step; then the next request's one


def test_a_caller_that_left_before_its_whole_batch_started_costs_no_prefill():
    engine = SteppedEngine()
    worker = EngineWorker(name="tiny", engine=engine)
    assert worker.generate_many([item(0), item(1)], gone=[lambda: True, lambda: True]) == [None, None]
    assert engine.sizes == [] and worker.items == 0


# ---- a prefill's hidden states do not outlive it ----------------------------------------------------------------

def _prefill_with_ref(engine, reqs: list[Request], spec: GenerationSpec, indices: list[int]):
    """``engine.start_batch`` and a weak reference to the last layer's prefill output (the final hidden states)."""
    refs: list[weakref.ref] = []

    def keep_ref(module, args, out):
        if not refs:  # the prefill's call; decode steps come later
            refs.append(weakref.ref(out))

    handle = engine.adapter.layers[-1].register_forward_hook(keep_ref)
    try:
        batch = engine.start_batch(reqs, spec, indices)
    finally:
        handle.remove()
    return batch, refs[0]


def _requests(first: int) -> list[Request]:
    return [Request(f"describe photo {i}", [random_image(i + 1)]) for i in range(first, first + 2)]


def test_a_prefilled_batch_holds_no_hidden_states_of_its_prefill():
    engine = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=6, min_new_tokens=6)
    want = [r.token_ids for r in engine.generate(_requests(0) + _requests(2), spec)]

    first, first_hidden = _prefill_with_ref(engine, _requests(0), spec, [0, 1])
    later, later_hidden = _prefill_with_ref(engine, _requests(2), spec, [2, 3])
    gc.collect()
    assert first_hidden() is None and later_hidden() is None  # the (B, L, D) prefill outputs are gone
    state = first.state
    assert state.final_seq.hidden.numel() == 0 and state.hidden_dtype == engine.model.dtype
    assert state.final_seq.visual.shape == state.final_seq.valid.shape  # the layout a result's kept indices need

    results: dict[int, list[int]] = {}
    try:
        for ev in first.advance():  # one step, then the later requests join (in-flight batching)
            assert not ev.done
        first.absorb(later)
        assert first.state.final_seq is None  # a merged batch keeps no prefill's layout for its whole life
        while first.active:
            for ev in first.advance():
                if ev.done:
                    results[ev.index] = ev.result.token_ids
    finally:
        first.close()
        later.close()
    assert [results[i] for i in range(4)] == want  # the answers of an uninterrupted batch of all four


def test_the_hidden_rows_a_decoder_asks_for_at_prefill_hold_no_layer_output():
    """VISTA asks for the last prompt position's residual of a window of layers. Those rows were views of each
    layer's whole (B, L, D) output, which therefore stayed alive as long as the batch did; they are copies now."""
    engine = tiny_engine("llava")
    spec = GenerationSpec(decoding="vista", max_new_tokens=4)
    refs: list[weakref.ref] = []

    def keep_ref(module, args, out):
        refs.append(weakref.ref(out))

    handles = [layer.register_forward_hook(keep_ref) for layer in engine.adapter.layers]
    try:
        batch = engine.start_batch(_requests(0), spec)
    finally:
        for h in handles:
            h.remove()
    try:
        assert batch.hidden  # the decoder's rows are there
        gc.collect()
        alive = [i for i, r in enumerate(refs) if r() is not None and r().dim() == 3 and r().shape[1] > 1]
        assert alive == []
    finally:
        batch.close()
