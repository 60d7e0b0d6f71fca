"""CHAIR scores (benchmarks.md 2.1): per-caption records and the aggregate CHAIR_s, CHAIR_i, Recall, Len.

A mention is hallucinated iff its category is not in the image's ground truth. Mentions count with
repetition. Aggregates are micro averages exactly as the reference computes them:
CHAIR_s = captions with a hallucination / captions; CHAIR_i = hallucinated mentions / mentions;
Recall = Σ |distinct recalled GT categories| / Σ |GT categories|; Len = mean tokens per caption
(after tokenisation and double-word merging, punctuation included). CHAIR_s, CHAIR_i and Recall are
percentages; an empty denominator gives ``None`` and a flag.

Two figures the reference does not report, because a model that repeats itself ("There is a spoon ...
There is a spoon ...") moves CHAIR_i by how often it repeats as much as by what it names:
``chair_i_distinct`` = Σ |distinct hallucinated categories| / Σ |distinct mentioned categories| (each object
once per caption), and ``repeated_mentions`` = mentions of a category the caption already named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vlmguard.bench.chair_extract import ChairExtractor, default_extractor
from vlmguard.bench.chair_gt import GroundTruth
from vlmguard.bench.jsonio import from_batch_output, int_from_text, read_records, read_text
from vlmguard.errors import InvalidInput

SENTENCE_END = ".!?"


def drop_incomplete_sentence(text: str) -> str:
    """Cut a caption after its last sentence end when the last sentence is unfinished.

    OPERA's 64-token setting keeps the text up to the last '.', so a caption without any sentence end
    becomes empty. A caption that already ends with '.', '!' or '?' is kept as is.
    """
    stripped = text.rstrip()
    if not stripped or stripped[-1] in SENTENCE_END:
        return text
    cut = max(stripped.rfind(c) for c in SENTENCE_END)
    return stripped[: cut + 1] if cut >= 0 else ""


def score_caption(
    image_id: int, caption: str, gt: frozenset[str], extractor: ChairExtractor | None = None
) -> dict[str, Any]:
    """The reference's per-caption record plus the counts the aggregate needs."""
    ext = extractor or default_extractor()
    x = ext.extract(caption)
    hallucinated: list[list[str]] = []
    hallucination_idxs: list[int] = []
    recalled: set[str] = set()
    for word, cat, idx in zip(x.words, x.categories, x.idxs):
        if cat not in gt:
            hallucinated.append([word, cat])
            hallucination_idxs.append(idx)
        else:
            recalled.add(cat)
    n_mentions = len(x.words)
    return {
        "image_id": image_id,
        "caption": caption,
        "mscoco_generated_words": list(x.categories),
        "mscoco_words": list(x.words),
        "mscoco_gt_words": sorted(gt),
        "mscoco_hallucinated_words": hallucinated,
        "hallucination_idxs": hallucination_idxs,
        "words": list(x.tokens),
        "metrics": {
            "CHAIRs": int(bool(hallucinated)),
            "CHAIRi": len(hallucinated) / n_mentions if n_mentions else 0.0,
            "Recall": len(recalled) / len(gt) if gt else 0.0,
            "Len": len(x.tokens),
        },
        "counts": {
            "mentions": n_mentions,
            "hallucinated": len(hallucinated),
            "gt": len(gt),
            "recalled": len(recalled),
            "tokens": len(x.tokens),
        },
    }


