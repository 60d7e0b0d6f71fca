"""In-flight joins over the whole matrix: family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL) x pruner (all five, each
cutting) x decoder (all six, VISTA also with ``vsv_decode_only``, plus seeded sampling).

Requests join a running batch at different steps, each group its own cohort with its own prompt lengths and
image sizes (LLaVA-NeXT: different anyres crop counts, Qwen2-VL: different grids; LLaVA-1.5 resizes every
image to one size), and leave it at different steps (their own ``max_new_tokens``, or EOS): one leaves before
anyone joins, one leaves the middle of a two-request group while its partner decodes on, the first group leaves
before the last joiners finish. Two groups join before one step; one of them holds two copies of one request
(the ``n`` choices of a chat request: prefilled once where the decoder keeps no per-request state). Greedy
requests decode beside requests sampling with their own seeded generators and penalties. Every request gets
exactly the tokens, text, finish reason, kept visual tokens, scores and log-probabilities it gets alone
(``Engine.generate([request], spec)``), and its streamed text adds up to its result; its decoding report is
its own group's."""
from __future__ import annotations

import pytest

from vlmguard.decoding import DECODERS
from vlmguard.engine import Request
from vlmguard.pruning import PRUNERS
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
PRUNER_NAMES = ["none", "fastv", "flowcut", "adaptinfer", "random"]
# below every request's visual tokens (LLaVA-1.5 16, LLaVA-NeXT >= 36, Qwen2-VL >= 4): FlowCut gets a count,
# the others a fraction, so both kinds of budget run
FLOWCUT_BUDGET = {"llava": 6, "llava_next": 8, "qwen2_vl": 3}
DECODERS_UNDER_TEST = {  # id: (decoder, params that make every contrast act on the tiny models)
    "greedy": ("greedy", {}),
    "vcd": ("vcd", {}),
    "m3id": ("m3id", {"gate": False}),
    "vista": ("vista", {"vsv_lambda": 0.3}),
    "vista-decode-only": ("vista", {"vsv_lambda": 0.3, "vsv_decode_only": True}),
    "iava": ("iava", {"fallback_rule": "avisc"}),
    "lqcd": ("lqcd", {}),
    "sample": ("sample", {}),
}
SAMPLED = {"do_sample": True, "temperature": 0.9, "top_k": 20}
NAMES = ["A", "D", "B", "E", "C", "C2", "F"]  # each request's StreamEvent index is its place here
# the groups prefilled before each step (the first one starts the batch, the others join it); two groups join
# before step 4, one after the other
JOINS = {0: [["A", "D"]], 2: [["B", "E"]], 4: [["C", "C2"], ["F"]]}
GROUPS = [g for groups in JOINS.values() for g in groups]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared 2-core machine


def test_the_matrix_covers_every_method():
    assert sorted(PRUNER_NAMES) == PRUNERS.names()
    assert sorted({d for d, _ in DECODERS_UNDER_TEST.values()}) == DECODERS.names()
    for name in DECODERS.names():  # every built-in decoder joins (docs/architecture.md, in-flight batching)
        assert DECODERS.get(name).joinable, name


def requests() -> dict[str, Request]:
    out = {
        "A": Request("Is there a dog in the image?", [random_image(1, (40, 32))], request_id="A"),
        "D": Request("hi", [random_image(4, (32, 32))], request_id="D"),
        "B": Request("describe the photo", [random_image(2, (64, 64))], request_id="B"),
        "E": Request("is the cat on the table", [random_image(5, (64, 40))], request_id="E"),
        # longer than the running rows' cache on LLaVA-1.5 and Qwen2-VL, so the merge pads the running side
        # (on LLaVA-NeXT B's four-crop image makes the group joining at step 2 the longer side)
        "C": Request("what color is the car on the street in this picture and is there a person with a dog "
                     "or a cat in the kitchen", [random_image(3, (32, 64))], request_id="C"),
        "F": Request("a red car", [random_image(6, (48, 40))], request_id="F"),
    }
    out["C2"] = Request(out["C"].prompt, out["C"].images, request_id="C2")  # a copy: the very same image object
    return out


