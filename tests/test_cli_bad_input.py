"""Bad input on the command line: one clear ``vlmguard: error: ...`` line (exit status 2), checked before any
work (no model loads, no cluster starts), never a traceback, and results printed before files are written."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlmguard.cli import main
from vlmguard.errors import InvalidInput

FIX = Path(__file__).resolve().parent / "fixtures" / "bench"
SYNTH = FIX / "synth_mini"


def run_cli(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr()


def assert_error(capsys, argv, *needles, one_line=True):
    rc, out = run_cli(capsys, [str(a) for a in argv])
    assert rc == 2, (out.out, out.err)
    assert "Traceback" not in out.err
    if one_line:
        assert out.err.startswith("vlmguard: error:") and out.err.count("\n") == 1, out.err
    for needle in needles:
        assert needle in out.err, out.err
    return out


@pytest.fixture()
def no_work(monkeypatch):
    """Every way to load a model, start a cluster or reach the Jobs API fails the test: errors must come first."""
    import vlmguard.engine
    import vlmguard.perf.models
    import vlmguard.workers.jobs
    import vlmguard.workers.launch

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the bad input was reported")

    monkeypatch.setattr(vlmguard.engine.Engine, "load", forbidden)
    monkeypatch.setattr(vlmguard.perf.models, "load_engine", forbidden)
    monkeypatch.setattr(vlmguard.workers.launch, "start_service", forbidden)
    monkeypatch.setattr(vlmguard.workers.launch, "start_detached_cluster", forbidden)
    monkeypatch.setattr(vlmguard.workers.jobs, "client", forbidden)


@pytest.fixture()
def a_dir(tmp_path):
    d = tmp_path / "a_dir"
    d.mkdir()
    return d


@pytest.fixture()
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("keep me\n")
    return f


PERF = ["--shape", "random:llava", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet"]


# ---- 1. output paths are checked before the work ------------------------------------------------------

@pytest.mark.parametrize("cmd", ["prefill", "decode", "serve"])
def test_perf_out_and_plot_checked_first(capsys, no_work, a_dir, tmp_path, cmd):
    base = ["perf", cmd, *PERF] + (["--no-ray"] if cmd == "serve" else [])
    assert_error(capsys, base + ["--out", a_dir], f"--out {a_dir}: is a directory")
    assert_error(capsys, base + ["--plot", a_dir], f"--plot {a_dir}: is a directory")
    assert_error(capsys, base + ["--plot", tmp_path / "x.txt"], "unsupported figure format '.txt'", ".png")
    # without an extension matplotlib would have written x.png: refused, naming the formats
    assert_error(capsys, base + ["--plot", tmp_path / "figure"], "--plot", "no file extension", ".png")
    assert not (tmp_path / "figure.png").exists()


def test_output_checks_leave_nothing_behind(capsys, no_work, tmp_path, a_file):
    out = tmp_path / "new" / "deeper" / "r.json"
    assert_error(capsys, ["perf", "prefill", *PERF, "--out", out, "--plot", tmp_path / "new" / "f.txt"],
                 "unsupported figure format")
    assert not (tmp_path / "new").exists()  # the --out probe removed the folders it made
    assert_error(capsys, ["perf", "prefill", *PERF, "--out", a_file / "r.json"], f"--out {a_file / 'r.json'}",
                 "cannot write it")
    assert a_file.read_text() == "keep me\n"


def test_perf_plot_command_checks_its_figure_path(capsys, tmp_path):
    (tmp_path / "r.json").write_text('{"command": "perf prefill", "rows": []}')
    assert_error(capsys, ["perf", "plot", tmp_path / "r.json", "--out", tmp_path / "x.txt"], "--out",
                 "unsupported figure format")


def test_perf_results_are_printed_before_the_file_is_written(capsys, a_dir):
    from vlmguard.perf.report import emit

    with pytest.raises(InvalidInput, match="--out .*: cannot write it .Is a directory"):
        emit({"rows": []}, "THE TABLE", False, str(a_dir))
    assert "THE TABLE" in capsys.readouterr().out
    with pytest.raises(InvalidInput, match="--out .*: cannot write it"):
        emit({"rows": [1]}, "THE TABLE", True, str(a_dir))
    assert '{"rows": [1]}' in capsys.readouterr().out


def test_synth_eval_save_checked_first(capsys, no_work, a_dir):
    assert_error(capsys, ["synth", "eval", "--pope-limit", "2", "--chair-images", "2", "--save", a_dir],
                 f"--save {a_dir}: is a directory")
    assert_error(capsys, ["synth", "eval", "--pope-limit", "2", "--chair-images", "2", "--db", a_dir],
                 f"--db {a_dir}: is a directory")


def test_score_chair_records_checked_first(capsys, a_dir, tmp_path):
    # the captions file does not even exist: the output is checked before anything is read
    assert_error(capsys, ["score", "chair", "--captions", tmp_path / "none.jsonl", "--gt", tmp_path / "gt",
                          "--records", a_dir], f"--records {a_dir}: is a directory")


# ---- 2. a file where a folder is expected ----------------------------------------------------------------

def test_out_folder_that_is_a_file(capsys, no_work, tmp_path, a_file):
    from vlmguard.bench.db import connect

    connect(tmp_path / "r.sqlite").close()
    msg = f"--out {a_file}: exists and is not a directory"
    assert_error(capsys, ["report", "--db", tmp_path / "r.sqlite", "--out", a_file], msg)
    assert_error(capsys, ["bench", "make-leading", "--questions", SYNTH / "pope" / "synthcoco_pope_random.json",
                          "--out", a_file], msg)
    assert_error(capsys, ["synth", "build", "--out", a_file, "--test", "1"], msg)
    data = _train_data(tmp_path)
    assert_error(capsys, ["synth", "train", "--data", data, "--out", a_file, "--steps", "0,0,1"], msg)
    assert a_file.read_text() == "keep me\n"


def _train_data(tmp_path: Path) -> Path:
    """Just enough of a SynthCOCO directory to pass `synth train`'s first checks (nothing is loaded)."""
    data = tmp_path / "data"
    (data / "text").mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    (data / "text" / "train.jsonl").write_text("")
    return data


