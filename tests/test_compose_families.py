"""Every pruner x every decoder on the tiny LLaVA-NeXT and Qwen2-VL engines (test_decoding_compose.py covers
LLaVA-1.5): a batch of two images of different sizes (NeXT: different anyres crop counts; Qwen2-VL: different
grids) plus a text-only request gives every request what it gets alone, branch rows included; the streamed text
adds up to the result; requests joining a running batch and seeded sampling decode as alone."""
from __future__ import annotations

import pytest
import torch

from pruning_support import DECODER_PARAMS, check_joined_equals_alone, prefill
from vlmguard.engine import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

INT_BUDGET = {"llava_next": 8, "qwen2_vl": 3}  # below every image's visual tokens (NeXT 44 / 88, Qwen2-VL 4 / 16)
CASES = [(fam, "none", None) for fam in INT_BUDGET] + [
    (fam, p, b) for fam in INT_BUDGET for p in ("random", "fastv", "adaptinfer", "flowcut")
    for b in (INT_BUDGET[fam], 0.25)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared 2-core machine


def requests() -> list[Request]:
    return [Request("Is there a dog in the image?", [random_image(1, (40, 32))]),
            Request("describe the photo", [random_image(2, (64, 64))]),
            Request("what color is the car", [])]


def spec_of(pruner: str, budget, decoder: str, **kw) -> GenerationSpec:
    return GenerationSpec(pruning=pruner, budget=budget, decoding=decoder, decoding_params=DECODER_PARAMS[decoder],
                          max_new_tokens=5, **kw)


def row_views(engine, reqs, spec) -> list[list[tuple[list[int], list[int]]]]:
    """Per request, per row (main, then its branches): the visual indices the row ends with and the visual
    tokens each layer of the row saw, from the prefill."""
    _, state, _ = prefill(engine, reqs, spec)
    n = len(reqs)
    vis = state.final_seq.visual
    fed = torch.stack(state.visual_per_layer, dim=1).tolist()
    rows = range(vis.shape[0])
    return [[(sorted(vis[r][vis[r] >= 0].tolist()), fed[r]) for r in rows if r % n == j] for j in range(n)]


def assert_same(b, a, what: str) -> None:
    assert b.token_ids == a.token_ids and b.text == a.text, what
    assert b.kept_indices == a.kept_indices and b.visual_tokens_kept == a.visual_tokens_kept, what
    assert [s.main_prob for s in b.steps] == pytest.approx([s.main_prob for s in a.steps], abs=1e-6), what
    # a text-only request batched with image requests carries a (plain) copy of its prompt as the branch row,
    # alone it has none (docs/decoding.md, "How branches run"): its contrast diagnostic only exists batched
    if any(s.contrast_prob is not None for s in a.steps):
        assert [s.contrast_prob for s in b.steps] == pytest.approx([s.contrast_prob for s in a.steps], abs=1e-6), what
    assert [s.score for s in b.steps] == pytest.approx([s.score for s in a.steps], abs=1e-4), what


@pytest.mark.parametrize("family,pruner,budget", CASES)
def test_batched_equals_alone_and_stream_equals_result(family, pruner, budget):
    eng = tiny_engine(family)
    reqs = requests()
    for decoder in DECODER_PARAMS:
        spec = spec_of(pruner, budget, decoder)
        what = f"{family} {pruner}@{budget} x {decoder}"
        streamed, batched = ["", "", ""], [None, None, None]
        for ev in eng.stream(reqs, spec):
            streamed[ev.index] += ev.text
            if ev.done:
                batched[ev.index] = ev.result
        views = row_views(eng, reqs, spec)
        for i, req in enumerate(reqs):
            b = batched[i]
            assert streamed[i] == b.text, what
            a = eng.generate([req], spec)[0]
            assert_same(b, a, f"{what}, request {i}")
            if "applied" in b.decoding:
                assert b.decoding["applied"] == a.decoding["applied"], what  # its own entry, as alone
            # every row of the request (e.g. VCD's distorted view) sees the tokens it sees alone
            one = row_views(eng, [req], spec)[0]
            assert views[i][:len(one)] == one, f"{what}, request {i}: branch rows"


@pytest.mark.parametrize("family", list(INT_BUDGET))
@pytest.mark.parametrize("pruner", ["fastv", "flowcut"])
def test_joined_and_seeded_sampling_equal_alone(family, pruner):
    eng = tiny_engine(family)
    a, b, t = requests()
    for decoder in DECODER_PARAMS:
        spec = spec_of(pruner, 0.25, decoder)
        check_joined_equals_alone(eng, spec, [b, t], [a])
        sampled = spec.model_copy(update={"do_sample": True, "temperature": 0.9, "top_k": 20, "seed": 11})
        together = eng.generate([a, b, t], sampled)
        assert [r.token_ids for r in together] == [eng.generate([r], sampled)[0].token_ids for r in (a, b, t)]


def test_vcd_distorted_view_is_not_cut_by_a_batch_mates_flowcut_stage_l():
    """Regression: FlowCut on LLaVA-NeXT leaves a 2-crop image's row alone at stage L (floor(K/2) per crop
    already fits K), but a batch mate with more crops makes stage L run; the engine then shared the main row's
    (uncut) index set with VCD's distorted row, whose own stage-V selection differs, dropping the tokens not in
    both: the contrast changed with the batch (2 of its 10 tokens gone, score off by 8e-3)."""
    eng = tiny_engine("llava_next")
    a, b, _ = requests()
    spec = spec_of("flowcut", 0.25, "vcd")
    alone = row_views(eng, [a], spec)[0]
    assert len(alone[1][0]) == 10 and alone[1][0] != alone[0][0]  # the distorted view picked its own tokens
    assert row_views(eng, [a, b], spec)[0] == alone
    assert_same(eng.generate([a, b], spec)[0], eng.generate([a], spec)[0], "vcd x flowcut")


@pytest.mark.parametrize("family, budget", [("llava_next", 0.25), ("llava_next", 8), ("qwen2_vl", 3)])
def test_vcd_distorted_view_gets_flowcuts_budget_at_stage_l(family, budget):
    """After FlowCut's stage V picked the distorted view's own tokens, its stage-L cut is its own too, to the same
    budget as the main row (the engine used to keep only the tokens it shared with the main row's cut: 18 of
    22 on LLaVA-NeXT at 0.25, 5-6 of 8 at 8)."""
    eng = tiny_engine(family)
    _, b, _ = requests()
    main, distorted = row_views(eng, [b], spec_of("flowcut", budget, "vcd"))[0]
    assert distorted[1] == main[1]  # the same tokens per layer: stage V's count, then stage L's budget
    assert len(distorted[0]) == len(main[0]) == main[1][-1]
    assert distorted[0] != main[0]  # chosen on its own evidence
