"""A benchmark job frames a question as a local run on the same model does: the OPERA / HALC presets send LLaVA-1.5
(llava-hf's Vicuna template) their own raw string through the replica too, and the job's run is the local run.
Before, the job's ``ServeEngine`` had no adapter to frame with and ``WorkItem`` could not carry a raw prompt, so a
job ran the model's template under another run id."""
from __future__ import annotations

from test_bench_runner import SYNTH

from vlmguard.bench.datasets import synth_dataset
from vlmguard.bench.db import connect, list_runs
from vlmguard.bench.runner import default_spec, run_benchmark
from vlmguard.engine import Engine
from vlmguard.models.shapes import LLAVA_HF_VICUNA_TEMPLATE
from vlmguard.testing import tiny_llava
from vlmguard.workers.bench_job import ServeEngine
from vlmguard.workers.engine_worker import EngineWorker


class _Handle:
    """A Serve deployment handle's ``generate_batch.remote(items).result()``, answered by a worker in process."""

    def __init__(self, worker: EngineWorker):
        self.generate_batch = self
        self.worker = worker

    def remote(self, items):
        self.answers = self.worker.generate_many(items)
        return self

    def result(self, timeout_s=None):
        return self.answers


def test_a_job_frames_opera_on_llava_hf_as_a_local_run_does(tmp_path):
    model, processor = tiny_llava()
    processor.chat_template = LLAVA_HF_VICUNA_TEMPLATE
    local = Engine(model, processor, name="tiny-hf-vicuna")
    served = ServeEngine(_Handle(EngineWorker(name="tiny-hf-vicuna", engine=local)),
                         EngineWorker(name="tiny-hf-vicuna", engine=local).info())
    spec = default_spec("pope", prompt_preset="opera")
    outcomes = []
    for engine, db in ((local, tmp_path / "local.sqlite"), (served, tmp_path / "job.sqlite")):
        outcomes.append(run_benchmark(engine, "pope", synth_dataset(SYNTH), spec, db, split="random",
                                      prompt_preset="opera", progress=False, limit=4))
    here, job = outcomes
    assert here.run_id == job.run_id  # the job's run is the local run: the framing is in both
    run = list_runs(tmp_path / "job.sqlite")[0]
    assert run["prompt"].startswith("A chat between") and run["prompt"].endswith("USER: <image> {question} ASSISTANT:")
    answers = []
    for db in ("local.sqlite", "job.sqlite"):
        conn = connect(tmp_path / db)
        answers.append(conn.execute("SELECT sample_key, output_text FROM samples ORDER BY sample_key").fetchall())
        conn.close()
    assert answers[0] == answers[1] and len(answers[0]) == 4


def test_a_job_given_an_unusable_file_ends_in_one_line(monkeypatch, capsys):
    """An unwritable --db (an OSError about a named file) is the job's one-line error, as in the CLI; it printed
    a traceback into the job log."""
    from vlmguard.workers import bench_job

    def unwritable(args):
        raise PermissionError(13, "Permission denied", "/srv/results.sqlite")

    monkeypatch.setattr(bench_job, "parse_job_args", lambda argv: None)
    monkeypatch.setattr(bench_job, "run_job", unwritable)
    assert bench_job.main(["pope", "--db", "/srv/results.sqlite"]) == 2
    assert capsys.readouterr().err == "vlmguard: error: Permission denied: /srv/results.sqlite\n"
