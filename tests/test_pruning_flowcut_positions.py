"""FlowCut's positions (spec section 2, invariant 7).

``position_mode="compact"`` (default, the reference): on LLaVA-NeXT the stage-L cut at decoder layer 1 renumbers the
survivors, so layers >= 2 see contiguous positions (== transformers run on the physically shortened sequence after
layer 1's cut) and decode N_vis - K positions below layers 0-1; cached decode == uncached recompute; batched == one
by one; a joiner gets what it gets alone. ``position_mode="original"`` and Qwen2-VL (M-RoPE, any mode) are the old
behaviour bit for bit: the engine used to renumber only for ``position_mode == "renumber"``, which is the base
``Pruner.renumbers_llm_cuts`` (patched in below as the "old" engine).
"""
from __future__ import annotations

import pytest
import torch

from pruning_support import (check_batched_equals_alone, check_joined_equals_alone,
                             check_positions_are_cache_lengths, first_step_logits, only_layers, prefill,
                             renumbered_decode_vs_replay, requests, sharp_engine)
from test_pruning_positions import IMAGE_REQS, TEXT_REQ
from vlmguard.pruning import make_pruner
from vlmguard.pruning.base import Pruner
from vlmguard.pruning.flowcut import FlowCutPruner
from vlmguard.runner import LayerRunner
from vlmguard.spec import GenerationSpec
from vlmguard.testing import tiny_engine

BUDGET = 6  # the tiny LLaVA-NeXT's stage V keeps 3 per crop (up to ~12 visual tokens); stage L cuts to 6


def spec_for(mode: str | None = None, max_new_tokens: int = 4, budget=BUDGET, **params) -> GenerationSpec:
    p = {**params, **({"position_mode": mode} if mode else {})}
    return GenerationSpec(pruning="flowcut", budget=budget, max_new_tokens=max_new_tokens, pruning_params=p)


def old_engine(monkeypatch) -> None:
    """The engine before this change: LLM-side cuts renumbered only for ``position_mode == "renumber"`` (the base
    ``Pruner.renumbers_llm_cuts``), so FlowCut's stage L kept the positions layers 0-1 saw."""
    monkeypatch.setattr(FlowCutPruner, "renumbers_llm_cuts", Pruner.renumbers_llm_cuts)


def record_prefill(engine, monkeypatch) -> list[tuple]:
    """Record each prefill's input sequence and its ``renumber`` flag."""
    calls = []
    real = LayerRunner.prefill

    def prefill_(self, seq, *args, **kwargs):
        calls.append((seq, kwargs.get("renumber", False)))
        return real(self, seq, *args, **kwargs)

    monkeypatch.setattr(LayerRunner, "prefill", prefill_)
    return calls


def record_rope_positions(engine, monkeypatch) -> list[torch.Tensor]:
    """Record the positions every ``adapter.rotary`` call gets (prefill: once, then once after each cut)."""
    calls = []
    real = engine.adapter.rotary

    def rotary(h, positions):
        calls.append(positions.clone())
        return real(h, positions)

    monkeypatch.setattr(engine.adapter, "rotary", rotary)
    return calls


def test_flowcut_says_when_its_llm_cut_renumbers():
    compact, original = make_pruner("flowcut", 6, None), make_pruner("flowcut", 6, {"position_mode": "original"})
    assert compact.renumbers_llm_cuts("llava_next") and compact.renumbers_llm_cuts("llava")  # llava: no stage L
    assert not compact.renumbers_llm_cuts("qwen2_vl")  # M-RoPE keeps its positions
    assert not any(original.renumbers_llm_cuts(f) for f in ("llava", "llava_next", "qwen2_vl"))
    # the others: the base rule (AdaptInfer renumbers only when asked to, FastV never)
    assert make_pruner("adaptinfer", 3, {"position_mode": "renumber"}).renumbers_llm_cuts("llava_next")
    assert not make_pruner("adaptinfer", 3, {}).renumbers_llm_cuts("llava_next")
    assert not make_pruner("fastv", 3, {}).renumbers_llm_cuts("llava_next")


# ---- (a) invariant 7: layers >= 2 see contiguous positions == transformers on the shortened input --------------
def shortened_after_stage_l(engine, seq, kept_l: list[int], llm_layer: int = 1) -> torch.Tensor:
    """Last-position logits (V,) of transformers' own language model: layers 0..llm_layer on the stage-V sequence as
    a new input (positions 0..n-1, transformers' default), then the stage-L survivors as a *new, shorter input*
    through the remaining layers."""
    model = engine.model
    lm = model.model.language_model
    valid = seq.valid[0]
    h, visual = seq.hidden[:, valid], seq.visual[0, valid]
    with torch.no_grad(), only_layers(lm, 0, llm_layer + 1, final=False):
        h = lm(inputs_embeds=h, use_cache=False).last_hidden_state
    keep = (visual < 0) | torch.isin(visual, torch.tensor(kept_l, device=visual.device))
    with torch.no_grad(), only_layers(lm, llm_layer + 1, None, final=True):
        h = lm(inputs_embeds=h[:, keep], use_cache=False).last_hidden_state
        return model.lm_head(h[:, -1])[0].float()


