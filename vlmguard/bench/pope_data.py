"""POPE question files (benchmarks.md 1.1): readers, named sets, LLaVA's 8910-line file.

Layouts accepted by :func:`load_pope_file`: JSON Lines (official COCO files, SynthCOCO files, VCD's
copies) and one JSON array (POPE's SEEM A-OKVQA / GQA files). Each record needs ``question_id`` (int),
``image`` (str), ``text`` (str) and, unless ``require_label=False``, ``label`` (``yes``/``no``).
Any problem raises :class:`InvalidInput` naming file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmguard.bench.jsonio import file_sha256, read_records, require
from vlmguard.errors import InvalidInput

SPLITS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")

# Named question-file sets, relative to a POPE directory (``refdata/pope`` layout); {split} is filled in.
POPE_SETS: dict[str, str] = {
    "head": "coco_pope_{split}.json",  # RUCAIBox/POPE 109985c = HEAD (default)
    "llava15_e3e3926": "llava15_e3e3926/coco_pope_{split}.json",  # what LLaVA-1.5 / OPERA pin
    "aokvqa_seem": "aokvqa_pope_seem_{split}.json",
    "gqa_seem": "gqa_pope_seem_{split}.json",
}
DEFAULT_POPE_SET = "head"

# LLaVA's llava_pope_test.jsonl: split order and question-id offsets, and the answer-format suffix.
LLAVA_TEST_LAYOUT = (("adversarial", 0), ("random", 10_000_000), ("popular", 20_000_000))
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int
    image: str
    text: str
    label: str | None
    line: int = 0
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"question_id": self.question_id, "image": self.image, "text": self.text}
        if self.label is not None:
            rec["label"] = self.label
        if self.category is not None:
            rec["category"] = self.category
        rec.update(self.extra)
        return rec


@dataclass(frozen=True)
class PopeFile:
    path: Path
    layout: str  # "jsonl" | "json_array"
    questions: list[PopeQuestion]
    sha256: str

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def images(self) -> list[str]:
        """Distinct images in first-appearance order."""
        return list(dict.fromkeys(q.image for q in self.questions))

    def by_id(self) -> dict[int, PopeQuestion]:
        return {q.question_id: q for q in self.questions}

    def label_counts(self) -> dict[str, int]:
        out = {"yes": 0, "no": 0}
        for q in self.questions:
            if q.label is not None:
                out[q.label] += 1
        return out


_CORE = {"question_id", "image", "text", "label", "category"}


def load_pope_file(path: str | Path, *, require_label: bool = True) -> PopeFile:
    p = Path(path)
    records, layout = read_records(p)
    questions: list[PopeQuestion] = []
    seen: dict[int, int] = {}
    for line, rec in records:
        qid = require(rec, "question_id", int, p, line)
        image = require(rec, "image", str, p, line)
        text = require(rec, "text", str, p, line)
        label: str | None = None
        if require_label or "label" in rec:
            label = require(rec, "label", str, p, line).strip().lower()
            if label not in LABELS:
                raise InvalidInput(f"{p}:{line}: field 'label' must be 'yes' or 'no', got {rec['label']!r}")
        if qid in seen:
            raise InvalidInput(f"{p}:{line}: duplicate question_id {qid} (first on line {seen[qid]})")
        seen[qid] = line
        category = rec.get("category")
        extra = {k: v for k, v in rec.items() if k not in _CORE}
        questions.append(
            PopeQuestion(qid, image, text, label, line, category if isinstance(category, str) else None, extra)
        )
    if not questions:
        raise InvalidInput(f"{p}: no questions in file")
    return PopeFile(p, layout, questions, file_sha256(p))


def pope_set_path(pope_dir: str | Path, set_name: str, split: str) -> Path:
    if set_name not in POPE_SETS:
        raise InvalidInput(f"unknown POPE set {set_name!r} (known: {', '.join(POPE_SETS)})")
    if split not in SPLITS:
        raise InvalidInput(f"unknown POPE split {split!r} (known: {', '.join(SPLITS)})")
    return Path(pope_dir) / POPE_SETS[set_name].format(split=split)


def build_llava_pope_test(split_files: dict[str, PopeFile]) -> list[dict[str, Any]]:
    """LLaVA's question file from the three split files (adversarial, random, popular; id offsets)."""
    out: list[dict[str, Any]] = []
    for split, offset in LLAVA_TEST_LAYOUT:
        if split not in split_files:
            raise InvalidInput(f"missing POPE split {split!r} for the LLaVA question file")
        for q in split_files[split].questions:
            out.append(
                {
                    "question_id": offset + q.question_id,
                    "image": q.image,
                    "text": q.text + LLAVA_SUFFIX,
                    "category": split,
                }
            )
    return out


def dumps_jsonl(records: list[dict[str, Any]]) -> str:
    """JSON Lines exactly as Python's ``json.dumps`` defaults write them (LLaVA's files)."""
    return "".join(json.dumps(r) + "\n" for r in records)


def llava_test_labels(llava_file: PopeFile, split_files: dict[str, PopeFile]) -> dict[int, tuple[str, str]]:
    """Question id of LLaVA's file -> (split, label), aligned BY ORDER within each category.

    This is how LLaVA's ``eval_pope.py`` pairs answers and labels (benchmarks.md 1.5); a count mismatch
    between a category and its label file raises instead of silently shifting labels (POPE issue #17).
    """
    out: dict[int, tuple[str, str]] = {}
    for split, _ in LLAVA_TEST_LAYOUT:
        qs = [q for q in llava_file.questions if q.category == split]
        labels = split_files[split].questions
        if len(qs) != len(labels):
            raise InvalidInput(
                f"{llava_file.path}: category {split!r} has {len(qs)} questions but the label file "
                f"{split_files[split].path} has {len(labels)}"
            )
        for q, lab in zip(qs, labels):
            out[q.question_id] = (split, lab.label or "")
    return out
