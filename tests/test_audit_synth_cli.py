"""Audit of `synth build|train`, `score chair`, `dashboard` and `demo` start-up: bad input is one line
(`vlmguard: error: ...`, exit 2) before any work, and no user file is overwritten."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from vlmguard.cli import main


def _error(capsys, argv, needle: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmguard: error: ") and "\n" not in err and needle in err, err
    return err


def _forbid(monkeypatch, module, name: str) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError(f"work started ({name}) before the bad input was reported")

    monkeypatch.setattr(module, name, forbidden)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny complete SynthCOCO build without a val split."""
    from vlmguard.synth.build import build_dataset

    return build_dataset(tmp_path_factory.mktemp("synth") / "d", seed=0, train=2, val=0, test=3)


# ---- synth build ------------------------------------------------------------------------------------------

def test_build_refuses_a_count_beyond_the_split_id_range(capsys, monkeypatch, tmp_path):
    import vlmguard.synth.build

    _forbid(monkeypatch, vlmguard.synth.build, "build_dataset")
    _error(capsys, ["synth", "build", "--out", tmp_path / "o", "--test", "10000000"],
           "--test must be at most 9,999,999 images")
    _error(capsys, ["synth", "build", "--out", tmp_path / "o", "--train", str(10 ** 30)], "--train must be at most")
    assert not (tmp_path / "o").exists()


# ---- synth train ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--instruct-lr", "inf"], "--instruct-lr must be a learning rate > 0 (and finite), got inf"),
    (["--vision-lr", "1e400"], "--vision-lr must be a learning rate > 0 (and finite), got inf"),
    (["--scene-weight", "-1"], "--scene-weight must be a finite weight >= 0"),
    (["--scene-weight", "nan"], "--scene-weight must be a finite weight >= 0"),
    (["--scene-weight", "inf"], "--scene-weight must be a finite weight >= 0"),
    (["--val-stop", "0.9"], "--val-stop needs a val split"),  # the data has none: it would never stop
])
def test_train_refuses_options_that_would_train_silently_wrong(capsys, monkeypatch, tmp_path, data, extra, needle):
    import vlmguard.synth.train

    _forbid(monkeypatch, vlmguard.synth.train, "Trainer")
    _error(capsys, ["synth", "train", "--data", data, "--out", tmp_path / "out", "--steps", "1,1,1", *extra], needle)
    assert not (tmp_path / "out").exists()


def test_train_val_stop_without_validation_checks(capsys, monkeypatch, tmp_path):
    import vlmguard.synth.train
    from vlmguard.synth.build import build_dataset

    with_val = build_dataset(tmp_path / "v", seed=0, train=2, val=2, test=3)
    _forbid(monkeypatch, vlmguard.synth.train, "Trainer")
    base = ["synth", "train", "--data", with_val, "--out", tmp_path / "out", "--steps", "0,0,5", "--val-stop", "0.9"]
    _error(capsys, base + ["--val-every", "0"], "--val-stop needs validation checks")
    _error(capsys, base + ["--val-questions", "0"], "--val-stop needs validation checks")


def test_train_init_without_weights_is_one_line(capsys, monkeypatch, tmp_path, data):
    import vlmguard.synth.train

    _forbid(monkeypatch, vlmguard.synth.train, "Trainer")
    init = tmp_path / "init"
    init.mkdir()
    (init / "tokenizer.json").write_text("{}")  # a tokenizer alone: from_pretrained failed with a traceback
    _error(capsys, ["synth", "train", "--data", data, "--out", tmp_path / "out", "--steps", "0,0,1", "--init", init],
           f"--init {init}: not a saved tiny model (no config.json and model.safetensors)")


def test_train_out_with_foreign_files_is_refused(capsys, monkeypatch, tmp_path, data):
    import vlmguard.synth.train

    _forbid(monkeypatch, vlmguard.synth.train, "Trainer")
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}\n')
    _error(capsys, ["synth", "train", "--data", data, "--out", out, "--steps", "1,0,0"],
           "not a `vlmguard synth train` output, and saving the model would overwrite config.json")
    assert (out / "config.json").read_text() == '{"mine": 1}\n'