# ---- 3. synth eval's limits ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--pope-limit", "2", "--chair-images", "-1"], "--chair-images must be >= 0"),
    (["--pope-limit", "-1"], "--pope-limit must be >= 0"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_synth_eval_limits_checked_first(capsys, no_work, argv, needle):
    out = assert_error(capsys, ["synth", "eval", *argv], needle)
    assert "--limit" not in out.err


# ---- 4. bench sweep: the whole config before any run -----------------------------------------------------

@pytest.mark.parametrize("body, needles", [
    ("benchmarks: [pope]\nmethods: 5\n", ["methods", "valid list"]),
    ("benchmarks: 5\n", ["benchmarks", "valid list"]),
    ("benchmarks: [{pope: 5}]\n", ["'pope'", "options must be a mapping"]),
    ("benchmarks: [pope]\nlimit: abc\n", ["limit", "valid integer"]),
    ("benchmarks: [pope]\ndb: 5\n", ["db", "valid string"]),
    ("benchmarks: [{pope: {splits: random}}]\n", ["splits", "valid list"]),
    ("benchmarks: [{pope: {splits: [random], bogus: 1}}]\n", ["'pope'", "unknown options ['bogus']"]),
    ("benchmarks: [{pope: {splits: [randm]}}]\n", ["splits.0"]),
    ("benchmarks: [{pope: {parser: nope}}]\n", ["'pope'", "nope"]),
    ("benchmarks: [{chair: {preset: chair1}}]\n", ["'chair'", "chair1"]),
    ("benchmarks: [{pope-leading: {templates: [Z+]}}]\n", ["'pope-leading'", "Z+"]),
    ("benchmarks: [pope]\nmethods:\n  - {name: a, pruning_params: 5}\n", ["method 'a'", "pruning_params"]),
    # a bad second method fails before the first method's runs
    ("benchmarks: [pope]\nmethods:\n  - {name: base}\n  - {name: v, decoding: vcd, decoding_params: {alpha: abc}}\n",
     ["method 'v'", "alpha"]),
    ("benchmarks: [pope]\nmethods:\n  - {name: base}\n  - {name: p, pruning: nosuch}\nbudgets: [8]\n",
     ["method 'p'", "nosuch"]),
    ("benchmarks: [pope]\nmethods:\n  - {name: base}\n  - {name: f, pruning: fastv, budget: -3}\n",
     ["method 'f'", "budget"]),
    ("benchmarks: [pope\n  x: {\n", ["bad YAML"]),
])
def test_sweep_config_checked_before_any_run(capsys, no_work, tmp_path, body, needles):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"dataset: {SYNTH}\n" + body)
    assert_error(capsys, ["bench", "sweep", cfg, "--db", tmp_path / "s.sqlite", "--no-progress"], str(cfg), *needles)
    assert not (tmp_path / "s.sqlite").exists()