@pytest.mark.parametrize("req_index", [0, 2])
def test_next_stage_l_equals_transformers_on_the_shortened_input(req_index, monkeypatch):
    eng = sharp_engine("llava_next")
    req = requests()[req_index]
    with monkeypatch.context() as m:
        calls = record_prefill(eng, m)
        ropes = record_rope_positions(eng, m)
        logits, state, (report,) = prefill(eng, [req], spec_for())
    (seq, renumber), = calls
    assert renumber
    n = int(seq.valid.sum())
    n_vis = int(seq.visual_mask().sum())  # the stage-V span layers 0-1 see
    kept_l = report["flowcut_llm_kept"][1][0]
    assert len(kept_l) == BUDGET < n_vis  # stage L did cut
    # stage V: contiguous positions (compact); stage L: contiguous again over the survivors (invariant 7)
    assert [p.tolist() for p in ropes] == [[list(range(n))], [list(range(n - n_vis + BUDGET))]]
    ref = shortened_after_stage_l(eng, seq, kept_l)
    assert (logits[0] - ref).abs().max().item() < 1e-5
    # decoding: layers 0-1 continue from the stage-V numbering, layers >= 2 N_vis - K lower (spec section 2)
    check_positions_are_cache_lengths(state)
    assert [int(p[0]) for p in state.layer_next_positions] == [n, n] + [n - (n_vis - BUDGET)] * (len(eng.adapter.layers) - 2)
    # the old rule (layers >= 2 keep the gaps) is a different computation, on the same layer-1 decision
    with monkeypatch.context() as m:
        old_engine(m)
        old, old_state, (old_report,) = prefill(eng, [req], spec_for())
    assert old_report["flowcut_llm_kept"] == report["flowcut_llm_kept"]
    assert old_state.layer_next_positions is None
    assert (old[0] - ref).abs().max().item() > 1e-3


# ---- (b) cached decode == uncached recompute ---------------------------------------------------------------
def test_next_cached_decode_equals_uncached_recompute(monkeypatch):
    """Decode step t feeds layers 0-1 position n + t and layers >= 2 position n - (N_vis - K) + t; an uncached
    prefill of prompt + generated tokens with the same (frozen) stage-L cut numbers them the same way."""
    eng = sharp_engine("llava_next")
    req, steps = requests()[0], 3
    spec = spec_for(max_new_tokens=steps + 2)
    stages, cached, replays = renumbered_decode_vs_replay(eng, req, spec, monkeypatch, "flowcut_llm_kept", steps)
    assert stages[1][0] is not None  # stage L cut
    for t, (uncached, state) in enumerate(replays, start=1):
        assert state.layer_next_positions is not None  # the replay renumbers as FlowCut does
        assert (uncached - cached[t]).abs().max().item() < 1e-4
    # the decode positions matter: the old rule's cached logits are elsewhere
    with monkeypatch.context() as m:
        old_engine(m)
        assert (first_step_logits(eng, req, spec) - cached[1]).abs().max().item() > 1e-3


# ---- (c) batched == one by one; a joiner == alone -----------------------------------------------------------
def test_next_batched_equals_one_by_one():
    eng = sharp_engine("llava_next")
    reqs = requests()  # different prompt and image lengths: left padding, different N_vis per row
    spec = spec_for(max_new_tokens=5)
    _, _, reports = prefill(eng, reqs, spec)
    cut = [report["flowcut_llm_kept"][1][0] is not None for report in reports]  # each request's own row
    assert cut.count(True) >= 2 and not all(cut)  # row 1's stage V leaves K after unpadding: no stage-L cut
    check_batched_equals_alone(eng, reqs, spec)


@pytest.mark.parametrize("first,later", [(requests(), IMAGE_REQS + [TEXT_REQ]), ([TEXT_REQ], IMAGE_REQS)],
                         ids=["pruned+mixed", "text+pruned"])
def test_next_joined_requests_get_what_they_get_alone(first, later):
    eng = sharp_engine("llava_next")
    spec = spec_for(max_new_tokens=6)
    check_joined_equals_alone(eng, spec, first, later)


# ---- (d) "original" and (e) Qwen2-VL: the old behaviour bit for bit ---------------------------------------------
def assert_same_as_old_engine(eng, spec: GenerationSpec, monkeypatch) -> None:
    reqs = requests()
    with monkeypatch.context() as m:
        calls = record_prefill(eng, m)
        logits, state, reports = prefill(eng, reqs, spec)
        out = eng.generate(reqs, spec)
    assert not any(renumber for _, renumber in calls) and state.layer_next_positions is None
    with monkeypatch.context() as m:
        old_engine(m)
        old_logits, _, old_reports = prefill(eng, reqs, spec)
        old = eng.generate(reqs, spec)
    assert torch.equal(logits, old_logits) and reports == old_reports
    assert [r.token_ids for r in out] == [r.token_ids for r in old]
    assert [r.kept_indices for r in out] == [r.kept_indices for r in old]
    assert [[s.main_prob for s in r.steps] for r in out] == [[s.main_prob for s in r.steps] for r in old]


@pytest.mark.parametrize("budget", [4, BUDGET])
def test_next_original_is_the_old_behaviour_bit_for_bit(budget, monkeypatch):
    eng = sharp_engine("llava_next")
    assert_same_as_old_engine(eng, spec_for("original", budget=budget), monkeypatch)
    # every layer sees the unpruned positions: the decode position is the full prompt's length
    _, state, (report,) = prefill(eng, requests()[:1], spec_for("original", budget=budget))
    assert report["flowcut_llm_kept"][1][0] is not None
    full = eng.adapter.encode(eng._prompts(requests()[:1])).input_ids.shape[1]
    assert state.next_positions.tolist() == [full]


@pytest.mark.parametrize("params", [{}, {"position_mode": "original"}, {"qwen_vit_keep": 0}],
                         ids=["compact", "original", "stage-L-only"])
def test_qwen2_vl_is_unchanged_bit_for_bit(params, monkeypatch):
    eng = tiny_engine("qwen2_vl")
    spec = spec_for(budget=2, **params)
    _, _, reports = prefill(eng, requests(), spec)
    assert any(report["flowcut_llm_kept"][1][0] is not None for report in reports)  # stage L cut
    assert_same_as_old_engine(eng, spec, monkeypatch)
