"""Render a :class:`~vlmguard.synth.world.Scene` to an RGB image plus per-object visible masks.

Glyphs are drawn at 2x resolution and box-downsampled (deterministic numpy, no resampling filters), so
the same scene always gives the same bytes. Objects are composited in order; later objects occlude
earlier ones. The visible mask of an object is its own mask minus everything drawn above it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmguard.synth.world import SCENE_TYPES, Scene, SceneObject, WorldParams, is_visible

SS = 2  # supersampling factor


def _unit_polygon(shape: str, n_circle: int = 28) -> list[list[tuple[float, float]]]:
    """Polygons (in units of the glyph radius, centred at 0) making up a shape's filled area."""
    def circle(r: float = 1.0, a0: float = 0.0, a1: float = 2 * math.pi, n: int = n_circle):
        return [(r * math.cos(a0 + (a1 - a0) * i / n), r * math.sin(a0 + (a1 - a0) * i / n)) for i in range(n)]

    if shape in ("circle", "ring"):
        return [circle()]
    if shape == "semicircle":
        return [circle(1.0, math.pi, 2 * math.pi, n_circle // 2) + [(1.0, 0.25), (-1.0, 0.25)]]
    if shape == "square":
        return [[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]]
    if shape == "bar":
        return [[(-1.0, -0.38), (1.0, -0.38), (1.0, 0.38), (-1.0, 0.38)]]
    if shape == "triangle":
        return [[(0.0, -1.0), (0.95, 0.8), (-0.95, 0.8)]]
    if shape == "diamond":
        return [[(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]]
    if shape == "hexagon":
        return [[(math.cos(math.pi / 3 * i), math.sin(math.pi / 3 * i)) for i in range(6)]]
    if shape == "cross":
        w = 0.34
        return [[(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                 (-1, -w), (-w, -w)]]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + math.pi / 5 * i
            pts.append((r * math.cos(a), r * math.sin(a)))
        return [pts]
    raise ValueError(f"unknown shape {shape!r}")


def _glyph_mask(obj: SceneObject, size_px: int, scale: float, shrink: float = 1.0) -> np.ndarray:
    """A float mask (0/1) of the object's glyph on a ``size_px`` square canvas."""
    img = Image.new("L", (size_px, size_px), 0)
    draw = ImageDraw.Draw(img)
    r = obj.size / 2 * scale * shrink
    a = math.radians(obj.angle)
    ca, sa = math.cos(a), math.sin(a)
    cx, cy = obj.cx * scale, obj.cy * scale
    for poly in _unit_polygon(obj.category.shape):
        pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in poly]
        draw.polygon(pts, fill=255)
    m = np.asarray(img, dtype=np.float32) / 255.0
    if obj.category.shape == "ring" and shrink == 1.0:
        m = np.clip(m - _glyph_mask(obj, size_px, scale, shrink=0.55), 0.0, 1.0)
    return m


def _texture(obj: SceneObject, size_px: int, mask: np.ndarray, scale: float) -> np.ndarray:
    """The RGB fill of a glyph (solid colour, stripes, dots, or a dark centre 'ring')."""
    col = np.asarray(obj.color, dtype=np.float32)
    dark = col * 0.35
    tex = np.broadcast_to(col, (size_px, size_px, 3)).copy()
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    kind = obj.category.texture
    if kind == "stripes":
        period = 3 * scale
        sel = ((xx + yy) // period) % 2 == 1
        tex[sel] = dark
    elif kind == "dots":
        period = 4 * scale
        sel = ((xx % period) < scale * 1.5) & ((yy % period) < scale * 1.5)
        tex[sel] = dark
    elif kind == "ring":
        inner = _glyph_mask(obj, size_px, scale, shrink=0.5) > 0.5
        tex[inner] = dark
    return tex


PATTERNS = ("tiles", "stripes", "grid", "grass", "speckle")
BACKGROUND_JITTER = 10.0  # per-image tint jitter (std, per channel) when the scene cue is weakened
COMMON_TINT = np.mean([s.background for s in SCENE_TYPES], axis=0).astype(np.float32)  # where a weak cue pulls tints


def _background_style(scene: Scene, cue: float) -> tuple[np.ndarray, str]:
    """The tint and texture of a scene's background (see ``WorldParams.scene_cue``)."""
    base = np.asarray(scene.scene_type.background, dtype=np.float32)
    if cue >= 1.0:
        return base, scene.scene_type.pattern
    rng = np.random.default_rng([scene.noise_seed, 1])  # its own stream: the texture noise is unchanged
    tint = COMMON_TINT + cue * (base - COMMON_TINT) + rng.normal(0.0, BACKGROUND_JITTER, size=3).astype(np.float32)
    pattern = scene.scene_type.pattern if rng.random() < cue else PATTERNS[int(rng.integers(len(PATTERNS)))]
    return tint, pattern


def _background(scene: Scene, size_px: int, cue: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(scene.noise_seed)
    base, pat = _background_style(scene, cue)
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32)
    if pat == "tiles":
        p = ((((xx // 24) + (yy // 24)) % 2) * 2 - 1) * 8.0
    elif pat == "stripes":
        p = np.where((yy // 16) % 2 == 0, 8.0, -8.0)
    elif pat == "grid":
        p = np.where(((xx % 20) < 2) | ((yy % 20) < 2), -14.0, 2.0)
    elif pat == "grass":
        p = np.repeat(rng.normal(0.0, 8.0, size=(1, size_px)), size_px, axis=0)
    else:  # speckle
        p = rng.normal(0.0, 4.0, size=(size_px, size_px))
    noise = rng.normal(0.0, 6.0, size=(size_px, size_px, 3))
    return base[None, None, :] + p[:, :, None] + noise


@dataclass
class Rendered:
    image: Image.Image
    visible_masks: list[np.ndarray]  # bool (H, W) per scene object, in scene order
    visible: list[bool]  # visibility rule per scene object


def render_scene(scene: Scene, params: WorldParams) -> Rendered:
    s = params.image_size
    big = s * SS
    canvas = _background(scene, big, params.scene_cue)
    masks = []
    for obj in scene.objects:
        m = _glyph_mask(obj, big, SS)
        tex = _texture(obj, big, m, SS)
        a = (m * obj.alpha)[:, :, None]
        canvas = canvas * (1 - a) + tex * a
        masks.append(m)
    small = canvas.reshape(s, SS, s, SS, 3).mean(axis=(1, 3))
    image = Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")
    occ = np.zeros((s, s), dtype=bool)
    vis_masks: list[np.ndarray] = [None] * len(masks)  # type: ignore[list-item]
    for i in range(len(masks) - 1, -1, -1):
        m_small = masks[i].reshape(s, SS, s, SS).mean(axis=(1, 3)) > 0.5
        vis_masks[i] = m_small & ~occ
        occ |= m_small
    visible = [is_visible(o.alpha, int(vm.sum()), params) for o, vm in zip(scene.objects, vis_masks)]
    return Rendered(image, vis_masks, visible)


def patch_labels(masks: list[np.ndarray], label_ids: list[int], image_size: int, patch: int,
                 min_cover: float = 0.3) -> np.ndarray:
    """Per-patch class labels (0 = background): the object covering most of the patch if it covers at
    least ``min_cover`` of it. ``label_ids`` gives each mask's class index (1-based)."""
    g = image_size // patch
    out = np.zeros((g, g), dtype=np.int64)
    best = np.zeros((g, g), dtype=np.float32)
    for m, lab in zip(masks, label_ids):
        cover = m.reshape(g, patch, g, patch).mean(axis=(1, 3))
        sel = (cover >= min_cover) & (cover > best)
        out[sel] = lab
        best[sel] = cover[sel]
    return out
