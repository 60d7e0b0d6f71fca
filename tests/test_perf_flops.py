"""The analytic FLOP model in the convention of the ideal speed-ups (``HARDWARE``), checked against
hand-computed LLaVA-1.5-7B figures, and its two conventions against each other."""
from __future__ import annotations

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from vlmguard.flops import (HARDWARE, PAPER, TextDims, batch_prefill_flops, llm_flops, llm_layer_flops,
                            vit_layer_flops)


def llava15_7b_config() -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)


def test_llm_linear_flops_are_two_per_parameter_per_token():
    cfg = llava15_7b_config().text_config
    layer_params = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q, k, v, o + gate, up, down
    one_token = llm_flops(cfg, [1] * 32, HARDWARE)
    attention_one_token = 32 * 4 * 4096  # QK^T + AV against the single visible key
    assert one_token == pytest.approx(2 * 32 * layer_params + 2 * 4096 * 32064 + attention_one_token)


def test_attention_term_is_causal():
    # n tokens see n(n+1)/2 keys in total
    dims = TextDims(hidden=64, q_width=64, kv_width=32, mlp=128, vocab=100)  # 4 heads of 16, 2 kv heads
    lin = llm_layer_flops(1, dims, HARDWARE) - 4 * 64 * 1
    n = 10
    assert llm_layer_flops(n, dims, HARDWARE) == pytest.approx(n * lin + 4 * 64 * n * (n + 1) / 2)
    assert vit_layer_flops(n, 32, 64, HARDWARE) == pytest.approx(2 * n * (4 * 32 * 32 + 2 * 32 * 64) + 4 * n * n * 32)


def test_paper_convention_counts_macs_full_attention_and_no_lm_head():
    dims = TextDims(hidden=64, q_width=64, kv_width=32, mlp=128, vocab=100)
    n = 10
    linear_macs = n * 64 * (2 * 64 + 2 * 32) + 3 * n * 64 * 128
    assert llm_layer_flops(n, dims, PAPER) == linear_macs + 2 * n * n * 64
    assert llm_layer_flops(n, dims, HARDWARE) == 2 * (linear_macs + 2 * 64 * n * (n + 1) / 2)
    assert vit_layer_flops(n, 32, 64, HARDWARE) == 2 * vit_layer_flops(n, 32, 64, PAPER)
    cfg = llava15_7b_config()
    paper = batch_prefill_flops(cfg, "llava", [(40, [576] * 32)], n_passes=1, n_visual_total=576, conv=PAPER)
    hard = batch_prefill_flops(cfg, "llava", [(40, [576] * 32)], n_passes=1, n_visual_total=576, conv=HARDWARE)
    assert hard.vision == 2 * paper.vision and hard.projector == 2 * paper.projector  # no causal term there
    assert hard.llm < 2 * paper.llm  # causal attention halves the n^2 term, more than the lm_head adds


def test_llava15_prefill_split_and_ideal_speedup():
    cfg = llava15_7b_config()
    text = 40
    full = batch_prefill_flops(cfg, "llava", [(text, [576] * 32)], n_passes=1, n_visual_total=576, conv=HARDWARE)
    # ViT-L/14-336: 24 layers on 577 tokens, ~0.35 TFLOPs; the LLM dominates (~8 TFLOPs)
    assert 0.3e12 < full.vision < 0.45e12
    assert 7.5e12 < full.llm < 9e12
    assert full.total == pytest.approx(full.vision + full.projector + full.llm)
    pruned = batch_prefill_flops(cfg, "llava", [(text, [64] * 32)], n_passes=1, n_visual_total=576,
                                 projected_tokens=64, conv=HARDWARE)
    ideal = full.total / pruned.total
    assert 3.5 < ideal < 5.0  # 616 -> 104 LLM tokens, the ViT unchanged
    # a vision-side schedule that stops early and shrinks costs less in the tower
    sched = [[577, 577] + [65] * 21]
    early = batch_prefill_flops(cfg, "llava", [(text, [64] * 32)], n_passes=1, n_visual_total=576,
                                vit_passes=sched, projected_tokens=64, conv=HARDWARE)
    assert early.vision < pruned.vision / 3


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_every_result_reports_its_prefill_flops(family):
    """Issue 3: results report the analytic FLOPs of the tokens actually fed, by the formula in docs/pruning.md
    (``result_flops``, PAPER convention), for every pruner; pruning lowers them."""
    from vlmguard.engine import Request
    from vlmguard.flops import result_flops
    from vlmguard.spec import GenerationSpec
    from vlmguard.testing import random_image, tiny_engine

    eng = tiny_engine(family)
    req = [Request("Is there a dog in the image?", [random_image(1, (64, 48))]), Request("what is this", [])]
    budget = {"llava": 8, "llava_next": 8, "qwen2_vl": 3}[family]
    totals = {}
    for pruner in ("none", "random", "fastv", "adaptinfer", "flowcut"):
        spec = GenerationSpec(pruning=pruner, budget=None if pruner == "none" else budget, max_new_tokens=2)
        for r in eng.generate(req, spec):
            assert r.prefill_flops == result_flops(eng.model.config, r).to_dict(), (family, pruner)
            assert r.prefill_flops["total"] == pytest.approx(sum(r.prefill_flops[k] for k in ("vision", "projector",
                                                                                                 "llm")))
        totals[pruner] = eng.generate(req[:1], spec)[0].prefill_flops["total"]
    assert all(totals[p] < totals["none"] for p in totals if p != "none"), totals


def test_benchmark_runs_store_and_report_prefill_flops(tmp_path):
    """Each stored answer keeps its prefill FLOPs, a run's report shows their mean (prefill_gflops), and a
    database written before the column existed gets it by migration (its old answers read NULL)."""
    import sqlite3
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_bench_runner import SYNTH
    from vlmguard.bench import db as dbm
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.report import POPE_VIEW, flatten
    from vlmguard.bench.runner import default_spec, run_benchmark
    from vlmguard.engine import load_engine

    old = tmp_path / "old.sqlite"
    conn = dbm.connect(old)
    conn.execute("ALTER TABLE samples DROP COLUMN prefill_flops")
    conn.close()
    eng = load_engine("tiny")
    for db in (tmp_path / "new.sqlite", old):
        gflops = {}
        for pruning, budget in (("none", None), ("adaptinfer", 16)):
            run = run_benchmark(eng, "pope", synth_dataset(SYNTH), default_spec("pope", pruning=pruning, budget=budget),
                                db, split="random", progress=False, limit=4)
            flops = [r[0] for r in sqlite3.connect(db).execute("SELECT prefill_flops FROM samples WHERE run_id = ?",
                                                                (run.run_id,))]
            assert len(flops) == 4 and all(f and f > 0 for f in flops)
            row = flatten({r["run_id"]: r for r in dbm.list_runs(db)}[run.run_id])
            assert row["prefill_gflops"] == pytest.approx(sum(flops) / len(flops) / 1e9)
            gflops[pruning] = row["prefill_gflops"]
        assert gflops["adaptinfer"] < gflops["none"] and "prefill_gflops" in POPE_VIEW
