"""An audit of pruning under unusual requests through the engine's Python API: a batch whose requests differ in how
many images they carry, copies of a request (``n`` choices), and budgets that cover one request whole while they cut
another. A budget error names the request as the caller placed it, and a request's result (its pruning report, the
FLOPs counted from it) is the same in a batch as alone."""
from __future__ import annotations

import pytest

from vlmguard.engine import Request
from vlmguard.errors import InvalidInput
from vlmguard.flops import result_flops
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

PER_REQUEST = ("visual_scores", "flowcut_vit_tokens_per_layer", "flowcut_vit_events")


def own_report(res) -> dict:
    """The entries of a result's pruning report that describe that request alone."""
    return {k: v for k, v in res.pruning.items() if k in PER_REQUEST}


def test_flowcut_names_the_request_whose_images_outnumber_its_budget():
    """Copies of one request share a prefill, so the batch's rows are not the caller's positions: the error named
    "request row 1" for the caller's request 2, in another format than every other budget error."""
    copy = Request("describe", [random_image(1)])
    three = Request("what", [random_image(2), random_image(3), random_image(4)])
    with pytest.raises(InvalidInput, match=r"^request 2: flowcut: budget 2 is below one token per image \(3 images\)$"):
        tiny_engine("llava").generate([copy, copy, three], GenerationSpec(pruning="flowcut", budget=2,
                                                                          max_new_tokens=2))


def test_fastv_reports_no_heatmap_for_a_request_it_leaves_whole():
    """At 16 tokens FastV leaves a one-image request (16 tokens) whole: alone it reports no scores, but batched with
    a three-image request that it cuts, it got a heatmap of its own."""
    eng = tiny_engine("llava")
    one = Request("describe", [random_image(1)])
    three = Request("what", [random_image(2), random_image(3), random_image(4)])
    spec = GenerationSpec(pruning="fastv", budget=16, max_new_tokens=2)
    batched = eng.generate([one, three], spec)
    alone = eng.generate([one], spec)[0]
    assert "visual_scores" not in alone.pruning
    assert "visual_scores" not in batched[0].pruning
    assert len(batched[1].pruning["visual_scores"]) == 48  # the request it cut keeps its heatmap
    assert batched[0].token_ids == alone.token_ids and batched[0].kept_indices == alone.kept_indices


def test_flowcut_llava_request_covered_by_its_budget_is_unpruned_in_a_batch_as_alone():
    """A one-image request at a budget of all its 16 tokens takes the unpruned path alone; batched with a request
    that is cut it ran through stage V and reported a ViT schedule and an all-zero heatmap."""
    eng = tiny_engine("llava")
    one = Request("describe", [random_image(1)])
    two = Request("what", [random_image(2), random_image(3)])
    spec = GenerationSpec(pruning="flowcut", budget=16, max_new_tokens=3)
    batched = eng.generate([two, one], spec)
    alone = [eng.generate([r], spec)[0] for r in (two, one)]
    assert own_report(alone[1]) == {}
    for b, a in zip(batched, alone):
        assert own_report(b).keys() == own_report(a).keys()
        assert b.token_ids == a.token_ids and b.kept_indices == a.kept_indices
        assert b.visual_tokens_kept == a.visual_tokens_kept
        assert [s.main_prob for s in b.steps] == pytest.approx([s.main_prob for s in a.steps], abs=1e-5)


@pytest.mark.parametrize("budget", [12, 6])
def test_flowcut_qwen_request_the_tower_leaves_whole_counts_the_same_flops_in_a_batch(budget):
    """Three small images (4 merged tokens each): at 12 (all of them) or 6 (2 each, x2 in the ViT = all) the tower
    cuts none of them, and alone the request takes the unpruned tower. Batched with a large image that the tower
    does cut, it went through stage V: a ViT schedule, an all-zero heatmap, and other FLOPs than alone."""
    eng = tiny_engine("qwen2_vl")
    big = Request("describe", [random_image(1, (2000, 10))])
    small = Request("what", [random_image(2, (1, 1)), random_image(3, (1, 1)), random_image(4, (1, 1))])
    spec = GenerationSpec(pruning="flowcut", budget=budget, max_new_tokens=3)
    batched = eng.generate([big, small], spec)
    alone = [eng.generate([r], spec)[0] for r in (big, small)]
    assert "flowcut_vit_tokens_per_layer" not in alone[1].pruning
    for b, a in zip(batched, alone):
        assert own_report(b).keys() == own_report(a).keys()
        assert result_flops(eng.model.config, b).total == result_flops(eng.model.config, a).total
        assert b.token_ids == a.token_ids and b.kept_indices == a.kept_indices
        assert b.visual_tokens_kept == a.visual_tokens_kept
        assert [s.main_prob for s in b.steps] == pytest.approx([s.main_prob for s in a.steps], abs=1e-5)


@pytest.mark.parametrize("method,decoding", [("fastv", "greedy"), ("adaptinfer", "greedy"), ("adaptinfer", "vcd"),
                                             ("flowcut", "greedy")])
def test_a_request_reports_its_own_stage_records_not_the_batch_s(method, decoding):
    """Every request's result carried the batch's stage records (kept indices of every row, AdaptInfer's schedule of
    every row, branch rows included): another request's kept tokens in a result the API returns, and a report
    that differed batched from alone. Now a request reports exactly what it reports alone."""
    family = "qwen2_vl" if method == "flowcut" else "llava"  # FlowCut's stage L: after its tower keeps 2K
    eng = tiny_engine(family)
    reqs = [Request("describe the scene", [random_image(5)]), Request("what", [random_image(6), random_image(7)])]
    spec = GenerationSpec(pruning=method, budget=0.3, decoding=decoding, max_new_tokens=2)
    batched = eng.generate(reqs, spec)
    alone = [eng.generate([r], spec)[0] for r in reqs]
    for b, a in zip(batched, alone):  # (heatmap scores: equal up to float rounding of another batch shape)
        scores_b, scores_a = b.pruning.pop("visual_scores", None), a.pruning.pop("visual_scores", None)
        assert b.pruning == a.pruning and b.kept_indices == a.kept_indices
        assert (scores_b is None) == (scores_a is None)
        assert scores_b is None or scores_b == pytest.approx(scores_a, rel=1e-5, abs=1e-6)
    assert all(any(k.endswith("_kept") for k in r.pruning) for r in batched)  # the stage records, per request
