"""CHAIR ground truth per image (benchmarks.md 2.2): instance categories ∪ caption-derived categories.

Sources:
* COCO-format annotation files read with pycocotools (real COCO 2014 or SynthCOCO): every instance
  annotation's category name (crowd included) mapped through the synonym table, plus every reference
  caption of the image run through the same extraction as generated captions.
* The exported table ``{image_id: [sorted canonical names]}`` (``chair_gt_objects_coco2014_trainval.json.gz``).

``load_ground_truth(source)`` accepts a table file, a COCO annotation directory (``instances_*.json`` +
``captions_*.json``, e.g. real COCO ``annotations/``), or a SynthCOCO directory (its ``annotations/``).
Restricting to ``image_ids`` only extracts the captions of those images (same result, much faster).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, Iterable

from vlmguard.bench.chair_extract import ChairExtractor, default_extractor
from vlmguard.bench.chair_vocab import load_vocabulary
from vlmguard.errors import InvalidInput

GroundTruth = dict[int, frozenset[str]]


def load_gt_table(path: str | Path) -> GroundTruth:
    p = Path(path)
    try:
        raw = p.read_bytes()
        if p.suffix == ".gz":
            raw = gzip.decompress(raw)
        table = json.loads(raw, object_pairs_hook=_unique_keys)
    except (OSError, ValueError, EOFError, zlib.error) as e:  # ValueError: bad JSON, not UTF-8 text
        raise InvalidInput(f"{p}: cannot read CHAIR ground-truth table ({e})") from None
    if not isinstance(table, dict) or "annotations" in table:
        raise InvalidInput(f"{p}: expected a table {{image_id: [object names]}}")
    vocab = load_vocabulary()
    out: GroundTruth = {}
    for key, names in table.items():
        try:
            imid = int(key)
        except ValueError:
            raise InvalidInput(f"{p}: image id {key!r} is not an integer") from None
        if not isinstance(names, list) or any(n not in vocab.categories for n in names):
            raise InvalidInput(f"{p}: image {key}: expected a list of COCO category names, got {names!r}")
        if imid in out:  # "1" and "01": one image given twice, the second would replace the first silently
            raise InvalidInput(f"{p}: image id {imid} given twice")
        out[imid] = frozenset(names)
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a key given twice is an error (``json`` keeps the last one silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice")
        out[k] = v
    return out


def quiet_coco(path: Path):
    """``pycocotools.coco.COCO`` without its progress prints; bad files raise InvalidInput."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise InvalidInput(f"{path}: file not found")
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(str(path))
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (KeyError, TypeError, AssertionError) as e:
            raise InvalidInput(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


_BUILT: dict[tuple, GroundTruth] = {}  # recent results of gt_from_coco_files, by files and ids
_BUILT_MAX = 8


def _file_key(paths: Iterable[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
        except OSError:
            return ()  # a missing file: not memoised (building names it)
        out.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def gt_from_coco_files(
    instances_files: Iterable[Path],
    captions_files: Iterable[Path],
    image_ids: Iterable[int] | None = None,
    extractor: ChairExtractor | None = None,
) -> GroundTruth:
    """The CHAIR ground truth of ``image_ids`` (all images when None) from COCO instances and captions files.

    With the default extractor the result is kept for the process, by the files' paths, sizes and modification
    times and the ids: a sweep's CHAIR runs on one image list parse COCO's annotation files (instances_train2014
    alone is ~330 MB of JSON, the reference reads train and val) once, not once per run. Only the small result
    is kept, never the parsed files."""
    instances_files, captions_files = list(instances_files), list(captions_files)
    ids = None if image_ids is None else frozenset(image_ids)
    inst_key, caps_key = _file_key(instances_files), _file_key(captions_files)
    key = (inst_key, caps_key, ids) if extractor is None and inst_key and caps_key else None
    if key is not None and key in _BUILT:
        return dict(_BUILT[key])
    gt = _build_gt(instances_files, captions_files, ids, extractor)
    if key is not None:
        if len(_BUILT) >= _BUILT_MAX:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = gt
    return dict(gt)


def _build_gt(
    instances_files: list[Path],
    captions_files: list[Path],
    image_ids: frozenset[int] | None,
    extractor: ChairExtractor | None,
) -> GroundTruth:
    vocab = load_vocabulary()
    wanted = image_ids
    objects: dict[int, set[str]] = {}
    for path in instances_files:
        coco = quiet_coco(Path(path))
        if "categories" not in coco.dataset:  # pycocotools raises KeyError: 'categories'
            raise InvalidInput(f"{path}: not an instances file (no 'categories'; a captions file?)")
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        for imid in coco.getImgIds():
            if wanted is not None and imid not in wanted:
                continue
            bucket = objects.setdefault(imid, set())
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[imid], iscrowd=None)):
                name = names.get(ann["category_id"])
                if name not in vocab.to_category:
                    raise InvalidInput(f"{path}: annotation {ann.get('id')}: category {name!r} is not a COCO category")
                bucket.add(vocab.to_category[name])
    ext = None
    for path in captions_files:
        coco = quiet_coco(Path(path))
        ext = ext or extractor or default_extractor()
        for imid in coco.getImgIds():
            if wanted is not None and imid not in wanted:
                continue
            bucket = objects.setdefault(imid, set())
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[imid])):
                if not isinstance(ann.get("caption"), str):
                    raise InvalidInput(f"{path}: annotation {ann.get('id')}: expected a 'caption' string, "
                                       f"got {ann.get('caption')!r}")
                bucket.update(ext.extract(ann["caption"]).categories)
    return {k: frozenset(v) for k, v in objects.items()}


