"""SynthCOCO generator: determinism, COCO readability, POPE protocol properties."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from vlmguard.errors import InvalidInput
from vlmguard.synth import build_dataset
from vlmguard.synth.pope import cooccurrence
from vlmguard.synth.world import CATEGORIES, WorldParams, sample_scene

SMALL = dict(train=12, val=4, test=30)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("synth") / "a", seed=7, **SMALL)


def test_layout(built: Path):
    m = json.loads((built / "manifest.json").read_text())
    assert m["seed"] == 7 and m["counts"] == SMALL
    assert "visibility_rule" in m and m["parameters"]["min_alpha"] == WorldParams().min_alpha
    # the default world's manifest (and so its dataset version) is the one written before scene_cue existed
    assert "scene_cue" not in m["parameters"]
    for split, n in SMALL.items():
        pngs = sorted((built / "images" / split).glob("*.png"))
        assert len(pngs) == n
        assert pngs[0].name.startswith(f"synthcoco_{split}_") and len(pngs[0].stem.split("_")[-1]) == 12
        assert (built / "annotations" / f"instances_{split}.json").is_file()
        assert (built / "annotations" / f"captions_{split}.json").is_file()
        recs = [json.loads(x) for x in (built / "text" / f"{split}.jsonl").read_text().splitlines()]
        assert {r["task"] for r in recs} == {"caption", "detail", "yesno"}
        assert all(set(r) == {"image_id", "task", "prompt", "answer"} for r in recs)
    for s in ("random", "popular", "adversarial"):
        assert (built / "pope" / f"synthcoco_pope_{s}.json").is_file()


def test_deterministic_bytes(built: Path, tmp_path: Path):
    again = build_dataset(tmp_path / "b", seed=7, **SMALL)
    assert _digest(built) == _digest(again)
    # each split has its own RNG: a test-only build gives the same test split and POPE files
    only_test = build_dataset(tmp_path / "c", seed=7, train=0, val=0, test=SMALL["test"])
    a, c = _digest(built), _digest(only_test)
    shared = [k for k in c if k != "manifest.json"]
    assert shared and all(a[k] == c[k] for k in shared)
    other = build_dataset(tmp_path / "d", seed=8, train=0, val=0, test=SMALL["test"])
    assert _digest(other)["annotations/instances_test.json"] != c["annotations/instances_test.json"]


def test_pycocotools_reads(built: Path):
    coco = COCO(str(built / "annotations" / "instances_test.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert {(c["id"], c["name"]) for c in cats} == {(c.id, c.name) for c in CATEGORIES}
    assert len(coco.getImgIds()) == SMALL["test"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(a["iscrowd"] == 0 and a["area"] >= WorldParams().min_pixels for a in anns)
    mask = coco.annToMask(anns[0])
    assert mask.sum() == anns[0]["area"]
    x, y, w, h = anns[0]["bbox"]
    assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
    caps = COCO(str(built / "annotations" / "captions_test.json"))
    assert len(caps.getAnnIds()) == 5 * SMALL["test"]


def _gt(built: Path) -> dict[str, list[str]]:
    inst = json.loads((built / "annotations" / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    gt: dict[str, list[str]] = {fn: [] for fn in files.values()}
    for a in inst["annotations"]:
        gt[files[a["image_id"]]].append(names[a["category_id"]])
    return gt


def test_hidden_objects_mentioned_but_not_ground_truth(tmp_path: Path):
    root = build_dataset(tmp_path / "h", seed=3, train=60, val=0, test=0)
    inst = json.loads((root / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    yes = Counter()
    for line in (root / "text" / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["task"] == "yesno" and r["answer"] == "Yes":
            yes[(r["image_id"], r["prompt"].split(" in the image")[0].split(" ", 3)[3])] += 1
    hidden = [(im["id"], names[o["category_id"]]) for im in inst["images"] for o in im["scene_objects"]
              if not o["visible"]]
    assert hidden, "the generator must produce nearly invisible objects"
    anns = {(a["image_id"], names[a["category_id"]]) for a in inst["annotations"]}
    for key in hidden:
        assert key not in anns  # not in the ground truth
        assert yes[key] >= 1  # but the training text says it is there


def test_pope_protocol(built: Path):
    gt = _gt(built)
    files = {s: [json.loads(x) for x in (built / "pope" / f"synthcoco_pope_{s}.json").read_text().splitlines()]
             for s in ("random", "popular", "adversarial")}
    eligible = {fn for fn, objs in gt.items() if len(set(objs)) >= 3}
    selected = [(fn, gt[fn]) for fn in dict.fromkeys(q["image"] for q in files["random"])]
    co = cooccurrence(selected)
    freq = Counter(o for _, objs in selected for o in set(objs))
    for split, qs in files.items():
        assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
        assert all(set(q) == {"question_id", "image", "text", "label"} for q in qs)
        per_image: dict[str, list[dict]] = {}
        for q in qs:
            per_image.setdefault(q["image"], []).append(q)
        assert set(per_image) == eligible
        for fn, iq in per_image.items():
            labels = [q["label"] for q in iq]
            assert labels == ["yes", "no"] * 3
            objs = [q["text"].split(" in the image?")[0].split(" ", 3)[3] for q in iq]
            assert q["text"].startswith("Is there a")
            assert objs[0::2] == gt[fn][:3]  # positives: first three GT objects in list order
            assert len(set(objs)) == 6
            for pos, neg in zip(objs[0::2], objs[1::2]):
                assert neg not in gt[fn]
                asked_before = set(objs[: objs.index(neg)])
                valid = [o for o in freq if o not in gt[fn] and o not in asked_before]
                if split == "adversarial":
                    ranked = [o for o, _ in co[pos] if o in valid]
                    if ranked:
                        assert neg == ranked[0]
                if split == "popular":
                    assert freq[neg] == max(freq[o] for o in valid)


def test_default_dataset_cached_and_race_safe(tmp_path: Path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from vlmguard.synth import build as build_mod
    from vlmguard.synth import default_dataset

    monkeypatch.setenv("VLMGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(build_mod.DEFAULT_COUNTS, "test", 4)
    with ThreadPoolExecutor(3) as ex:
        paths = list(ex.map(lambda _: default_dataset(), range(3)))
    assert len(set(paths)) == 1 and paths[0] == tmp_path / "cache" / "synthcoco-seed0"
    assert (paths[0] / "pope" / "synthcoco_pope_random.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["synthcoco-seed0"]  # no temp dirs left
    assert default_dataset() == paths[0]


def test_scene_cue_weakens_what_the_background_tells_of_the_scene():
    """``scene_cue`` 1 keeps each scene type's own tint and texture; below 1 the tint moves toward the common
    mean (plus a per-image jitter) and the texture is the type's own only sometimes, so the background alone
    no longer names the scene type."""
    import random

    import numpy as np

    from vlmguard.synth.render import BACKGROUND_JITTER, PATTERNS, _background_style
    from vlmguard.synth.world import SCENE_TYPES, sample_scene

    rng = random.Random(0)
    scenes = []
    for i in range(400):
        s = sample_scene(rng, WorldParams())
        s.noise_seed = i
        scenes.append(s)
    common = np.mean([t.background for t in SCENE_TYPES], axis=0)
    for s in scenes[:20]:
        tint, pattern = _background_style(s, 1.0)
        assert tuple(tint) == s.scene_type.background and pattern == s.scene_type.pattern
        assert _background_style(s, 0.25)[0].tolist() == _background_style(s, 0.25)[0].tolist()  # deterministic
    weak = [_background_style(s, 0.0) for s in scenes]
    # cue 0: every tint is the common mean plus the jitter, whatever the scene type
    assert all(np.abs(t - common).max() < 5 * BACKGROUND_JITTER for t, _ in weak)
    own = sum(p == s.scene_type.pattern for s, (_, p) in zip(scenes, weak)) / len(scenes)
    assert abs(own - 1 / len(PATTERNS)) < 0.08  # textures drawn independently of the type
    half = [_background_style(s, 0.5) for s in scenes]
    own_half = sum(p == s.scene_type.pattern for s, (_, p) in zip(scenes, half)) / len(scenes)
    assert abs(own_half - (0.5 + 0.5 / len(PATTERNS))) < 0.08


def test_scene_cue_is_recorded_and_validated(tmp_path: Path):
    import subprocess
    import sys

    params = WorldParams()
    params.scene_cue = 0.25
    out = build_dataset(tmp_path / "w", seed=7, train=0, val=0, test=3, params=params)
    assert json.loads((out / "manifest.json").read_text())["parameters"]["scene_cue"] == 0.25
    r = subprocess.run([sys.executable, "-m", "vlmguard.cli", "synth", "build", "--out", str(tmp_path / "x"),
                        "--scene-cue", "1.5"], capture_output=True, text=True)
    assert r.returncode != 0 and "--scene-cue: world parameter scene_cue must be in [0.0, 1.0], got 1.5" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad,message", [
    ({"min_objects": 0}, "min_objects <= max_objects"),
    ({"max_objects": 4}, "object_count_weights must hold 4"),
    ({"min_objects": 2}, "object_count_weights must hold 4 non-negative weights (one per object count 2..5)"),
    ({"hidden_alpha": (0.3, 0.1)}, "hidden_alpha must be an ordered pair"),
    ({"visible_size": (0, 10)}, "visible_size must be an ordered pair >= 1"),
    ({"hidden_prob": 1.5}, "hidden_prob must be in [0.0, 1.0]"),
    ({"pope_sample_num": 0}, "pope_sample_num >= 1"),
])
def test_world_parameters_are_validated(bad, message, tmp_path: Path):
    with pytest.raises(InvalidInput) as err:
        WorldParams(**bad)
    assert message in str(err.value)
    params = WorldParams()  # set after construction: build_dataset checks again, before writing anything
    for k, v in bad.items():
        setattr(params, k, v)
    with pytest.raises(InvalidInput):
        build_dataset(tmp_path / "w", seed=0, train=0, val=0, test=1, params=params)
    assert not (tmp_path / "w").exists()


def test_object_count_weights_cover_min_to_max_objects(tmp_path: Path):
    params = WorldParams(min_objects=2, max_objects=5, object_count_weights=(1.0, 1.0, 1.0, 1.0))
    rng = random.Random(0)
    assert {len(sample_scene(rng, params).objects) >= 2 for _ in range(20)} == {True}
    assert build_dataset(tmp_path / "w", seed=0, train=0, val=0, test=2, params=params).exists()


def test_rebuild_into_existing_directory_leaves_nothing_stale(tmp_path: Path):
    """A rebuild with another seed and fewer / no images of a split equals a fresh build (no old split, image or
    POPE file left behind for `synth train` / `bench` to pick up); files that are not SynthCOCO's are kept."""
    d = build_dataset(tmp_path / "d", seed=0, train=3, val=2, test=6)
    (d / "notes.txt").write_text("mine\n")
    build_dataset(d, seed=1, train=0, val=0, test=4)
    fresh = build_dataset(tmp_path / "fresh", seed=1, train=0, val=0, test=4)
    got = _digest(d)
    assert got.pop("notes.txt") and got == _digest(fresh)
    assert sorted(p.name for p in (d / "images").iterdir()) == ["test"]


def test_a_build_into_a_folder_no_build_wrote_deletes_nothing(tmp_path: Path):
    """Only a folder a build wrote (its marker, or a SynthCOCO manifest) is cleared: files of the same names that
    someone else put there are kept when the build does not write them."""
    d = tmp_path / "mine"
    for rel in ("annotations/instances_train.json", "annotations/captions_val.json", "text/train.jsonl"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("{}\n")
    build_dataset(d, seed=0, train=0, val=0, test=2)
    assert all((d / rel).read_text() == "{}\n" for rel in
               ("annotations/instances_train.json", "annotations/captions_val.json", "text/train.jsonl"))


def test_interrupted_rebuild_is_not_presented_as_complete(tmp_path: Path, monkeypatch):
    import vlmguard.synth.build as build_mod

    d = build_dataset(tmp_path / "d", seed=0, train=0, val=0, test=4)
    real = build_mod.build_split

    def interrupted(out, split, *args, **kwargs):
        real(out, split, 2, *args[1:], **kwargs)  # part of the split written, then ^C
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "build_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(d, seed=5, train=0, val=0, test=4)
    assert not (d / "manifest.json").exists()  # no manifest: `synth train` / `bench` refuse the directory
