"""The tiny-LVLM training recipe (a few steps on a tiny config) and the bundled checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vlmguard.errors import ModelLoadError
from vlmguard.models.resolve import resolve_model_path
from vlmguard.synth import build_dataset
from vlmguard.synth.model import TinySize
from vlmguard.synth.train import TrainConfig, Trainer

TINY = TinySize(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, text_hidden=64,
                text_layers=2, text_heads=2, text_kv_heads=2, text_intermediate=128)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("synth") / "d", seed=1, train=24, val=6, test=12)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_short_training_lowers_loss_and_saves_loadable_model(small_data: Path, tmp_path: Path):
    cfg = TrainConfig(seed=0, vision_steps=12, vision_batch=8, align_steps=0, instruct_steps=24,
                      instruct_batch=6, instruct_lr=3e-3, eval_questions=12, val_questions=12, val_every=12,
                      vision_scene_weight=0.5, size=TINY)
    trainer = Trainer(small_data, tmp_path / "m", cfg, log=lambda m: None)
    out = trainer.run()
    vision = trainer.losses["stage 1 vision"]
    lm = trainer.losses["stage 3 instruct"]
    assert _mean(vision[-4:]) < 0.8 * _mean(vision[:4])
    assert _mean(lm[-4:]) < 0.8 * _mean(lm[:4])
    report = json.loads((out / "training_report.json").read_text())
    assert set(report["stages"]) == {"vision", "instruct"} and report["validation"]
    assert 0.0 <= report["stages"]["vision"]["test_scene_acc"] <= 1.0
    proc = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert isinstance(proc, LlavaProcessor)
    # the trainer's token sequences are exactly what processor + chat template produce
    prompt = "Is there a cup in the image?\nAnswer the question using a single word or phrase."
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "USER: <image>\n" + prompt + " ASSISTANT:"
    img = Image.open(next((small_data / "images" / "test").glob("*.png")))
    enc = proc(images=img, text=text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == trainer.enc.prompt(prompt)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 144
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all()


def _bundled() -> Path:
    try:
        return resolve_model_path("tiny")
    except ModelLoadError:
        pytest.fail("the bundled tiny model is missing from vlmguard/assets/tiny-llava")


def test_bundled_model_answers_pope_question_fast(tmp_path: Path):
    path = _bundled()
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) <= 25 * 2**20
    proc = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    assert model.config.vision_feature_select_strategy == "default"
    assert proc.num_additional_image_tokens == 1 and proc.patch_size == 8
    data = build_dataset(tmp_path / "t", seed=0, train=0, val=0, test=4)
    inst = json.loads((data / "annotations" / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    im = inst["images"][0]
    present = next(names[a["category_id"]] for a in inst["annotations"] if a["image_id"] == im["id"])
    image = Image.open(data / "images" / "test" / im["file_name"])
    q = f"Is there a {present} in the image?\nAnswer the question using a single word or phrase."
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    enc = proc(images=image, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=8)  # warm-up
        t0 = time.process_time()  # CPU time of this process: robust to other jobs sharing the machine
        out = model.generate(**enc, max_new_tokens=8)
        dt = time.process_time() - t0
    answer = proc.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer in ("Yes", "No")
    assert out[0, -1].item() == model.generation_config.eos_token_id  # generation stopped at EOS
    assert dt < 1.0, f"one POPE answer took {dt:.2f}s of CPU time"


def test_resolve_model_path_errors(tmp_path: Path):
    assert resolve_model_path(str(_bundled())) == _bundled()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model_path("nonexistent-org-xyz/nonexistent-model")
    with pytest.raises(ModelLoadError):
        resolve_model_path("not a model")


def test_training_augmentations_build_consistent_batches(small_data: Path, tmp_path: Path):
    """Image-free sequences, visual-token dropout and post-image position jitter: rows lose 0 (kept), all
    (image-free) or 1..8/9 of their 144 visual tokens, the cached features fill exactly the image slots left,
    jittered text moves down by less than the row's visual span, and the loss is finite."""
    cfg = TrainConfig(seed=0, vision_steps=0, align_steps=0, instruct_steps=0, eval_questions=6, val_questions=6,
                      text_only_share=0.3, token_dropout=0.7, position_jitter=1.0, size=TINY)
    trainer = Trainer(small_data, tmp_path / "m", cfg, log=lambda m: None)
    trainer.cache_features()
    convs = [(iid, trainer._yesno_conv(iid)) for iid in trainer.train_ids[:16]]
    batch = trainer._lm_batch(convs)  # masked_scatter inside fails if features and image slots differ
    pos, lens = batch["position_ids"], batch["attention_mask"].sum(1)
    full = torch.tensor([len(trainer.enc.conversation(t)[0]) for _, t in convs])
    cut = full - lens
    assert ((cut == 0) | (cut == 144) | ((cut > 0) & (cut <= 144 - 144 // 9))).all()
    assert (cut == 144).any() and ((cut > 0) & (cut < 144)).any()
    for r in range(len(convs)):
        p = pos[r, : int(lens[r])]
        assert (p[:3] == torch.arange(3)).all()
        assert (p.diff() >= -(144 - int(cut[r]) - 1)).all()  # one jump down after the image, smaller than it
    with torch.no_grad():
        loss = trainer.model(**batch).loss
    assert torch.isfinite(loss)


def test_object_first_dropout_keeps_every_object_patch_before_background(small_data: Path, tmp_path: Path):
    cfg = TrainConfig(seed=0, vision_steps=0, align_steps=0, instruct_steps=0, eval_questions=6, val_questions=6,
                      token_dropout=1.0, token_dropout_object_share=1.0, size=TINY)
    trainer = Trainer(small_data, tmp_path / "m", cfg, log=lambda m: None)
    checked = 0
    for iid in trainer.train_ids:
        labels = trainer.train.patch_labels[trainer.train.index[iid]].reshape(-1)
        objects = set((labels > 0).nonzero().flatten().tolist())
        for _ in range(5):
            kept = trainer._dropout_subset(iid).tolist()
            assert kept == sorted(set(kept)) and 144 // 9 <= len(kept) <= 144
            on_objects = objects & set(kept)
            # object patches first: the subset holds all of them, or nothing but them
            assert on_objects == objects or len(on_objects) == len(kept)
            checked += bool(objects) and len(kept) > len(objects)
    assert checked > 0
    trainer.cfg.token_dropout_object_share = 0.0  # uniform subsets miss object patches now and then
    iid = next(i for i in trainer.train_ids if (trainer.train.patch_labels[trainer.train.index[i]] > 0).any())
    labels = trainer.train.patch_labels[trainer.train.index[iid]].reshape(-1)
    objects = set((labels > 0).nonzero().flatten().tolist())
    assert any(not objects <= set(trainer._dropout_subset(iid).tolist()) for _ in range(50))


def test_synth_eval_uses_the_benchmark_runner_and_writes_the_card(small_data: Path, tmp_path: Path):
    import shutil

    from vlmguard.synth.card import model_card
    from vlmguard.synth.evaluate import evaluate

    res = evaluate("tiny", small_data, pope_limit=6, chair_images=3, batch=8, progress=False,
                   db=tmp_path / "eval.sqlite")
    assert set(res["pope"]) == {"random", "popular", "adversarial"}
    assert all(m["n"] == 6 and 0 <= m["accuracy"] <= 100 for m in res["pope"].values())
    assert res["chair"]["n"] == 3 and res["chair"]["preset"] == "chair512" and len(res["chair_examples"]) == 3
    assert res["latency_s"]["pope_answer"] > 0
    model_dir = tmp_path / "model"
    shutil.copytree(_bundled(), model_dir)
    card = model_card(model_dir, res)
    assert "| random | 6 |" in card and "CHAIR, preset chair512" in card
    assert "4. augmentations of the instruct stage" in card and "`vlmguard synth train" in card


def test_synth_eval_prints_undefined_metrics_as_dashes(monkeypatch, capsys, tmp_path: Path):
    """A weak model whose captions name no object has no CHAIR_i (and may have no POPE F1): the table says "-"
    and the run's results are still saved (it crashed formatting None)."""
    import json

    import vlmguard.synth.evaluate
    from vlmguard.cli import main

    res = {"pope": {s: {"accuracy": 50.0, "f1": None, "yes_ratio": 0.0, "n": 4} for s in ("random", "popular")},
           "chair": {"chair_s": 0.0, "chair_i": None, "recall": 0.0, "scorer": "synthcoco"}}
    monkeypatch.setattr(vlmguard.synth.evaluate, "evaluate", lambda *a, **k: res)
    out = tmp_path / "eval.json"
    assert main(["synth", "eval", "--data", str(tmp_path), "--model", "tiny", "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "f1 -" in printed and "CHAIR_i -" in printed
    assert json.loads(out.read_text())["chair"]["chair_i"] is None


def test_model_card_reproduce_lines_chain_the_runs_outputs():
    """The card's reproduce commands point each --init at the previous line's --out (the recorded paths were
    wherever each run happened to write), and say which training images each run used."""
    from vlmguard.synth.card import model_card

    card = model_card(_bundled(), None)
    assert "Runs 1 and 2 used the first 3000 training images, runs 3 and 4 all of them;" in card
    assert "--init runs/run1`" in card and "--init runs/run2`" in card
    assert "--init runs/run3/checkpoints/step-500`" in card and "tiny-c" not in card and "tiny-b0" not in card
    assert "synth build --seed 0 --out runs/synth0" in card


def test_quick_and_presence_pope_without_questions():
    """A test split too small for any POPE question (no image with 3 objects): nothing measured, no crash."""
    from vlmguard.synth.train import presence_pope, quick_pope

    class Split:
        image_ids: list = []
        file_names: list = []

        def normalized(self, idx):
            return torch.zeros((len(idx), 3, 96, 96))

    vision = torch.nn.Module()
    vision.forward = lambda x: None
    assert presence_pope(vision, torch.nn.Linear(4, 28), Split(), []) == {"acc": None, "yes_ratio": None}
    assert quick_pope(torch.nn.Linear(1, 1), None, Split(), []) == {"acc": None, "yes_ratio": None}


def _cli_data(tmp_path: Path, test: bool = True) -> Path:
    """Enough of a SynthCOCO directory for `synth train`'s checks (nothing is loaded)."""
    data = tmp_path / "data"
    for sub in ("text", "annotations", "pope"):
        (data / sub).mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    (data / "text" / "train.jsonl").write_text("")
    if test:
        (data / "annotations" / "instances_test.json").write_text("{}")
        for s in ("random", "popular", "adversarial"):
            (data / "pope" / f"synthcoco_pope_{s}.json").write_text("")
    return data


@pytest.mark.parametrize("extra, needle", [
    (["--max-train-images", "-3"], "--max-train-images must be >= 0, got -3"),
    (["--val-questions", "-1"], "--val-questions must be >= 0, got -1"),
    (["--val-every", "-5"], "--val-every must be >= 0, got -5"),
    (["--val-stop", "5"], "--val-stop must be an accuracy in [0, 1]"),
    (["--val-stop", "nan"], "--val-stop must be an accuracy in [0, 1]"),
    (["--steps", "0,0,0"], "--steps 0,0,0: every stage is skipped, nothing to train"),
    (["--log", "DIR"], "--log DIR: is a directory"),
    (["--no-test"], "has no test split"),
])
def test_synth_train_bad_options_one_line_before_work(capsys, monkeypatch, tmp_path: Path, extra, needle):
    import vlmguard.synth.train as train_mod
    from vlmguard.cli import main

    def forbidden(*a, **k):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(train_mod, "Trainer", forbidden)
    data = _cli_data(tmp_path, test="--no-test" not in extra)
    extra = [str(tmp_path) if x == "DIR" else x for x in extra if x != "--no-test"]
    needle = needle.replace("DIR", str(tmp_path))
    rc = main(["synth", "train", "--data", str(data), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_synth_empty_paths_and_missing_eval_data(capsys, monkeypatch, tmp_path: Path):
    import vlmguard.synth.evaluate as eval_mod
    from vlmguard.cli import main

    monkeypatch.setattr(eval_mod, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    rc = main(["synth", "eval", "--data", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--data {tmp_path / 'nope'}: not found" in err and "--dataset" not in err
    for argv in (["synth", "build", "--out", "", "--test", "1"], ["synth", "train", "--data", "", "--out", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "empty path" in capsys.readouterr().err
