"""Audit of `vlmguard report` and `vlmguard compare` (and perf's argument checks): regressions of the defects found."""
from __future__ import annotations

import json
import math
from pathlib import Path

from vlmguard.bench.compare import compare_runs
from vlmguard.bench.db import add_samples, connect, ensure_run, finish_if_complete
from vlmguard.cli import main

POPE = dict(benchmark="pope", model="tiny", dataset="synthcoco", dataset_version="v1", split="random",
            question_sha256="abc")
CHAIR = dict(benchmark="chair", model="tiny", dataset="synthcoco", dataset_version="v1", split="test",
             variant="chair512", max_new_tokens=512)


def _store(conn, knobs: dict, samples: list[dict], n_expected: int | None = None) -> str:
    run_id = ensure_run(conn, knobs, n_expected=n_expected or len(samples), package_version="test")
    add_samples(conn, run_id, samples)
    finish_if_complete(conn, run_id)
    return run_id


def _pope(pred, offset: int = 0, n: int = 10) -> list[dict]:
    """Two questions per image (labels yes, no); ``pred(i)`` answers question i."""
    return [{"sample_key": f"q:{i + offset}", "image": f"img{(i + offset) // 2}.png",
             "label": "yes" if i % 2 == 0 else "no", "prediction": pred(i)} for i in range(n)]


def _chair(mentions: int, hallucinated: int, n: int = 5) -> list[dict]:
    cats = [f"c{j}" for j in range(mentions)]
    rec = {"mscoco_generated_words": cats, "mscoco_words": cats,
           "mscoco_hallucinated_words": [[c, c] for c in cats[:hallucinated]],
           "counts": {"mentions": mentions, "hallucinated": hallucinated, "gt": 3, "recalled": 0, "tokens": 5}}
    return [{"sample_key": f"img:{i}", "image": f"img{i}.png", "record": rec} for i in range(n)]


def _strict_json(line: str) -> dict:
    """JSON as a strict parser (jq, JavaScript) reads it: NaN and Infinity are not JSON."""
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def test_compare_json_is_valid_json_when_a_baseline_metric_is_undefined(tmp_path: Path, capsys):
    """A baseline whose captions mention no object has no CHAIR_i: the JSON said NaN / Infinity (not JSON) and
    the table printed 'nan' as the baseline's value."""
    db = tmp_path / "r.sqlite"
    conn = connect(db)
    _store(conn, CHAIR, _chair(0, 0))
    _store(conn, {**CHAIR, "decoding": "vcd"}, _chair(2, 1))
    conn.close()
    assert main(["compare", "--db", str(db), "--boot", "100", "--json"]) == 0
    out = _strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["metric"]: r for r in out["comparisons"]}
    assert rows["chair_i"]["baseline_value"] is None and rows["chair_i"]["change"] is None
    assert rows["chair_i"]["value"] == 50.0
    assert rows["chair_s"]["baseline_value"] == 0.0 and rows["chair_s"]["change"] is None  # 100% against 0%
    assert main(["compare", "--db", str(db), "--boot", "100"]) == 0
    table = capsys.readouterr().out
    assert "| chair | test chair512 | vcd | chair_i | - | 50.00 | - | [-, -] | 5 |" in table
    assert "nan" not in table


def test_a_run_sharing_no_questions_with_its_baseline_is_named_not_dropped(tmp_path: Path, capsys):
    db = tmp_path / "r.sqlite"
    conn = connect(db)
    base = _store(conn, POPE, _pope(lambda i: "yes"))
    _store(conn, {**POPE, "decoding": "vcd"}, _pope(lambda i: "no"))
    other = _store(conn, {**POPE, "pruning": "fastv", "budget": 16}, _pope(lambda i: "yes", offset=100))
    conn.close()
    assert main(["compare", "--db", str(db), "--boot", "100", "--json"]) == 0
    cap = capsys.readouterr()
    out = _strict_json(cap.out.strip().splitlines()[-1])
    assert {r["method"] for r in out["comparisons"]} == {"vcd"}
    assert out["unpaired"] == [{"benchmark": "pope", "split": "random", "method": "fastv@16", "run_id": other,
                                "baseline_run_id": base}]
    assert f"fastv@16 (run {other}) shares no questions with its baseline run {base}: not compared" in cap.err


