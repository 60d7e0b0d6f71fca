"""AdaptInfer's position modes: ``preserve`` (default, original RoPE positions) and ``renumber`` (the official
LLaVA code: contiguous positions after each cut, every layer decodes at its own cache length).

renumber == transformers run on the physically shortened sequence after each cut; cached decode == uncached
recompute; batched == one by one; a request joining a running batch gets what it gets alone; Qwen2-VL (M-RoPE)
refuses it. The default stays bit-identical to ``preserve``.
"""
from __future__ import annotations

import pytest
import torch

from pruning_support import (check_batched_equals_alone, check_joined_equals_alone,
                             check_positions_are_cache_lengths, first_step_logits, only_layers, prefill,
                             renumbered_decode_vs_replay, requests, sharp_engine)
from vlmguard.engine import Engine, Request
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

STAGES = {"layers": [1, 2], "keeps": [8, 3]}  # two cuts in the 4-layer tiny models: three position groups


def spec_for(mode: str | None, max_new_tokens: int = 4, **params) -> GenerationSpec:
    p = {**STAGES, **params, **({"position_mode": mode} if mode else {})}
    return GenerationSpec(pruning="adaptinfer", budget=3, max_new_tokens=max_new_tokens, pruning_params=p)


# ---- (1) preserve is the default, bit for bit ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_preserve_is_the_default_bit_for_bit(family):
    eng = tiny_engine(family)
    base_logits, base_state, _ = prefill(eng, requests(), spec_for(None))
    logits, state, _ = prefill(eng, requests(), spec_for("preserve"))
    assert torch.equal(logits, base_logits)
    assert state.layer_next_positions is None and base_state.layer_next_positions is None
    base = eng.generate(requests(), spec_for(None))
    out = eng.generate(requests(), spec_for("preserve"))
    assert [r.token_ids for r in out] == [r.token_ids for r in base]
    assert [[s.main_prob for s in r.steps] for r in out] == [[s.main_prob for s in r.steps] for r in base]


def test_renumber_without_a_cut_is_exactly_unpruned():
    eng = tiny_engine("llava")
    req = requests()[1]
    base = eng.generate([req], GenerationSpec(max_new_tokens=4))[0]
    spec = GenerationSpec(pruning="adaptinfer", budget=base.visual_tokens, max_new_tokens=4,
                          pruning_params={"position_mode": "renumber"})
    res = eng.generate([req], spec)[0]
    assert res.token_ids == base.token_ids
    assert [s.main_prob for s in res.steps] == [s.main_prob for s in base.steps]


# ---- (2) renumber at prefill == transformers on the physically shortened input --------------------------------
def shortened_reference(engine: Engine, req: Request, kept: dict[int, list[int]]) -> torch.Tensor:
    """Last-position logits (V,) of transformers' own model: layers up to the first cut on the full input (the
    model's own vision path), then after each cut the survivors as a *new, shorter input* (positions 0..n-1,
    transformers' default), run through the following layers."""
    model = engine.model
    lm = model.model.language_model
    batch = engine.adapter.encode([Prompt(req.prompt, list(req.images))])
    cuts = sorted(kept)
    with torch.no_grad(), only_layers(lm, 0, cuts[0] + 1, final=False):
        h = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                        **batch.vision_inputs).last_hidden_state
    visual = torch.where(batch.image_token_mask[0], batch.image_token_mask[0].long().cumsum(0) - 1, -1)
    for j, layer in enumerate(cuts):
        keep = (visual < 0) | torch.isin(visual, torch.tensor(kept[layer]))
        h, visual = h[:, keep], visual[keep]
        stop = cuts[j + 1] + 1 if j + 1 < len(cuts) else None
        with torch.no_grad(), only_layers(lm, layer + 1, stop, final=stop is None):
            h = lm(inputs_embeds=h, use_cache=False).last_hidden_state
    with torch.no_grad():
        return model.lm_head(h[:, -1])[0].float()


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("stages", [{"layers": [2], "keeps": [5]}, STAGES], ids=["one-stage", "two-stages"])
def test_renumber_equals_transformers_on_the_shortened_input(family, stages):
    eng = sharp_engine(family)
    req = requests()[0]
    logits, state, (report,) = prefill(eng, [req], spec_for("renumber", **stages))
    kept = {int(k): v[0] for k, v in report["adaptinfer_kept"].items()}
    assert sorted(kept) == stages["layers"]
    ref = shortened_reference(eng, req, kept)
    assert (logits[0] - ref).abs().max().item() < 1e-5
    check_positions_are_cache_lengths(state)
    # preserve keeps the gaps: a different computation (so the comparison above means something)
    preserved, _, (report_p,) = prefill(eng, [req], spec_for("preserve", **stages))
    first = min(kept)  # the first cut decides on equal inputs (later ones need not: their inputs differ)
    assert report_p["adaptinfer_kept"][first] == report["adaptinfer_kept"][first]
    assert (preserved[0] - ref).abs().max().item() > 1e-3