def coco_annotation_files(directory: Path, splits: Iterable[str] | None = None) -> tuple[list[Path], list[Path]]:
    """``instances_*.json`` / ``captions_*.json`` in ``directory`` (or its ``annotations/``)."""
    d = directory / "annotations" if (directory / "annotations").is_dir() else directory
    if splits is not None:
        inst = [d / f"instances_{s}.json" for s in splits]
        caps = [d / f"captions_{s}.json" for s in splits]
        for f in inst + caps:
            if not f.is_file():
                raise InvalidInput(f"{f}: file not found (CHAIR needs instances and captions)")
        return inst, caps
    inst = sorted(d.glob("instances_*.json"))
    caps = sorted(d.glob("captions_*.json"))
    if not inst or not caps:
        raise InvalidInput(f"{directory}: no instances_*.json and captions_*.json (CHAIR ground truth needs both)")
    return inst, caps


def load_ground_truth(
    source: str | Path,
    image_ids: Iterable[int] | None = None,
    splits: Iterable[str] | None = None,
    cache: str | Path | None = None,
) -> GroundTruth:
    """Ground truth from a table file or a COCO / SynthCOCO annotation directory (see module doc).

    ``cache``: when building from COCO files, write the result as a table (``.json.gz``) there and
    reuse it next time. A cache holds the images of the runs that wrote it: images it lacks are built from
    ``source`` and added to it (it is not taken for the whole ground truth).
    """
    p = Path(source)
    cached: GroundTruth = {}
    if cache is not None and Path(cache).is_file():
        cached = load_gt_table(cache)
        wanted = None if image_ids is None else set(image_ids)
        if wanted is None or wanted <= cached.keys():
            return cached
        image_ids = sorted(wanted - cached.keys())
    if p.is_file():
        if p.name.endswith((".json.gz", ".json")) and not p.name.startswith(("instances_", "captions_")):
            return load_gt_table(p)
        raise InvalidInput(f"{p}: give a ground-truth table or a directory with instances_*/captions_*.json")
    if not p.is_dir():
        raise InvalidInput(f"{p}: no such ground-truth file or directory")
    inst, caps = coco_annotation_files(p, splits)
    gt = gt_from_coco_files(inst, caps, image_ids)
    if cache is not None:
        gt = {**cached, **gt}
        save_gt_table(gt, cache)
    return gt


def save_gt_table(gt: GroundTruth, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({str(k): sorted(v) for k, v in sorted(gt.items())}).encode()
    p.write_bytes(gzip.compress(data) if p.suffix == ".gz" else data)
