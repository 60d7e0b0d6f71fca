"""Invariants every pruning method must keep, on tiny random models of every family.

kept count == budget (as each method maps it to its stages), kept indices sorted and in range,
budget == all tokens gives exactly the unpruned output, batched == one-by-one, cached decode ==
uncached recompute with frozen selections, determinism, clear errors for invalid budgets.
"""
from __future__ import annotations

import pytest

from pruning_support import check_cached_equals_uncached, requests
from vlmguard.errors import InvalidInput
from vlmguard.pruning import make_pruner
from vlmguard.spec import GenerationSpec
from vlmguard.testing import tiny_engine

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
METHODS = ["random", "fastv", "adaptinfer", "flowcut"]
STAGE_KEYS = {"random": None, "fastv": "fastv_kept", "adaptinfer": "adaptinfer_kept", "flowcut": "flowcut_llm_kept"}


def expected_fed(method: str, family: str, res, budget: int) -> list[int]:
    """Visual tokens each LLM layer should receive for one result."""
    n = res.visual_tokens
    n_layers = len(res.visual_tokens_kept)
    k = min(budget, n)
    if method == "random":
        return [k] * n_layers
    if method == "fastv":
        return [n, n] + [k] * (n_layers - 2)
    if method == "adaptinfer":
        sched = [s for s in res.pruning["adaptinfer_schedule"] if s and s["n_visual"] == n][0]
        fed, cur, stage = [], n, 0
        for i in range(n_layers):
            fed.append(cur)
            if stage < len(sched["layers"]) and sched["layers"][stage] == i:
                cur = sched["keeps"][stage] if sched["keeps"][stage] < cur else cur
                stage += 1
        return fed
    # flowcut
    if family == "llava":
        return [k] * n_layers
    first = res.visual_tokens_kept[0]
    if family == "qwen2_vl":  # stage V keeps 2K merged tokens of the (one) image
        assert first == min(n, 2 * k)
    return [first, first] + [min(k, first)] * (n_layers - 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_kept_count_sorted_and_deterministic(method, family):
    eng = tiny_engine(family)
    budget = 3
    spec = GenerationSpec(pruning=method, budget=budget, max_new_tokens=2)
    out = eng.generate(requests(), spec)
    again = eng.generate(requests(), spec)
    for res, res2 in zip(out, again):
        assert res.visual_tokens_kept == expected_fed(method, family, res, budget)
        idx = res.kept_indices
        assert len(idx) == res.visual_tokens_kept[-1]
        assert all(a < b for a, b in zip(idx, idx[1:]))  # strictly increasing
        assert all(0 <= i < res.visual_tokens for i in idx)
        assert res2.kept_indices == idx and res2.token_ids == res.token_ids  # deterministic
        if family == "llava_next" and method == "flowcut":
            assert res.visual_tokens_kept[0] <= 5 * (budget // 2) * 2  # stage V: floor(K/2) per crop


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_budget_equal_to_all_tokens_is_exactly_unpruned(method, family):
    eng = tiny_engine(family)
    req = requests()[1]
    base = eng.generate([req], GenerationSpec(max_new_tokens=4))[0]
    for budget in (base.visual_tokens, 1.0) if family == "llava" else (base.visual_tokens,):
        res = eng.generate([req], GenerationSpec(pruning=method, budget=budget, max_new_tokens=4))[0]
        assert res.token_ids == base.token_ids
        assert [s.main_prob for s in res.steps] == [s.main_prob for s in base.steps]  # bit-identical
        assert res.visual_tokens_kept == base.visual_tokens_kept
        assert res.kept_indices == list(range(base.visual_tokens))


@pytest.mark.parametrize("method,family", [pytest.param(m, f, id=f"{m}-{f}") for m in METHODS for f in FAMILIES])
def test_batched_equals_one_by_one(method, family):
    eng = tiny_engine(family)
    spec = GenerationSpec(pruning=method, budget=0.3, max_new_tokens=3)
    reqs = requests()
    batched = eng.generate(reqs, spec)
    single = [eng.generate([r], spec)[0] for r in reqs]
    for b, s in zip(batched, single):
        assert b.kept_indices == s.kept_indices
        assert b.visual_tokens_kept == s.visual_tokens_kept
        assert b.token_ids == s.token_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_cached_decode_equals_uncached_recompute(method, family, monkeypatch):
    eng = tiny_engine(family)
    spec = GenerationSpec(pruning=method, budget=0.4, max_new_tokens=3)
    check_cached_equals_uncached(eng, requests()[0], spec, monkeypatch, STAGE_KEYS[method], steps=2)


@pytest.mark.parametrize("method", METHODS)
def test_invalid_budgets_give_clear_errors(method):
    eng = tiny_engine("llava")
    for bad in (0, -3, 1.5, -0.2):
        with pytest.raises(InvalidInput, match="budget"):
            GenerationSpec.build(pruning=method, budget=bad)
    if method == "fastv":  # the spec's default R = 50%
        assert make_pruner(method, None, {}).keep_count(16) == 8
    else:
        with pytest.raises(InvalidInput, match="needs a budget"):
            make_pruner(method, None, {})
    with pytest.raises(InvalidInput, match="exceeds the 16 visual tokens"):
        eng.generate(requests()[:1], GenerationSpec(pruning=method, budget=17))
    for bad in (0, -1):  # pruners built directly (bypassing the spec) still refuse
        with pytest.raises(InvalidInput, match="at least 1"):
            make_pruner(method, bad, {}).keep_count(16)
    with pytest.raises(InvalidInput, match=r"ratio must be in \(0, 1\]"):
        make_pruner(method, 2.5, {}).keep_count(16)


@pytest.mark.parametrize("method", METHODS)
def test_text_only_rows_untouched_and_multi_image_rows_budgeted(method):
    from vlmguard.engine import Request
    from vlmguard.testing import random_image

    eng = tiny_engine("llava")
    text_only = Request("what color is the car")
    two = Request("compare", [random_image(3, (40, 32)), random_image(4, (32, 64))])
    base = eng.generate([text_only], GenerationSpec(max_new_tokens=3))[0]
    out = eng.generate([requests()[0], text_only, two], GenerationSpec(pruning=method, budget=4, max_new_tokens=3))
    assert out[1].token_ids == base.token_ids and out[1].kept_indices is None
    assert out[2].visual_tokens == 32
    assert len(out[2].kept_indices) == out[2].visual_tokens_kept[-1] <= 4


@pytest.mark.parametrize("method,family,budget", [("fastv", "llava", 6), ("adaptinfer", "llava", 6),
                                                  ("flowcut", "llava", 6), ("flowcut", "llava_next", 6),
                                                  ("flowcut", "qwen2_vl", 2)])
def test_score_methods_report_per_request_visual_scores(method: str, family: str, budget: int):
    """The dashboard's heatmap: one score per visual token (raster order) for each request, the same in a batch
    as alone, every kept token scored; FastV's kept set is exactly the top-K of its scores."""
    from vlmguard.engine import Request
    from vlmguard.testing import random_image

    eng = tiny_engine(family)
    reqs = [Request("Is there a dog in the image?", [random_image(1)]), Request("describe", [random_image(2)])]
    spec = GenerationSpec(pruning=method, budget=budget, max_new_tokens=2)
    batched = eng.generate(reqs, spec)
    single = [eng.generate([r], spec)[0] for r in reqs]
    for b, s in zip(batched, single):
        scores = b.pruning["visual_scores"]
        assert len(scores) == b.visual_tokens and "per_row" not in b.pruning
        assert scores == pytest.approx(s.pruning["visual_scores"], abs=1e-5)
        assert all(scores[i] > 0 for i in b.kept_indices)
        if method == "fastv":
            top = sorted(range(len(scores)), key=lambda i: -scores[i])[:budget]
            assert sorted(top) == b.kept_indices
    assert batched[0].pruning["visual_scores"] != batched[1].pruning["visual_scores"]


def test_budget_without_a_pruning_method_is_an_error():
    """A budget with pruning 'none' kept every token silently; the CLI refused it, the Python and HTTP APIs
    did not."""
    with pytest.raises(InvalidInput, match="needs a pruning method"):
        make_pruner("none", 64, {})
    with pytest.raises(InvalidInput, match="needs a pruning method"):
        tiny_engine("llava").generate(requests()[:1], GenerationSpec(budget=8, max_new_tokens=2))
