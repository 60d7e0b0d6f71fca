"""Runner + results DB + reports + sweep, on the SynthCOCO-layout fixture with a fake engine (same
``generate(requests, spec)`` signature as :class:`vlmguard.engine.Engine`), including resume after a
simulated kill, sharding and idempotent writes."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vlmguard.bench import db as dbm
from vlmguard.bench.datasets import synth_dataset
from vlmguard.bench.report import build_report, method_label
from vlmguard.bench.runner import default_spec, run_benchmark
from vlmguard.bench.sweep import expand, load_config, run_sweep
from vlmguard.cli import main
from vlmguard.errors import InvalidInput

FIX = Path(__file__).resolve().parent / "fixtures" / "bench"
SYNTH = FIX / "synth_mini"


def _scenes() -> dict[int, set[str]]:
    inst = json.loads((SYNTH / "annotations" / "instances_test.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    out: dict[int, set[str]] = {}
    for a in inst["annotations"]:
        out.setdefault(a["image_id"], set()).add(cats[a["category_id"]])
    return out


SCENES = _scenes()
QUESTION = re.compile(r"Is there an? (.+?) in the im")


@dataclass
class FakeTimings:
    vision_s: float = 0.001
    prefill_s: float = 0.002
    decode_s: float = 0.003
    ttft_s: float = 0.004
    total_s: float = 0.005


@dataclass
class FakeResult:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"
    prompt_tokens: int = 30
    visual_tokens: int = 16
    visual_tokens_kept: list[int] = field(default_factory=list)
    kept_indices: list[int] | None = None
    timings: FakeTimings = field(default_factory=FakeTimings)


class FakeEngine:
    """Reads the image id from the red channel of pixel (0, 0) (see fixtures/bench/make_fixtures.py).

    POPE: answers truthfully, except that it follows any cue saying "It seems like there is." (a
    sycophant) and says "No" to cars it cannot see (a hallucination-free model otherwise).
    CHAIR: lists the true objects and adds a hallucinated dog; odd image ids end with an unfinished
    sentence and finish_reason "length".
    """

    model_name = "fake"
    family = "llava"
    context_length = 4096

    def __init__(self) -> None:
        self.calls = 0
        self.prompts: list[str] = []
        self.specs: list = []

    def generate(self, requests, spec):
        out = []
        self.specs.append(spec)
        budget = spec.budget if isinstance(spec.budget, int) else 16
        for r in requests:
            self.calls += 1
            self.prompts.append(r.prompt)
            imid = r.images[0].getpixel((0, 0))[0] // 10
            objs = SCENES[imid]
            kept = [16, 16, budget, budget]
            if "describe" in r.prompt.lower():
                text = "A photo of a " + " and a ".join(sorted(objs)) + " and a dog. It is"
                finish = "length" if imid % 2 else "stop"
                out.append(FakeResult(text, list(range(15)), finish, visual_tokens_kept=kept))
            else:
                obj = QUESTION.search(r.prompt).group(1)
                yes = obj in objs or "It seems like there is." in r.prompt
                out.append(FakeResult("Yes" if yes else "No", [1], visual_tokens_kept=kept))
        return out


@pytest.fixture()
def dataset():
    return synth_dataset(SYNTH)


def _count(db_path: Path, run_id: str) -> tuple[int, int]:
    with sqlite3.connect(db_path) as c:
        return c.execute("SELECT COUNT(*), COUNT(DISTINCT sample_key) FROM samples WHERE run_id = ?", (run_id,)).fetchone()


def test_dataset_layout(dataset):
    assert dataset.kind == "synth" and dataset.version.startswith("fixture-1+")
    assert set(dataset.pope_paths) == {"random", "popular", "adversarial"}
    assert len(dataset.pope_file("random")) == 24
    assert dataset.chair_image_ids() == ([1, 2, 3, 4], "all test images")
    assert dataset.chair_image_path(3).name == "synthcoco_test_000000000003.png"
    assert dataset.chair_ground_truth([4])[4] == frozenset({"cup", "fork", "knife", "bottle"})


def test_pope_run_records_everything_and_resumes(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    eng = FakeEngine()
    spec = default_spec("pope")
    out = run_benchmark(eng, "pope", dataset, spec, db, split="adversarial", batch_size=5, progress=False)
    assert out.status == "finished" and out.n_new == 24 and out.n_samples == 24
    assert out.metrics["accuracy"] == 100.0 and out.metrics["tp"] == 12 and out.metrics["tn"] == 12
    assert eng.prompts[0] == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert eng.specs[0].max_new_tokens == 128 and not eng.specs[0].sampling
    run = dbm.get_run(db, out.run_id)
    for key, want in {"benchmark": "pope", "model": "fake", "model_family": "llava", "dataset": "synth_mini",
                      "split": "adversarial", "prompt_preset": "llava", "parser": "official", "pruning": "none",
                      "decoding": "greedy", "max_new_tokens": 128, "do_sample": 0, "status": "finished",
                      "question_file": "synthcoco_pope_adversarial.json", "package_version": "0.1.0"}.items():
        assert run[key] == want, key
    assert run["dataset_version"] == dataset.version and len(run["question_sha256"]) == 64
    assert run["knobs"]["prompt"] == "\nAnswer the question using a single word or phrase."
    assert run["created_at"] and run["finished_at"]
    # same command again: same run, nothing regenerated
    again = run_benchmark(eng, "pope", dataset, spec, db, split="adversarial", batch_size=5, progress=False)
    assert again.run_id == out.run_id and again.n_new == 0 and eng.calls == 24
    s = dbm.run_samples(db, out.run_id)
    assert len(s) == 24 and s[0]["sample_key"] == "q:1" and s[0]["prediction"] == "yes" and s[0]["correct"] == 1
    assert s[0]["visual_tokens_kept"] == 16.0 and s[0]["visual_tokens_kept_layers"] == [16, 16, 16, 16]
    assert s[0]["timings"]["prefill_s"] == 0.002 and s[0]["prompt"].startswith("Is there a dog")


def test_resume_after_simulated_kill(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    eng = FakeEngine()
    spec = default_spec("pope", budget=8, pruning="fake")

    def kill_after_two_batches(n_done: int) -> None:
        if n_done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(eng, "pope", dataset, spec, db, split="random", batch_size=5, progress=False,
                      on_batch=kill_after_two_batches)
    run_id = dbm.list_runs(db)[0]["run_id"]
    assert _count(db, run_id) == (10, 10)
    assert dbm.get_run(db, run_id)["status"] == "running"
    partial = dbm.run_metrics(db, run_id)
    assert partial["n"] == 10 and partial["complete"] is False
    out = run_benchmark(eng, "pope", dataset, spec, db, split="random", batch_size=5, progress=False)
    assert out.run_id == run_id and out.n_new == 14 and out.status == "finished"
    assert _count(db, run_id) == (24, 24)
    assert eng.calls == 24  # nothing generated twice
    ref = run_benchmark(FakeEngine(), "pope", dataset, spec, tmp_path / "ref.sqlite", split="random", progress=False)
    assert ref.run_id == run_id
    strip = lambda m: {k: v for k, v in m.items() if k != "perf"}  # noqa: E731
    assert strip(out.metrics) == strip(ref.metrics)


def test_shards_write_one_run_idempotently(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    spec = default_spec("pope")
    a = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="popular", shard_index=0, num_shards=2, progress=False)
    assert a.status == "running" and a.n_new == 12
    b = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="popular", shard_index=1, num_shards=2, progress=False)
    assert b.run_id == a.run_id and b.status == "finished" and b.n_samples == 24
    again = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="popular", shard_index=0, num_shards=2, progress=False)
    assert again.n_new == 0 and _count(db, a.run_id) == (24, 24)
    conn = dbm.connect(db)  # direct re-insert of an existing key is ignored
    assert dbm.add_samples(conn, a.run_id, [{"sample_key": "q:1", "output_text": "dup"}]) == 0
    conn.close()
    with pytest.raises(InvalidInput, match="bad shard"):
        run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="popular", shard_index=2, num_shards=2, progress=False)


def test_run_identity_follows_protocol_knobs(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    ids = set()
    for kw, spec in [
        ({}, default_spec("pope")),
        ({}, default_spec("pope", pruning="fake", budget=8)),
        ({"parser": "opera"}, default_spec("pope")),
        ({"prompt_preset": "llava_space"}, default_spec("pope", prompt_preset="llava_space")),
        ({}, default_spec("pope", decoding="fakecd", decoding_params={"alpha": 1.0})),
        ({}, default_spec("pope", max_new_tokens=8)),
    ]:
        ids.add(run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", limit=2, progress=False, **kw).run_id)
    assert len(ids) == 6 and len(dbm.list_runs(db)) == 6
    vcd = default_spec("pope", prompt_preset="vcd")
    assert vcd.sampling and vcd.seed == 42 and vcd.temperature == 1.0


def test_limit_then_full_run_extends_same_run(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    spec = default_spec("pope")
    first = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", limit=6, progress=False)
    assert first.status == "finished" and first.n_samples == 6
    full = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", progress=False)
    assert full.run_id == first.run_id and full.n_new == 18 and full.n_expected == 24 and full.status == "finished"


def test_pope_leading_run_pairs_with_neutral_run(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    eng = FakeEngine()
    out = run_benchmark(eng, "pope-leading", dataset, default_spec("pope-leading"), db, split="random",
                        template="W+", progress=False)
    assert out.neutral_run_id and out.variant == "W+"
    assert eng.calls == 48  # neutral run first, then the leading run
    assert "Is there a dog in the image? It seems like there is.\nAnswer the question" in eng.prompts[24]
    m = out.metrics
    assert m["accuracy"] == 50.0 and m["accuracy_neutral"] == 100.0 and m["sycophancy"] == 100.0
    assert m["ctr"] == 50.0 and m["subsets"]["misleading"]["n"] == 12 and m["subsets"]["consistent"]["accuracy"] == 100.0
    assert dbm.get_run(db, out.run_id)["neutral_run_id"] == out.neutral_run_id
    rec = dbm.run_samples(db, out.run_id)[1]["record"]
    assert rec["cue"] == {"template_id": "W+", "kind": "weak", "polarity": "affirm", "misleading": True}
    # the same command reuses both runs
    again = run_benchmark(eng, "pope-leading", dataset, default_spec("pope-leading"), db, split="random", template="W+", progress=False)
    assert again.run_id == out.run_id and eng.calls == 48


def test_chair_run(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    out64 = run_benchmark(FakeEngine(), "chair", dataset, default_spec("chair", chair_preset="chair64"), db,
                          chair_preset="chair64", progress=False)
    s = dbm.run_samples(db, out64.run_id)
    assert [x["sample_key"] for x in s] == ["img:1", "img:2", "img:3", "img:4"]
    assert s[0]["output_text"].endswith("It is") and s[0]["record"]["caption"].endswith("a dog.")  # length -> dropped
    assert s[1]["record"]["caption"].endswith("It is")  # stopped normally: kept
    m = out64.metrics
    # image 1 has a dog (no hallucination), images 2-4 do not
    assert m["n"] == 4 and m["chair_s"] == 75.0 and m["hallucinated_mentions"] == 3
    run = dbm.get_run(db, out64.run_id)
    assert run["variant"] == "chair64" and run["max_new_tokens"] == 64 and run["drop_incomplete"] == 1
    assert run["prompt"] == "Please describe this image in detail." and run["image_list"] == "all test images"
    ids = tmp_path / "ids.txt"
    ids.write_text("2\n4\n")
    out = run_benchmark(FakeEngine(), "chair", dataset, default_spec("chair"), db, image_ids_file=ids, progress=False)
    assert out.n_samples == 2 and out.run_id != out64.run_id and dbm.get_run(db, out.run_id)["max_new_tokens"] == 512


def test_unknown_image_names_file_and_line(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(SYNTH, root)
    f = root / "pope" / "synthcoco_pope_random.json"
    lines = f.read_text().splitlines()
    rec = json.loads(lines[6])
    rec["image"] = "synthcoco_test_000000000099.png"
    lines[6] = json.dumps(rec)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match=r"synthcoco_pope_random\.json:7: unknown image 'synthcoco_test_000000000099\.png'"):
        run_benchmark(FakeEngine(), "pope", synth_dataset(root), default_spec("pope"), tmp_path / "r.sqlite",
                      split="random", progress=False)


def test_query_functions_and_report(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    for budget in (None, 8, 4):
        spec = default_spec("pope", pruning="fake" if budget else "none", budget=budget)
        run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", progress=False)
    run_benchmark(FakeEngine(), "chair", dataset, default_spec("chair"), db, progress=False)
    runs = dbm.list_runs(db)
    assert len(runs) == 4 and all(r["metrics"] for r in runs)
    pope_runs = [r for r in runs if r["benchmark"] == "pope"]
    kept = sorted(r["metrics"]["perf"]["visual_tokens_kept"] for r in pope_runs)
    assert kept == [10.0, 12.0, 16.0]
    assert dbm.run_metrics(db, pope_runs[0]["run_id"])["n"] == 24
    rep = build_report(db, tmp_path / "rep")
    names = sorted(Path(f).name for f in rep["files"])
    assert names == ["chair_by_method.png", "pope_accuracy_vs_prefill.png", "pope_accuracy_vs_visual_tokens.png", "runs.csv"]
    for f in rep["files"]:
        if f.endswith(".png"):
            assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (tmp_path / "rep" / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("run_id,benchmark")
    assert "fake@8" in rep["table"] and "== chair" in rep["table"]


def test_report_cli(tmp_path, dataset, capsys):
    db = tmp_path / "r.sqlite"
    run_benchmark(FakeEngine(), "pope", dataset, default_spec("pope"), db, split="random", progress=False)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["runs"][0]["accuracy"] == 100.0 and "chair_by_method.png" in out["skipped_plots"]
    assert main(["report", "--db", str(tmp_path / "missing.sqlite")]) == 2


def test_sweep(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"""
model: fake
dataset: {SYNTH}
limit: 6
batch_size: 4
benchmarks:
  - pope: {{splits: [random, adversarial]}}
  - chair: {{preset: chair64}}
