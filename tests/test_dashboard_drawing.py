"""Drawing helpers: token grids, the kept-token overlay, the score heatmap, per-token probabilities."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmguard.dashboard import drawing


def test_token_grid_per_family():
    assert drawing.token_grid(576, (336, 336)) == (24, 24, 576)
    assert drawing.token_grid(144, (96, 96), "llava") == (12, 12, 144)
    assert drawing.token_grid(2928, (672, 672), "llava_next") == (24, 24, 576)  # base grid first
    assert drawing.token_grid(12, (400, 300), "qwen2_vl") == (3, 4, 12)  # landscape: more columns
    assert drawing.token_grid(12, (300, 400), "qwen2_vl") == (4, 3, 12)
    with pytest.raises(ValueError):
        drawing.token_grid(0, (10, 10))


def _cell_mean(img: Image.Image, rows: int, cols: int, r: int, c: int) -> float:
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape[:2]
    y0, y1, x0, x1 = r * h // rows + 3, (r + 1) * h // rows - 3, c * w // cols + 3, (c + 1) * w // cols - 3
    return float(a[y0:y1, x0:x1].mean())


def test_kept_overlay_dims_pruned_tokens_only():
    img = Image.new("RGB", (40, 40), (200, 180, 160))
    out = drawing.kept_overlay(img, [0, 5, 15], 16, side=160)
    assert out.size == (160, 160)
    kept = [_cell_mean(out, 4, 4, i // 4, i % 4) for i in (0, 5, 15)]
    pruned = [_cell_mean(out, 4, 4, i // 4, i % 4) for i in (1, 2, 14)]
    assert min(kept) > 170 and max(pruned) < 110  # pruned cells darkened, kept cells untouched
    everything = drawing.kept_overlay(img, None, 16, side=160)  # no pruning: nothing dimmed
    assert _cell_mean(everything, 4, 4, 2, 2) > 170


def test_score_heatmap_brightest_where_the_score_is_highest():
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    scores = [0.0] * 16
    scores[6] = 5.0
    out = drawing.score_heatmap(img, scores, side=128, alpha=1.0)
    lum = [_cell_mean(out, 4, 4, i // 4, i % 4) for i in range(16)]
    assert int(np.argmax(lum)) == 6 and lum[6] > lum[0] + 100
    flat = drawing.score_heatmap(img, [1.0] * 16, side=128, alpha=1.0)  # constant scores: one colour
    assert len({round(_cell_mean(flat, 4, 4, i // 4, i % 4)) for i in range(16)}) == 1


def test_find_visual_scores():
    assert drawing.find_visual_scores({"name": "fastv", "visual_scores": [1, 2, 3, 4]}, 4) == ("visual_scores", [1.0, 2.0, 3.0, 4.0])
    assert drawing.find_visual_scores({"attn": [[0.5] * 4, [0.1] * 4]}, 4) == ("attn", [0.5] * 4)
    assert drawing.find_visual_scores({"name": "fastv", "budget": 6, "fastv_kept": {"1": [[1, 2]]}}, 4) is None
    assert drawing.find_visual_scores({"scores": [1, 2]}, 4) is None  # wrong length
    assert drawing.find_visual_scores(None, 4) is None


def test_steps_frame_and_probs_chart():
    steps = [{"token_id": 5, "token": "Yes", "main_prob": 0.7, "contrast_prob": 0.2, "score": 1.2, "main_top_id": 5},
             {"token_id": 9, "token": ".", "main_prob": 0.3, "contrast_prob": 0.6, "score": 0.1, "main_top_id": 4}]
    frame = drawing.steps_frame(steps)
    assert list(frame["changed"]) == [False, True] and list(frame["label"]) == ["0:Yes", "1:."]
    spec = drawing.probs_chart(frame).to_dict()
    values = [v for d in spec["datasets"].values() for v in d]
    assert {"main", "contrast"} <= {v.get("branch") for v in values}
    greedy = drawing.steps_frame([{**steps[0], "contrast_prob": None}])
    assert greedy["contrast_prob"].isna().all()
    drawing.probs_chart(greedy).to_dict()  # main branch only still draws
    assert frame["final_prob"].isna().all() and list(frame["alternatives"]) == ["", ""]
    logprobs = [{"token_id": 5, "token": "Yes", "logprob": -0.5,
                 "top": [{"token_id": 5, "token": "Yes", "logprob": -0.5}, {"token_id": 7, "token": " No", "logprob": -1.5}]},
                {"token_id": 9, "token": ".", "logprob": -2.0, "top": []}]
    with_lp = drawing.steps_frame(steps, logprobs)
    assert list(with_lp["final_prob"]) == pytest.approx([0.6065, 0.1353], abs=1e-4)
    assert list(with_lp["alternatives"]) == ["'Yes' 0.607 · ' No' 0.223", ""]


def test_kept_overlay_of_an_image_a_pixel_high():
    """A 4000 x 2 upload is 384 x 1 on screen: its grid cells are under a pixel high (rectangles raised ValueError)."""
    for size in ((4000, 2), (2, 4000)):
        out = drawing.kept_overlay(Image.new("RGB", size), [0, 5, 15], 16)
        assert max(out.size) == drawing.DISPLAY_SIDE and min(out.size) == 1
