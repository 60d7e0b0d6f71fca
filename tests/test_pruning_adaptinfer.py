"""AdaptInfer: cheap text-row scores == eager full-matrix scores, the prior's algebra, reduction to FastV,
schedules (official table, accounting, tiny labels), stage nesting, and the offline analysis command."""
from __future__ import annotations

import json

import pytest
import torch

from pruning_support import requests
from vlmguard.cli import main as cli_main
from vlmguard.engine import Engine
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.pruning.adaptinfer import text_prior_scores
from vlmguard.pruning.adaptinfer_schedule import (OFFICIAL_KEEPS_7B, OFFICIAL_LAYERS_7B, actual_average,
                                                  make_schedule, official_average, pruned_layers_average)
from vlmguard.pruning.analysis import change_point, pick_peaks
from vlmguard.pruning.scores import pad_rows, text_after_vision, top_sorted
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine, tiny_llava, tiny_qwen2_vl

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


@pytest.mark.parametrize("builder", [tiny_llava, tiny_qwen2_vl])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_cheap_text_rows_equal_eager_full_matrix(builder, lam):
    model, proc = builder(attn="eager")
    eng = Engine(model, proc, attn_implementation="vlmguard_sdpa")
    model.set_attn_implementation("vlmguard_sdpa")
    prompts = [Prompt("Is there a dog in the image?", [random_image(1, (40, 32))]),
               Prompt("what color is the car", [random_image(3, (64, 40))])]
    texts = {}

    def rows(seq):
        t = [text_after_vision(seq, r) for r in range(seq.batch_size)]
        texts["t"] = t
        return pad_rows(t, seq.length - 1)

    layers = [0, 2]
    probe = eng.probe_forward(prompts, score_layers=layers, query_rows=rows, per_head=True)
    batch = eng.adapter.encode(prompts)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True,
                    **batch.vision_inputs)
    model.set_attn_implementation("vlmguard_sdpa")
    vis = batch.image_token_mask
    for layer in layers:
        for r in range(len(prompts)):
            t = texts["t"][r]
            pos = vis[r].nonzero().squeeze(1)
            full = out.attentions[layer][r].float()  # (H, L, L), the oracle
            s_ref, w_ref = text_prior_scores(full[:, t, :], t, pos, lam)
            s, w = text_prior_scores(probe["scores"][layer][r, :, : t.numel()], t, pos, lam)
            assert (w - w_ref).abs().max().item() < 1e-5
            assert (s - s_ref).abs().max().item() < 1e-5
            assert torch.equal(top_sorted(s, 5), top_sorted(s_ref, 5))