def test_train_interrupted_output_is_marked_incomplete(capsys, monkeypatch, tmp_path, data):
    from vlmguard.synth.train import Trainer

    def interrupted(self, *args, **kwargs):
        self.save()  # a validation checkpoint, then Ctrl-C
        raise KeyboardInterrupt

    out = tmp_path / "m"
    argv = ["synth", "train", "--data", str(data), "--out", str(out), "--steps", "0,0,1", "--val-questions", "2"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "stage_instruct", interrupted)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "not the finished model" in err and "vlmguard: interrupted" in err
    assert json.loads((out / "training_report.json").read_text())["complete"] is False
    assert main(argv) == 0  # the same run to its end replaces it with the finished model
    assert json.loads((out / "training_report.json").read_text())["complete"] is True


class _SigtermNotUnwound(Exception):
    pass


def test_train_stopped_by_sigterm_says_so_like_ctrl_c(capsys, monkeypatch, tmp_path, data):
    """A scheduler's or container's stop (SIGTERM) ended training silently, mid-write for all the user knew; now it
    unwinds like Ctrl-C: one line on the checkpoint left, then `vlmguard: terminated (SIGTERM)`, exit 143."""
    from vlmguard.synth.train import Trainer

    def terminated(self, *args, **kwargs):
        self.save()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # the handler runs here
        raise AssertionError("SIGTERM was not delivered")

    def not_unwound(signum, frame):  # what a regression would meet, instead of the suite dying
        raise _SigtermNotUnwound

    out = tmp_path / "m"
    argv = ["synth", "train", "--data", str(data), "--out", str(out), "--steps", "0,0,1", "--val-questions", "2"]
    previous = signal.signal(signal.SIGTERM, not_unwound)
    try:
        with monkeypatch.context() as m:
            m.setattr(Trainer, "stage_instruct", terminated)
            assert main(argv) == 143
        assert signal.getsignal(signal.SIGTERM) is not_unwound  # restored after the command
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "not the finished model" in err and err.strip().endswith("vlmguard: terminated (SIGTERM)")
    assert json.loads((out / "training_report.json").read_text())["complete"] is False


# ---- score chair --------------------------------------------------------------------------------------------

