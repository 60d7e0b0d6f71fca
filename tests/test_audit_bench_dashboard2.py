"""Audit of `vlmguard bench` / `score pope` and the dashboard playground: a smaller --limit on a run that holds
more samples reported the metrics of every stored sample (n=12 for --limit 6); playground results stayed on
screen as if they answered a new image or prompt; an answer file with several answer fields was scored from
`text` without a word, whatever the others held. Each test failed before its fix."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from test_bench_runner import SYNTH, FakeEngine
from test_dashboard_pages import StubClient, all_text, page, quiet_env
from vlmguard.bench.datasets import synth_dataset
from vlmguard.bench.pope_data import load_pope_file
from vlmguard.bench.pope_metrics import load_answers
from vlmguard.bench.runner import default_spec, run_benchmark
from vlmguard.bench.sweep import run_sweep
from vlmguard.cli import main
from vlmguard.dashboard.service import CLIENT_KEY
from vlmguard.errors import InvalidInput

COUNTS = ("n", "tp", "fp", "tn", "fn", "accuracy")


# ---- 1. --limit below what the run holds -----------------------------------------------------------


def _pope(db: Path, **kw):
    return run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope"), db, split="random",
                         progress=False, **kw)


def test_a_smaller_limit_reports_the_metrics_of_the_items_it_selects(tmp_path):
    db = tmp_path / "r.sqlite"
    big = _pope(db, limit=12)
    assert big.metrics["n"] == 12 and not big.metrics["flags"]
    small = _pope(db, limit=6)
    fresh = _pope(tmp_path / "fresh.sqlite", limit=6)  # what --limit 6 gives on a database of its own
    assert small.run_id == big.run_id and small.n_new == 0 and small.n_samples == 12
    assert {k: small.metrics[k] for k in COUNTS} == {k: fresh.metrics[k] for k in COUNTS}
    assert small.metrics["n"] == 6 and small.metrics["complete"] is True
    assert small.metrics["perf"] == fresh.metrics["perf"]
    assert small.metrics["flags"] == ["metrics over the first 6 items (limit 6); the run holds 12 samples"]
    again = _pope(db, limit=12)  # the run itself is unchanged
    assert again.metrics["n"] == 12 and not again.metrics["flags"] and again.status == "finished"


def test_a_shard_with_a_smaller_limit_covers_the_first_items_of_all_shards(tmp_path):
    db = tmp_path / "r.sqlite"
    _pope(db, limit=12)
    shard = _pope(db, limit=6, shard_index=1, num_shards=2)
    assert shard.n_new == 0 and shard.metrics["n"] == 6 and shard.metrics["complete"] is True
    # a shard that is still partial counts only the selected items stored so far
    db2 = tmp_path / "r2.sqlite"
    _pope(db2, limit=12, shard_index=0, num_shards=2)  # items 0, 2, ..., 10 stored
    part = _pope(db2, limit=4, shard_index=0, num_shards=2)
    assert part.metrics["n"] == 2 and part.metrics["complete"] is False


def test_chair_and_pope_leading_with_a_smaller_limit(tmp_path):
    db = tmp_path / "r.sqlite"
    ds = synth_dataset(SYNTH)
    spec = default_spec("chair", chair_preset="chair64")
    run_benchmark(FakeEngine(), "chair", ds, spec, db, chair_preset="chair64", limit=4, progress=False)
    small = run_benchmark(FakeEngine(), "chair", ds, spec, db, chair_preset="chair64", limit=2, progress=False)
    fresh = run_benchmark(FakeEngine(), "chair", ds, spec, tmp_path / "f.sqlite", chair_preset="chair64", limit=2,
                          progress=False)
    assert small.metrics["n"] == 2 and small.metrics["chair_s"] == fresh.metrics["chair_s"]
    assert any("first 2 items (limit 2)" in f for f in small.metrics["flags"])
    lead = default_spec("pope-leading")
    run_benchmark(FakeEngine(), "pope-leading", ds, lead, db, split="random", template="W+", limit=8, progress=False)
    out = run_benchmark(FakeEngine(), "pope-leading", ds, lead, db, split="random", template="W+", limit=4,
                        progress=False)
    assert out.metrics["n"] == 4 and out.metrics["unpaired"] == 0


@pytest.fixture()
def fake_engine(monkeypatch):
    from vlmguard.engine import Engine

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, model="tiny", **kw: FakeEngine()))


def _cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_bench_cli_limit_text_and_json(tmp_path, fake_engine):
    common = ["bench", "pope", "--dataset", str(SYNTH), "--split", "random", "--db", str(tmp_path / "r.sqlite"),
              "--no-progress"]
    first = _cli([*common, "--limit", "12"])
    run_id = first.split("run ")[1].split(",")[0]
    text = _cli([*common, "--limit", "6"])
    assert "(n=6, run " + run_id in text and "the run holds 12 samples" in text
    out = _cli([*common, "--limit", "6", "--json"]).strip().splitlines()
    doc = json.loads(out[-1])  # still one JSON object on the last line
    m = doc["metrics"]["random"]
    assert m["n"] == 6 and doc["runs"][0]["run_id"] == run_id and doc["runs"][0]["n_samples"] == 12
    assert "metrics over the first 6 items (limit 6); the run holds 12 samples" in m["flags"]


def test_sweep_limit_override_below_the_configs(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"model: fake\ndataset: {SYNTH}\nlimit: 8\nbenchmarks:\n  - pope: {{splits: [random]}}\n"
                   "  - chair: {preset: chair64}\n")
    db = tmp_path / "s.sqlite"
    run_sweep(cfg, db=db, load_engine=lambda name: FakeEngine(), progress=False)
    pope, chair = run_sweep(cfg, db=db, limit=3, load_engine=lambda name: FakeEngine(), progress=False)
    assert pope.metrics["n"] == 3 and chair.metrics["n"] == 3 and pope.n_new == chair.n_new == 0


# ---- 2. playground results after the input changed --------------------------------------------------


@pytest.fixture()
def _dash_env(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)


def _generated(stub: StubClient):
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.checkbox(key="pg_compare").uncheck()
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    at.run()  # a plain rerun: the results are current
    assert "No dog ." in all_text(at) and not at.warning
    return at


def test_playground_marks_results_stale_when_the_image_changes(_dash_env):
    stub = StubClient()
    at = _generated(stub)
    at.number_input(key="pg_seed").set_value(2).run()  # another rendered scene
    assert not at.exception
    warn = " ".join(w.value for w in at.warning)
    assert "Stale results: the image changed" in warn and "prompt" not in warn
    at.number_input(key="pg_seed").set_value(1).run()  # back to the image they were computed for
    assert not at.warning and "No dog ." in all_text(at)
    n = len(stub.calls)
    at.button(key="pg_go").click().run()
    assert len(stub.calls) == n + 1 and not at.warning


def test_playground_marks_results_stale_when_the_prompt_changes(_dash_env):
    at = _generated(StubClient())
    at.text_area(key="pg_prompt").input("Is there a cat in the image?").run()
    warn = " ".join(w.value for w in at.warning)
    assert "Stale results: the prompt changed" in warn and "Is there a dog in the image?" in warn
    at.slider(key="pg_max_new").set_value(32).run()
    assert "the prompt and settings changed" in " ".join(w.value for w in at.warning)


# ---- 3. answer files with several answer fields ----------------------------------------------------

QUESTIONS = SYNTH / "pope" / "synthcoco_pope_random.json"


def _answers(tmp_path: Path, name: str, make) -> Path:
    qs = load_pope_file(QUESTIONS).questions
    p = tmp_path / name
    p.write_text("".join(json.dumps({"question_id": q.question_id, **make(q)}) + "\n" for q in qs))
    return p


def test_answer_fields_that_disagree_are_refused(tmp_path, capsys):
    # `answer` holds the label, `text` the model's words: scoring either silently could be the wrong one
    p = _answers(tmp_path, "a.jsonl", lambda q: {"text": "Yes", "answer": q.label})
    with pytest.raises(InvalidInput, match=r"a\.jsonl:\d+: answer fields 'text' and 'answer' differ .*--answer-key"):
        load_answers(p)
    assert main(["score", "pope", "--answers", str(p), "--questions", str(QUESTIONS)]) == 2
    assert "--answer-key" in capsys.readouterr().err
    doc = json.loads(_cli(["score", "pope", "--answers", str(p), "--questions", str(QUESTIONS), "--answer-key",
                           "answer", "--json"]).strip().splitlines()[-1])
    assert doc["accuracy"] == 100.0 and not any("scored from" in f for f in doc["flags"])


def test_answer_fields_that_agree_are_named_once(tmp_path):
    p = _answers(tmp_path, "b.jsonl", lambda q: dict.fromkeys(("text", "answer"), q.label.capitalize()))
    note = "answers scored from field 'text'; the records also have 'answer', equal to it (--answer-key picks one)"
    text = _cli(["score", "pope", "--answers", str(p), "--questions", str(QUESTIONS)])
    assert text.count("note: " + note) == 1
    doc = json.loads(_cli(["score", "pope", "--answers", str(p), "--questions", str(QUESTIONS), "--json"])
                     .strip().splitlines()[-1])
    assert doc["flags"] == [note] and doc["n"] == 24 and doc["accuracy"] == 100.0
    mixed = _answers(tmp_path, "c.jsonl", lambda q: {"text": "No"} if q.question_id % 2 else {"answer": "No"})
    notes: list[str] = []
    load_answers(mixed, notes=notes)
    assert notes == ["answers scored from fields 'text' (12 records), 'answer' (12 records) (--answer-key picks one)"]
    plain: list[str] = []
    load_answers(_answers(tmp_path, "d.jsonl", lambda q: {"text": "No"}), notes=plain)
    assert plain == []  # one answer field, as in LLaVA's answer files: nothing to say