def test_sweep_db_checked_before_any_run(capsys, no_work, tmp_path, a_dir):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"dataset: {SYNTH}\nbenchmarks: [pope]\n")
    assert_error(capsys, ["bench", "sweep", cfg, "--db", a_dir, "--no-progress"], f"--db {a_dir}: is a directory")
    cfg.write_text(f"dataset: {SYNTH}\ndb: {a_dir}\nbenchmarks: [pope]\n")
    assert_error(capsys, ["bench", "sweep", cfg, "--no-progress"], f"{cfg}: db {a_dir}: is a directory")


# ---- 5. serve options and config --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--replicas", "0"], "--replicas 0: Input should be greater than or equal to 1"),
    (["--port", "70000"], "--port 70000: Input should be less than or equal to 65535"),
    (["--max-batch-size", "0"], "--max-batch-size 0: Input should be greater than or equal to 1"),
    (["--batch-wait-ms", "-5"], "--batch-wait-ms -5.0"),
])
def test_serve_options_one_line_before_ray(capsys, no_work, argv, needle):
    out = assert_error(capsys, ["serve", *argv], needle)
    assert "validation error" not in out.err


def test_serve_unloadable_model_one_line_before_ray(capsys, no_work, tmp_path):
    """A model the local replicas could not load is reported before Ray starts (it was a deployment failure
    that lost the reason: "Failed to update the deployments [...]")."""
    assert_error(capsys, ["serve", "--model", str(tmp_path / "nope")], f"no such directory {tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert_error(capsys, ["serve", "--model", str(tmp_path / "empty")], "has no config.json")


def test_serve_bad_yaml_one_line(capsys, no_work, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{model: tiny\n  x: : 1\n")
    assert_error(capsys, ["serve", "--config", bad], f"vlmguard: error: {bad}:2:", "bad YAML (")


def test_serve_stop_without_a_cluster_says_so(capsys, monkeypatch):
    import ray

    def no_cluster(*a, **k):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    rc, out = run_cli(capsys, ["serve", "--stop"])
    assert rc == 0 and out.out == "no Ray cluster is running: nothing to stop\n" and "Traceback" not in out.err


def test_detach_onto_a_running_cluster_reuses_it(monkeypatch):
    import subprocess

    import vlmguard.workers.launch as launch

    class RayStart:  # `ray start` that fails with ``stderr``
        stderr = ""

        def __init__(self, *args, **kwargs):
            assert kwargs["start_new_session"]
            self.pid, self.returncode = 999999, 1

        def communicate(self):
            return "", RayStart.stderr

    ended = []
    monkeypatch.setattr(subprocess, "Popen", RayStart)
    monkeypatch.setattr(launch, "end_process_group", ended.append)
    RayStart.stderr = ("ConnectionError: Ray is trying to start at 127.0.0.1:6379, but is already running at "
                       "127.0.0.1:6379.")
    assert launch.start_detached_cluster() == "127.0.0.1:6379"
    assert ended == []  # nothing of the running cluster's is ended
    RayStart.stderr = "some other failure"
    with pytest.raises(launch.VlmguardError, match="some other failure"):
        launch.start_detached_cluster()
    assert ended == [999999]  # what the failed start left is ended


# ---- 6. bench --db ------------------------------------------------------------------------------------------

def test_bench_db_checked_first(capsys, no_work, a_dir):
    argv = ["bench", "pope", "--limit", "2", "--dataset", SYNTH, "--no-progress"]
    assert_error(capsys, argv + ["--db", a_dir], f"--db {a_dir}: is a directory")
    if Path("/proc/self").exists():
        assert_error(capsys, argv + ["--db", "/proc/x.sqlite"], "--db /proc/x.sqlite: cannot open")


# ---- 7. synth train --init and learning rates ------------------------------------------------------------

def test_synth_train_init_and_learning_rates(capsys, no_work, tmp_path):
    data = _train_data(tmp_path)
    base = ["synth", "train", "--data", data, "--out", tmp_path / "out", "--steps", "0,0,1"]
    assert_error(capsys, base + ["--init", "/nonexist"], "--init /nonexist: not a saved tiny model (no tokenizer.json)")
    assert_error(capsys, base + ["--init", tmp_path], f"--init {tmp_path}: not a saved tiny model")
    assert_error(capsys, base + ["--instruct-lr", "-1"], "--instruct-lr must be a learning rate > 0")
    assert_error(capsys, base + ["--vision-lr", "0"], "--vision-lr must be a learning rate > 0")
    assert not (tmp_path / "out").exists()


# ---- 8. perf --threads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", ["-2", "0"])
def test_perf_threads_at_least_one(capsys, no_work, threads):
    argv = ["perf", "prefill", "--shape", "random:llava", "--repeats", "1", "--warmup", "0", "--quiet",
            "--threads", threads]
    assert_error(capsys, argv, "argument --threads: must be >= 1", one_line=False)


# ---- 9. job submit checks locally ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--pruning", "nosuch", "--budget", "8"], "unknown pruning method 'nosuch'"),
    (["--decoding", "vcd", "--param", "alpha=abc"], "alpha"),
    (["--dataset", "/nonexist"], "--dataset '/nonexist'"),
    (["--shards", "-2"], "--shards: expected an integer >= 1, got -2"),
    (["--shards", "0"], "--shards: expected an integer >= 1, got 0"),
    (["--parser", "nope"], "--parser: invalid choice"),
    # the Jobs API is on this machine: the job's files are checked here too, as `vlmguard bench` checks them
    (["--db", str(FIX)], f"--db {FIX}: is a directory"),
    (["--limit", "2", "--image-ids", "/no/such/ids.txt"], "--image-ids /no/such/ids.txt: file not found"),
    (["--device", "cuda"], "--device cannot be used in a job"),
    (["--dtype", "bfloat16"], "--dtype cannot be used in a job"),
    (["--quantization", "bnb-nf4"], "--quantization cannot be used in a job"),
])
def test_job_submit_checked_before_the_cluster(capsys, no_work, argv, needle):
    assert_error(capsys, ["job", "submit", "--address", "http://127.0.0.1:9", "bench", "pope", *argv], needle)


def test_a_sweep_job_that_names_a_quantization_is_refused(capsys, no_work, tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("model: tiny\nquantization: bnb-nf4\nbenchmarks:\n  - pope: {splits: [random]}\n")
    assert_error(capsys, ["job", "submit", "--address", "http://127.0.0.1:9", "bench", "sweep", cfg],
                 "quantization cannot be used in a job")


# ---- 10. perf decode takes decoders with parameters ---------------------------------------------------------

def test_perf_decode_decoders_with_parameters(capsys):
    from cli_support import run_json

    data = run_json(["perf", "decode", *PERF, "--decoders", "vcd[alpha=0.5],vcd", "--batch", "1",
                     "--new-tokens", "2", "--json"])
    assert [r["decoder"] for r in data["rows"]] == ["greedy", "vcd[alpha=0.5]", "vcd"]
    capsys.readouterr()
    assert_error(capsys, ["perf", "decode", *PERF, "--decoders", "vcd[alpha=abc]", "--batch", "1"], "alpha")
    assert_error(capsys, ["perf", "decode", *PERF, "--decoders", "vcd[alpha=1", "--batch", "1"],
                 "expected NAME or NAME[KEY=VALUE;...]")


def test_prune_analyze_checks_its_out_and_min_size_first(capsys, no_work, a_dir):
    assert_error(capsys, ["prune", "analyze", "--model", "tiny", "--out", a_dir], "--out", "is a directory")
    assert_error(capsys, ["prune", "analyze", "--model", "tiny", "--min-size", "0"], "--min-size must be >= 1")


def test_readers_never_turn_another_sqlite_file_into_a_results_database(capsys, tmp_path):
    import hashlib
    import sqlite3

    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    for cmd in (["report", "--db", foreign], ["compare", "--db", foreign]):
        assert_error(capsys, cmd, "not a vlmguard results database")
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before


def test_mistakes_that_used_to_pass_silently(capsys, no_work, tmp_path):
    assert_error(capsys, ["generate", "--image", "x.png", "--prompt", "hi", "--budget", "16"], "--budget needs --pruning")
    assert_error(capsys, ["bench", "pope", "--dataset", SYNTH, "--limit", "2", "--budget", "16"], "--budget needs --pruning")
    assert_error(capsys, ["bench", "chair", "--dataset", SYNTH, "--limit", "2", "--prompt", " "], "--prompt is empty")
    assert_error(capsys, ["synth", "build", "--out", tmp_path / "w", "--train", "0", "--val", "0", "--test", "0"],
                 "nothing to build")
    rc, out = run_cli(capsys, ["bench", "pope", "--dataset", str(SYNTH), "--sample", "--greedy"])
    assert rc == 2 and "not allowed with argument" in out.err and "Traceback" not in out.err
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 1, "caption": "a dog"}\n{"image_id": 1, "caption": "a cat"}\n')
    assert_error(capsys, ["score", "chair", "--captions", captions, "--gt", tmp_path / "none.json"], "duplicate image_id 1")


def test_score_pope_with_an_empty_answers_file_is_an_error(capsys, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("")
    questions = SYNTH / "pope" / "synthcoco_pope_random.json"
    assert_error(capsys, ["score", "pope", "--answers", answers, "--questions", questions], "no answers in file")


# ---- 11. perf: names, budgets, seeds and service options before the model loads ---------------------------

@pytest.mark.parametrize("argv, needle", [
    (["prefill", "--methods", "nosuch", "--budgets", "8"], "unknown pruning method 'nosuch'"),
    (["prefill", "--methods", "fastv", "--budgets", "0"], "budget must be >= 1"),
    (["prefill", "--methods", "fastv", "--budgets", "2.5"], "budget 2.5 is neither a whole number"),
    (["prefill", "--methods", "flowcut[bogus=1]", "--budgets", "8"], "bogus"),
    (["decode", "--decoders", "nosuch", "--batch", "1"], "unknown decoding method 'nosuch'"),
    (["decode", "--decoders", "vcd", "--batch", "1", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["decode", "--decoders", "vcd", "--batch", "1", "--pruning", "nosuch", "--budget", "8"],
     "unknown pruning method 'nosuch'"),
    # the budget was silently dropped (rows said budget None)
    (["decode", "--decoders", "vcd", "--batch", "1", "--budget", "8"], "--budget needs --pruning"),
    (["decode", "--decoders", "vcd", "--batch", "1", "--pruning", "none", "--budget", "8"], "--budget needs --pruning"),
    (["prefix", "--decoders", "greedy", "--budget", "8"], "--budget needs --pruning"),
    (["prefix", "--decoders", "greedy", "--pruning", "flowcut"], "--pruning needs --budget"),
    (["prefix", "--decoders", "greedy", "--pruning", "nosuch", "--budget", "8"], "unknown pruning method 'nosuch'"),
    (["chat", "--budget", "8"], "--budget needs --pruning"),
    (["chat", "--pruning", "nosuch", "--budget", "8"], "unknown pruning method 'nosuch'"),
])
def test_perf_methods_checked_before_the_model_loads(capsys, no_work, argv, needle):
    """A real shape takes minutes to build: a typo in a method must not wait for it."""
    cmd, rest = argv[0], argv[1:]
    assert_error(capsys, ["perf", cmd, "--shape", "llava-1.5-7b-cpu4", "--repeats", "1", "--quiet", *rest], needle)


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "argument --seed: must be in [0, 2**63-1], got -1"),  # was numpy's ValueError traceback
    (["--seed", str(2**64)], "argument --seed"),
    (["--budgets", "abc"], "argument --budgets: budget must be a number, got 'abc'"),
])
def test_perf_seed_and_budget_arguments(capsys, no_work, argv, needle):
    assert_error(capsys, ["perf", "prefill", *PERF, *argv], needle, one_line=False)


