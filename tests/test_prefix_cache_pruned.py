"""The prefix cache keeps what a vision-side pruner made of a row's images (``Pruner.vision_cache_key``; FlowCut's
stage V): a later request about the same images takes its kept tokens, indices and report, and neither the tower
nor the pruner runs on them again. What it gets is what a fresh prefill gives: the same tokens, kept indices,
pruning report (ViT schedule, heatmap) and FLOPs."""
from __future__ import annotations

import math

import pytest

import vlmguard.pruning.flowcut as flowcut_module
from pruning_support import count_tower_images
from test_prefix_cache import assert_same, both_ways, first_turn, images, second_turn
from test_prefix_cache import cache_off_afterwards, engine  # noqa: F401 (the fixture: every engine left without a cache)
from vlmguard.engine import Request
from vlmguard.pruning.base import merge_report
from vlmguard.pruning.registry import PRUNERS
from vlmguard.spec import GenerationSpec

STAGE_V = {"llava": "run_stage_v", "llava_next": "run_stage_v", "qwen2_vl": "run_stage_v_qwen"}


def count_stage_v_images(family: str, monkeypatch) -> list[int]:
    """A list that records, for every FlowCut stage-V pass, how many images (LLaVA-NeXT: crops) it cut."""
    seen: list[int] = []
    name = STAGE_V[family]
    real = getattr(flowcut_module, name)

    def spy(tower, pixels, targets, *args, **kwargs):
        seen.append(len(targets))
        return real(tower, pixels, targets, *args, **kwargs)

    monkeypatch.setattr(flowcut_module, name, spy)
    return seen


def flowcut_spec(**params) -> GenerationSpec:
    # a quarter: Qwen2-VL's ViT keeps twice its share (qwen_vit_keep), so half would leave its tower nothing to cut
    return GenerationSpec(pruning="flowcut", budget=0.25, pruning_params=params, max_new_tokens=5, logprobs=2)


def same_report(a, c, rel: float = 1e-5) -> bool:
    """Pruning reports alike: the same keys, lists and values, floats to ``rel``. A cut taken from the cache was
    made in a batch of other images than a fresh prefill's, and a CPU's matrix products may round the scores of a
    batch otherwise in their last bits (AMD EPYC: 1 ulp in FlowCut's LLaVA-NeXT stage-V scores)."""
    if isinstance(a, dict):
        return isinstance(c, dict) and a.keys() == c.keys() and all(same_report(a[k], c[k], rel) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(c, (list, tuple)) and len(a) == len(c) and all(same_report(x, y, rel) for x, y in zip(a, c))
    if isinstance(a, float):
        return math.isclose(a, c, rel_tol=rel, abs_tol=1e-7)
    return a == c


def assert_same_pruning(fresh, cached):
    assert_same(fresh, cached)
    for a, c in zip(fresh, cached):
        assert same_report(a.pruning, c.pruning), (a.pruning, c.pruning)
        assert c.prefill_flops == a.prefill_flops


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_flowcut_takes_its_own_earlier_cut_of_a_cached_image(family, monkeypatch):
    eng = engine(family)
    cuts = count_stage_v_images(family, monkeypatch)
    towers = count_tower_images(eng, monkeypatch)
    spec = flowcut_spec()
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn(family), second_turn(family)])
    assert_same_pruning(fresh1 + fresh2, cached1 + cached2)
    assert all(r.pruning.get("flowcut_vit_tokens_per_layer") for r in cached2[:5])  # each its ViT schedule
    crops = cuts[0] // 2  # per image: 1, or LLaVA-NeXT's crops (every image here has the same count)
    # per turn: each distinct image of the batch, cut in one pass; with the cache, the second turn's new image only
    assert cuts == [2 * crops, 3 * crops, 2 * crops, crops], cuts
    stats = eng.prefix_cache.stats
    # hits: the first turn's two images (the row asking about one of them again takes the first row's cut);
    # entries: those two and the new image
    assert (stats.pruned_hits, stats.pruned_entries) == (2, 3)
    assert towers == [] and stats.image_entries == 0  # stage V runs the tower layers itself, never image_features
    cuts.clear()
    again = eng.generate([Request("Is there a dog?", [images(family)[1]])], spec)
    assert cuts == []
    vit = ("flowcut_vit_tokens_per_layer", "flowcut_vit_events")  # stage L's heatmap follows the question
    assert [again[0].pruning[k] for k in vit] == [cached1[1].pruning[k] for k in vit]


