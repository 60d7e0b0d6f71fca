"""Audit of the command line against the forms the issues promise (other tools call them exactly).

Checklist (issue: item): 2: ``generate --model --image --prompt [--pruning --budget] [--decoding] [--param key=value
...] [--max-new-tokens] [--stream] [--json]``, ``--json`` one object on the last line (text, tokens, timings, kept
visual tokens), bad input a one-line error with a non-zero exit. 3: ``prune analyze --model``, budgets as counts or
ratios, invalid budgets refused. 5: ``bench pope|pope-leading|chair --model --dataset [--split S] [--pruning]
[--decoding] [--limit] [--db] [--json]`` (dataset default ``synthcoco``), ``bench sweep CONFIG.yaml``, ``report --db``
(tables, CSV, PNG plots), ``score pope --answers --questions [--json]``, ``score chair --captions --gt [--json]``,
malformed files named with file and line. 6: ``serve [--config] [--port] [--address]``, ``job submit bench ...``,
``job status|logs|stop ID`` with ``--address``. 7: ``dashboard [--port] [--db]``. 8: ``perf prefill --shape --methods
--budgets [--batch] [--json]`` (defaults none,flowcut,adaptinfer,fastv,random and 192,128,64; rows with method, budget,
speedup, ideal_speedup, times, memory), ``perf decode --decoders`` (batch sizes 1 and 8, ``--pruning``), ``perf serve``
(1, 4 and 16 clients). 9: ``synth build --seed --out --train --val --test`` (test 500), ``synth train``.
README and docs/*.md commands parse.

Defects found and fixed:
- ``generate --param a=1 b=2`` (issue 2's ``[--param key=value ...]``) was refused ("unrecognized arguments"); one
  ``--param`` now takes one or more pairs, and repeating it still works.
- ``bench chair --split S`` (issue 5 gives ``[--split S]`` to all three benchmarks) was refused; for CHAIR it names the
  image split, an alias of ``--image-split``.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from vlmguard.cli import build_parser, main
from vlmguard.commands.generate import spec_from_args

SYNTH_MINI = Path(__file__).parent / "fixtures" / "bench" / "synth_mini"


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def _run_json(argv: list[str]) -> tuple[dict, list[str]]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0
    lines = buf.getvalue().strip().splitlines()
    return json.loads(lines[-1]), lines


def test_generate_param_takes_several_key_value_pairs():
    args = _parse("generate", "--image", "x.png", "--prompt", "hi", "--decoding", "vcd",
                  "--param", "alpha=1.0", "beta=0.1")
    assert args.param == ["alpha=1.0", "beta=0.1"]
    assert spec_from_args(args).decoding_params == {"alpha": 1.0, "beta": 0.1}


def test_generate_param_still_repeatable_and_mixed():
    args = _parse("generate", "--prompt", "hi", "--decoding", "vcd", "--param", "alpha=1.0", "--decoding-param",
                  "beta=0.1", "--param", "noise_step=400", "noise_seed=3", "--json")
    assert args.param == ["alpha=1.0", "noise_step=400", "noise_seed=3"] and args.decoding_param == ["beta=0.1"]
    assert spec_from_args(args).decoding_params == {"alpha": 1.0, "beta": 0.1, "noise_step": 400, "noise_seed": 3}
    assert args.json is True
    assert _parse("generate", "--prompt", "hi").param == []


def test_bench_chair_split_names_the_image_split():
    assert _parse("bench", "chair", "--split", "val").image_split == "val"
    assert _parse("bench", "chair").image_split == "test"  # the default is unchanged
    assert _parse("bench", "chair", "--image-split", "train").image_split == "train"


def test_bench_chair_split_runs_and_reports_it(tmp_path):
    out, _ = _run_json(["bench", "chair", "--model", "tiny", "--dataset", str(SYNTH_MINI), "--split", "test",
                        "--limit", "1", "--max-new-tokens", "2", "--db", str(tmp_path / "r.sqlite"),
                        "--no-progress", "--json"])
    assert out["benchmark"] == "chair" and [r["split"] for r in out["runs"]] == ["test"]
    assert "chair512" in out["metrics"]


def test_issue_defaults_of_perf_and_synth():
    pre = _parse("perf", "prefill")
    assert pre.shape == "llava-1.5-7b-cpu" and pre.batch == 1 and pre.json is False
    # the budgets default to 192 / 128 / 64 of 576, scaled to the shape's visual tokens once it is loaded
    assert pre.methods == ["none", "flowcut", "adaptinfer", "fastv", "random"] and pre.budgets is None
    dec = _parse("perf", "decode")
    assert dec.decoders == ["greedy", "vcd", "m3id", "vista", "iava", "lqcd"] and dec.batch == [1, 8]
    assert _parse("perf", "serve").clients == [1, 4, 16]
    assert _parse("synth", "build", "--out", "d").test == 500
    assert _parse("bench", "pope").dataset == "synthcoco"


def test_perf_prefill_default_budgets_follow_the_shape(capsys):
    """`perf prefill --shape tiny` failed on its own default budgets (192 of the tiny model's 144 tokens): they are
    the 192 / 128 / 64 of 576 scaled to the shape (tiny: 48 / 32 / 16; the 576-token shapes keep 192 / 128 / 64)."""
    from vlmguard.engine import Engine, load_engine
    from vlmguard.models.shapes import build_shape
    from vlmguard.perf.cli import default_budgets

    assert default_budgets(load_engine("tiny")) == [48, 32, 16]
    assert default_budgets(Engine(*build_shape("llava-1.5-7b-cpu"), name="shape")) == [192, 128, 64]
    out, _ = _run_json(["perf", "prefill", "--shape", "tiny", "--methods", "none,random", "--repeats", "1",
                        "--warmup", "0", "--quiet", "--json"])
    assert [r["budget"] for r in out["rows"]] == [None, 48, 32, 16]


def test_perf_prefill_json_is_one_object_with_the_promised_row_fields():
    out, lines = _run_json(["perf", "prefill", "--shape", "random:llava", "--methods", "none,fastv", "--budgets", "8",
                            "--repeats", "1", "--warmup", "0", "--quiet", "--json"])
    assert len(lines) == 1
    assert [(r["method"], r["budget"]) for r in out["rows"]] == [("none", None), ("fastv", 8)]
    for row in out["rows"]:
        assert {"method", "budget", "speedup", "ideal_speedup", "achieved_over_ideal", "times", "memory"} <= set(row)
        assert {"prefill_s", "ttft_s"} <= set(row["times"])
        assert {"peak_bytes", "kv_cache_bytes"} <= set(row["memory"])


def test_job_submit_bench_sweep_is_checked_here_and_runs_the_config_from_this_directory(tmp_path, monkeypatch,
                                                                                       capsys):
    """Issue 6: ``job submit bench ...`` "submits a sweep as a Ray Job"; a job ran one benchmark only. ``bench sweep
    CONFIG.yaml`` is now a job kind: checked here as ``vlmguard bench sweep`` checks it, before any cluster is
    contacted, and run on the cluster from this directory (the config's relative paths mean what they mean here).
    (The job itself runs against a real cluster in tests/test_serve_ray.py.)"""
    from vlmguard.workers import jobs
    from vlmguard.workers.bench_job import build_sweep_parser

    monkeypatch.chdir(tmp_path)
    good = tmp_path / "sweep.yaml"
    good.write_text(f"model: random:llava\ndataset: {SYNTH_MINI}\ndb: out/s.sqlite\n"
                    "benchmarks: [{pope: {splits: [random]}}]\nmethods: [{name: base}]\n")
    args = jobs.check_bench_args(["sweep", "sweep.yaml", "--limit", "4"], local_paths=True)
    assert args.config == "sweep.yaml" and args.limit == 4
    entry = jobs.bench_entrypoint(["sweep", "sweep.yaml", "--shards", "2"], python="py")
    assert entry == f"py -m vlmguard.workers.bench_job sweep {good} --shards 2 --chdir {tmp_path}"
    assert build_sweep_parser().parse_args(entry.split()[4:]).chdir == str(tmp_path)

    (tmp_path / "bad.yaml").write_text("benchmarks: [{pope: {splits: [random]}}]\n"
                                       "methods: [{name: x, decoding: vcdd}]\n")

    def no_cluster(*a, **k):
        raise AssertionError("the cluster was contacted")

    monkeypatch.setattr(jobs, "client", no_cluster)
    for argv, needle in ((["bad.yaml"], "bad.yaml: method 'x'"), (["missing.yaml"], "missing.yaml"),
                         (["sweep.yaml", "--bogus"], "unrecognized arguments: --bogus")):
        assert main(["job", "submit", "bench", "sweep", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlmguard: error: ") and needle in err and err.count("\n") == 1, err


def test_job_submit_bench_chair_takes_split_as_its_image_split(capsys):
    """``bench chair --split S`` names the image split; the job's own parser refused every split but POPE's."""
    from vlmguard.workers import jobs

    args = jobs.check_bench_args(["chair", "--split", "val", "--limit", "2"])
    assert args.image_split == "val" and args.split is None
    assert jobs.check_bench_args(["pope", "--split", "random", "--split", "all"]).split == ["random", "all"]
    assert main(["job", "submit", "bench", "pope", "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'val'" in err and err.count("\n") == 1, err