def distinct_counts(record: dict[str, Any]) -> tuple[int, int]:
    """(distinct categories a caption mentions, distinct hallucinated ones) of one caption record."""
    return (len(set(record["mscoco_generated_words"])),
            len({cat for _, cat in record["mscoco_hallucinated_words"]}))


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    n = mentions = halluc = gt = recalled = tokens = halluc_caps = 0
    distinct = distinct_halluc = 0
    for r in records:
        c = r["counts"]
        n += 1
        d, dh = distinct_counts(r)
        distinct += d
        distinct_halluc += dh
        mentions += c["mentions"]
        halluc += c["hallucinated"]
        gt += c["gt"]
        recalled += c["recalled"]
        tokens += c["tokens"]
        halluc_caps += 1 if c["hallucinated"] else 0
    flags: list[str] = []

    def pct(num: int, den: int, what: str) -> float | None:
        if den == 0:
            flags.append(f"{what} undefined (empty denominator)")
            return None
        return 100.0 * num / den

    return {
        "n": n,
        "chair_s": pct(halluc_caps, n, "CHAIR_s"),
        "chair_i": pct(halluc, mentions, "CHAIR_i (no caption mentions a COCO object)"),
        "recall": pct(recalled, gt, "recall"),
        "len": (tokens / n) if n else None,
        "mentions": mentions,
        "hallucinated_mentions": halluc,
        "hallucinated_captions": halluc_caps,
        # not in the reference: each object counted once per caption, and how many mentions repeat one
        "chair_i_distinct": 100.0 * distinct_halluc / distinct if distinct else None,  # CHAIR_i's flag covers 0
        "repeated_mentions": mentions - distinct,
        "flags": flags,
    }


@dataclass(frozen=True)
class Caption:
    image_id: int
    caption: str
    line: int


def load_captions(path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption",
                  notes: list[str] | None = None) -> list[Caption]:
    """A caption file: JSON array or JSON Lines of objects with an image-id key and a caption key, or an OpenAI
    batch output file (its ``custom_id`` the image id; requests without an answer left out, said in ``notes``)."""
    p = Path(path)
    records, _ = read_records(p)
    records = from_batch_output(records, image_id_key, caption_key, notes)
    out = []
    seen: dict[int, int] = {}
    for line, rec in records:
        if image_id_key not in rec:
            raise InvalidInput(f"{p}:{line}: missing field {image_id_key!r}")
        if caption_key not in rec:
            raise InvalidInput(f"{p}:{line}: missing field {caption_key!r}")
        imid, cap = rec[image_id_key], rec[caption_key]
        imid = int_from_text(imid)
        if not isinstance(imid, int) or isinstance(imid, bool):
            raise InvalidInput(f"{p}:{line}: field {image_id_key!r} must be an integer image id, got {imid!r}")
        if not isinstance(cap, str):
            raise InvalidInput(f"{p}:{line}: field {caption_key!r} must be str, got {cap!r}")
        if imid in seen:  # CHAIR scores one caption per image; a second one would count twice
            raise InvalidInput(f"{p}:{line}: duplicate {image_id_key} {imid} (first on line {seen[imid]})")
        seen[imid] = line
        out.append(Caption(imid, cap, line))
    if not out:
        raise InvalidInput(f"{p}: no captions in file")
    return out


def score_captions(
    captions: list[Caption],
    gt: GroundTruth,
    path: str | Path = "captions",
    drop_incomplete: bool = False,
    extractor: ChairExtractor | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregate metrics and per-caption records; an image id without ground truth raises (file:line)."""
    ext = extractor or default_extractor()
    records = []
    for c in captions:
        if c.image_id not in gt:
            raise InvalidInput(f"{path}:{c.line}: unknown image id {c.image_id} (not in the ground truth)")
        text = drop_incomplete_sentence(c.caption) if drop_incomplete else c.caption
        records.append(score_caption(c.image_id, text, gt[c.image_id], ext))
    return aggregate(records), records


def read_image_ids(path: str | Path) -> list[int]:
    """An image-id list: one integer per line (``#`` comments and blank lines ignored)."""
    p = Path(path)
    ids = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(read_text(p).splitlines(), start=1):  # one-line errors: missing, not UTF-8
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        try:
            imid = int(s)
        except ValueError:
            raise InvalidInput(f"{p}:{lineno}: not an integer image id: {s!r}") from None
        if imid in seen:  # one caption per image: a repeated id would leave a run waiting for a sample forever
            raise InvalidInput(f"{p}:{lineno}: duplicate image id {imid} (first on line {seen[imid]})")
        seen[imid] = lineno
        ids.append(imid)
    return ids
