"""End to end on the real engine: the `vlmguard bench` CLI on the SynthCOCO-layout fixture with a
random-weight LLaVA (``random:llava``), a SIGKILL in the middle of a run and a resume, and the bundled
tiny model on SynthCOCO when it is present."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmguard.bench import db as dbm
from vlmguard.cli import main

FIX = Path(__file__).resolve().parent / "fixtures" / "bench"
SYNTH = FIX / "synth_mini"
REPO = Path(__file__).resolve().parents[1]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture()
def engine_loaded_once(monkeypatch):
    """The CLI loads the model per command; build the random-weight model once for this test."""
    from vlmguard.engine import Engine

    real_load = Engine.load.__func__
    cache: dict[str, Engine] = {}

    def load(cls, model="tiny", **kw):
        if model not in cache:
            cache[model] = real_load(cls, model, **kw)
        return cache[model]

    monkeypatch.setattr(Engine, "load", classmethod(load))
    return cache


def test_cli_bench_on_real_engine(tmp_path, capsys, engine_loaded_once):
    db = tmp_path / "r.sqlite"
    common = ["--model", "random:llava", "--dataset", str(SYNTH), "--db", str(db), "--no-progress", "--json"]
    assert main(["bench", "pope", "--split", "random", "--limit", "8", "--batch-size", "4", "--max-new-tokens", "3", *common]) == 0
    out = _last_json(capsys)
    assert out["benchmark"] == "pope" and out["dataset"] == "synth_mini" and out["dataset_version"].startswith("fixture-1")
    m = out["metrics"]["random"]
    assert m["n"] == 8 and m["tp"] + m["fp"] + m["tn"] + m["fn"] == 8 and m["complete"] is True
    assert m["perf"]["visual_tokens"] > 0 and m["perf"]["prefill_s"] > 0
    run = dbm.get_run(db, out["runs"][0]["run_id"])
    assert run["model"] == "random:llava" and run["model_family"] == "llava" and run["max_new_tokens"] == 3

    assert main(["bench", "pope-leading", "--split", "popular", "--template", "S-", "--limit", "6",
                 "--max-new-tokens", "3", *common]) == 0
    lead = _last_json(capsys)
    lm = lead["metrics"]["popular/S-"]
    assert lm["n"] == 6 and lm["unpaired"] == 0 and lm["ctr"] is not None
    assert lead["runs"][0]["neutral_run_id"]

    assert main(["bench", "chair", "--preset", "chair64", "--max-new-tokens", "6", "--param", "unused=1",
                 "--decoding", "greedy", *common]) == 2  # the greedy decoder has no parameter 'unused'
    capsys.readouterr()
    assert main(["bench", "chair", "--preset", "chair64", "--max-new-tokens", "6", *common]) == 0
    ch = _last_json(capsys)
    assert ch["metrics"]["chair64"]["n"] == 4
    assert len(dbm.list_runs(db)) == 4  # pope random, pope popular (neutral), pope-leading, chair
    assert list(engine_loaded_once) == ["random:llava"]

    assert main(["bench", "pope", "--split", "random", "--pruning", "nosuchpruner", *common]) == 2
    err = capsys.readouterr().err
    assert "vlmguard: error:" in err and "nosuchpruner" in err


def _counts(db: Path) -> dict[str, tuple[int, int]]:
    with sqlite3.connect(db, timeout=30) as c:
        rows = c.execute("SELECT r.split, COUNT(s.id), COUNT(DISTINCT s.sample_key) FROM runs r "
                         "LEFT JOIN samples s ON s.run_id = r.run_id GROUP BY r.run_id").fetchall()
    return {split: (n, d) for split, n, d in rows}


def test_sigkill_then_resume(tmp_path):
    db = tmp_path / "k.sqlite"
    cmd = [sys.executable, "-m", "vlmguard.cli", "bench", "pope", "--model", "random:llava", "--dataset", str(SYNTH),
           "--split", "random", "--batch-size", "1", "--max-new-tokens", "4", "--db", str(db), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: the shared 2-core machine can be very busy
    stored = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    stored = sum(n for n, _ in _counts(db).values())
                except sqlite3.OperationalError:
                    stored = 0
                if stored >= 5:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished (or died) before it could be killed"
        assert stored >= 5, "no samples stored within the deadline"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = _counts(db)
    killed_total = sum(n for n, _ in before.values())
    assert 5 <= killed_total < 24
    with sqlite3.connect(db) as c:
        early = c.execute("SELECT run_id, sample_key, output_text, created_at FROM samples ORDER BY id").fetchall()
    done = subprocess.run(cmd + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["status"] for r in out["runs"]] == ["finished"]
    assert out["runs"][0]["n_new"] == 24 - killed_total  # nothing regenerated, nothing lost
    assert _counts(db) == {"random": (24, 24)}
    with sqlite3.connect(db) as c:
        kept = c.execute("SELECT run_id, sample_key, output_text, created_at FROM samples ORDER BY id LIMIT ?",
                         (len(early),)).fetchall()
    assert kept == early  # samples written before the kill are untouched


TINY = REPO / "vlmguard" / "assets" / "tiny-llava"


def test_tiny_model_on_synthcoco(tmp_path, capsys):
    assert (TINY / "config.json").is_file(), "the bundled tiny model is missing from vlmguard/assets/tiny-llava"
    db = tmp_path / "t.sqlite"
    assert main(["bench", "pope", "--model", "tiny", "--dataset", "synthcoco", "--split", "random", "--limit", "24",
                 "--batch-size", "12", "--db", str(db), "--no-progress", "--json"]) == 0
    m = _last_json(capsys)["metrics"]["random"]
    assert m["n"] == 24 and m["accuracy"] is not None and m["perf"]["visual_tokens"] == 144
    assert main(["bench", "chair", "--model", "tiny", "--dataset", "synthcoco", "--preset", "chair64", "--limit", "6",
                 "--db", str(db), "--no-progress", "--json"]) == 0
    c = _last_json(capsys)["metrics"]["chair64"]
    assert c["n"] == 6 and c["len"] > 0