@pytest.mark.parametrize("value, needle", [("-1", "argument --other-chats: must be in [0, 1024], got -1"),
                                           ("many", "argument --other-chats: invalid _other_chats value: 'many'")])
def test_perf_chat_other_chats_argument(capsys, no_work, value, needle):
    assert_error(capsys, ["perf", "chat", "--shape", "tiny", "--other-chats", value], needle, one_line=False)


def test_perf_repeated_methods_budgets_and_batches_measured_once(capsys):
    from cli_support import run_json

    data = run_json(["perf", "prefill", *PERF, "--methods", "fastv,none,fastv", "--budgets", "8,8.0,1.0",
                     "--json"])
    rows = [(r["method"], r["budget"]) for r in data["rows"]]
    assert rows == [("none", None), ("fastv", 8), ("fastv", 1.0)]  # 1.0 is the ratio (keep all), as in bench
    assert all(len(r["times"]["samples"]["prefill_s"]) == 1 for r in data["rows"])  # --repeats 1: one sample
    assert data["rows"][2]["visual_tokens_per_layer"] == [data["rows"][0]["visual_tokens"]] * 4
    data = run_json(["perf", "decode", *PERF, "--decoders", "greedy", "--batch", "1,1", "--new-tokens", "2",
                     "--json"])
    assert [(r["decoder"], r["batch"]) for r in data["rows"]] == [("greedy", 1)]