def test_chair_records_never_overwrite_an_input(capsys, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image_id": 1, "caption": "a person with a dog."}\n')
    gt = tmp_path / "gt.json"
    gt.write_text('{"1": ["person"]}')
    base = ["score", "chair", "--captions", caps, "--gt", gt]
    _error(capsys, base + ["--records", caps], f"--records {caps}: is the --captions file")
    _error(capsys, base + ["--records", gt], f"--records {gt}: is the --gt file")
    assert caps.read_text() == '{"image_id": 1, "caption": "a person with a dog."}\n'
    assert gt.read_text() == '{"1": ["person"]}'
    assert main([str(a) for a in base + ["--records", tmp_path / "r.jsonl", "--json"]]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (m["chair_s"], m["chair_i"], m["recall"]) == (100.0, 50.0, 100.0)


# ---- dashboard / demo ----------------------------------------------------------------------------------------

def test_dashboard_port_in_use_is_one_line(capsys, monkeypatch):
    import os

    _forbid(monkeypatch, os, "execve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _error(capsys, ["dashboard", "--port", port],
               f"--host 127.0.0.1 --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)")
    _error(capsys, ["dashboard", "--host", "no.such.host.invalid"],
           "--host no.such.host.invalid --port 8501: cannot resolve host 'no.such.host.invalid'")


def test_demo_checks_its_files_before_step_one(capsys, monkeypatch, tmp_path):
    import vlmguard.commands.demo

    _forbid(monkeypatch, vlmguard.commands.demo, "_examples")
    a_file = tmp_path / "f"
    a_file.write_text("x\n")
    db = tmp_path / "d.sqlite"
    _error(capsys, ["demo", "--no-serve", "--db", db, "--out", a_file], f"--out {a_file}: exists and is not a directory")
    _error(capsys, ["demo", "--no-serve", "--db", db, "--config", tmp_path / "no.yaml"], "sweep config not found")
    _error(capsys, ["demo", "--no-serve", "--db", tmp_path, "--out", tmp_path / "r"], f"--db {tmp_path}: is a directory")
    assert a_file.read_text() == "x\n"


def test_dashboard_db_that_is_not_a_results_database(capsys, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    _error(capsys, ["dashboard", "--db", notes, "--dry-run"], f"--db {notes}: not a vlmguard results database")
    assert notes.read_text() == "# my notes\n"
    assert main(["dashboard", "--db", str(tmp_path / "new.sqlite"), "--dry-run"]) == 0  # "no runs yet" page
    assert not (tmp_path / "new.sqlite").exists()


def test_model_card_names_the_data_it_was_measured_on():
    """`synth eval --data DIR --write-card` said "seed 0 test split, 500 images" whatever DIR held."""
    from vlmguard.models.resolve import resolve_model_path
    from vlmguard.synth.card import model_card

    ev = {"data": "mydata", "pope": {"random": {"n": 6, "accuracy": 50.0, "f1": 50.0, "yes_ratio": 50.0}},
          "chair": {"n": 3, "chair_s": 0.0, "chair_i": None, "recall": 0.0, "len": 3.0, "preset": "chair512",
                    "scorer": "vlmguard.bench.chair"}, "latency_s": {"pope_answer": 0.1}}
    card = model_card(resolve_model_path("tiny"), ev)
    assert "## Measured quality (SynthCOCO test split of mydata, greedy)" in card and "500 images" not in card
    card = model_card(resolve_model_path("tiny"), {**ev, "data": "synthcoco"})
    assert "## Measured quality (SynthCOCO seed 0 test split, greedy)" in card
    # POPE's images are those with 3 visible objects (410 of the 500 test images), not all: said as measured
    assert "POPE asks about the 1 images with at least 3 visible objects" in card and "CHAIR describes all 3" in card


def test_model_card_says_what_was_trained_and_which_checkpoint_ships():
    """The card said the projector trained (it is tied to the word embeddings, fixed) and gave commands whose
    runs, completed, are not the bundled weights (run 4's step-800 checkpoint of a 1200-step cosine schedule)."""
    from pathlib import Path

    from vlmguard.models.resolve import resolve_model_path
    from vlmguard.synth.card import model_card

    card = model_card(resolve_model_path("tiny"), None)
    assert "the decoder alone learns short captions" in card and "projector + decoder" not in card
    assert "the bundled weights are run 4's `checkpoints/step-800`" in card
    shipped = (Path(resolve_model_path("tiny")) / "MODEL_CARD.md").read_text()
    assert shipped.startswith(card.rstrip("\n") + "\n")  # the shipped card is this generator's, plus measurements


@pytest.mark.parametrize("table, needle", [
    ('{"1": ["person"], "1": ["dog"]}', "key '1' given twice"),  # json kept the last one: GT {1: dog}
    ('{"1": ["person"], "01": ["dog"]}', "image id 1 given twice"),
])
def test_chair_gt_table_with_an_image_twice_is_refused(capsys, tmp_path, table, needle):
    caps = tmp_path / "caps.json"
    caps.write_text('[{"image_id": 1, "caption": "a dog"}]')
    gt = tmp_path / "gt.json"
    gt.write_text(table)
    _error(capsys, ["score", "chair", "--captions", caps, "--gt", gt], needle)


def test_dashboard_image_dir_must_be_a_folder(capsys, tmp_path):
    _error(capsys, ["dashboard", "--image-dir", tmp_path / "nope", "--dry-run"], f"--image-dir {tmp_path / 'nope'}: not found")
    (tmp_path / "f.png").write_bytes(b"x")
    _error(capsys, ["dashboard", "--image-dir", tmp_path / "f.png", "--dry-run"], "not a directory")
    assert main(["dashboard", "--image-dir", str(tmp_path), "--dry-run"]) == 0


def test_dashboard_checks_the_database_of_its_environment_variable_too(capsys, monkeypatch, tmp_path):
    # $VLMGUARD_DB pointing at a folder started the dashboard, whose pages then could not read it
    monkeypatch.setenv("VLMGUARD_DB", str(tmp_path))
    _error(capsys, ["dashboard", "--dry-run"], f"$VLMGUARD_DB {tmp_path}: is a directory, expected an SQLite file")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    monkeypatch.setenv("VLMGUARD_DB", str(notes))
    _error(capsys, ["dashboard", "--dry-run"], f"$VLMGUARD_DB {notes}: not a vlmguard results database")
    assert main(["dashboard", "--db", str(tmp_path / "new.sqlite"), "--dry-run"]) == 0  # --db is the one read


def test_train_on_an_interrupted_build_says_so(capsys, tmp_path):
    from vlmguard.synth.build import BUILD_MARKER

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / BUILD_MARKER).write_text("written by `vlmguard synth build`\n")
    _error(capsys, ["synth", "train", "--data", tmp_path / "half", "--out", tmp_path / "o"],
           "its `vlmguard synth build` did not finish (no manifest.json); run it again")
    _error(capsys, ["synth", "train", "--data", tmp_path, "--out", tmp_path / "o"], "is not a SynthCOCO directory")