# ---- (3) cached decode == uncached recompute ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_renumber_cached_decode_equals_uncached_recompute(family, monkeypatch):
    """Each decode step feeds layer group g position n_g + t; an uncached prefill of prompt + generated tokens
    with the same (frozen) cuts numbers them the same way, so logits agree at every step."""
    eng = sharp_engine(family)
    req, steps = requests()[0], 3
    _, cached, replays = renumbered_decode_vs_replay(eng, req, spec_for("renumber", max_new_tokens=steps + 2),
                                                     monkeypatch, "adaptinfer_kept", steps)
    for t, (uncached, _) in enumerate(replays, start=1):
        assert (uncached - cached[t]).abs().max().item() < 1e-4
    # the decode positions matter: preserve's cached logits are elsewhere
    preserved = first_step_logits(eng, req, spec_for("preserve", max_new_tokens=steps + 2))
    assert (preserved - cached[1]).abs().max().item() > 1e-3


# ---- (4) batched == one by one ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_renumber_batched_equals_one_by_one(family):
    eng = sharp_engine(family)
    reqs = requests()  # different prompt (and, for LLaVA-NeXT, image) lengths: left padding
    spec = spec_for("renumber", max_new_tokens=5)
    batched = check_batched_equals_alone(eng, reqs, spec)
    assert [r.token_ids for r in batched] != [r.token_ids for r in eng.generate(reqs, spec_for("preserve", 5))]


# ---- (5) in-flight batching ---------------------------------------------------------------------------------
IMAGE_REQS = [Request(p, [random_image(i + 5, s)], request_id=f"r{i}") for i, (p, s) in
              enumerate([("count the cats", (48, 48)), ("hi", (36, 52))])]
TEXT_REQ = Request("what color is the car", request_id="text")


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("first,later", [
    (requests(), IMAGE_REQS + [TEXT_REQ]),  # pruned rows join pruned rows (and an uncut text-only row)
    (requests()[:2], [TEXT_REQ]),  # an uncut batch (one numbering) joins per-layer numberings
    ([TEXT_REQ], IMAGE_REQS),  # per-layer numberings join an uncut batch
], ids=["pruned+mixed", "pruned+text", "text+pruned"])
def test_renumber_joined_requests_get_what_they_get_alone(family, first, later):
    eng = sharp_engine(family)
    spec = spec_for("renumber", max_new_tokens=6)
    check_joined_equals_alone(eng, spec, first, later)


def test_merged_state_shares_one_position_tensor_per_group():
    """Layers of one stage group share one position tensor (rope once per group per step), also after a merge of
    states whose groupings differ and after rows leave."""
    eng = tiny_engine("llava")
    spec = spec_for("renumber", max_new_tokens=6)
    batch = eng.start_batch(requests()[:2], spec)
    try:
        assert len({id(p) for p in batch.state.layer_next_positions}) == 3  # layers 0-1 | 2 | 3
        batch.absorb(eng.start_batch([TEXT_REQ], spec, indices=[2]))  # one numbering for all its layers
        assert len({id(p) for p in batch.state.layer_next_positions}) == 3
        list(batch.advance())
        check_positions_are_cache_lengths(batch.state)
        batch.drop({0})
        assert len({id(p) for p in batch.state.layer_next_positions}) == 3
        check_positions_are_cache_lengths(batch.state)
    finally:
        batch.close()


# ---- (6) validation -----------------------------------------------------------------------------------------
def test_qwen2_vl_refuses_renumber():
    eng = tiny_engine("qwen2_vl")
    with pytest.raises(InvalidInput, match="position_mode='renumber' needs 1-D RoPE positions.*qwen2_vl"):
        eng.generate(requests()[:1], spec_for("renumber"))
    eng.generate(requests()[:1], spec_for("preserve", max_new_tokens=1))  # the default runs


def test_unknown_position_mode_is_refused():
    with pytest.raises(InvalidInput, match="position_mode"):
        spec_for("compact").resolve()