@pytest.mark.parametrize("argv, needle", [
    (["--max-batch", "1000"], "--max-batch 1000: Input should be less than or equal to 256"),
    (["--batch-wait-ms", "-5"], "--batch-wait-ms -5.0 (= -0.005 s): Input should be greater than or equal to 0"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms nan (= nan s): Input should be a finite number"),  # not "<= 10"
])
def test_perf_serve_options_checked_before_the_model_and_ray(capsys, no_work, monkeypatch, argv, needle):
    """These were a pydantic traceback after the model loaded and Ray started."""
    import vlmguard.perf.serve as perf_serve

    monkeypatch.setattr(perf_serve, "_private_ray", lambda *a, **k: pytest.fail("Ray started"))
    out = assert_error(capsys, ["perf", "serve", *PERF, "--clients", "1", "--requests", "2", *argv], needle)
    assert "validation error" not in out.err


@pytest.mark.parametrize("argv, needle", [
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb -1.0: Input should be greater than or equal to 0"),
    (["--spill-queue", "0"], "argument --spill-queue: must be >= 1"),
    (["--think-s", "-1"], "argument --think-s: must be in [0, 600] seconds, got -1"),
    (["--think-s", "nan"], "argument --think-s: must be in [0, 600] seconds, got nan"),
    (["--new-tokens", "0"], "argument --new-tokens: must be >= 1"),
])
def test_perf_routing_options_checked_before_the_model_and_ray(capsys, no_work, monkeypatch, argv, needle):
    import vlmguard.perf.serve as perf_serve

    monkeypatch.setattr(perf_serve, "_private_ray", lambda *a, **k: pytest.fail("Ray started"))
    # argparse's own errors come with the usage; the config's are one line
    out = assert_error(capsys, ["perf", "routing", *PERF, *argv], needle, one_line=not needle.startswith("argument"))
    assert "validation error" not in out.err


def test_perf_plot_of_a_broken_report(capsys, tmp_path):
    bad = tmp_path / "r.json"
    bad.write_bytes(b"\xff\xfe{}")
    assert_error(capsys, ["perf", "plot", bad, "--out", tmp_path / "f.png"], f"{bad} is not a JSON report",
                 "not UTF-8")
    bad.write_text('{"command": "perf prefill", "rows": [{"budget": 8}]}')
    assert_error(capsys, ["perf", "plot", bad, "--out", tmp_path / "f.png", "--markdown"],
                 f"{bad} is not a vlmguard perf report", "KeyError")


# ---- 12. prune analyze: the calibration images before the model, --min-size against its depth --------------

def test_prune_analyze_images_checked_before_the_model(capsys, no_work, tmp_path, a_file, a_dir):
    base = ["prune", "analyze", "--model", "tiny", "--samples", "2", "--images"]
    assert_error(capsys, base + [tmp_path / "none"], f"--images {tmp_path / 'none'}: no such directory")
    assert_error(capsys, base + [a_file], f"--images {a_file}: not a directory")
    assert_error(capsys, base + [a_dir], f"no images (.jpg/.png/.webp) in {a_dir}")
    (a_dir / "broken.png").write_text("not an image")
    assert_error(capsys, base + [a_dir], f"--images: cannot read image {a_dir / 'broken.png'}")


def test_prune_analyze_min_size_too_large_for_the_model(capsys, tmp_path):
    """It wrote a schedule from an all-zero histogram: no change point fits in 4 layers with segments of 3. (The
    check needs the model's depth, so the weights load first: --json keeps their progress bar off stderr, which
    this test reads whole, whichever tests ran before it.)"""
    out = tmp_path / "s.json"
    assert_error(capsys, ["prune", "analyze", "--model", "tiny", "--samples", "1", "--min-size", "3", "--out", out,
                          "--json"], "--min-size 3 is too large for the 4 decoder layers of tiny (at most 2)")
    assert not out.exists()


# ---- 13. score: broken gzip, non-UTF-8 and incomplete ground truth ------------------------------------------

def test_score_files_that_are_not_valid_gzip(capsys, tmp_path):
    import gzip

    questions = SYNTH / "pope" / "synthcoco_pope_random.json"
    good = gzip.compress(b'{"question_id": 1, "text": "yes"}\n' * 20)
    cases = {"notgz.jsonl.gz": b"plain text", "cut.jsonl.gz": good[:20], "bad.jsonl.gz": good[:10] + b"\xff" * 6 + good[16:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert_error(capsys, ["score", "pope", "--answers", tmp_path / name, "--questions", questions],
                     f"{tmp_path / name}: not a valid gzip file")
        assert_error(capsys, ["score", "chair", "--captions", tmp_path / name, "--gt", SYNTH / "annotations"],
                     f"{tmp_path / name}: not a valid gzip file")
    table = tmp_path / "gt.json.gz"
    table.write_bytes(cases["bad.jsonl.gz"])
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 1, "caption": "a dog"}\n')
    assert_error(capsys, ["score", "chair", "--captions", captions, "--gt", table],
                 f"{table}: cannot read CHAIR ground-truth table")
    table = tmp_path / "gt.json"
    table.write_bytes(b"\x80{}")
    assert_error(capsys, ["score", "chair", "--captions", captions, "--gt", table],
                 f"{table}: cannot read CHAIR ground-truth table")


def test_score_chair_coco_annotation_folder_with_bad_files(capsys, tmp_path):
    import json

    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_id": 1, "caption": "a dog"}\n')
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "instances_x.json").write_text((SYNTH / "annotations" / "instances_test.json").read_text())
    caps = json.loads((SYNTH / "annotations" / "captions_test.json").read_text())
    for ann in caps["annotations"]:
        del ann["caption"]
    (gt / "captions_x.json").write_text(json.dumps(caps))
    assert_error(capsys, ["score", "chair", "--captions", captions, "--gt", gt],
                 f"{gt / 'captions_x.json'}: annotation", "expected a 'caption' string")
    (gt / "instances_x.json").write_bytes(b"\x80{}")
    assert_error(capsys, ["score", "chair", "--captions", captions, "--gt", gt],
                 f"{gt / 'instances_x.json'}: not UTF-8 text")


# ---- 14. compare: its resampling seed and count ------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "--seed must be >= 0, got -1"),  # was numpy's ValueError traceback
    (["--boot", "999999999999"], "--boot must be at most 100000"),  # was a MemoryError traceback (or worse)
])
def test_compare_seed_and_boot_checked(capsys, tmp_path, argv, needle):
    from vlmguard.bench.db import connect

    connect(tmp_path / "r.sqlite").close()
    assert_error(capsys, ["compare", "--db", tmp_path / "r.sqlite", *argv], needle)


