"""`vlmguard compare`: runs against a baseline run with paired bootstrap intervals over images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmguard.bench.chair_score import aggregate
from vlmguard.bench.compare import compare_pair, compare_runs, format_comparisons
from vlmguard.bench.db import add_samples, connect, ensure_run, finish_run
from vlmguard.bench.pope_metrics import pope_metrics
from vlmguard.cli import main
from vlmguard.errors import InvalidInput


def chair_record(h: int, mentions: int = 10) -> dict:
    """A caption naming `mentions` distinct objects, the first `h` of them absent from the image."""
    cats = [f"cat{j}" for j in range(mentions)]
    return {"mscoco_generated_words": cats, "mscoco_words": cats, "mscoco_hallucinated_words": [[c, c] for c in cats[:h]],
            "counts": {"mentions": mentions, "hallucinated": h, "gt": 3, "recalled": 1, "tokens": 20}}


def chair_samples(halluc: list[int], mentions: int = 10) -> list[dict]:
    return [{"sample_key": f"img{i}", "image": f"img{i}.png", "record": chair_record(h, mentions)}
            for i, h in enumerate(halluc)]


def pope_samples(correct: list[list[bool]]) -> list[dict]:
    """Questions grouped by image: correct[i][j] = question j of image i answered right (label yes)."""
    return [{"sample_key": f"q{i}-{j}", "image": f"img{i}.png", "label": "yes", "prediction": "yes" if ok else "no"}
            for i, row in enumerate(correct) for j, ok in enumerate(row)]


def by_metric(rows: list[dict]) -> dict[str, dict]:
    return {r["metric"]: r for r in rows}


def test_chair_changes_match_the_stored_metrics_and_the_interval_brackets_them():
    base = chair_samples([1] * 50 + [0] * 50)  # CHAIR_i 5%, CHAIR_s 50%
    method = chair_samples([1] * 25 + [0] * 75)  # half of those images fixed
    rows = by_metric(compare_pair(base, method, "chair", n_boot=500))
    agg_b = aggregate(s["record"] for s in base)
    agg_m = aggregate(s["record"] for s in method)
    ci = rows["chair_i"]
    assert ci["baseline_value"] == pytest.approx(agg_b["chair_i"]) and ci["value"] == pytest.approx(agg_m["chair_i"])
    assert ci["change"] == pytest.approx(-0.5) and ci["kind"] == "relative"
    assert ci["ci_low"] < -0.5 < ci["ci_high"] < 0  # a clear effect: the interval excludes no change
    assert rows["chair_s"]["value"] == pytest.approx(agg_m["chair_s"]) and rows["chair_s"]["change"] == pytest.approx(-0.5)
    assert ci["images"] == ci["samples"] == 100


def test_identical_runs_show_no_change_and_a_zero_width_interval():
    s = chair_samples([i % 3 for i in range(60)])
    for r in compare_pair(s, s, "chair", n_boot=200):
        assert r["change"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0


def test_pairing_is_by_sample_key_on_the_keys_both_runs_hold():
    base = chair_samples([1, 0, 2, 0, 1, 0])
    method = list(reversed(chair_samples([0, 0, 2, 0, 1, 0])))[:4]  # other order, images 0 and 1 missing
    (ci, _, _) = compare_pair(base, method, "chair", n_boot=200)
    assert ci["samples"] == 4 and ci["baseline_value"] == pytest.approx(100 * 3 / 40) and ci["change"] == 0


def test_pope_resamples_images_and_reports_points_and_the_share_kept():
    rng = np.random.default_rng(1)
    base_ok = (rng.random((80, 6)) < 0.9).tolist()
    method_ok = (rng.random((80, 6)) < 0.75).tolist()
    base, method = pope_samples(base_ok), pope_samples(method_ok)
    rows = by_metric(compare_pair(base, method, "pope", n_boot=1000))
    acc_b = pope_metrics((s["prediction"], s["label"]) for s in base)["accuracy"]
    acc_m = pope_metrics((s["prediction"], s["label"]) for s in method)["accuracy"]
    pts, kept = rows["accuracy"], rows["accuracy_retained"]
    assert pts["images"] == 80 and pts["samples"] == 480  # six questions of an image move together
    assert pts["change"] == pytest.approx(acc_m - acc_b) and pts["ci_low"] < pts["change"] < pts["ci_high"]
    assert kept["kind"] == "ratio" and kept["change"] == pytest.approx(acc_m / acc_b)
    assert kept["ci_low"] < kept["change"] < kept["ci_high"] < 1.0
    # the same seed gives the same interval; another seed a slightly different one
    again = by_metric(compare_pair(base, method, "pope", n_boot=1000))["accuracy"]
    other = by_metric(compare_pair(base, method, "pope", n_boot=1000, seed=7))["accuracy"]
    assert (again["ci_low"], again["ci_high"]) == (pts["ci_low"], pts["ci_high"]) != (other["ci_low"], other["ci_high"])


def test_correlated_answers_widen_the_interval():
    """All six questions of an image right or wrong together: resampling images must see 80 units, not 480."""
    together = pope_samples([[i % 4 != 0] * 6 for i in range(80)])
    spread = pope_samples([[(i * 6 + j) % 4 != 0 for j in range(6)] for i in range(80)])  # same accuracy, mixed
    base = pope_samples([[True] * 6 for _ in range(80)])
    w_together = by_metric(compare_pair(base, together, "pope"))["accuracy"]
    w_spread = by_metric(compare_pair(base, spread, "pope"))["accuracy"]
    assert w_together["change"] == w_spread["change"] == pytest.approx(-25.0)
    assert (w_together["ci_high"] - w_together["ci_low"]) > 1.5 * (w_spread["ci_high"] - w_spread["ci_low"])


def _store(conn, knobs: dict, samples: list[dict]) -> str:
    run_id = ensure_run(conn, knobs, n_expected=len(samples), package_version="test")
    add_samples(conn, run_id, samples)
    finish_run(conn, run_id, {})
    return run_id


def test_runs_are_compared_within_their_group_only(tmp_path: Path):
    db = tmp_path / "r.sqlite"
    conn = connect(db)
    task = dict(benchmark="chair", model="tiny", dataset="synthcoco", dataset_version="v1", split="test",
                variant="chair512", max_new_tokens=512)
    _store(conn, task, chair_samples([1] * 20 + [0] * 20))
    _store(conn, {**task, "decoding": "vcd"}, chair_samples([1] * 10 + [0] * 30))
    _store(conn, {**task, "decoding": "m3id", "decoding_params": {"lam": 0.03}}, chair_samples([1] * 30 + [0] * 10))
    other_world = {**task, "dataset_version": "v2"}  # another dataset version: its own group, no baseline there
    _store(conn, {**other_world, "decoding": "vcd"}, chair_samples([0] * 40))
    pope = dict(benchmark="pope", model="tiny", dataset="synthcoco", dataset_version="v1", split="random",
                question_sha256="abc")
    _store(conn, pope, pope_samples([[True] * 6] * 10))
    _store(conn, {**pope, "pruning": "flowcut", "budget": 16}, pope_samples([[True] * 5 + [False]] * 10))
    conn.close()
    rows = compare_runs(db, n_boot=200)
    got = {(r.benchmark, r.method, r.metric): r for r in rows}
    assert set(got) == {("chair", m, metric) for m in ("vcd", "m3id[lam=0.03]")
                        for metric in ("chair_i", "chair_s", "chair_i_distinct")} | {
        ("pope", "flowcut@16", "accuracy"), ("pope", "flowcut@16", "accuracy_retained")}
    assert got[("chair", "vcd", "chair_i")].change == pytest.approx(-0.5)
    assert got[("chair", "m3id[lam=0.03]", "chair_i")].change == pytest.approx(0.5)
    assert got[("pope", "flowcut@16", "accuracy_retained")].value == pytest.approx(100 * 5 / 6)
    assert [r.metric for r in compare_runs(db, benchmark="pope", n_boot=200)] == ["accuracy", "accuracy_retained"]
    table = format_comparisons(rows)
    assert "| chair | test chair512 | vcd | chair_i | 5.00 | 2.50 | -50.0%" in table
    # against another baseline label: the base run becomes one of the compared runs
    vs_vcd = {(r.method, r.metric): r for r in compare_runs(db, "vcd", benchmark="chair", n_boot=200)}
    assert vs_vcd[("base", "chair_i")].change == pytest.approx(1.0)
    with pytest.raises(InvalidInput, match=r"no run labelled 'greedy'.*labels in .*: base, flowcut@16, m3id\[lam=0.03\], vcd"):
        compare_runs(db, "greedy")
    with pytest.raises(InvalidInput, match="confidence"):
        compare_runs(db, confidence=1.0)


def test_cli_compares_real_runs_of_the_bundled_model(tmp_path: Path, capsys):
    from vlmguard.synth import build_dataset

    data = build_dataset(tmp_path / "w", seed=0, train=0, val=0, test=12)
    db = tmp_path / "r.sqlite"
    for extra in ([], ["--decoding", "m3id", "--param", "gate=false"]):
        assert main(["bench", "chair", "--model", "tiny", "--dataset", str(data), "--preset", "chair64", "--limit",
                     "12", "--batch-size", "12", "--db", str(db), "--no-progress", "--json", *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = [json.loads(x) for x in lines if x.startswith("{")]
    stored = {r["runs"][0]["run_id"]: r["runs"][0]["metrics"] for r in runs}
    assert main(["compare", "--db", str(db), "--json", "--boot", "300"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["baseline"] == "base" and out["boot"] == 300 and out["confidence"] == 0.95
    rows = out["comparisons"]
    assert {r["metric"] for r in rows} == {"chair_i", "chair_s", "chair_i_distinct"} and {r["method"] for r in rows} == {"m3id[gate=False]"}
    ci = next(r for r in rows if r["metric"] == "chair_i")
    assert ci["images"] == 12 and ci["value"] == pytest.approx(stored[ci["run_id"]]["chair_i"])
    assert ci["baseline_value"] == pytest.approx(stored[ci["baseline_run_id"]]["chair_i"])
    assert main(["compare", "--db", str(db)]) == 0
    assert "| chair | test chair64 | m3id[gate=False] | chair_i |" in capsys.readouterr().out
    assert main(["compare", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "results database not found" in capsys.readouterr().err
    assert main(["compare", "--db", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory, not a results database" in capsys.readouterr().err
    assert main(["compare", "--db", str(db), "--benchmark", "pope"]) == 2
    assert "no finished pope runs" in capsys.readouterr().err


def test_distinct_chair_i_separates_repeating_from_naming_absent_objects():
    """A caption that repeats its one absent object three times: CHAIR_i counts 3 of 5, per object it is 1 of 3."""
    from vlmguard.bench.chair_score import score_caption

    rec = score_caption(1, "There is a dog. There is a dog. There is a dog. There is a cat. There is a car.",
                        frozenset({"cat", "car"}))
    agg = aggregate([rec])
    assert agg["chair_i"] == pytest.approx(60.0) and agg["chair_i_distinct"] == pytest.approx(100 / 3)
    assert agg["repeated_mentions"] == 2
    fixed = score_caption(1, "There is a dog. There is a cat. There is a car.", frozenset({"cat", "car"}))
    rows = by_metric(compare_pair([{"sample_key": "1", "record": rec}], [{"sample_key": "1", "record": fixed}],
                                  "chair", n_boot=100))
    assert rows["chair_i"]["change"] == pytest.approx(1 / 3 / 0.6 - 1)  # 60% -> 33%: "-44%"
    assert rows["chair_i_distinct"]["change"] == pytest.approx(0.0)  # the same objects named