methods:
  - {{name: base}}
  - {{name: fakeprune, pruning: random}}  # a registered pruner: the config's methods are resolved up front
budgets: [8, 4]
""")
    jobs = expand(load_config(cfg))
    assert len(jobs) == 9  # base x (2 pope + 1 chair) + fakeprune x 2 budgets x 3
    engines = []

    def load(name):
        engines.append(FakeEngine())
        return engines[-1]

    outs = run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=load, progress=False)
    assert len(outs) == 9 and len(engines) == 1 and all(o.status == "finished" for o in outs)
    assert {o.metrics["perf"]["visual_tokens_kept"] for o in outs} == {16.0, 12.0, 10.0}
    again = run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=load, progress=False)
    assert [o.run_id for o in again] == [o.run_id for o in outs] and sum(o.n_new for o in again) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmarks: [pope]\nmethods:\n  - {name: x, pruningg: fake}\n")
    with pytest.raises(InvalidInput, match="unknown keys"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_eval_configs_load_and_expand(path):
    """Every evaluation config the docs cite parses, and each of its methods builds with valid parameters."""
    from vlmguard.decoding import make_decoder
    from vlmguard.pruning import make_pruner

    jobs = expand(load_config(path))
    assert jobs
    for job in jobs:  # unknown methods or parameters raise InvalidInput here
        make_pruner(job.get("pruning") or "none", job.get("budget"), job.get("pruning_params"))
        make_decoder(job.get("decoding") or "greedy", job.get("decoding_params"))


def test_lqcd_oracle_neutral_text_per_request(tmp_path, dataset):
    db = tmp_path / "r.sqlite"
    eng = FakeEngine()
    spec = default_spec("pope-leading", decoding="lqcd", decoding_params={"neutral_text": "oracle", "alpha": 1.0})
    out = run_benchmark(eng, "pope-leading", dataset, spec, db, split="random", template="D-", batch_size=4,
                        limit=8, progress=False)
    neutral_specs, leading_specs = eng.specs[:2], eng.specs[2:]
    assert all("neutral_text" not in s.decoding_params for s in neutral_specs)
    assert leading_specs[0].decoding_params["neutral_text"] == [
        "Is there a dog in the image?\nAnswer the question using a single word or phrase.",
        "Is there a cup in the image?\nAnswer the question using a single word or phrase.",
        "Is there a person in the image?\nAnswer the question using a single word or phrase.",
        "Is there a cat in the image?\nAnswer the question using a single word or phrase.",
    ]
    assert eng.prompts[8].startswith("There is no dog in the image. Is there a dog in the image?\n")
    run = dbm.get_run(db, out.run_id)
    assert run["decoding_params"] == {"neutral_text": "oracle", "alpha": 1.0}
    assert dbm.get_run(db, out.neutral_run_id)["decoding_params"] == {"alpha": 1.0}
    with pytest.raises(InvalidInput, match="only applies to the pope-leading"):
        run_benchmark(eng, "pope", dataset, spec, db, split="random", progress=False)


def test_chair_max_new_tokens_capped_by_model_context(tmp_path, dataset):
    eng = FakeEngine()
    eng.context_length = 100  # the fake prompt is 30 tokens
    out = run_benchmark(eng, "chair", dataset, default_spec("chair"), tmp_path / "r.sqlite", limit=2, progress=False)
    assert eng.specs[0].max_new_tokens == 1  # the probe
    assert all(s.max_new_tokens == 70 for s in eng.specs[1:])
    assert dbm.get_run(tmp_path / "r.sqlite", out.run_id)["max_new_tokens"] == 70


def test_retrained_model_under_one_name_gets_new_runs(tmp_path, dataset):
    """The run identity includes the engine's weights fingerprint: samples of a retrained model never resume
    (mix into) the runs of the old weights, even under the same model name."""
    db = tmp_path / "r.sqlite"
    old, new = FakeEngine(), FakeEngine()
    old.revision, new.revision = "aaaa", "bbbb"
    spec = default_spec("pope")
    a = run_benchmark(old, "pope", dataset, spec, db, split="random", limit=2, progress=False)
    b = run_benchmark(new, "pope", dataset, spec, db, split="random", limit=2, progress=False)
    again = run_benchmark(old, "pope", dataset, spec, db, split="random", limit=2, progress=False)
    assert a.run_id != b.run_id and again.run_id == a.run_id and again.n_new == 0
    assert {r["model_revision"] for r in dbm.list_runs(db)} == {"aaaa", "bbbb"}


def test_another_precision_is_another_run_and_float32_keeps_its_run_id(tmp_path, dataset):
    """A bf16 run never resumes into (mixes with) an fp32 run of the same command; float32 is not written into
    the knobs, so fp32 runs keep the ids databases of earlier versions gave them."""
    import types

    import torch

    db = tmp_path / "r.sqlite"
    spec = default_spec("pope")
    plain = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", limit=2, progress=False)
    runs = {}
    for dt in (torch.float32, torch.bfloat16):
        eng = FakeEngine()
        eng.model = types.SimpleNamespace(dtype=dt)
        runs[dt] = run_benchmark(eng, "pope", dataset, spec, db, split="random", limit=2, progress=False)
    assert runs[torch.float32].run_id == plain.run_id and runs[torch.float32].n_new == 0
    assert runs[torch.bfloat16].run_id != plain.run_id and runs[torch.bfloat16].n_new == 2
    assert {r["run_id"]: r["dtype"] for r in dbm.list_runs(db)} == {plain.run_id: None,
                                                                     runs[torch.bfloat16].run_id: "bfloat16"}


def test_database_of_an_earlier_version_gains_the_revision_column(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, benchmark TEXT NOT NULL, model TEXT NOT NULL, "
                  "knobs TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'running', created_at TEXT NOT NULL)")
        c.execute("INSERT INTO runs VALUES ('r1', 'pope', 'tiny', '{}', 'finished', 'then')")
    conn = dbm.connect(db)
    cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    assert {"model_revision", "dtype"} <= cols
    assert tuple(conn.execute("SELECT model_revision, dtype FROM runs WHERE run_id = 'r1'").fetchone()) == (None, None)
    conn.close()


def test_weights_fingerprint_follows_the_weights(tmp_path):
    from vlmguard.models.resolve import resolve_model_path, weights_fingerprint

    model = tmp_path / "m"
    shutil.copytree(resolve_model_path("tiny"), model)
    first = weights_fingerprint(model)
    assert weights_fingerprint(model) == first and len(first) == 16
    data = bytearray((model / "model.safetensors").read_bytes())
    for i in range(len(data) - 1, len(data) // 2, -4096):  # as a retraining would: weights all over change
        data[i] ^= 0x01
    (model / "model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(model) != first


def test_opening_a_new_database_concurrently_waits_out_locks(tmp_path):
    """Shards of one job open the same new database while a reader watches it: SQLite can answer one of
    them SQLITE_BUSY without waiting (journal-mode switch, schema script); the open retries instead of
    failing the job as 'not a vlmguard results database'."""
    import threading

    for trial in range(20):
        path = tmp_path / f"r{trial}.sqlite"
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                if path.exists():
                    try:
                        with sqlite3.connect(path, timeout=5) as c:
                            c.execute("SELECT COUNT(*) FROM samples").fetchone()
                    except sqlite3.OperationalError:
                        pass

        opened: list = []

        def opener():
            try:
                opened.append(dbm.connect(path))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                opened.append(e)

        watcher = threading.Thread(target=reader)
        watcher.start()
        openers = [threading.Thread(target=opener) for _ in range(3)]
        for t in openers:
            t.start()
        for t in openers:
            t.join()
        stop.set()
        watcher.join()
        assert len(opened) == 3 and all(isinstance(c, sqlite3.Connection) for c in opened), opened
        for c in opened:
            c.close()


def test_a_lock_during_open_is_retried_and_a_lasting_one_named(tmp_path, monkeypatch):
    real_connect = sqlite3.connect
    busy = {"left": 2}

    class Flaky:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and busy["left"]:
                busy["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def __setattr__(self, name, value):
            if name == "_conn":
                object.__setattr__(self, name, value)
            else:
                setattr(self._conn, name, value)

    monkeypatch.setattr(dbm.sqlite3, "connect", lambda *a, **k: Flaky(real_connect(*a, **k)))
    conn = dbm.connect(tmp_path / "a.sqlite")
    assert busy["left"] == 0 and conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    conn.close()
    busy["left"] = 10 ** 6
    monkeypatch.setattr(dbm, "BUSY_TIMEOUT_S", 0.2)
    with pytest.raises(InvalidInput, match="stayed locked"):
        dbm.connect(tmp_path / "b.sqlite")


def test_method_labels_name_the_settings_a_run_set():
    assert method_label({"pruning": "none", "decoding": "greedy"}) == "base"
    assert method_label({"pruning": "fastv", "budget": 16.0, "pruning_params": {}, "decoding": "greedy"}) == "fastv@16"
    assert method_label({"pruning": "flowcut", "budget": 0.25, "pruning_params": {"position_mode": "original"},
                         "decoding": "m3id", "decoding_params": {"gate": False, "beta": 0.1}}) \
        == "flowcut@0.25[position_mode=original]+m3id[beta=0.1,gate=False]"


def _kill_after(n: int):
    def on_batch(n_done: int) -> None:
        if n_done >= n:
            raise KeyboardInterrupt
    return on_batch


def test_report_marks_a_killed_run_partial_until_it_is_resumed(tmp_path, dataset, capsys):
    db = tmp_path / "r.sqlite"
    spec = default_spec("pope")
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", batch_size=5, progress=False,
                      on_batch=_kill_after(10))
    rep = build_report(db, tmp_path / "rep")
    line = next(ln for ln in rep["table"].splitlines() if ln.startswith(rep["rows"][0]["run_id"]))
    assert "partial 10/24" in line and rep["rows"][0]["status"] == "running"  # the CSV keeps the DB's status
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert row["partial"] is True and row["n_samples"] == 10 and row["n_expected"] == 24
    run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", batch_size=5, progress=False)
    rep = build_report(db, tmp_path / "rep")
    assert "partial" not in rep["table"] and "finished" in rep["table"]


def test_finishing_does_not_race_a_larger_limit_of_the_same_run(tmp_path, dataset, monkeypatch):
    """A --limit 6 run finishing while the same run is started with no limit (n_expected 24) in another
    process must not end up 'finished' with the 6-sample metrics cached once the second process dies."""
    import threading

    from vlmguard.bench import metrics as metrics_mod

    db = tmp_path / "r.sqlite"
    spec = default_spec("pope")
    real = metrics_mod.metrics_for_run
    other: list[threading.Thread] = []

    def start_the_full_run(knobs) -> None:
        conn = dbm.connect(db)
        try:
            dbm.ensure_run(conn, knobs, n_expected=24, package_version="t")
        finally:
            conn.close()

    def racing_metrics(conn, run):
        if not other:  # while the first process computes its metrics, the second one starts the same run
            t = threading.Thread(target=start_the_full_run, args=(run["knobs"],))
            other.append(t)
            t.start()
            t.join(0.5)
        return real(conn, run)

    monkeypatch.setattr(metrics_mod, "metrics_for_run", racing_metrics)
    run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", limit=6, progress=False)
    other[0].join(30)
    monkeypatch.setattr(metrics_mod, "metrics_for_run", real)
    run = dbm.list_runs(db)[0]
    assert run["n_expected"] == 24 and run["n_samples"] == 6
    assert run["status"] == "running" and run["metrics"]["complete"] is False  # the second process was killed
    out = run_benchmark(FakeEngine(), "pope", dataset, spec, db, split="random", progress=False)
    assert out.status == "finished" and out.n_new == 18 and dbm.list_runs(db)[0]["metrics"]["n"] == 24


def _readonly_sqlite(monkeypatch):
    """Make every plain sqlite3.connect open its file read-only, as for a file this process may not write
    (chmod does not stop root, who runs these tests in some sandboxes)."""
    real = sqlite3.connect

    def connect(database, *args, uri=False, **kw):
        if not uri:
            return real(f"{Path(database).resolve().as_uri()}?mode=ro", *args, uri=True, **kw)
        return real(database, *args, uri=uri, **kw)

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_a_read_only_database_is_read_and_a_write_names_the_cause(tmp_path, dataset, monkeypatch, capsys):
    db = tmp_path / "r.sqlite"
    run_benchmark(FakeEngine(), "pope", dataset, default_spec("pope"), db, split="random", progress=False)
    run_benchmark(FakeEngine(), "pope", dataset, default_spec("pope", pruning="fake", budget=8), db, split="random",
                  progress=False)
    _readonly_sqlite(monkeypatch)
    runs = dbm.list_runs(db)
    assert len(runs) == 2 and all(r["n_samples"] == 24 and r["status"] == "finished" for r in runs)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]) == 2
    assert main(["compare", "--db", str(db), "--boot", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["comparisons"]
    with pytest.raises(InvalidInput, match=r"--db .*r\.sqlite: the results database \(or its folder\) is read-only"):
        dbm.check_db(db)
    with pytest.raises(InvalidInput, match="read-only"):
        run_benchmark(FakeEngine(), "pope", dataset, default_spec("pope"), db, split="random", progress=False)
