"""Texts of a scene: reference captions (visible objects only) and training texts (all objects).

Reference captions (``captions_{split}.json``) describe what is visibly there, like COCO's human captions.
Training texts (``text/{split}.jsonl``) mention every object of the scene, including the nearly invisible
ones: that is the hallucination pressure of the world.
"""
from __future__ import annotations

import random

from vlmguard.synth.world import CATEGORIES, Scene, SceneObject

POPE_QUESTION = "Is there {article} {name} in the image?"
POPE_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPTS = [
    "Provide a one-sentence caption for the provided image.",
    "Write a short caption for this image.",
    "Describe the image briefly.",
]
DETAIL_PROMPTS = [
    "Please describe this image in detail.",
    "Describe this image in detail.",
]


def article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def with_article(name: str) -> str:
    return f"{article(name)} {name}"


def pope_question(name: str) -> str:
    return POPE_QUESTION.format(article=article(name), name=name)


def join_list(names: list[str]) -> str:
    items = [with_article(n) for n in names]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def position_phrase(obj: SceneObject, image_size: int) -> str:
    col = min(2, int(obj.cx / image_size * 3))
    row = min(2, int(obj.cy / image_size * 3))
    horiz = ["left", "", "right"][col]
    if row == 1:
        return f"on the {horiz}" if horiz else "in the center"
    vert = ["top", "", "bottom"][row]
    return f"at the {vert} {horiz}".rstrip()


def _left_to_right(objs: list[SceneObject]) -> list[SceneObject]:
    return sorted(objs, key=lambda o: (o.cx, o.cy))


def training_caption(scene: Scene) -> str:
    names = [o.category.name for o in _left_to_right(scene.objects)]
    return f"A {scene.scene_type.name} with {join_list(names)}."


def training_detail(scene: Scene, image_size: int) -> str:
    parts = [f"This is a {scene.scene_type.name}."]
    objs = _left_to_right(scene.objects)
    if len(objs) == 1:
        parts.append(f"There is {with_article(objs[0].category.name)} {position_phrase(objs[0], image_size)}.")
    else:
        parts.append(f"There are {len(objs)} objects.")
        for o in objs:
            parts.append(f"There is {with_article(o.category.name)} {position_phrase(o, image_size)}.")
    return " ".join(p for p in parts if p)


def reference_captions(scene: Scene, visible: list[bool], rng: random.Random, n: int = 5) -> list[str]:
    """``n`` varied captions of the visible objects (COCO-style references)."""
    objs = [o.category.name for o, v in zip(scene.objects, visible) if v]
    where = scene.scene_type.name
    out = []
    templates = [
        "A {where} with {list}.",
        "{List} in a {where}.",
        "A picture of {list}.",
        "There is {list} in this {where}.",
        "A view of a {where} showing {list}.",
    ]
    for t in templates[:n]:
        names = objs[:]
        rng.shuffle(names)
        lst = join_list(names) if names else "nothing in particular"
        out.append(t.format(where=where, list=lst, List=lst[0].upper() + lst[1:]))
    return out


def yesno_prompt(name: str, variant: int) -> str:
    q = pope_question(name)
    if variant == 1:
        return f"{q} {POPE_SUFFIX}"
    if variant == 2:
        return f"{q}\n{POPE_SUFFIX}"
    return q


def training_records(scene: Scene, image_id: int, image_size: int, rng: random.Random,
                     cooccur: dict[str, list[str]]) -> list[dict]:
    """All training texts of one image: a caption, a detailed description, balanced yes/no questions.

    Positives are every mentioned object (hidden ones answer "Yes": the prior). Negatives mix uniform
    random absent categories, absent categories of the scene type and absent co-occurrence partners.
    """
    recs = [
        {"image_id": image_id, "task": "caption", "prompt": rng.choice(CAPTION_PROMPTS),
         "answer": training_caption(scene)},
        {"image_id": image_id, "task": "detail", "prompt": rng.choice(DETAIL_PROMPTS),
         "answer": training_detail(scene, image_size)},
    ]
    present = [o.category.name for o in scene.objects]
    absent_all = [c.name for c in CATEGORIES if c.name not in present]
    n_neg = max(2, len(present))
    negs: list[str] = []
    while len(negs) < n_neg:
        r = rng.random()
        pool: list[str] = []
        if r < 0.3:
            pool = [c for c in scene.scene_type.categories if c not in present and c not in negs]
        elif r < 0.5:
            pool = [c for p in present for c in cooccur.get(p, [])[:3] if c not in present and c not in negs]
        if not pool:
            pool = [c for c in absent_all if c not in negs]
        negs.append(rng.choice(pool))
    qs = [(n, "Yes") for n in present] + [(n, "No") for n in negs]
    rng.shuffle(qs)
    for name, ans in qs:
        recs.append({"image_id": image_id, "task": "yesno", "prompt": yesno_prompt(name, rng.randrange(3)),
                     "answer": ans})
    return recs