def test_each_setting_of_the_pruner_has_entries_of_its_own(monkeypatch):
    eng = engine("llava")
    cuts = count_stage_v_images("llava", monkeypatch)
    eng.enable_prefix_cache(64)
    image = images("llava")[0]
    settings = [flowcut_spec(), flowcut_spec(history=0.25), flowcut_spec(), flowcut_spec(history=0.25)]
    results = [eng.generate([Request("Is there a dog?", [image])], s)[0] for s in settings]
    assert cuts == [1, 1]  # the first two; the last two take their own setting's entry
    assert eng.prefix_cache.stats.pruned_entries == 2
    assert results[2].pruning == results[0].pruning and results[3].pruning == results[1].pruning
    budget = flowcut_spec()
    budget.budget = 0.5
    eng.generate([Request("Is there a dog?", [image])], budget)
    assert cuts == [1, 1, 1] and eng.prefix_cache.stats.pruned_entries == 3


def test_the_reference_batch_coupling_is_never_cached(monkeypatch):
    """With the reference's batch-wide prune count a row's cut depends on its batch: no entry is kept."""
    eng = engine("llava")
    cuts = count_stage_v_images("llava", monkeypatch)
    spec = flowcut_spec(reference_batch_coupling=True)
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn("llava"), second_turn("llava")])
    assert_same_pruning(fresh1 + fresh2, cached1 + cached2)
    assert cuts == [2, 5, 2, 5] and eng.prefix_cache.stats.pruned_entries == 0
    flowcut = PRUNERS.get("flowcut")
    assert flowcut(flowcut.Params(reference_batch_coupling=True), 8).vision_cache_key() is None
    assert flowcut(flowcut.Params(), 8).vision_cache_key() is not None


@pytest.mark.parametrize("decoding", ["lqcd", "vcd"])
def test_a_decoders_rows_with_the_requests_image_take_its_cut_its_noised_view_is_cut_on_its_own(decoding,
                                                                                                monkeypatch):
    """LQCD's branch rows carry the request's own image: they take the main row's cut, in the batch and from the
    cache. VCD's noised copy is another image, cut on its own evidence, and kept too (its branch asks the cache to
    keep its rows: the noise is seeded by the image), so the next turn cuts neither."""
    eng = engine("llava")
    cuts = count_stage_v_images("llava", monkeypatch)
    spec = GenerationSpec(pruning="flowcut", budget=0.5, decoding=decoding, max_new_tokens=4, logprobs=1)
    turn = [Request("Is there a dog in the image?", [images("llava")[0]])]
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [turn, turn])
    assert_same_pruning(fresh1 + fresh2, cached1 + cached2)
    assert cuts == ([1, 1, 1] if decoding == "lqcd" else [2, 2, 2]), cuts
    assert eng.prefix_cache.stats.pruned_entries == (1 if decoding == "lqcd" else 2)


def test_requests_about_one_image_in_a_batch_share_its_cut_without_a_cache(monkeypatch):
    """POPE asks six questions about each image: stage V cuts it once, and each request gets what it gets alone
    (its tokens, kept indices, ViT schedule and heatmap)."""
    eng = engine("llava")
    cuts = count_stage_v_images("llava", monkeypatch)
    a, b, _ = images("llava")
    batch = [Request("Is there a dog?", [a]), Request("Is there a cat?", [b]), Request("Is there a car?", [a]),
             Request("a cat", []), Request("Is there a bus?", [a])]
    spec = flowcut_spec()
    together = eng.generate(batch, spec)
    assert cuts == [2], cuts
    alone = [eng.generate([r], spec)[0] for r in batch]
    assert_same_pruning(alone, together)
    assert together[0].pruning["visual_scores"] == together[2].pruning["visual_scores"]


def test_the_random_baseline_takes_the_towers_cached_output(monkeypatch):
    """``random`` samples the tower's output (``PruneContext.image_features``): a cached image's tower does not
    run again."""
    eng = engine("llava")
    towers = count_tower_images(eng, monkeypatch)
    spec = GenerationSpec(pruning="random", budget=8, max_new_tokens=4, logprobs=1)
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn("llava"), second_turn("llava")])
    assert_same_pruning(fresh1 + fresh2, cached1 + cached2)
    assert towers == [2, 3, 2, 1], towers  # each distinct image once; cached: the new image only
    assert eng.prefix_cache.stats.image_hits == 2 and eng.prefix_cache.stats.pruned_entries == 0


def test_merge_report_sets_each_rows_entries_beside_the_rows_own():
    into = {"per_row": {0: {"vision_patches": [4]}}, "stage": 1}
    merge_report(into, {"per_row": {0: {"visual_scores": [0.7]}, 2: {"x": 1}}, "stage": 2})
    assert into == {"per_row": {0: {"vision_patches": [4], "visual_scores": [0.7]}, 2: {"x": 1}}, "stage": 2}
