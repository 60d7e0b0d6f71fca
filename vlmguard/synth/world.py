"""The SynthCOCO world: categories (real COCO ids and names), glyphs, scene types and scene sampling.

A scene is a scene type plus 1-5 objects. Objects are drawn from the scene type's category weights and
strongly co-occurring pairs are completed with high probability (fork -> knife, car -> traffic light...).
Some objects are made *nearly invisible* (tiny, low contrast) on purpose: the training text still
mentions them, so a model trained on it acquires the co-occurrence prior that makes real LVLMs
hallucinate. Whether an object counts as present in the ground truth is decided by the visibility rule
in :func:`is_visible` after rendering (see ``render.py``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

GENERATOR_VERSION = "synthcoco-1.0"


@dataclass(frozen=True)
class Category:
    id: int  # real COCO category id
    name: str  # real COCO category name (CHAIR / POPE vocabulary)
    supercategory: str
    shape: str
    color: tuple[int, int, int]
    texture: str  # solid | stripes | dots | ring


# 28 COCO categories, each with one fixed glyph. Co-occurring categories get clearly different colours.
CATEGORIES: list[Category] = [
    Category(1, "person", "person", "star", (230, 40, 40), "solid"),
    Category(2, "bicycle", "vehicle", "ring", (40, 40, 220), "solid"),
    Category(3, "car", "vehicle", "square", (220, 40, 220), "solid"),
    Category(6, "bus", "vehicle", "square", (250, 220, 30), "stripes"),
    Category(10, "traffic light", "outdoor", "triangle", (30, 200, 60), "solid"),
    Category(13, "stop sign", "outdoor", "hexagon", (240, 20, 20), "ring"),
    Category(15, "bench", "outdoor", "bar", (140, 80, 30), "solid"),
    Category(16, "bird", "animal", "triangle", (30, 200, 230), "stripes"),
    Category(17, "cat", "animal", "diamond", (250, 140, 20), "stripes"),
    Category(18, "dog", "animal", "circle", (140, 80, 30), "dots"),
    Category(28, "umbrella", "accessory", "semicircle", (150, 40, 200), "solid"),
    Category(34, "frisbee", "sports", "circle", (250, 250, 250), "ring"),
    Category(37, "sports ball", "sports", "circle", (250, 140, 20), "solid"),
    Category(41, "skateboard", "sports", "bar", (30, 200, 60), "stripes"),
    Category(43, "tennis racket", "sports", "ring", (230, 230, 40), "dots"),
    Category(44, "bottle", "kitchen", "bar", (30, 200, 230), "solid"),
    Category(47, "cup", "kitchen", "square", (250, 250, 250), "solid"),
    Category(48, "fork", "kitchen", "cross", (40, 40, 220), "solid"),
    Category(49, "knife", "kitchen", "triangle", (220, 40, 220), "dots"),
    Category(50, "spoon", "kitchen", "diamond", (30, 200, 60), "solid"),
    Category(51, "bowl", "kitchen", "semicircle", (250, 220, 30), "solid"),
    Category(53, "apple", "food", "circle", (230, 40, 40), "solid"),
    Category(62, "chair", "furniture", "cross", (250, 140, 20), "solid"),
    Category(63, "couch", "furniture", "bar", (150, 40, 200), "stripes"),
    Category(72, "tv", "electronic", "square", (20, 20, 20), "ring"),
    Category(75, "remote", "electronic", "diamond", (40, 40, 220), "dots"),
    Category(84, "book", "indoor", "hexagon", (30, 200, 60), "stripes"),
    Category(85, "clock", "indoor", "star", (250, 250, 250), "ring"),
]
BY_NAME = {c.name: c for c in CATEGORIES}
BY_ID = {c.id: c for c in CATEGORIES}


@dataclass(frozen=True)
class SceneType:
    name: str  # as written in captions ("kitchen", "living room"...)
    weight: float
    categories: dict[str, float]  # category name -> sampling weight
    background: tuple[int, int, int]  # base tint of the background texture (weak scene cue)
    pattern: str  # background texture: tiles | stripes | speckle | grass | grid


SCENE_TYPES: list[SceneType] = [
    SceneType("kitchen", 1.0, {"fork": 3, "knife": 2, "spoon": 2, "cup": 3, "bowl": 2.5, "bottle": 2,
                                "apple": 1.5, "chair": 1, "person": 1}, (196, 184, 160), "tiles"),
    SceneType("street", 1.0, {"car": 3, "bus": 2, "traffic light": 2, "stop sign": 1.5, "bicycle": 1.5,
                               "person": 3, "umbrella": 1, "bench": 0.5}, (128, 128, 132), "stripes"),
    SceneType("living room", 1.0, {"couch": 3, "chair": 2, "tv": 2.5, "remote": 1.5, "book": 2,
                                    "clock": 1.5, "cat": 1.5, "cup": 1, "person": 1}, (176, 150, 130), "grid"),
    SceneType("park", 1.0, {"dog": 3, "bird": 2, "bench": 2.5, "frisbee": 1.5, "umbrella": 1,
                             "person": 2.5, "bicycle": 1.5, "sports ball": 0.5}, (120, 160, 110), "grass"),
    SceneType("sports field", 0.8, {"sports ball": 3, "tennis racket": 2.5, "skateboard": 2, "person": 3,
                                     "bottle": 1.5, "frisbee": 1, "bench": 0.5}, (140, 150, 170), "speckle"),
]

# (a, b, p): when a is in the scene, b is added with probability p (if the scene has room).
PAIRS: list[tuple[str, str, float]] = [
    ("fork", "knife", 0.8), ("knife", "fork", 0.6), ("cup", "spoon", 0.5), ("bowl", "spoon", 0.5),
    ("car", "traffic light", 0.7), ("bus", "traffic light", 0.5), ("traffic light", "car", 0.6),
    ("tv", "remote", 0.7), ("couch", "tv", 0.5), ("remote", "tv", 0.5),
    ("dog", "frisbee", 0.6), ("bench", "bird", 0.5), ("bicycle", "person", 0.6),
    ("tennis racket", "sports ball", 0.8), ("skateboard", "person", 0.6), ("sports ball", "person", 0.4),
]


@dataclass
class WorldParams:
    """Generator parameters (recorded in the manifest)."""

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 5
    object_count_weights: tuple[float, ...] = (0.04, 0.1, 0.3, 0.3, 0.26)  # for min_objects..max_objects (1..5)
    hidden_prob: float = 0.22  # chance that a *pair-completed* object is rendered nearly invisible
    hidden_prob_other: float = 0.06  # chance for any other object
    hidden_alpha: tuple[float, float] = (0.12, 0.22)
    hidden_size: tuple[int, int] = (5, 8)
    visible_alpha: tuple[float, float] = (0.9, 1.0)
    visible_size: tuple[int, int] = (15, 30)
    # visibility rule: present in the ground truth iff alpha >= min_alpha and unoccluded pixels >= min_pixels
    min_alpha: float = 0.5
    min_pixels: int = 40
    # how strongly the background tells the scene type: 1 = each type its own tint and texture (the first
    # worlds); s < 1 = the tint moved toward the common mean by (1 - s) plus a per-image jitter, and the
    # type's own texture drawn with probability s (else any of the five)
    scene_cue: float = 1.0
    pope_sample_num: int = 3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """One-line InvalidInput naming the first field out of range (checked again by ``build_dataset``, since
        fields can be set after construction)."""
        from vlmguard.errors import InvalidInput

        def pair(name: str, lo: float, hi: float | None = None) -> None:
            a, b = getattr(self, name)
            if not (lo <= a <= b and (hi is None or b <= hi)):
                top = "" if hi is None else f", at most {hi}"
                raise InvalidInput(f"world parameter {name} must be an ordered pair >= {lo}{top}, got {(a, b)}")

        def within(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise InvalidInput(f"world parameter {name} must be in [{lo}, {hi}], got {v}")

        if self.image_size < 16:
            raise InvalidInput(f"world parameter image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise InvalidInput(f"world parameters need 1 <= min_objects <= max_objects, got "
                               f"{self.min_objects} and {self.max_objects}")
        weights = self.object_count_weights
        n_counts = self.max_objects - self.min_objects + 1
        if len(weights) != n_counts or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise InvalidInput(f"world parameter object_count_weights must hold {n_counts} non-negative weights "
                               f"(one per object count {self.min_objects}..{self.max_objects}), got {tuple(weights)}")
        for name in ("hidden_prob", "hidden_prob_other", "min_alpha", "scene_cue"):
            within(name, 0.0, 1.0)
        pair("hidden_alpha", 0.0, 1.0)
        pair("visible_alpha", 0.0, 1.0)
        pair("hidden_size", 1)
        pair("visible_size", 1)
        if self.min_pixels < 0 or self.pope_sample_num < 1:
            raise InvalidInput(f"world parameters need min_pixels >= 0 and pope_sample_num >= 1, got "
                               f"{self.min_pixels} and {self.pope_sample_num}")

    def to_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        if d["scene_cue"] == 1.0:  # the worlds built before the option existed: same manifest, same dataset version
            del d["scene_cue"]
        return d


@dataclass
class SceneObject:
    category: Category
    cx: float
    cy: float
    size: float  # glyph diameter in pixels at image resolution
    angle: float  # degrees
    alpha: float
    color: tuple[int, int, int]
    hidden: bool  # drawn nearly invisible on purpose
    pair_completed: bool = False


@dataclass
class Scene:
    scene_type: SceneType
    objects: list[SceneObject] = field(default_factory=list)
    noise_seed: int = 0


def is_visible(alpha: float, visible_pixels: int, params: WorldParams) -> bool:
    """The visibility rule: the object is in the ground truth iff it is drawn with enough contrast
    (alpha >= ``min_alpha``) and enough of it is left unoccluded (>= ``min_pixels`` pixels at 96 px)."""
    return alpha >= params.min_alpha and visible_pixels >= params.min_pixels


def _choose_weighted(rng: random.Random, items: list[str], weights: list[float]) -> str:
    return rng.choices(items, weights=weights, k=1)[0]


def sample_scene(rng: random.Random, params: WorldParams) -> Scene:
    """Draw one scene: type, object categories (with pair completion), then placement and visibility."""
    stype = rng.choices(SCENE_TYPES, weights=[s.weight for s in SCENE_TYPES], k=1)[0]
    n_target = rng.choices(range(params.min_objects, params.max_objects + 1),
                           weights=params.object_count_weights, k=1)[0]
    names: list[str] = []
    completed: set[str] = set()
    pool = list(stype.categories)
    while len(names) < n_target:
        avail = [c for c in pool if c not in names]
        if not avail:
            break
        name = _choose_weighted(rng, avail, [stype.categories[c] for c in avail])
        names.append(name)
        for a, b, p in PAIRS:
            if a == name and b not in names and len(names) < params.max_objects and rng.random() < p:
                names.append(b)
                completed.add(b)
    objects: list[SceneObject] = []
    placed: list[tuple[float, float, float]] = []
    s = params.image_size
    for name in names:
        cat = BY_NAME[name]
        p_hidden = params.hidden_prob if name in completed else params.hidden_prob_other
        hidden = rng.random() < p_hidden
        if hidden:
            size = rng.uniform(*params.hidden_size)
            alpha = rng.uniform(*params.hidden_alpha)
        else:
            size = rng.uniform(*params.visible_size)
            alpha = rng.uniform(*params.visible_alpha)
        # place with limited overlap: try a few positions, keep the least overlapping one
        best = None
        for _ in range(12):
            r = size / 2
            cx = rng.uniform(r + 1, s - r - 1)
            cy = rng.uniform(r + 1, s - r - 1)
            overlap = max((max(0.0, (r + pr) * 0.8 - ((cx - px) ** 2 + (cy - py) ** 2) ** 0.5)
                           for px, py, pr in placed), default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, cx, cy)
            if overlap == 0.0:
                break
        _, cx, cy = best
        placed.append((cx, cy, size / 2))
        jitter = [max(0, min(255, c + rng.randint(-18, 18))) for c in cat.color]
        objects.append(SceneObject(cat, cx, cy, size, rng.uniform(0, 360), alpha, tuple(jitter), hidden,
                                   pair_completed=name in completed))
    # ensure at least one visible-by-construction object
    if all(o.hidden for o in objects):
        o = objects[0]
        o.hidden = False
        o.size = rng.uniform(*params.visible_size)
        o.alpha = rng.uniform(*params.visible_alpha)
        r = o.size / 2
        o.cx = min(max(o.cx, r + 1), s - r - 1)
        o.cy = min(max(o.cy, r + 1), s - r - 1)
    # hidden objects are drawn first (under the others), then visible ones
    objects.sort(key=lambda o: 0 if o.hidden else 1)
    return Scene(stype, objects, noise_seed=rng.randrange(2**31))