def test_a_baseline_label_naming_several_runs_of_a_group_is_refused_and_a_run_id_chooses(tmp_path: Path, capsys):
    """Two 'base' runs in one group (greedy, and greedy with a temperature set, which no label shows: other knobs,
    another run): the newest was taken in silence and the other compared against it as 'base' vs 'base'."""
    db = tmp_path / "r.sqlite"
    conn = connect(db)
    greedy = _store(conn, POPE, _pope(lambda i: "yes"))
    sampled = _store(conn, {**POPE, "temperature": 0.5}, _pope(lambda i: "no"))
    _store(conn, {**POPE, "decoding": "vcd"}, _pope(lambda i: "yes" if i % 2 == 0 else "no"))
    conn.close()
    assert main(["compare", "--db", str(db), "--boot", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmguard: error: --baseline 'base' matches 2 runs of one group") and "\n" == err[-1]
    assert greedy in err and sampled in err and err.count("\n") == 1
    assert main(["compare", "--db", str(db), "--boot", "100", "--baseline", greedy, "--json"]) == 0
    out = _strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    acc = {r["run_id"]: r for r in out["comparisons"] if r["metric"] == "accuracy"}
    assert {r["baseline_run_id"] for r in acc.values()} == {greedy}
    assert acc[sampled]["value"] == 50.0 and acc[sampled]["baseline_value"] == 50.0
    assert next(r for r in acc.values() if r["method"] == "vcd")["change"] == 50.0


def test_runs_of_other_weights_dtype_or_parser_are_not_compared_with_the_baseline(tmp_path: Path):
    """A retrained model under the same name (model_revision), a bf16 run or another POPE parser is another task."""
    db = tmp_path / "r.sqlite"
    conn = connect(db)
    _store(conn, {**POPE, "model_revision": "aaa", "parser": "official"}, _pope(lambda i: "yes"))
    _store(conn, {**POPE, "model_revision": "bbb", "parser": "official", "decoding": "vcd"}, _pope(lambda i: "no"))
    _store(conn, {**POPE, "model_revision": "aaa", "parser": "yorn", "decoding": "m3id"}, _pope(lambda i: "no"))
    _store(conn, {**POPE, "model_revision": "aaa", "parser": "official", "dtype": "bfloat16", "decoding": "vista"},
           _pope(lambda i: "no"))
    same = _store(conn, {**POPE, "model_revision": "aaa", "parser": "official", "decoding": "lqcd"},
                  _pope(lambda i: "no"))
    conn.close()
    rows = compare_runs(db, n_boot=100)
    assert {r.run_id for r in rows} == {same}


def test_a_baseline_that_is_only_unfinished_says_so(tmp_path: Path, capsys):
    db = tmp_path / "r.sqlite"
    conn = connect(db)
    _store(conn, POPE, _pope(lambda i: "yes"), n_expected=40)  # killed after 10 of 40 questions
    _store(conn, {**POPE, "decoding": "vcd"}, _pope(lambda i: "yes"))
    conn.close()
    assert main(["compare", "--db", str(db), "--boot", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmguard: error: no run labelled 'base' to compare against (only 1 unfinished run")
    assert err.count("\n") == 1


def test_chair_plot_draws_no_bar_for_an_undefined_chair_i(tmp_path: Path, monkeypatch):
    """CHAIR_i of captions without mentions is undefined: it was drawn as a bar at 0, the best possible score."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from vlmguard.bench.report import build_report

    db = tmp_path / "r.sqlite"
    conn = connect(db)
    _store(conn, CHAIR, _chair(0, 0))
    _store(conn, {**CHAIR, "decoding": "vcd"}, _chair(2, 1))
    conn.close()
    bars: dict[str, list[float]] = {}
    real_bar = Axes.bar

    def bar(self, x, height, *args, **kwargs):
        bars[kwargs.get("label")] = list(height)
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    rep = build_report(db, tmp_path / "out")
    assert str(tmp_path / "out" / "chair_by_method.png") in rep["files"]
    methods = [r["method"] for r in rep["rows"] if r["benchmark"] == "chair"]
    heights = dict(zip(methods, bars["CHAIR_i"]))
    assert math.isnan(heights["base"]) and heights["vcd"] == 50.0


# ---- perf argument lists and limits ------------------------------------------------------------------------

def test_perf_lists_with_an_empty_item_and_unbounded_batches_are_refused(capsys):
    import pytest

    for argv, needle in [
        (["perf", "serve", "--clients", "1,,16"], "argument --clients: empty item in '1,,16'"),  # was 1,16
        (["perf", "prefill", "--budgets", "64,"], "argument --budgets: empty item in '64,'"),
        (["perf", "prefill", "--methods", "none,,fastv"], "argument --methods: empty item"),
        # the images of a batch are built before anything runs: a typo ran out of memory instead of failing
        (["perf", "decode", "--batch", "1,80000000"], "argument --batch: must be at most 1024, got 80000000"),
        (["perf", "prefill", "--batch", "5000"], "must be at most 1024"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err, argv


def test_the_dashboard_names_the_baseline_run_it_compared_with(tmp_path: Path):
    # the dashboard keeps the newest run under an ambiguous label (it cannot ask), but now says which one
    from vlmguard.dashboard import data

    db = tmp_path / "r.sqlite"
    conn = connect(db)
    _store(conn, POPE, _pope(lambda i: "yes"))
    newest = _store(conn, {**POPE, "temperature": 0.5}, _pope(lambda i: "no"))  # greedy too: also 'base'
    vcd = _store(conn, {**POPE, "decoding": "vcd"}, _pope(lambda i: "yes" if i % 2 == 0 else "no"))
    conn.close()
    frame = data.comparisons(db, "base", data.load_runs(db))
    row = frame[(frame["run_id"] == vcd) & (frame["metric"] == "accuracy")].iloc[0]
    assert row["baseline_run"] == newest


def test_runs_that_sample_or_stop_at_another_length_have_labels_of_their_own(tmp_path: Path):
    """Greedy and sampled (temperature 0.7, seed 3) runs of one method were both 'base' in a report: the label
    shows where a run's token selection differs from its benchmark preset's (the length is a task key)."""
    from vlmguard.bench.db import list_runs
    from vlmguard.bench.report import method_label

    conn = connect(tmp_path / "r.sqlite")
    for knobs in ({}, {"do_sample": True, "temperature": 0.7, "seed": 3},
                  {"decoding": "vcd", "do_sample": True, "temperature": 1.0, "top_k": 5}):
        _store(conn, {**POPE, **knobs}, _pope(lambda i: "yes"))
    labels = sorted(method_label(r) for r in list_runs(conn))
    conn.close()
    assert labels == ["base", "sample[seed=3,temperature=0.7]", "vcd+sample[top_k=5]"]
    # the VCD prompt preset samples by default (T=1, top-p 1, seed 42): only a departure from it is shown
    vcd_preset = {"benchmark": "pope", "prompt_preset": "vcd", "max_new_tokens": 128, "do_sample": True,
                  "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 42}
    assert method_label(vcd_preset) == "base"
    assert method_label({**vcd_preset, "do_sample": False}) == "greedy"
