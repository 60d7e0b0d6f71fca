"""AdaptInfer's offline inflection-layer analysis: where does text-to-vision attention change regime?

For each calibration sample (unpruned prefill, the engine's cheap score facility at every layer):

1. a_l[v] = sum over the text queries (tokens after the image) of the head-mean attention to visual
   token v at layer l  -> an (L x V) array;
2. keep the top 10% of visual tokens by sum_l a_l[v] (at least one);
3. per kept token, the cumulative curve c_l = sum_{l' <= l} a_{l'}[v];
4. one change point per curve by exhaustive binary segmentation with an L2 (piecewise-constant mean)
   cost, min segment size 2 (= ruptures Binseg(model="l2", jump=1, min_size=2) with one break);
   record the last layer of the first segment (breakpoint - 1, so layer >= 1);
5. histogram the recorded layers; the stage layers are the highest local maxima of the 3-bin smoothed
   histogram at least max(2, L/8) apart (3 stages for L >= 8, else 2), filled from the relative-depth
   rule when fewer peaks exist; keep counts are then solved per budget label.

Calibration data: SynthCOCO scenes rendered on the fly (a seed disjoint from the benchmark's test split)
with POPE-style questions, or the image files of a directory.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from vlmguard.models.base import Prompt
from vlmguard.pruning.adaptinfer_schedule import (accounting_for, actual_average, default_layers, official_average,
                                                   solve_keeps)
from vlmguard.pruning.scores import pad_rows, text_after_vision

CALIBRATION_SEED = 7919  # SynthCOCO's benchmark split uses small seeds (0, 1, ...)
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


def synth_calibration(n: int, seed: int = CALIBRATION_SEED, image_size: int = 96) -> Iterator[Prompt]:
    """POPE-style prompts on freshly rendered SynthCOCO scenes (half present, half absent objects), each
    rendered when it is taken: a large ``n`` does not hold all its images in memory before the first is used."""
    from vlmguard.synth.render import render_scene
    from vlmguard.synth.text import pope_question
    from vlmguard.synth.world import CATEGORIES, WorldParams, sample_scene

    rng = random.Random(seed)
    params = WorldParams(image_size=image_size)
    for i in range(n):
        scene = sample_scene(rng, params)
        img = render_scene(scene, params).image
        present = [o.category.name for o in scene.objects]
        if i % 2 == 0 and present:
            name = rng.choice(present)
        else:
            absent = [c.name for c in CATEGORIES if c.name not in present]
            name = rng.choice(absent)
        yield Prompt(pope_question(name) + POPE_SUFFIX, [img])


def directory_calibration(path: str | Path, n: int, question: str = "Describe the image briefly.") -> list[Prompt]:
    """The first ``n`` images of a folder; a missing folder or an unreadable image is one line naming it."""
    from PIL import Image

    from vlmguard.errors import InvalidInput, first_line

    d = Path(path)
    if not d.is_dir():
        raise InvalidInput(f"--images {d}: {'not a directory' if d.exists() else 'no such directory'}")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[:n]
    if not files:
        raise InvalidInput(f"no images (.jpg/.png/.webp) in {path}")
    prompts = []
    for f in files:
        try:
            with Image.open(f) as im:
                prompts.append(Prompt(question, [im.convert("RGB")]))
        except (OSError, ValueError) as e:  # not an image (PIL's UnidentifiedImageError), truncated, unreadable
            raise InvalidInput(f"--images: cannot read image {f} ({first_line(e)})") from None
    return prompts


def text_to_vision_profile(engine, prompt: Prompt) -> torch.Tensor:
    """(L, V) attention each visual token receives from the text queries, per layer (head mean)."""
    holder: dict[str, torch.Tensor] = {}

    def rows(seq):
        t = text_after_vision(seq, 0)
        if not t.numel():
            t = torch.tensor([seq.length - 1], device=seq.hidden.device)
        holder["t"] = t
        return pad_rows([t], seq.length - 1).to(seq.hidden.device)

    n_layers = engine.adapter.num_layers
    res = engine.probe_forward([prompt], score_layers=range(n_layers), query_rows=rows, per_head=False)
    vis_pos = res["seq"].visual_mask()[0].nonzero().squeeze(1)
    n_t = holder["t"].numel()
    return torch.stack([res["scores"][i][0, :n_t][:, vis_pos].sum(dim=0) for i in range(n_layers)])


def change_point(curve: torch.Tensor, min_size: int = 2) -> int | None:
    """Breakpoint b of the best single split [0, b) + [b, L) under the L2 cost; None if L < 2*min_size."""
    c = curve.double()
    n = c.numel()
    best: tuple[float, int] | None = None
    for b in range(min_size, n - min_size + 1):
        left, right = c[:b], c[b:]
        cost = float(((left - left.mean()) ** 2).sum() + ((right - right.mean()) ** 2).sum())
        if best is None or cost < best[0] - 1e-12:
            best = (cost, b)
    return None if best is None else best[1]


def inflection_layers_of(profile: torch.Tensor, top_frac: float = 0.1, min_size: int = 2) -> list[int]:
    """Recorded inflection layers (last layer of the first segment) for one sample's top tokens."""
    n_layers, n_vis = profile.shape
    k = max(1, int(round(n_vis * top_frac)))
    top = torch.argsort(-profile.sum(dim=0), stable=True)[:k]
    out = []
    for v in top.tolist():
        b = change_point(profile[:, v].cumsum(dim=0), min_size=min_size)
        if b is not None:
            out.append(b - 1)
    return out


