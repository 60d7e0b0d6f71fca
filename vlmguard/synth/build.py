"""Build a SynthCOCO dataset directory (images, COCO json, training text, POPE files, manifest).

Layout::

    DIR/manifest.json
    DIR/images/{split}/synthcoco_{split}_{image_id:012d}.png
    DIR/annotations/instances_{split}.json     COCO instances (visible objects only, RLE segmentation)
    DIR/annotations/captions_{split}.json      COCO captions (5 references per image, visible objects)
    DIR/text/{split}.jsonl                     training texts (every object, including nearly invisible)
    DIR/pope/synthcoco_pope_{random,popular,adversarial}.json   (test split only)

Each split is generated from its own RNG (seeded by ``seed`` and the split name), so a build with only
``test=500`` writes the same test split as a full build. Ground truth: an object is present iff it
passes :func:`vlmguard.synth.world.is_visible` (alpha >= 0.5 and >= 40 unoccluded pixels at 96 px).
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.synth.pope import write_pope_files
from vlmguard.synth.render import render_scene
from vlmguard.synth.text import reference_captions, training_records
from vlmguard.synth.world import CATEGORIES, GENERATOR_VERSION, PAIRS, WorldParams, sample_scene

SPLITS = ("train", "val", "test")
SPLIT_ID_BASE = {"train": 10_000_000, "val": 20_000_000, "test": 30_000_000}
DEFAULT_COUNTS = {"train": 8000, "val": 200, "test": 500}


def image_file_name(split: str, image_id: int) -> str:
    return f"synthcoco_{split}_{image_id:012d}.png"


def _static_cooccur() -> dict[str, list[str]]:
    co: dict[str, list[str]] = {}
    for a, b, _ in PAIRS:
        co.setdefault(a, []).append(b)
        co.setdefault(b, []).append(a)
    return {k: list(dict.fromkeys(v)) for k, v in co.items()}


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=False))


def build_split(out: Path, split: str, n: int, seed: int, params: WorldParams) -> list[tuple[str, list[str]]]:
    """Generate one split; returns [(file name, ground-truth object names in annotation order)]."""
    rng = random.Random(f"synthcoco-{seed}-{split}")
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, caps, texts, gt_records = [], [], [], [], []
    cooccur = _static_cooccur()
    ann_id = SPLIT_ID_BASE[split]
    for i in range(n):
        image_id = SPLIT_ID_BASE[split] + i + 1
        scene = sample_scene(rng, params)
        rendered = render_scene(scene, params)
        fname = image_file_name(split, image_id)
        (img_dir / fname).write_bytes(_png_bytes(rendered.image))
        s = params.image_size
        images.append({"id": image_id, "file_name": fname, "width": s, "height": s,
                       "scene_type": scene.scene_type.name})
        gt: list[str] = []
        for obj, vmask, vis in zip(scene.objects, rendered.visible_masks, rendered.visible):
            if not vis:
                continue
            ann_id += 1
            rle = mask_utils.encode(np.asfortranarray(vmask.astype(np.uint8)))
            bbox = [float(x) for x in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": ann_id, "image_id": image_id, "category_id": obj.category.id,
                         "bbox": bbox, "area": float(vmask.sum()), "iscrowd": 0, "segmentation": rle})
            gt.append(obj.category.name)
        gt_records.append((fname, gt))
        cap_rng = random.Random(f"{seed}-{split}-cap-{image_id}")
        for j, c in enumerate(reference_captions(scene, rendered.visible, cap_rng)):
            caps.append({"id": image_id * 10 + j, "image_id": image_id, "caption": c})
        texts.extend(training_records(scene, image_id, s, random.Random(f"{seed}-{split}-txt-{image_id}"), cooccur))
        # scene graph with hidden objects, for analysis (not part of the COCO ground truth)
        images[-1]["scene_objects"] = [
            {"category_id": o.category.id, "hidden": o.hidden, "visible": v, "alpha": round(o.alpha, 3),
             "size": round(o.size, 2)} for o, v in zip(scene.objects, rendered.visible)]
    categories = [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in CATEGORIES]
    info = {"description": f"SynthCOCO {split}", "version": GENERATOR_VERSION, "year": 2026}
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    _dump({"info": info, "images": images, "annotations": anns, "categories": categories,
           "licenses": []}, ann_dir / f"instances_{split}.json")
    cap_images = [{k: v for k, v in im.items() if k != "scene_objects"} for im in images]
    _dump({"info": info, "images": cap_images, "annotations": caps, "licenses": []},
          ann_dir / f"captions_{split}.json")
    txt_dir = out / "text"
    txt_dir.mkdir(parents=True, exist_ok=True)
    (txt_dir / f"{split}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    return gt_records


def build_dataset(out: str | os.PathLike, seed: int = 0, train: int = DEFAULT_COUNTS["train"],
                  val: int = DEFAULT_COUNTS["val"], test: int = DEFAULT_COUNTS["test"],
                  params: WorldParams | None = None, progress: bool = False) -> Path:
    """Build SynthCOCO into ``out`` (created when missing). A previous build there (complete, or interrupted:
    ``BUILD_MARKER`` says one started) is replaced: its SynthCOCO files are removed first; a folder no build
    wrote is never cleared, and other files are left alone. ``manifest.json`` is written last, so only a
    complete build has one."""
    params = params or WorldParams()
    params.validate()
    out = Path(out)
    counts = {"train": train, "val": val, "test": test}
    out.mkdir(parents=True, exist_ok=True)
    if (out / BUILD_MARKER).is_file() or _is_synthcoco_manifest(out / "manifest.json"):
        _clear_previous_build(out)
    else:
        _refuse_to_overwrite(out, counts)
    (out / BUILD_MARKER).write_text("written by `vlmguard synth build`; a rebuild here replaces its files\n")
    for split in SPLITS:
        if counts[split] <= 0:
            continue
        if progress:
            print(f"building {split}: {counts[split]} images", flush=True)
        gt = build_split(out, split, counts[split], seed, params)
        if split == "test":
            write_pope_files(gt, out / "pope", seed, sample_num=params.pope_sample_num)
    manifest = {
        "name": "SynthCOCO",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "counts": counts,
        "image_size": params.image_size,
        "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory, "shape": c.shape,
                        "color": list(c.color), "texture": c.texture} for c in CATEGORIES],
        "parameters": params.to_dict(),
        "visibility_rule": (f"an object is in the ground truth (instances, captions, POPE) iff it is drawn "
                            f"with alpha >= {params.min_alpha} and at least {params.min_pixels} of its pixels "
                            f"are unoccluded; nearly invisible objects are still mentioned in text/*.jsonl"),
        "pope": "test split only; POPE utils.py protocol, 3 positives + 3 negatives per image with >= 3 objects",
    }
    # written last and atomically: a directory with a manifest is a complete build
    tmp_manifest = out / ".manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, out / "manifest.json")
    return out


BUILD_MARKER = ".synthcoco-build"  # written when a build starts, kept: a later build may clear this folder


def _is_synthcoco_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("name") == "SynthCOCO"
    except (OSError, ValueError, AttributeError):
        return False


def _refuse_to_overwrite(out: Path, counts: dict[str, int]) -> None:
    """A folder no build wrote keeps its files: a build that would overwrite one of them (a ``manifest.json``,
    an ``annotations/instances_test.json``, ... of someone else's) is refused before anything is written."""
    paths = [out / "manifest.json"]
    for split in SPLITS:
        if counts[split] <= 0:
            continue
        paths += [out / "annotations" / f"instances_{split}.json", out / "annotations" / f"captions_{split}.json",
                  out / "text" / f"{split}.jsonl"]
        img_dir = out / "images" / split
        if img_dir.is_dir():
            paths += [img_dir / image_file_name(split, SPLIT_ID_BASE[split] + i + 1) for i in range(counts[split])]
    if counts["test"] > 0:
        paths += [out / "pope" / f"synthcoco_pope_{s}.json" for s in ("random", "popular", "adversarial")]
    taken = [str(p.relative_to(out)) for p in paths if p.exists()]
    if taken:
        names = ", ".join(taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise InvalidInput(f"{out}: not a SynthCOCO build, and a build would overwrite {len(taken)} of its files "
                           f"({names}); choose an empty or new folder")


def _clear_previous_build(out: Path) -> None:
    """Remove what an earlier build (complete or interrupted) wrote into ``out``, the manifest first, so a
    rebuild with other counts or another seed leaves no stale split, image or POPE file behind, and an
    interrupted rebuild is not taken for a complete one. Only the files of the layout above are touched."""
    for name in ("manifest.json", ".manifest.json.tmp"):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        img_dir = out / "images" / split
        if img_dir.is_dir():
            for f in img_dir.glob(f"synthcoco_{split}_*.png"):
                f.unlink()
        for f in (out / "annotations" / f"instances_{split}.json", out / "annotations" / f"captions_{split}.json",
                  out / "text" / f"{split}.jsonl"):
            f.unlink(missing_ok=True)
    for split in ("random", "popular", "adversarial"):
        (out / "pope" / f"synthcoco_pope_{split}.json").unlink(missing_ok=True)
    # folders left empty go too (a fresh build creates only those of the splits it writes)
    for d in [*(out / "images" / s for s in SPLITS), *(out / n for n in ("images", "annotations", "text", "pope"))]:
        try:
            d.rmdir()
        except OSError:
            pass  # missing, or holds other files


def cache_dir() -> Path:
    if "VLMGUARD_CACHE" in os.environ:
        return Path(os.environ["VLMGUARD_CACHE"])
    try:
        return Path.home() / ".cache" / "vlmguard"
    except RuntimeError as e:  # HOME unset and no passwd entry for this uid (a container run with --user)
        raise VlmguardError("cannot find a home folder for the SynthCOCO dataset cache (HOME is unset); set "
                            "VLMGUARD_CACHE to a writable folder") from e


def default_dataset_dir(seed: int = 0) -> Path:
    """Where :func:`default_dataset` keeps the default-seed world (it may not be built yet)."""
    return cache_dir() / f"synthcoco-seed{seed}"


def default_dataset(seed: int = 0) -> Path:
    """The default-seed test split (500 images), built once into ``$VLMGUARD_CACHE/synthcoco-seed{seed}``.

    Safe when several processes race: each builds into its own temporary directory and renames it into
    place; the loser discards its copy.
    """
    target = default_dataset_dir(seed)
    if (target / "manifest.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # not mkdtemp, whose 0700 would keep a shared VLMGUARD_CACHE's world from every other user: the umask's mode
        tmp = target.parent / f".synthcoco-seed{seed}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:  # a read-only or missing HOME (CI runners, service accounts)
        raise VlmguardError(f"cannot build the SynthCOCO dataset in {target.parent}: {e.strerror or e}; set "
                            "VLMGUARD_CACHE to a writable folder") from e
    try:
        build_dataset(tmp, seed=seed, train=0, val=0, test=DEFAULT_COUNTS["test"])
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
