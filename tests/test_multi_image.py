"""Requests with several images (the HTTP API allows up to four): FLOPs count every image's tower pass, a row's
int budget is shared by its images as docs/pruning.md says, and a multi-image request batched with single-image
and text-only requests gets what it gets alone."""
from __future__ import annotations

import pytest

from vlmguard.engine import Request
from vlmguard.flops import result_flops
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

SIZES = [(64, 64), (32, 64), (40, 32)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared 2-core machine


def images():
    return [random_image(3 + j, s) for j, s in enumerate(SIZES)]


def test_llava_flops_count_one_tower_pass_per_image():
    """Regression: ``result_flops`` counted one CLIP pass for a LLaVA-1.5 request whatever its image count, so an
    unpruned 3-image request reported a third of its tower work (FlowCut's own schedule counted all three)."""
    eng = tiny_engine("llava")
    cfg = eng.model.config
    spec = GenerationSpec(max_new_tokens=1)
    ims = images()
    three = result_flops(cfg, eng.generate([Request("describe the photo", ims)], spec)[0])
    ones = [result_flops(cfg, eng.generate([Request("describe the photo", [im])], spec)[0]) for im in ims]
    assert three.vision == pytest.approx(sum(o.vision for o in ones))
    flow = eng.generate([Request("describe the photo", ims)], spec.model_copy(update={"pruning": "flowcut",
                                                                                       "budget": 47}))[0]
    assert len(flow.pruning["flowcut_vit_tokens_per_layer"]) == 3  # FlowCut reports its three passes
    assert 0.95 * three.vision < result_flops(cfg, flow).vision < three.vision  # 47 of 48: one token less, late


def test_int_budget_is_per_row_flowcut_splits_it_over_the_images_random_does_not():
    """docs/pruning.md, Budgets: FlowCut (LLaVA-1.5) splits K evenly over a row's images (earlier ones get the
    remainder); random samples K of the row's tokens, so an image may keep none."""
    eng = tiny_engine("llava")
    req = Request("describe the photo", images())  # 3 x 16 visual tokens

    def per_image(pruner, budget):
        r = eng.generate([req], GenerationSpec(pruning=pruner, budget=budget, max_new_tokens=1))[0]
        return [sum(16 * j <= x < 16 * (j + 1) for x in r.kept_indices) for j in range(3)]

    assert per_image("flowcut", 3) == [1, 1, 1]
    assert per_image("flowcut", 8) == [3, 3, 2]
    assert sum(per_image("random", 6)) == 6
    assert per_image("flowcut", 48) == per_image("random", 48) == [16, 16, 16]  # the total: nothing cut


@pytest.mark.parametrize("family,budget", [("llava", 8), ("llava_next", 8), ("qwen2_vl", 3), ("qwen2_vl", 0.25)])
def test_multi_image_request_batched_equals_alone(family, budget):
    eng = tiny_engine(family)
    reqs = [Request("Is there a dog in the image?", images()[:2]),
            Request("what color is the car", [random_image(6, (40, 32))]),
            Request("is there a cat", [])]
    for pruner in ("random", "fastv", "adaptinfer", "flowcut"):
        for decoder in ("greedy", "vcd"):
            spec = GenerationSpec(pruning=pruner, budget=budget, decoding=decoder, max_new_tokens=4)
            batched = eng.generate(reqs, spec)
            for b, req in zip(batched, reqs):
                a = eng.generate([req], spec)[0]
                what = f"{family} {pruner}@{budget} x {decoder}"
                assert b.token_ids == a.token_ids and b.kept_indices == a.kept_indices, what
                assert b.visual_tokens_kept == a.visual_tokens_kept, what
                assert [s.score for s in b.steps] == pytest.approx([s.score for s in a.steps], abs=1e-4), what
