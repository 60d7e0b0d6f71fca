"""Where a model's CHAIR hallucinations on SynthCOCO come from: each hallucinated mention, sorted by kind.

SynthCOCO knows more than COCO's ground truth: every image's scene type and its full scene graph, nearly
invisible objects included (``instances_{split}.json``: ``scene_type``, ``scene_objects``). So a mention that
CHAIR counts as hallucinated (an object category not visibly present) can be traced to what made the model
say it, checked in this order:

- ``hidden``: the object *is* in the scene, drawn below the visibility rule: the planted prior (training
  text still names such objects);
- ``partner``: the co-occurrence partner of an object that is visibly present (fork -> knife; the world's
  ``PAIRS``);
- ``scene``: another category the scene's type draws (street -> traffic light);
- ``foreign``: a category the scene's type never draws (a misread glyph, or the scene taken for another).

``vlmguard synth hallucinations --db DB --data DIR`` reports this for every CHAIR run of a results database;
the tables in ``docs/decoding.md`` were made with it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmguard.errors import InvalidInput
from vlmguard.synth.world import BY_ID, PAIRS, SCENE_TYPES

KINDS = ("hidden", "partner", "scene", "foreign")
KIND_TITLES = {
    "hidden": "a nearly invisible object that is there",
    "partner": "the co-occurrence partner of a visible object",
    "scene": "another object typical of the scene type",
    "foreign": "foreign to the scene type",
}
_TYPE_CATEGORIES = {s.name: frozenset(s.categories) for s in SCENE_TYPES}


@dataclass(frozen=True)
class SceneFacts:
    scene_type: str
    visible: frozenset[str]  # categories visibly present (COCO ground truth)
    invisible: frozenset[str]  # categories in the scene but below the visibility rule


@dataclass
class Breakdown:
    """One CHAIR run's hallucinated mentions by kind."""

    run_id: str
    method: str
    images: int = 0
    mentions: int = 0  # object mentions CHAIR counted (hallucinated or not)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def hallucinated(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hallucinated": self.hallucinated}


def load_scenes(data_dir: str | Path, split: str) -> dict[int, SceneFacts]:
    """Scene type and visible / invisible categories of every image of a SynthCOCO split."""
    path = Path(data_dir) / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise InvalidInput(f"{path}: not found (a SynthCOCO directory written by `vlmguard synth build`?)")
    try:
        inst = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8 text
        raise InvalidInput(f"{path}: cannot read it as JSON ({e})") from None
    images = inst.get("images") if isinstance(inst, dict) else None
    if not isinstance(images, list):
        raise InvalidInput(f"{path}: not a COCO instances file (no 'images' list)")
    facts = {}
    for im in images:
        if not isinstance(im, dict) or "scene_objects" not in im or "scene_type" not in im:
            raise InvalidInput(f"{path}: image {im.get('id') if isinstance(im, dict) else im!r} has no scene graph "
                               f"(not a SynthCOCO split)")
        try:
            objs = [(BY_ID[o["category_id"]].name, bool(o["visible"])) for o in im["scene_objects"]]
            image_id = int(im["id"])
        except (KeyError, TypeError, ValueError) as e:  # a missing field, an unknown category id, a bad id
            raise InvalidInput(f"{path}: image {im.get('id')}: bad scene graph ({type(e).__name__}: {e})") from None
        visible = frozenset(name for name, vis in objs if vis)
        invisible = frozenset(name for name, vis in objs if not vis) - visible
        facts[image_id] = SceneFacts(str(im["scene_type"]), visible, invisible)
    return facts


def classify(category: str, scene: SceneFacts) -> str:
    """The kind of one hallucinated mention of ``category`` (a COCO category name) in ``scene``."""
    if category in scene.invisible:
        return "hidden"
    if any(b == category and a in scene.visible for a, b, _ in PAIRS):
        return "partner"
    if category in _TYPE_CATEGORIES.get(scene.scene_type, ()):
        return "scene"
    return "foreign"


def breakdown(records: list[dict[str, Any]], scenes: dict[int, SceneFacts], run_id: str = "",
              method: str = "") -> Breakdown:
    """Sort the hallucinated mentions of CHAIR sample records (``vlmguard.bench`` CHAIR rows)."""
    out = Breakdown(run_id=run_id, method=method)
    for rec in records:
        iid = int(rec["image_id"])
        if iid not in scenes:
            raise InvalidInput(f"image {iid} is not in the SynthCOCO split given (--data / --split)")
        out.images += 1
        out.mentions += len(rec.get("mscoco_words") or [])
        for pair in rec.get("mscoco_hallucinated_words") or []:
            out.counts[classify(pair[1], scenes[iid])] += 1
    return out


def breakdowns_from_db(db: str | Path, data_dir: str | Path, split: str | None = None) -> list[Breakdown]:
    """Every CHAIR run of a results database made on the SynthCOCO dataset ``data_dir`` (same dataset version),
    oldest first. ``split``: its image split the runs used (default: each run's own, as recorded). Runs are
    labelled by method, and by model too when the database holds several models' runs."""
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.db import connect, list_runs, run_samples
    from vlmguard.bench.report import method_label

    version = synth_dataset(Path(data_dir)).version
    scenes: dict[str, dict[int, SceneFacts]] = {}
    conn = connect(db, create=False)
    try:
        chair = [r for r in list_runs(conn, with_metrics=False) if r["benchmark"] == "chair"]
        runs = [r for r in chair if r.get("dataset_version") == version]
        if not runs:
            found = sorted({str(r.get("dataset_version")) for r in chair})
            raise InvalidInput(f"{db}: no CHAIR runs on the SynthCOCO dataset {data_dir} (version {version}); "
                               f"CHAIR runs found on: {', '.join(found) or 'none'}")
        several_models = len({r["model"] for r in runs}) > 1
        out = []
        for r in reversed(runs):
            s = split or r.get("split") or "test"
            if s not in scenes:
                scenes[s] = load_scenes(data_dir, s)
            records = [x["record"] for x in run_samples(conn, r["run_id"]) if x.get("record")]
            label = f"{r['model']} {method_label(r)}" if several_models else method_label(r)
            out.append(breakdown(records, scenes[s], run_id=r["run_id"], method=label))
        return out
    finally:
        conn.close()


def format_table(rows: list[Breakdown]) -> str:
    """Markdown: one column per run, one row per kind, then the total over the mentions."""
    head = "| hallucinated mention | " + " | ".join(r.method for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for k in KINDS:
        lines.append(f"| {KIND_TITLES[k]} | " + " | ".join(str(r.counts[k]) for r in rows) + " |")
    lines.append("| total (of mentions) | " + " | ".join(f"{r.hallucinated} ({r.mentions})" for r in rows) + " |")
    return "\n".join(lines)
