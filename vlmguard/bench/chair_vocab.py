"""CHAIR's vocabulary: the COCO synonym table and the double-word rules (benchmarks.md 2.3).

The synonym file has one line per COCO category, comma+space separated, first entry = category.
It is parsed exactly as the reference does (``line.strip().split(', ')``), so its quirks survive:
" motor bike" and " cheesecake" keep a leading space (never match), "iPhone" is upper case, duplicates
are harmless. The packaged copy ``vlmguard/assets/bench/chair_synonyms.txt`` is byte-identical to LisaAnne/Hallucination's
``data/synonyms.txt`` (BSD-2-Clause, see ``vlmguard/assets/bench/NOTICE.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

SYNONYMS_FILE = Path(__file__).resolve().parents[1] / "assets" / "bench" / "chair_synonyms.txt"

# Two-word phrases treated as one token (self-mapped); "stove top oven" has three words so it never fires.
_COMPOUNDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
    "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
# "baby X" / "adult X" -> X so that the qualifier does not fire "person".
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger X" -> X for the same reason.
_VEHICLES = ("jet", "train")


def build_double_words() -> dict[str, str]:
    table = {w: w for w in _COMPOUNDS}
    for animal in _ANIMALS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in _VEHICLES:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


@dataclass(frozen=True)
class ChairVocabulary:
    """Synonym string -> canonical COCO category, plus the category list in file order."""

    categories: tuple[str, ...]
    to_category: dict[str, str] = field(repr=False)
    double_words: dict[str, str] = field(repr=False)

    @property
    def strings(self) -> frozenset[str]:
        return frozenset(self.to_category)

    def __contains__(self, word: str) -> bool:
        return word in self.to_category


def parse_synonyms(text: str) -> tuple[tuple[str, ...], dict[str, str]]:
    categories: list[str] = []
    mapping: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        entries = line.strip().split(", ")
        categories.append(entries[0])
        for s in entries:
            mapping[s] = entries[0]
    return tuple(categories), mapping


@lru_cache(maxsize=4)
def load_vocabulary(path: str | None = None) -> ChairVocabulary:
    text = Path(path or SYNONYMS_FILE).read_text(encoding="utf-8")
    categories, mapping = parse_synonyms(text)
    return ChairVocabulary(categories=categories, to_category=mapping, double_words=build_double_words())
