"""Resolving a benchmark dataset: images, POPE question files, CHAIR image lists and ground truth.

One code path for SynthCOCO and real COCO; they differ only in where files are:

* SynthCOCO directory (``vlmguard synth build`` output, or ``synthcoco`` = ``vlmguard.synth.default_dataset()``)::

    DIR/images/{split}/synthcoco_{split}_{id:012d}.png
    DIR/annotations/instances_{split}.json, captions_{split}.json
    DIR/pope/synthcoco_pope_{random,popular,adversarial}.json
    DIR/manifest.json

  POPE and CHAIR use the image split ``test`` unless ``image_split`` says otherwise; CHAIR's default image
  list is every image of that split.

* Real COCO (``--dataset coco``): ``coco_images`` = the val2014 image folder (``COCO_val2014_*.jpg``);
  ``pope_dir`` = a folder in the ``refdata/pope`` layout (default: ``../shared/refdata/pope`` when present)
  with ``pope_set`` naming the file version (``head`` default, ``llava15_e3e3926``, ``aokvqa_seem``,
  ``gqa_seem``); for CHAIR, ``gt`` = the exported table (default: refdata's
  ``chair_gt_objects_coco2014_trainval.json.gz``) or ``coco_annotations`` = the folder with
  ``instances_{train,val}2014.json`` + ``captions_{train,val}2014.json``; ``image_ids`` default = the
  standard 500-image list (refdata ``chair_image_ids_coco_val2014_500.txt``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from vlmguard.bench.chair_gt import (
    GroundTruth,
    coco_annotation_files,
    gt_from_coco_files,
    load_ground_truth,
    load_gt_table,
    quiet_coco,
)
from vlmguard.bench.chair_score import read_image_ids
from vlmguard.bench.nltk_setup import shared_dir
from vlmguard.bench.pope_data import DEFAULT_POPE_SET, SPLITS, PopeFile, load_pope_file, pope_set_path
from vlmguard.errors import InvalidInput

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def refdata_dir() -> Path:
    return shared_dir() / "refdata"


@dataclass
class BenchDataset:
    """Everything the runner needs from a dataset; see the module docstring for the layouts."""

    name: str  # "synthcoco" | "coco" | a directory name
    version: str  # manifest hash (SynthCOCO) or POPE set name (COCO)
    kind: str  # "synth" | "coco"
    image_dirs: list[Path]
    pope_paths: dict[str, Path]
    annotations_dir: Path | None = None
    gt_table: Path | None = None
    image_ids_file: Path | None = None
    image_split: str = "test"
    info: dict[str, Any] = field(default_factory=dict)
    pope_dir: Path | None = None  # where the POPE files were looked for (named when one is missing)
    pope_set: str = DEFAULT_POPE_SET

    # ---- images -------------------------------------------------------------------------------
    @cached_property
    def _image_index(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for d in self.image_dirs:
            if not d.is_dir():
                raise InvalidInput(f"{d}: image directory not found")
            with os.scandir(d) as it:
                for e in it:
                    if e.name.lower().endswith(IMAGE_EXTS):
                        index.setdefault(e.name, Path(e.path))
        return index

    def image_path(self, name: str) -> Path | None:
        """Path of an image by file name (as in POPE's ``image`` field), or None if unknown."""
        p = self._image_index.get(name)
        if p is None and os.path.isabs(name) and Path(name).is_file():
            return Path(name)
        return p

    # ---- POPE ---------------------------------------------------------------------------------
    def pope_file(self, split: str) -> PopeFile:
        if split not in self.pope_paths:
            where = ""
            if self.pope_dir is not None:
                where = (f" ({self.pope_dir}: POPE directory not found)" if not self.pope_dir.is_dir() else
                         f" ({pope_set_path(self.pope_dir, self.pope_set, split)}: file not found)")
            raise InvalidInput(f"dataset {self.name}: no POPE file for split {split!r}{where}")
        pope = load_pope_file(self.pope_paths[split])
        self.check_images(pope)
        return pope

    def check_images(self, pope: PopeFile) -> None:
        for q in pope.questions:
            if self.image_path(q.image) is None:
                raise InvalidInput(
                    f"{pope.path}:{q.line}: unknown image {q.image!r} (not in {', '.join(map(str, self.image_dirs))})"
                )

    # ---- CHAIR --------------------------------------------------------------------------------
    @cached_property
    def _coco_images(self) -> dict[int, str]:
        """image id -> file name from the instances file(s), when annotations are available."""
        if self.annotations_dir is None:
            return {}
        splits = [self.image_split] if self.kind == "synth" else None
        inst, _ = coco_annotation_files(self.annotations_dir, splits)
        out: dict[int, str] = {}
        for f in inst:
            coco = quiet_coco(f)
            for imid, img in coco.imgs.items():
                out[int(imid)] = img["file_name"]
        return out

    def chair_image_ids(self, image_ids_file: Path | None = None) -> tuple[list[int], str]:
        """(ids, description) — an explicit list file, else the dataset default."""
        f = image_ids_file or self.image_ids_file
        if f is not None:
            ids = read_image_ids(f)
            return ids, f"{Path(f).name}:{_sha(Path(f))[:12]}"
        if self.kind == "synth":
            return sorted(self._coco_images), f"all {self.image_split} images"
        raise InvalidInput("CHAIR on COCO needs an image-id list (--image-ids)")

    def chair_image_path(self, image_id: int) -> Path:
        name = self._coco_images.get(image_id) or f"COCO_val2014_{image_id:012d}.jpg"
        p = self.image_path(name)
        if p is None:
            raise InvalidInput(f"dataset {self.name}: unknown image id {image_id} (no file {name})")
        return p

    def chair_ground_truth(self, image_ids: list[int]) -> GroundTruth:
        splits = [self.image_split] if self.kind == "synth" else None
        if self.gt_table is not None and self.gt_table.is_dir():  # --gt: "table .json(.gz) or COCO annotation folder"
            gt = load_ground_truth(self.gt_table, image_ids, splits)
        elif self.gt_table is not None:
            gt = load_gt_table(self.gt_table)
        elif self.annotations_dir is not None:
            # every image the instances files list has an entry (an empty set when it has no annotations); an id
            # they do not list has no ground truth and is refused below, never scored against an empty set
            inst, caps = coco_annotation_files(self.annotations_dir, splits)
            gt = gt_from_coco_files(inst, caps, image_ids)
        else:
            raise InvalidInput(f"dataset {self.name}: CHAIR needs a ground-truth table or COCO annotations")
        missing = [i for i in image_ids if i not in gt]
        if missing:
            source = self.gt_table if self.gt_table is not None else self.annotations_dir
            raise InvalidInput(f"{source}: {len(missing)} image ids of dataset {self.name} have no ground truth "
                               f"(first: {missing[0]})")
        return gt


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_synth_dir(path: Path) -> bool:
    return (path / "annotations").is_dir() and (path / "pope").is_dir() and (path / "images").is_dir()


def synth_dataset(root: Path, name: str | None = None, image_split: str = "test") -> BenchDataset:
    root = Path(root)
    if not is_synth_dir(root):
        raise InvalidInput(f"{root}: not a SynthCOCO directory (needs images/, annotations/, pope/)")
    manifest = root / "manifest.json"
    info: dict[str, Any] = {}
    version = "unversioned"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{manifest}:{e.lineno}: bad JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{manifest}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        version = _sha(manifest)[:12]
        if isinstance(info, dict):
            for key in ("version", "generator_version"):
                if key in info:
                    version = f"{info[key]}+{version}"
                    break
    pope_paths = {}
    for split in SPLITS:
        cands = sorted((root / "pope").glob(f"*pope_{split}.json")) + sorted((root / "pope").glob(f"*pope_{split}.jsonl"))
        if cands:
            pope_paths[split] = cands[0]
    return BenchDataset(
        name=name or root.name,
        version=version,
        kind="synth",
        image_dirs=[root / "images" / image_split],
        pope_paths=pope_paths,
        annotations_dir=root / "annotations",
        image_split=image_split,
        info=info if isinstance(info, dict) else {},
    )


def coco_dataset(
    coco_images: Path | None,
    pope_dir: Path | None = None,
    pope_set: str = DEFAULT_POPE_SET,
    coco_annotations: Path | None = None,
    gt: Path | None = None,
    image_ids: Path | None = None,
) -> BenchDataset:
    if coco_images is None:
        raise InvalidInput("--dataset coco needs --coco-images DIR (the val2014 image folder)")
    pope_dir = pope_dir or (refdata_dir() / "pope")
    pope_paths = {}
    if pope_dir.is_dir():
        for split in SPLITS:
            p = pope_set_path(pope_dir, pope_set, split)
            if p.is_file():
                pope_paths[split] = p
    default_table = refdata_dir() / "chair_gt_objects_coco2014_trainval.json.gz"
    if gt is None and coco_annotations is None and default_table.is_file():
        gt = default_table
    default_ids = refdata_dir() / "chair_image_ids_coco_val2014_500.txt"
    if image_ids is None and default_ids.is_file():
        image_ids = default_ids
    return BenchDataset(
        name="coco",
        version=pope_set,
        kind="coco",
        image_dirs=[Path(coco_images)],
        pope_paths=pope_paths,
        annotations_dir=coco_annotations,
        gt_table=gt,
        image_ids_file=image_ids,
        image_split="val2014",
        pope_dir=Path(pope_dir),
        pope_set=pope_set,
    )


def default_synth_root() -> Path:
    """Build (or reuse the cached) default-seed SynthCOCO via ``vlmguard.synth.default_dataset()``."""
    try:
        from vlmguard.synth import default_dataset  # type: ignore[attr-defined]
    except ImportError as e:
        raise InvalidInput(f"SynthCOCO is not available in this build ({e})") from None
    ds = default_dataset()
    if not isinstance(ds, (str, os.PathLike)):
        for attr in ("root", "path", "directory"):
            if hasattr(ds, attr):
                ds = getattr(ds, attr)
                break
    return Path(ds)


def resolve_dataset(
    spec: str,
    *,
    image_split: str = "test",
    coco_images: Path | None = None,
    pope_dir: Path | None = None,
    pope_set: str = DEFAULT_POPE_SET,
    coco_annotations: Path | None = None,
    gt: Path | None = None,
    image_ids: Path | None = None,
) -> BenchDataset:
    """``synthcoco`` | a SynthCOCO directory | ``coco`` (+ the COCO options)."""
    if spec == "synthcoco":
        ds = synth_dataset(default_synth_root(), name="synthcoco", image_split=image_split)
    elif spec == "coco":
        ds = coco_dataset(coco_images, pope_dir, pope_set, coco_annotations, gt, image_ids)
        return ds
    else:
        p = Path(spec)
        if not p.exists():
            raise InvalidInput(f"--dataset {spec!r}: expected 'synthcoco', 'coco' or a SynthCOCO directory")
        ds = synth_dataset(p.resolve(), image_split=image_split)
    if gt is not None:
        ds.gt_table = gt
    if image_ids is not None:
        ds.image_ids_file = image_ids
    if pope_dir is not None:
        ds.pope_dir, ds.pope_set = Path(pope_dir), pope_set
        ds.pope_paths = {s: pope_set_path(pope_dir, pope_set, s) for s in SPLITS if pope_set_path(pope_dir, pope_set, s).is_file()}
    return ds