def pick_peaks(hist: list[int], n_layers: int, n_stages: int) -> list[int]:
    """Highest local maxima of the 3-bin smoothed histogram, at least max(2, L/8) apart (L = 28: 3.5, so 4
    layers), then filled from the relative-depth rule (which does not keep that spacing)."""
    h = torch.tensor(hist, dtype=torch.float64)
    padded = torch.cat([h[:1] * 0, h, h[:1] * 0])
    smooth = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    gap = max(2.0, n_layers / 8)
    maxima = [i for i in range(n_layers) if smooth[i] > 0
              and (i == 0 or smooth[i] >= smooth[i - 1]) and (i == n_layers - 1 or smooth[i] >= smooth[i + 1])]
    maxima.sort(key=lambda i: (-float(smooth[i]), -float(h[i]), i))
    chosen: list[int] = []
    for i in maxima:
        if i <= n_layers - 2 and all(abs(i - j) >= gap for j in chosen):
            chosen.append(i)
        if len(chosen) == n_stages:
            break
    for d in sorted(default_layers(n_layers), reverse=True):  # fill from the relative-depth rule
        if len(chosen) >= n_stages:
            break
        if d not in chosen:
            chosen.append(d)
    return sorted(chosen)[:n_stages]


@dataclass
class AnalysisResult:
    layers: list[int]
    histogram: list[int]
    samples: int
    n_visual: int
    n_layers: int
    keeps: dict[str, list[int]]
    min_size: int = 2

    def to_dict(self, model: str) -> dict:
        # which accounting the keep counts hit the label under (as a generation's schedule reports it): under
        # "pruned-layers" neither average below equals the label
        accounting = accounting_for(self.layers, self.n_layers)
        keeps = {b: {"keeps": k, "official_avg": round(official_average(self.layers, k, self.n_visual, self.n_layers), 2),
                     "actual_avg": round(actual_average(self.layers, k, self.n_visual, self.n_layers), 2),
                     "label_accounting": accounting}
                 for b, k in self.keeps.items()}
        return {"method": "adaptinfer", "model": model, "layers": self.layers, "n_layers": self.n_layers,
                "n_visual": self.n_visual, "samples": self.samples, "min_size": self.min_size, "histogram": self.histogram,
                "keeps": {b: v["keeps"] for b, v in keeps.items()}, "budgets": keeps}


def budget_labels(n_visual: int) -> list[int]:
    """LLaVA's 192 / 128 / 64 of 576, scaled to this model's visual token count."""
    return sorted({max(1, int(round(n_visual * b / 576))) for b in (192, 128, 64)}, reverse=True)


@torch.no_grad()
def analyze(engine, prompts: Iterable[Prompt], min_size: int = 2) -> AnalysisResult:
    """Run the analysis. ``min_size`` is the change-point search's minimum segment (official: 2; with 4
    layers that leaves one admissible split, so every curve reports layer 1; 1 makes it informative)."""
    n_layers = engine.adapter.num_layers
    hist = [0] * n_layers
    n_samples = 0
    n_visual = 0
    for p in prompts:
        prof = text_to_vision_profile(engine, p)
        n_visual = max(n_visual, prof.shape[1])
        for layer in inflection_layers_of(prof, min_size=min_size):
            hist[layer] += 1
        n_samples += 1
    n_stages = 3 if n_layers >= 8 else 2
    layers = pick_peaks(hist, n_layers, n_stages)
    keeps = {str(b): list(solve_keeps(layers, b, n_visual, n_layers)) for b in budget_labels(n_visual)}
    return AnalysisResult(layers=layers, histogram=hist, samples=n_samples, n_visual=n_visual, n_layers=n_layers,
                          keeps=keeps, min_size=min_size)
