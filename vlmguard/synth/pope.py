"""POPE question files built with POPE's own protocol (RUCAIBox/POPE ``utils.py``, see benchmarks.md 1.2).

1. keep images with at least ``sample_num`` ground-truth objects, draw ``img_num`` of them at random;
2. frequency table = number of SELECTED images containing each object;
3. co-occurrence table = for each object, the others ranked by how many selected images contain both;
4. per image the positives are the FIRST ``sample_num`` objects of its list; after each positive one
   negative is drawn that is not in the image and not already asked for this image:
   random = uniform over the frequency table (redrawn until valid); popular = most frequent valid;
   adversarial = valid object co-occurring most with THIS positive (random if none);
5. question ids run 1..N. Output: JSON lines with question_id, image, text, label.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from vlmguard.synth.text import pope_question

POPE_SPLITS = ("random", "popular", "adversarial")


def cooccurrence(records: list[tuple[str, list[str]]]) -> dict[str, list[tuple[str, int]]]:
    """object -> [(other, count)] sorted by count desc then name."""
    counts: dict[str, Counter] = {}
    for _, objs in records:
        uniq = list(dict.fromkeys(objs))
        for a in uniq:
            c = counts.setdefault(a, Counter())
            for b in uniq:
                if b != a:
                    c[b] += 1
    return {a: sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) for a, c in counts.items()}


def select_images(records: list[tuple[str, list[str]]], rng: random.Random, sample_num: int = 3,
                  img_num: int = 500) -> list[tuple[str, list[str]]]:
    cands = [r for r in records if len(set(r[1])) >= sample_num]
    if len(cands) <= img_num:
        return cands
    return rng.sample(cands, img_num)


def build_questions(selected: list[tuple[str, list[str]]], split: str, rng: random.Random,
                    sample_num: int = 3) -> list[dict]:
    freq = Counter(o for _, objs in selected for o in dict.fromkeys(objs))
    all_objs = sorted(freq)
    by_freq = sorted(freq, key=lambda o: (-freq[o], o))
    co = cooccurrence(selected)
    out: list[dict] = []
    for image, objs in selected:
        gt = list(dict.fromkeys(objs))
        asked: set[str] = set()
        for pos in gt[:sample_num]:
            asked.add(pos)
            out.append({"image": image, "text": pope_question(pos), "label": "yes"})
            neg = None
            if split == "popular":
                neg = next((o for o in by_freq if o not in gt and o not in asked), None)
            elif split == "adversarial":
                neg = next((o for o, _ in co.get(pos, []) if o not in gt and o not in asked), None)
            if neg is None:
                valid = [o for o in all_objs if o not in gt and o not in asked]
                if not valid:
                    continue
                while True:
                    neg = rng.choice(all_objs)
                    if neg not in gt and neg not in asked:
                        break
            asked.add(neg)
            out.append({"image": image, "text": pope_question(neg), "label": "no"})
    return [{"question_id": i + 1, **q} for i, q in enumerate(out)]


def write_pope_files(records: list[tuple[str, list[str]]], out_dir: Path, seed: int, prefix: str = "synthcoco",
                     sample_num: int = 3, img_num: int = 500) -> dict[str, Path]:
    """Write ``{prefix}_pope_{random,popular,adversarial}.json`` (JSON lines); same images for all three."""
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = select_images(records, random.Random(f"pope-select-{seed}"), sample_num, img_num)
    paths = {}
    for split in POPE_SPLITS:
        qs = build_questions(selected, split, random.Random(f"pope-{split}-{seed}"), sample_num)
        p = out_dir / f"{prefix}_pope_{split}.json"
        p.write_text("".join(json.dumps(q) + "\n" for q in qs))
        paths[split] = p
    return paths
