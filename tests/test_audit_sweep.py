"""`vlmguard bench sweep`: what a sweep YAML may say, and how a sweep stops and resumes.

Audited: unknown keys at every level, typos in method names and parameters, wrong types and YAML 1.1 traps
(`no`, `on`, `1e3` as a string), empty configs, duplicate runs, relative paths, a sweep stopped mid-run and
rerun, a changed config, and the report's labels. Defects found (each fixed, each tested below):

- `decoding_params: {neutral_text: oracle}` (pope-leading only) passed the up-front check on a `pope` or `chair`
  benchmark and failed only when that run came up, after the earlier methods' runs.
- a method's `budget` / `budgets` without a pruning method was dropped without a word: the method ran unpruned
  (`vlmguard bench --budget` without `--pruning` is refused).
- `model` and `models` both given: `models` ran and `model` was dropped without a word.
- a misspelt `random:FAMILY` model later in `models` was found only after the earlier models' runs; a bad
  `device` failed after the database was created, in a line naming neither the file nor the key.
- a bad `dataset` (or coco_* path) was reported as `--dataset ...` without naming the config file.

Held (tested so they stay so): SIGTERM in the middle of a run stops the sweep in one line, and the rerun skips
the finished runs and resumes the partial one with nothing lost or done twice.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vlmguard.bench.sweep import run_sweep
from vlmguard.cli import main
from vlmguard.errors import InvalidInput

from test_bench_runner import SYNTH, FakeEngine, _count

REPO = Path(__file__).resolve().parents[1]


def _refused(tmp_path: Path, body: str, *needles: str) -> None:
    """The sweep fails before any model loads or the database is created, naming the file and the key."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"dataset: {SYNTH}\n" + body)
    loads: list[str] = []
    with pytest.raises(InvalidInput) as e:
        run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=lambda name: loads.append(name) or FakeEngine(),
                  progress=False)
    for needle in (str(cfg), *needles):
        assert needle in str(e.value), str(e.value)
    assert not loads and not (tmp_path / "s.sqlite").exists()


def test_oracle_neutral_text_on_a_pope_benchmark_fails_before_any_run(tmp_path):
    _refused(tmp_path, "benchmarks:\n  - pope-leading: {splits: [random], templates: [D-]}\n"
             "  - pope: {splits: [random]}\nmethods:\n  - {name: base}\n"
             "  - {name: lq, decoding: lqcd, decoding_params: {neutral_text: oracle}}\n",
             "method 'lq' (pope)", "neutral_text=oracle only applies to the pope-leading benchmark")


@pytest.mark.parametrize("method, key", [("{name: v, decoding: vcd, budget: 16}", "'budget'"),
                                         ("{name: v, pruning: none, budgets: [16, 8]}", "'budgets'")])
def test_a_budget_without_a_pruning_method_is_refused(tmp_path, method, key):
    _refused(tmp_path, f"benchmarks: [pope]\nmethods:\n  - {{name: base}}\n  - {method}\n",
             "method 'v'", key, "needs a pruning method")


def test_model_and_models_together_are_refused(tmp_path):
    _refused(tmp_path, "benchmarks: [pope]\nmodel: random:llava\nmodels: [random:qwen]\n", "'model' or 'models'")


@pytest.mark.parametrize("body, needle", [("models: [random:llava, random:llavaa]\n", "'random:llavaa'"),
                                          ("model: random:llava\ndevice: gpu\n", "unknown device 'gpu'")])
def test_a_misspelt_model_or_device_fails_before_any_model_loads(tmp_path, monkeypatch, capsys, body, needle):
    import vlmguard.engine

    def forbidden(*args, **kwargs):
        raise AssertionError("a model loaded before the bad name was reported")

    monkeypatch.setattr(vlmguard.engine.Engine, "load", forbidden)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"dataset: {SYNTH}\nbenchmarks: [pope]\n{body}")
    assert main(["bench", "sweep", str(cfg), "--db", str(tmp_path / "s.sqlite"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlmguard: error: {cfg}: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "s.sqlite").exists()


def test_a_bad_dataset_names_the_config_file(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("dataset: no/such/dir\nbenchmarks: [pope]\n")
    with pytest.raises(InvalidInput, match=rf"^{cfg}: .*'no/such/dir'"):
        run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=lambda name: FakeEngine(), progress=False)


# A sweep that stops itself with SIGTERM on the first stored batch of its second run (deterministic: no race).
_STOP_IN_SECOND_RUN = """
import os, signal, sys
from vlmguard.bench import sweep
from vlmguard.cli import main
real, calls = sweep.run_benchmark, []
def run(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        kwargs["on_batch"] = lambda n: os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
sweep.run_benchmark = run
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_a_sweep_in_one_line_and_the_rerun_resumes(tmp_path, capsys):
    cfg, db = tmp_path / "sweep.yaml", tmp_path / "s.sqlite"
    cfg.write_text(f"model: random:llava\ndataset: {SYNTH}\nlimit: 6\nbatch_size: 2\nmax_new_tokens: 2\n"
                   "benchmarks:\n  - pope: {splits: [random, popular]}\n"
                   "methods: [{name: base}, {name: v, decoding: vcd}]\n")
    argv = ["bench", "sweep", str(cfg), "--db", str(db), "--no-progress"]
    stopped = subprocess.run([sys.executable, "-c", _STOP_IN_SECOND_RUN, *argv], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert stopped.returncode == 128 + signal.SIGTERM, (stopped.returncode, stopped.stderr)
    assert "terminated (SIGTERM)" in stopped.stderr and "Traceback" not in stopped.stderr
    assert main(argv + ["--json"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert [r["status"] for r in runs] == ["finished"] * 4
    assert [r["n_new"] for r in runs] == [0, 4, 6, 6]  # the first run skipped, the second resumed after 2
    assert len({r["run_id"] for r in runs}) == 4
    for r in runs:
        assert _count(db, r["run_id"]) == (6, 6)