# ---- 15. bench sweep: a key given twice, every model before the first run -----------------------------------

def test_sweep_yaml_key_given_twice(capsys, no_work, tmp_path):
    """PyYAML kept the last of two keys silently: the sweep ran only the second list of budgets."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"dataset: {SYNTH}\nbenchmarks: [pope]\nmethods: [{{name: f, pruning: fastv}}]\n"
                   "budgets: [16]\nbudgets: [8]\n")
    assert_error(capsys, ["bench", "sweep", cfg, "--db", tmp_path / "s.sqlite", "--no-progress"],
                 f"{cfg}:5:1: bad YAML (found duplicate key 'budgets')")
    cfg.write_text(f"dataset: {SYNTH}\nbenchmarks: [pope]\nmethods:\n"
                   "  - {name: v, decoding: vcd, decoding_params: {alpha: 1, alpha: 2}}\n")
    assert_error(capsys, ["bench", "sweep", cfg, "--db", tmp_path / "s.sqlite", "--no-progress"],
                 "found duplicate key 'alpha'")
    assert not (tmp_path / "s.sqlite").exists()


def test_sweep_yaml_merge_keys_may_be_overridden(tmp_path):
    from vlmguard.files import read_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: &b {alpha: 1, beta: 2}\nother:\n  <<: *b\n  alpha: 3\n")
    assert read_yaml(cfg, "config") == {"base": {"alpha": 1, "beta": 2}, "other": {"alpha": 3, "beta": 2}}


def test_sweep_models_found_before_any_run(capsys, no_work, tmp_path):
    """The second model's path was found missing only after the first model's runs."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"dataset: {SYNTH}\nbenchmarks: [pope]\nmodel: [tiny, {tmp_path / 'nope'}]\n")
    assert_error(capsys, ["bench", "sweep", cfg, "--db", tmp_path / "s.sqlite", "--no-progress"],
                 f"{cfg}: model '{tmp_path / 'nope'}'", "no such directory")
    assert not (tmp_path / "s.sqlite").exists()
