"""Audit of `vlmguard prune analyze` (AdaptInfer's offline inflection-layer analysis) and of how its schedule is
used afterwards: a schedule is written whole or not at all (a failing write is one line and keeps the old
file), an empty ``--out`` is refused instead of silently writing nothing, calibration scenes are rendered as
the analysis takes them, the output says under which accounting its keep counts hit each label, a schedule's
keep counts are reused only on a model of the depth they were solved for, and a schedule records its calibration
set (SynthCOCO seed or image folder)."""
from __future__ import annotations

import itertools
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

from pruning_support import requests
from vlmguard.cli import main
from vlmguard.engine import Engine
from vlmguard.errors import InvalidInput
from vlmguard.pruning.adaptinfer_schedule import accounting_for, official_average, pruned_layers_average
from vlmguard.pruning.analysis import synth_calibration
from vlmguard.spec import GenerationSpec
from vlmguard.testing import tiny_llava

ROOT = Path(__file__).resolve().parents[1]


def _error(capsys, argv, needle: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmguard: error: ") and "\n" not in err and needle in err, err
    return err


def test_a_failing_schedule_write_is_one_line_and_keeps_the_existing_schedule(tmp_path):
    """A full disk (here: a 200-byte file size limit) while writing --out: it was a traceback (OSError, exit 1)
    and the existing schedule was truncated to a half-written JSON file."""
    out = tmp_path / "sched.json"
    old = '{"layers": [1, 2], "n_visual": 144}\n'
    out.write_text(old)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    code = ("import sys; from vlmguard.cli import main; "
            f"sys.exit(main(['prune', 'analyze', '--model', 'tiny', '--samples', '1', '--out', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and err[-1].startswith(f"vlmguard: error: --out {out}: cannot write it")
    assert out.read_text() == old  # neither half-written nor emptied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sched.json"]  # no temporary file left behind
    assert "stage layers:" in proc.stdout  # the results were printed before the write


def test_an_empty_out_is_refused_not_silently_ignored(capsys):
    """`--out "$SCHEDULE"` with the variable unset analysed, exited 0 and wrote nothing."""
    _error(capsys, ["prune", "analyze", "--model", "tiny", "--samples", "1", "--out", ""], "--out is empty")


def test_calibration_scenes_are_rendered_as_the_analysis_takes_them(monkeypatch):
    """All --samples scenes were rendered into a list before the first was analysed: a large count held every
    image in memory (and rendered for hours) before any work."""
    import vlmguard.synth.render as render

    calls = []
    real = render.render_scene

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(render, "render_scene", counting)
    first = list(itertools.islice(synth_calibration(40, image_size=32), 2))
    assert len(calls) == 2
    # the same prompts as a run asking for just two
    again = list(synth_calibration(2, image_size=32))
    assert [p.text for p in first] == [p.text for p in again]
    assert [p.images[0].tobytes() for p in first] == [p.images[0].tobytes() for p in again]


def test_the_analysis_says_under_which_accounting_each_label_is_hit(capsys):
    """The tiny model printed `budget 48: keeps [77, 19]  official avg 64.75  actual avg 96.0`: neither average
    is the label, and nothing said the label is read as the mean over the layers after the first cut."""
    assert main(["prune", "analyze", "--model", "tiny", "--samples", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    accounting = accounting_for(data["layers"], data["n_layers"])
    average = official_average if accounting == "official" else pruned_layers_average
    for label, info in data["budgets"].items():
        assert info["label_accounting"] == accounting
        assert abs(average(data["layers"], info["keeps"], data["n_visual"], data["n_layers"]) - int(label)) <= 1


def test_schedule_keeps_solved_for_another_depth_are_solved_again():
    """A schedule analysed on a 4-layer model (keeps 8/2 for label 5 of 16 tokens) used on an 8-layer model with
    the same 16 tokens: its keep counts were taken as they were and averaged 3.0 tokens, not the 5 asked."""
    sched = {"layers": [1, 2], "n_layers": 4, "n_visual": 16, "keeps": {"5": [8, 2]}}
    model, proc = tiny_llava(text_layers=8)
    eng = Engine(model, proc, name="tiny-llava-8")
    res = eng.generate(requests()[:1], GenerationSpec(pruning="adaptinfer", budget=5, max_new_tokens=1,
                                                      pruning_params={"schedule": sched}))[0]
    used = res.pruning["adaptinfer_schedule"][0]
    assert list(used["layers"]) == [1, 2] and used["n_layers"] == 8 and used["n_visual"] == 16
    assert abs(pruned_layers_average(used["layers"], used["keeps"], 16, 8) - 5) <= 1, used
    assert res.visual_tokens_kept[3:] == [used["keeps"][1]] * 5
    # the same schedule on a model of its own depth keeps its counts
    same = dict(sched, n_layers=8)
    res = eng.generate(requests()[:1], GenerationSpec(pruning="adaptinfer", budget=5, max_new_tokens=1,
                                                      pruning_params={"schedule": same}))[0]
    assert list(res.pruning["adaptinfer_schedule"][0]["keeps"]) == [8, 2]
    # a depth that is not a positive integer is named, like a bad n_visual
    try:
        GenerationSpec(pruning="adaptinfer", budget=5, pruning_params={"schedule": dict(sched, n_layers="4")}).resolve()
    except InvalidInput as e:
        assert "'n_layers' must be a positive integer" in str(e)
    else:
        raise AssertionError("a schedule with n_layers='4' was accepted")


def test_the_schedule_records_its_calibration_set(capsys, tmp_path):
    """A schedule did not say what it was solved on (the SynthCOCO seed, or the image folder), so it could not be
    made again from its own file."""
    assert main(["prune", "analyze", "--model", "tiny", "--samples", "1", "--seed", "7", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["calibration"] == {"source": "synthcoco", "seed": 7} and data["samples"] == 1
    folder = tmp_path / "calib"
    folder.mkdir()
    from vlmguard.testing import random_image

    random_image(0, (96, 96)).save(folder / "a.png")
    out = tmp_path / "s.json"
    assert main(["prune", "analyze", "--model", "tiny", "--images", str(folder), "--samples", "1", "--out",
                 str(out), "--json"]) == 0
    assert json.loads(out.read_text())["calibration"] == {"source": "images", "path": str(folder.resolve())}
