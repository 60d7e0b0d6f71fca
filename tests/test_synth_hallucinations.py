"""`vlmguard synth hallucinations`: CHAIR's hallucinated mentions sorted by kind from SynthCOCO's scene graphs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmguard.cli import main
from vlmguard.synth import build_dataset
from vlmguard.synth.hallucinations import KINDS, SceneFacts, breakdown, classify, load_scenes


def test_each_kind_is_recognised_in_order():
    kitchen = SceneFacts("kitchen", visible=frozenset({"fork", "cup"}), invisible=frozenset({"knife", "bus"}))
    assert classify("knife", kitchen) == "hidden"  # in the scene below the visibility rule: wins over partner
    assert classify("bus", kitchen) == "hidden"  # even when foreign to the type
    assert classify("spoon", kitchen) == "partner"  # cup -> spoon is a world pair
    assert classify("bowl", kitchen) == "scene"  # kitchens draw bowls, no visible partner names it
    assert classify("dog", kitchen) == "foreign"
    street = SceneFacts("street", visible=frozenset({"car"}), invisible=frozenset())
    assert classify("traffic light", street) == "partner" and classify("bus", street) == "scene"


def test_scene_graph_agrees_with_the_coco_ground_truth(tmp_path: Path):
    data = build_dataset(tmp_path / "w", seed=3, train=0, val=0, test=40)
    scenes = load_scenes(data, "test")
    inst = json.loads((data / "annotations" / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    gt: dict[int, set[str]] = {im["id"]: set() for im in inst["images"]}
    for a in inst["annotations"]:
        gt[a["image_id"]].add(names[a["category_id"]])
    assert len(scenes) == 40 and all(scenes[i].visible == gt[i] for i in gt)
    assert any(s.invisible for s in scenes.values())  # the planted objects are there to be found
    assert all(not (s.visible & s.invisible) for s in scenes.values())
    rec = {"image_id": inst["images"][0]["id"], "mscoco_words": ["dog", "cup"],
           "mscoco_hallucinated_words": [["dog", "dog"]]}
    b = breakdown([rec], scenes)
    assert b.images == 1 and b.mentions == 2 and b.hallucinated == 1
    from vlmguard.errors import InvalidInput

    with pytest.raises(InvalidInput, match="image 1 is not in the SynthCOCO split"):
        breakdown([{**rec, "image_id": 1}], scenes)


def test_cli_sorts_every_hallucination_of_a_real_chair_run(tmp_path: Path, capsys):
    data = build_dataset(tmp_path / "w", seed=0, train=0, val=0, test=16)
    db = tmp_path / "r.sqlite"
    assert main(["bench", "chair", "--model", "tiny", "--dataset", str(data), "--preset", "chair512",
                 "--limit", "16", "--batch-size", "16", "--db", str(db), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["synth", "hallucinations", "--db", str(db), "--data", str(data), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from vlmguard.bench.db import list_runs, run_samples

    records = [s["record"] for s in run_samples(db, list_runs(db)[0]["run_id"])]
    assert row["images"] == 16 and row["method"] == "base"
    assert row["mentions"] == sum(len(r["mscoco_words"]) for r in records) > 0
    assert row["hallucinated"] == sum(len(r["mscoco_hallucinated_words"]) for r in records)
    assert set(row["counts"]) == set(KINDS)
    assert main(["synth", "hallucinations", "--db", str(db), "--data", str(data)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| hallucinated mention | base |") and table.count("\n") == 7  # header, rule, 4 kinds, total
    assert main(["synth", "hallucinations", "--db", str(db), "--data", str(tmp_path)]) == 2
    assert "not a SynthCOCO directory" in capsys.readouterr().err
    other = build_dataset(tmp_path / "other", seed=1, train=0, val=0, test=4)  # runs are only read on their world
    assert main(["synth", "hallucinations", "--db", str(db), "--data", str(other)]) == 2
    assert "no CHAIR runs on the SynthCOCO dataset" in capsys.readouterr().err