def test_prior_algebra():
    torch.manual_seed(0)
    h, t, n = 3, 5, 12
    logits = torch.randn(h, t, n)
    text = torch.arange(7, 12)
    causal = torch.arange(n)[None, :] <= text[:, None]
    a = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), dim=-1)
    m = a[:, :, text]
    s_mat = m + m.transpose(1, 2) - torch.diag_embed(m.diagonal(dim1=1, dim2=2))
    assert torch.allclose(s_mat, s_mat.transpose(1, 2))
    _, w = text_prior_scores(a, text, torch.arange(1, 7), lam=1.0)
    assert torch.allclose(w, s_mat.sum(dim=1), atol=1e-6)  # column-sum + row-sum - diagonal == rows of S
    # lam = 0: uniform prior -> score proportional to the head-summed attention
    s0, _ = text_prior_scores(a, text, torch.arange(1, 7), lam=0.0)
    ref = a[:, :, 1:7].sum(dim=(0, 1))
    assert torch.allclose(s0 / s0.sum(), ref / ref.sum(), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduces_exactly_to_fastv(family):
    eng = tiny_engine(family)
    for k in (2, 3):
        fast = eng.generate(requests(), GenerationSpec(pruning="fastv", budget=k, max_new_tokens=3))
        ada = eng.generate(requests(), GenerationSpec(pruning="adaptinfer", budget=k, max_new_tokens=3,
                                                      pruning_params={"lam": 0.0, "text_query": "last",
                                                                      "layers": [1], "keeps": [k]}))
        for f, a in zip(fast, ada):
            assert a.kept_indices == f.kept_indices
            assert a.visual_tokens_kept == f.visual_tokens_kept
            assert a.token_ids == f.token_ids


def test_stages_nest_and_counts_follow_schedule():
    eng = tiny_engine("llava_next")
    res = eng.generate(requests()[1:2], GenerationSpec(pruning="adaptinfer", budget=20, max_new_tokens=1,
                                                       pruning_params={"layers": [0, 2], "keeps": [30, 9]}))[0]
    stages = {int(k): v[0] for k, v in res.pruning["adaptinfer_kept"].items()}
    assert len(stages[0]) == 30 and len(stages[2]) == 9
    assert set(stages[2]) <= set(stages[0])
    assert stages[2] == res.kept_indices
    assert res.visual_tokens_kept == [res.visual_tokens, 30, 30, 9]


def test_official_schedule_and_accounting():
    for label, off, act in ((128, 128.8, 146.2), (64, 65.0, 82.9)):
        sched = make_schedule(family="llava", n_layers=32, hidden=4096, n_visual=576, budget=label)
        assert sched.layers == OFFICIAL_LAYERS_7B and sched.keeps == OFFICIAL_KEEPS_7B[label]
        assert round(sched.official_average, 1) == off
        assert round(sched.actual_average, 1) == act
    # a stage with k >= the tokens present is skipped
    assert official_average((1, 2), (600, 10), 576, 4) == (576 + 576 + 2 * 10) / 4


def test_qwen2_vl_2b_presets():
    """Qwen2-VL-2B (28 layers x 1536): the official port's layers (0, 9, 19) and per-stage ratios of the current
    count for the 10 / 30 / 50% labels (spec 2.2: they average 10.1 / 29.7 / 51.1% of V under the official
    accounting); other budgets get the same layers with keep counts solved for them, other 28-layer models
    (Qwen2-VL-7B, width 3584) the relative-depth layers."""
    v = 1000
    for label, ratios, share in ((100, (0.17, 0.60, 0.30), 10.1), (300, (0.50, 0.60, 0.30), 29.7),
                                 (500, (0.70, 0.90, 0.30), 51.1)):
        sched = make_schedule(family="qwen2_vl", n_layers=28, hidden=1536, n_visual=v, budget=label)
        k1 = int(ratios[0] * v)
        k2 = int(ratios[1] * k1)
        assert sched.source == "official-qwen2-vl-2b" and sched.layers == (0, 9, 19)
        assert sched.keeps == (k1, k2, int(ratios[2] * k2))
        assert abs(100 * sched.official_average / v - share) < 0.3
    assert make_schedule(family="qwen2_vl", n_layers=28, hidden=1536, n_visual=256, budget=26).keeps == (43, 25, 7)
    other = make_schedule(family="qwen2_vl", n_layers=28, hidden=1536, n_visual=v, budget=200)
    assert other.source == "official-qwen2-vl-2b-layers" and other.layers == (0, 9, 19)
    assert abs(other.official_average - 200) <= 1
    assert make_schedule(family="qwen2_vl", n_layers=28, hidden=3584, n_visual=v, budget=100).source == "relative-depth"


@pytest.mark.parametrize("n_layers,n_visual", [(32, 576), (8, 144), (4, 144)])
def test_every_budget_is_hit_within_one_token(n_layers, n_visual):
    """Invariant 9 for labels of every size: a budget above the largest official row (192 of 576) once stopped
    at about 41% of V (256, 288 or 400 of 576 all gave an average of 237.8), silently. Below the average of
    the layers before the first cut, which see every token, the schedule keeps as few tokens as it can."""
    layers = make_schedule(family="llava", n_layers=n_layers, hidden=64, n_visual=n_visual, budget=1).layers
    official = layers[0] / n_layers < 64 / 576
    average = official_average if official else pruned_layers_average
    floor = layers[0] * n_visual / n_layers if official else 0
    for budget in range(1, n_visual, max(1, n_visual // 60)):
        sched = make_schedule(family="llava", n_layers=n_layers, hidden=64, n_visual=n_visual, budget=budget)
        got = average(sched.layers, sched.keeps, n_visual, n_layers)
        assert abs(got - max(budget, floor)) <= 1, (budget, sched)
        assert list(sched.keeps) == sorted(sched.keeps, reverse=True)


@pytest.mark.parametrize("layers", [(0, 2), (1, 2)])
def test_tiny_labels_hit_within_one_token(layers):
    prev = None
    for label in (48, 32, 16):  # 576 -> 192/128/64 is 144 -> 48/32/16
        sched = make_schedule(family="llava", n_layers=4, hidden=256, n_visual=144, budget=label, layers=layers)
        avg = official_average(sched.layers, sched.keeps, 144, 4) if layers[0] == 0 else \
            pruned_layers_average(sched.layers, sched.keeps, 144, 4)
        assert abs(avg - label) <= 1
        assert actual_average(sched.layers, sched.keeps, 144, 4) >= avg
        if prev is not None:
            assert all(a <= b for a, b in zip(sched.keeps, prev))  # smaller label -> fewer tokens
        prev = sched.keeps


def test_change_point_matches_brute_force():
    torch.manual_seed(1)
    for _ in range(20):
        curve = torch.randn(9).cumsum(0)
        b = change_point(curve)
        costs = {k: float(((curve[:k] - curve[:k].mean()) ** 2).sum() + ((curve[k:] - curve[k:].mean()) ** 2).sum())
                 for k in range(2, 8)}
        assert b == min(costs, key=lambda k: (costs[k], k))
    assert change_point(torch.arange(3.0)) is None  # shorter than two segments of 2


def test_pick_peaks_spacing_and_fill():
    hist = [0, 50, 45, 0, 0, 0, 0, 0, 0, 30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert pick_peaks(hist, 32, 3) == [1, 9, 20]
    assert pick_peaks([0, 10, 0, 0], 4, 2) == [1, 2]  # one peak, filled from the relative-depth rule
    # L = 28: peaks at least 28 / 8 = 3.5 layers apart, so 12 (3 from 9) is passed over for 13, the
    # smoothed plateau's next bin (the integer gap 28 // 8 = 3 took 12)
    hist28 = [0] * 28
    hist28[9], hist28[12], hist28[20] = 50, 40, 30
    assert pick_peaks(hist28, 28, 2) == [9, 13]


def test_analyze_command_writes_a_usable_schedule(tmp_path, capsys):
    out = tmp_path / "sched.json"
    rc = cli_main(["prune", "analyze", "--model", "random:llava", "--samples", "3", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = json.loads(out.read_text())
    assert data["layers"] == summary["layers"] and len(data["layers"]) == 2
    assert sum(data["histogram"]) > 0 and data["n_visual"] == 16
    eng = tiny_engine("llava")
    budget = int(next(iter(data["keeps"])))
    res = eng.generate(requests()[:1], GenerationSpec(pruning="adaptinfer", budget=budget, max_new_tokens=1,
                                                      pruning_params={"schedule": str(out)}))[0]
    sched = res.pruning["adaptinfer_schedule"][0]
    assert list(sched["layers"]) == data["layers"] and list(sched["keeps"]) == data["keeps"][str(budget)]
    assert rc == 0 and cli_main(["prune", "analyze", "--model", "random:llava", "--samples", "0"]) == 2


@pytest.mark.parametrize("content, needle", [
    ({"layers": [1], "keeps": "x"}, "'keeps' must map budgets to lists of integers"),
    ({"layers": "x"}, "'layers' must be a non-empty list of integers"),
    ({"layers": [0, 1], "n_visual": "many"}, "'n_visual' must be a positive integer"),
    ([1, 2], "has no 'layers' list"),
])
def test_malformed_schedules_fail_when_the_spec_resolves(tmp_path, content, needle):
    """Before any model work, as one line naming the file (or the inline object) and the bad key."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(content))
    inline = [(content, "schedule")] if isinstance(content, dict) else []  # a non-object fails pydantic's type check
    for schedule, where in [(str(path), "schedule file")] + inline:
        with pytest.raises(InvalidInput, match=needle) as err:
            GenerationSpec(pruning="adaptinfer", budget=4, pruning_params={"schedule": schedule}).resolve()
        assert where in str(err.value)
    with pytest.raises(InvalidInput, match="cannot read schedule file"):
        GenerationSpec(pruning="adaptinfer", budget=4, pruning_params={"schedule": str(tmp_path)}).resolve()


def test_an_inline_schedule_equals_the_same_schedule_from_its_file(tmp_path):
    data = {"layers": [0, 2], "keeps": {"4": [8, 3]}, "n_visual": 16}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    eng = tiny_engine("llava")
    out = [eng.generate(requests()[:1], GenerationSpec(pruning="adaptinfer", budget=4, max_new_tokens=2,
                                                       pruning_params={"schedule": sched}))[0] for sched in (str(path), data)]
    assert out[0].token_ids == out[1].token_ids and out[0].visual_tokens_kept == out[1].visual_tokens_kept
    assert [o.pruning["adaptinfer_schedule"][0]["source"] for o in out] == [f"file:{path}", "inline"]
    assert list(out[1].pruning["adaptinfer_schedule"][0]["keeps"]) == [8, 3]