def specs(family: str, pruner: str, decoder_id: str) -> dict[str, GenerationSpec]:
    decoder, params = DECODERS_UNDER_TEST[decoder_id]
    budget = None if pruner == "none" else FLOWCUT_BUDGET[family] if pruner == "flowcut" else 0.5
    base = GenerationSpec(pruning=pruner, budget=budget, decoding=decoder, decoding_params=params,
                          diagnostics=True, max_new_tokens=8)
    own = {
        "A": {"logprobs": 2},  # decodes longest of the first group
        "D": {"max_new_tokens": 1},  # leaves before anyone joins
        "B": {"max_new_tokens": 3},  # leaves its group (and the batch) at C's first step, E goes on
        "E": {**SAMPLED, "seed": 5, "max_new_tokens": 6, "repetition_penalty": 1.3},
        "C": {**SAMPLED, "seed": 11, "max_new_tokens": 7, "presence_penalty": 0.5},
        "C2": {**SAMPLED, "seed": 12, "max_new_tokens": 5},  # C's second choice
        "F": {"max_new_tokens": 6, "logit_bias": {5: 3.0, 9: -100.0}},  # joins with a bias of its own
    }
    if decoder == "sample":  # every request samples, each with its own seed
        for name, seed in (("A", 3), ("D", 4), ("B", 7), ("F", 9)):
            own[name] = {**own[name], **SAMPLED, "seed": seed}
    return {k: base.model_copy(update=v) for k, v in own.items()}


def run_staggered(engine, reqs, sp) -> tuple[dict, dict, list[int]]:
    """The groups of ``JOINS`` join the running batch before their steps. Returns each request's result and
    streamed text by name, and the number of requests decoding at each step."""
    results, streamed, sizes = {}, {n: "" for n in NAMES}, []
    batch = None
    try:
        step = 0
        while batch is None or batch.active:
            for group in JOINS.get(step, []):
                other = engine.start_batch([reqs[n] for n in group], [sp[n] for n in group],
                                           indices=[NAMES.index(n) for n in group])
                if batch is None:
                    batch = other
                    continue
                try:
                    batch.absorb(other)
                finally:
                    other.close()  # a no-op once absorbed: its cohorts are the batch's
                assert other.active == 0
            sizes.append(batch.active)
            for ev in batch.advance():
                name = NAMES[ev.index]
                streamed[name] += ev.text
                if ev.done:
                    results[name] = ev.result
            step += 1
        assert step > max(JOINS), "the batch drained before the last group joined"
    finally:
        if batch is not None:
            batch.close()
    return results, streamed, sizes


def flat(logprobs) -> list[float]:
    """Each token's own log-probability, then those of its top tokens."""
    return [x for lp in logprobs for x in [lp.logprob, *(t.logprob for t in lp.top)]]


@pytest.mark.parametrize("decoder_id", list(DECODERS_UNDER_TEST))
@pytest.mark.parametrize("pruner", PRUNER_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_joined_equals_alone(family, pruner, decoder_id):
    eng = tiny_engine(family)
    reqs, sp = requests(), specs(family, pruner, decoder_id)
    joined, streamed, sizes = run_staggered(eng, reqs, sp)
    assert sorted(joined) == sorted(NAMES)
    assert max(sizes) >= 3, sizes  # the joiners decoded beside the running requests
    for name in NAMES:
        what = f"{family} x {pruner} x {decoder_id}: request {name}"
        a, j = eng.generate([reqs[name]], sp[name])[0], joined[name]
        assert j.token_ids == a.token_ids, what
        assert j.text == a.text == streamed[name].strip() and j.finish_reason == a.finish_reason, what
        assert j.kept_indices == a.kept_indices and j.visual_tokens_kept == a.visual_tokens_kept, what
        if pruner != "none":
            assert j.visual_tokens_kept[-1] < j.visual_tokens, what  # the budget cuts
        assert [s.main_prob for s in j.steps] == pytest.approx([s.main_prob for s in a.steps], rel=1e-4,
                                                                abs=1e-6), what
        contrast = [[s.contrast_prob for s in r.steps] for r in (j, a)]  # None: a decoder without a contrast
        assert [c is None for c in contrast[0]] == [c is None for c in contrast[1]], what
        assert [c or 0.0 for c in contrast[0]] == pytest.approx([c or 0.0 for c in contrast[1]], rel=1e-4,
                                                                abs=1e-6), what
        assert [s.score for s in j.steps] == pytest.approx([s.score for s in a.steps], rel=1e-4, abs=1e-5), what
        if sp[name].logprobs is not None:
            assert [lp.token_id for lp in j.logprobs] == [lp.token_id for lp in a.logprobs], what
            assert flat(j.logprobs) == pytest.approx(flat(a.logprobs), rel=1e-4, abs=1e-5), what
        assert j.request_id == name, what
    # a result reports its own group's decoding (batch-level fields such as VCD's ``applied`` list that group)
    for group in GROUPS:
        together = eng.generate([reqs[n] for n in group], [sp[n] for n in group])
        assert [joined[n].decoding for n in group] == [r.decoding for r in together], group
