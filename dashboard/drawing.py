"""Drawing helpers: kept visual tokens over the image, token scores as a heatmap, per-token probabilities.

Visual tokens are in raster order over a grid of patches (engine API: ``kept_indices`` index
``0..visual_tokens-1``). The grid is square for LLaVA-1.5 and the tiny model; LLaVA-NeXT puts the
base-resolution grid (the whole image resized to a square: 24 x 24 for a 336-pixel tower) first, followed by the
high-resolution tiles, so only the base grid is drawn (the service's ``ModelCard.grid_side``, else
:func:`next_base_side`); Qwen2-VL's grid follows the image's aspect ratio (merged 28-pixel patches).
LLaVA-1.5's CLIP processor resizes the shortest side and crops the centre square: its grid covers only that square
of a non-square image (:func:`token_region`), the rest is shaded as never seen; a request whose images were padded
to a square first (``image_aspect``) is drawn on the padded square (:func:`model_view`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from vlmguard.images import REFERENCE_IMAGE_ASPECT, pad_to_square

LLAVA_NEXT_BASE = 576  # LLaVA-NeXT's usual base grid, 24 x 24: a 336-pixel tower with 14-pixel patches
NEXT_MAX_CROPS = 6  # high-resolution crops per side tried when matching a NeXT token count (its pinpoints use up to 3)
DISPLAY_SIDE = 384
CLIP_MEAN_RGB = (122, 116, 104)  # OpenAI CLIP's image_mean x 255: what LLaVA pads a non-square image with
SCORE_KEYS = ("visual_scores", "token_scores", "scores", "visual_token_scores")


def token_grid(n_tokens: int, image_size: tuple[int, int], family: str | None = None,
               grid_side: int | None = None) -> tuple[int, int, int]:
    """``(rows, cols, n_drawn)`` of the visual-token grid of an image of ``image_size`` = (width, height).
    ``grid_side``: the service's ``ModelCard.grid_side`` where it gives one (LLaVA-NeXT's base grid: exact; without
    it the base grid is inferred from the token count)."""
    if n_tokens <= 0:
        raise ValueError("no visual tokens to draw")
    if family == "llava_next":
        known = grid_side if grid_side and grid_side * grid_side <= n_tokens else None
        base = known or next_base_side(n_tokens, image_size)
        if base is None and n_tokens > LLAVA_NEXT_BASE:
            base = math.isqrt(LLAVA_NEXT_BASE)
        if base is not None:
            return base, base, base * base
    side = math.isqrt(n_tokens)
    if side * side == n_tokens and family != "qwen2_vl":
        return side, side, n_tokens
    w, h = image_size
    aspect = w / h if h else 1.0
    best = (1, n_tokens)
    for r in range(1, n_tokens + 1):
        if n_tokens % r == 0:
            c = n_tokens // r
            if abs(math.log((c / r) / aspect)) < abs(math.log((best[1] / best[0]) / aspect)):
                best = (r, c)
    return best[0], best[1], n_tokens


def next_base_side(n_tokens: int, image_size: tuple[int, int]) -> int | None:
    """The side of LLaVA-NeXT's base grid (its tower's image_size / patch_size) that ``n_tokens`` visual tokens of an
    image of ``image_size`` = (width, height) imply, or None when no grid gives that count. The service tells neither
    the tower's resolution nor its pinpoints, so every base grid and high-resolution crop layout is tried. A count
    that several fit (rare) is read as 24 x 24 when that fits, else as crops shaped like the image, fewest first."""
    w, h = image_size
    if w <= 0 or h <= 0:
        return None
    fits = [(side, rows, cols) for side in range(2, math.isqrt(n_tokens) + 1)
            for rows in range(1, NEXT_MAX_CROPS + 1) for cols in range(1, NEXT_MAX_CROPS + 1)
            if _next_token_count(side, rows, cols, image_size) == n_tokens]
    if not fits:
        return None
    if any(side * side == LLAVA_NEXT_BASE for side, _, _ in fits):
        return math.isqrt(LLAVA_NEXT_BASE)

    def unlikely(fit: tuple[int, int, int]) -> tuple[bool, int, int]:
        side, rows, cols = fit
        shaped_like_image = rows == cols or w == h or (cols > rows) == (w > h)
        return not shaped_like_image, rows * cols, -side

    return min(fits, key=unlikely)[0]


def _next_token_count(side: int, rows: int, cols: int, image_size: tuple[int, int]) -> int:
    """LLaVA-NeXT's visual tokens for an image of ``image_size`` with a ``side`` x ``side`` base grid and ``rows`` x
    ``cols`` high-resolution crops: the base grid, then the crops' grid with the padding rows or columns removed, plus
    one newline token per row (as transformers' ``LlavaNextProcessor._get_number_of_features`` counts them)."""
    w, h = image_size
    high, wide = side * rows, side * cols
    if w / h > wide / high:
        high -= (high - int(round(h * (wide / w), 7))) // 2 * 2
    else:
        wide -= (wide - int(round(w * (high / h), 7))) // 2 * 2
    return side * side + high * wide + high


def model_view(image: Image.Image, family: str | None, image_aspect: str | None,
               reference: str | None = None) -> Image.Image:
    """The image as the model's processor gets it: padded to a square with CLIP's mean grey where the request's
    ``image_aspect`` pads (``pad``; ``reference`` where the model's reference pads: ``reference``, the service's
    ``ModelCard.reference_image_aspect``, which a checkpoint's own ``image_aspect_ratio`` decides, else the family's),
    so that its visual-token grid covers the padded square; otherwise as it is. (The grey is the CLIP processors'
    mean, what every supported family pads with.)"""
    if image_aspect == "reference":
        image_aspect = reference or REFERENCE_IMAGE_ASPECT.get(family or "", "native")
    pads = image_aspect == "pad"
    return pad_to_square(image.convert("RGB"), CLIP_MEAN_RGB) if pads else image


def token_region(image_size: tuple[int, int], family: str | None = None) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)``: the part of an image of ``image_size`` = (width, height) its visual tokens cover. LLaVA-1.5
    (family ``llava``, the bundled tiny model too) sees the centre square (CLIP's resize of the shortest side, then
    centre crop); the other families see the whole image."""
    w, h = image_size
    if family == "llava" and w != h:
        s = min(w, h)
        return (w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2
    return 0.0, 0.0, float(w), float(h)


def _display_region(image: Image.Image, shown: Image.Image, family: str | None) -> tuple[float, float, float, float]:
    """:func:`token_region` in the pixels of ``shown``, the display copy of ``image``."""
    sx, sy = shown.size[0] / image.size[0], shown.size[1] / image.size[1]
    x0, y0, x1, y1 = token_region(image.size, family)
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def display_image(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """RGB copy scaled so its longer side is ``side`` (small synthetic images are upscaled crisply)."""
    img = image.convert("RGB")
    w, h = img.size
    scale = side / max(w, h)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _cells(region: tuple[float, float, float, float], rows: int, cols: int):
    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    for r in range(rows):
        for c in range(cols):
            yield r * cols + c, (round(x0 + c * w / cols), round(y0 + r * h / rows), round(x0 + (c + 1) * w / cols),
                                 round(y0 + (r + 1) * h / rows))


def kept_overlay(image: Image.Image, kept_indices: Sequence[int] | None, n_tokens: int,
                 family: str | None = None, side: int = DISPLAY_SIDE, grid_side: int | None = None) -> Image.Image:
    """The image with pruned visual tokens dimmed and kept ones outlined (all kept when indices are None)."""
    base = display_image(image, side)
    rows, cols, n_drawn = token_grid(n_tokens, image.size, family, grid_side)
    kept = set(range(n_drawn)) if kept_indices is None else {int(i) for i in kept_indices if 0 <= int(i) < n_drawn}
    region = _display_region(image, base, family)
    shade = Image.new("L", base.size, 120)  # outside the region the tokens cover: never seen by the model
    d_shade = ImageDraw.Draw(shade)
    d_shade.rectangle(tuple(round(v) for v in region), fill=0)
    boxes = dict(_cells(region, rows, cols))
    for idx, box in boxes.items():
        if idx not in kept:
            d_shade.rectangle(box, fill=170)
    dark = Image.new("RGB", base.size, (10, 10, 30))
    out = Image.composite(dark, base, shade)
    draw = ImageDraw.Draw(out)
    for idx in sorted(kept):
        x0, y0, x1, y1 = boxes[idx]
        # a cell of a very wide or tall image can be under a pixel high or wide on the display copy
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=(60, 230, 90), width=1)
    return out


def heat_colors(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(N, 3) uint8 colours of values min-max normalised to [0, 1] (constant input gives the low colour)."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    lo, hi = (v[finite].min(), v[finite].max()) if finite.any() else (0.0, 0.0)
    norm = np.where(finite, (v - lo) / (hi - lo) if hi > lo else 0.0, 0.0)
    return (colormaps[cmap](norm)[:, :3] * 255).round().astype(np.uint8)


def score_heatmap(image: Image.Image, scores: Sequence[float], family: str | None = None,
                  alpha: float = 0.55, side: int = DISPLAY_SIDE, grid_side: int | None = None) -> Image.Image:
    """The per-visual-token scores as a heatmap blended over the image (brighter = higher score)."""
    base = display_image(image, side)
    n = len(scores)
    rows, cols, n_drawn = token_grid(n, image.size, family, grid_side)
    colors = heat_colors(np.asarray(scores[:n_drawn], dtype=np.float64))
    grid = colors.reshape(rows, cols, 3)
    x0, y0, x1, y1 = (round(v) for v in _display_region(image, base, family))
    heat = base.copy()  # no heat where the model sees nothing
    heat.paste(Image.fromarray(grid, "RGB").resize((max(1, x1 - x0), max(1, y1 - y0)), Image.Resampling.NEAREST),
               (x0, y0))
    return Image.blend(base, heat, alpha)


def find_visual_scores(report: dict[str, Any] | None, n_tokens: int) -> tuple[str, list[float]] | None:
    """Per-visual-token scores a pruner reported in its result diagnostics, as ``(key, scores)``.

    Accepts a flat list of ``n_tokens`` numbers, or a list of such lists (per image row / per layer: the
    first is taken), under one of :data:`SCORE_KEYS` (searched first) or any other key.
    """
    if not report or n_tokens <= 0:
        return None

    def as_scores(v: Any) -> list[float] | None:
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
            v = v[0]
        if isinstance(v, (list, tuple)) and len(v) == n_tokens and all(isinstance(x, (int, float)) and
                                                                     not isinstance(x, bool) for x in v):
            return [float(x) for x in v]
        return None

    keys = [k for k in SCORE_KEYS if k in report] + [k for k in report if k not in SCORE_KEYS]
    for k in keys:
        s = as_scores(report[k])
        if s is not None:
            return k, s
    return None


def _getter(obj: Any):
    return obj.get if isinstance(obj, dict) else (lambda k, _o=obj: getattr(_o, k, None))


def steps_frame(steps: Sequence[Any], logprobs: Sequence[Any] | None = None) -> pd.DataFrame:
    """Per generated token: main vs contrast probability, the decoder's score, and whether it changed the pick;
    with the result's ``logprobs``, the token's probability under the decoder's final distribution and the most
    likely tokens there (``alternatives``)."""
    rows = []
    logprobs = list(logprobs or [])
    for i, s in enumerate(steps):
        get = _getter(s)
        token_id, main_top = get("token_id"), get("main_top_id")
        final_prob, alternatives = None, ""
        if i < len(logprobs):
            lp = _getter(logprobs[i])
            final_prob = math.exp(lp("logprob"))
            alternatives = " · ".join(f"{_getter(t)('token')!r} {math.exp(_getter(t)('logprob')):.3f}"
                                      for t in lp("top") or [])
        rows.append({
            "step": i,
            "token": get("token"),
            "label": f"{i}:{get('token')}",
            "main_prob": get("main_prob"),
            "contrast_prob": get("contrast_prob"),
            "score": get("score"),
            "final_prob": final_prob,
            "alternatives": alternatives,
            "changed": main_top is not None and token_id is not None and main_top != token_id,
        })
    return pd.DataFrame(rows, columns=["step", "token", "label", "main_prob", "contrast_prob", "score", "final_prob",
                                       "alternatives", "changed"])


def probs_chart(frame: pd.DataFrame):
    """Grouped bars per generated token: main vs contrast probability; tokens the decoder changed are marked."""
    import altair as alt

    long = frame.melt(id_vars=["step", "label", "changed"], value_vars=["main_prob", "contrast_prob"],
                      var_name="branch", value_name="probability").dropna(subset=["probability"])
    long["branch"] = long["branch"].map({"main_prob": "main", "contrast_prob": "contrast"})
    order = list(frame["label"])
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("label:N", sort=order, title="generated token"),
        xOffset="branch:N",
        y=alt.Y("probability:Q", title="P(chosen token)"),
        color=alt.Color("branch:N", scale=alt.Scale(domain=["main", "contrast"], range=["#1f77b4", "#ff7f0e"])),
        opacity=alt.condition("datum.changed", alt.value(1.0), alt.value(0.75)),
        tooltip=["label", "branch", alt.Tooltip("probability:Q", format=".3f"), "changed"],
    )
    marks = alt.Chart(frame[frame["changed"]]).mark_text(text="▼", dy=-8, color="crimson", fontSize=12).encode(
        x=alt.X("label:N", sort=order), y=alt.value(0))
    return (bars + marks).properties(height=260)
