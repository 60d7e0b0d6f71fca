"""Runs against a baseline run of the same benchmark, with paired bootstrap confidence intervals.

Two runs on the same questions differ by the method and by which questions happened to be asked: on 500
images a CHAIR_i of 7.3% rests on about 150 hallucinated mentions, and a method's "-13%" may be chance.
This module puts an interval on every change. For each group of comparable runs (same benchmark, model,
dataset version, split, variant, question file and prompt) it pairs every run with the group's baseline
sample by sample (``sample_key``) and resamples *images* with replacement, the same images for both runs
(a paired percentile bootstrap): an image's POPE questions move together, since they share one picture and
one reading of it, and so do a caption's mentions.

Statistics (the same definitions as the stored metrics, ``chair_score.aggregate`` and ``pope_metrics``):

- CHAIR: ``chair_i`` (hallucinated mentions / mentions, a ratio of sums), ``chair_s`` (captions with a
  hallucination / captions) and ``chair_i_distinct`` (each object once per caption, so that a method that
  only repeats itself less does not pass for one that names fewer absent objects), each as a relative
  change against the baseline (``-0.2`` = 20% fewer);
- POPE: ``accuracy`` as a change in points, and ``accuracy_retained`` (method / baseline, what the pruning
  issue's "keeps 90% of the unpruned accuracy" asks) as a ratio.

``vlmguard compare --db DB [--baseline LABEL]`` prints them; labels are the report's method labels
(``base``, ``vcd``, ``flowcut@16``, ``m3id[beta=0.1,gate=False]``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vlmguard.bench.chair_score import distinct_counts
from vlmguard.bench.db import list_runs, run_samples
from vlmguard.bench.report import NULL_MEANS, method_label
from vlmguard.errors import InvalidInput

# what makes two runs answer the same task (the method columns are what may differ)
# (and the weights, their precision and quantization, the images' preprocessing and the POPE answer parser: a retrained
# model under the same name, a bf16 or 4-bit run, padded images or another parser is not the same task, and no method
# label shows them)
TASK_KEYS = ("benchmark", "model", "model_revision", "dtype", "quantization", "image_aspect", "dataset",
             "dataset_version", "split", "variant", "question_sha256", "prompt_preset", "prompt", "parser",
             "image_list", "max_new_tokens", "drop_incomplete")
BENCHMARKS = ("chair", "pope")


@dataclass
class Comparison:
    """One metric of one run against its group's baseline run."""

    benchmark: str
    split: str | None
    variant: str | None
    method: str
    baseline: str
    run_id: str
    baseline_run_id: str
    metric: str  # chair_i | chair_s | accuracy | accuracy_retained
    kind: str  # relative (value / baseline - 1) | points (value - baseline) | ratio (value / baseline)
    baseline_value: float
    value: float
    change: float
    ci_low: float
    ci_high: float
    images: int  # resampled units (paired images)
    samples: int  # paired samples (questions or captions)
    confidence: float
    # what tells this run's group from the other groups compared, where the table's columns do not (another model,
    # dtype, image_aspect, ...): "key=value ..."; empty when the groups differ only in what the table shows
    task: str = ""

    @property
    def split_label(self) -> str:
        """``random`` (POPE), ``test chair512`` (CHAIR: image split and preset)."""
        parts = [self.split or ""]
        if self.variant and self.variant != self.split:
            parts.append(self.variant)
        return " ".join(p for p in parts if p)

    @property
    def excludes_no_change(self) -> bool:
        """The interval lies on one side of "no change" (0 for a difference, 1 for a ratio)."""
        null = 1.0 if self.kind == "ratio" else 0.0
        return self.ci_low > null or self.ci_high < null

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an undefined value (a CHAIR_i without mentions, a change against 0) is None, not NaN."""
        d = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}
        return {**d, "excludes_no_change": self.excludes_no_change}


def _task(run: dict[str, Any]) -> tuple:
    return tuple(run.get(k) for k in TASK_KEYS)


SHOWN_TASK_KEYS = ("benchmark", "split", "variant")  # columns of the comparison table


def _task_labels(tasks: list[tuple]) -> dict[tuple, str]:
    """Per group's task tuple, ``key=value`` of the keys that tell it from the other groups of ``tasks`` the table
    would print on rows of the same benchmark and split (another model, dtype, image_aspect, ...); "" for a group
    no other shares its benchmark and split with."""
    shown = [TASK_KEYS.index(k) for k in SHOWN_TASK_KEYS]
    alike: dict[tuple, list[tuple]] = defaultdict(list)
    for t in tasks:
        alike[tuple(t[i] for i in shown)].append(t)

    def value(i: int, v: Any) -> str:
        text = str(NULL_MEANS.get(TASK_KEYS[i], "-") if v is None else v)
        return text if len(text) <= 16 else text[:15] + "…"

    labels = {}
    for same in alike.values():
        varying = [i for i in range(len(TASK_KEYS)) if i not in shown and len({t[i] for t in same}) > 1]
        labels.update({t: " ".join(f"{TASK_KEYS[i]}={value(i, t[i])}" for i in varying) for t in same})
    return labels


def _unit_sums(samples: list[dict[str, Any]], benchmark: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per sample key: the image it belongs to and the counts its metrics sum."""
    out = {}
    for s in samples:
        if benchmark == "chair":
            c = s["record"]["counts"]
            counts = (c["mentions"], c["hallucinated"], 1 if c["hallucinated"] else 0, 1, *distinct_counts(s["record"]))
        else:  # pope: unknown answers count as wrong, as in pope_metrics
            counts = (1 if s["prediction"] == s["label"] else 0, 1)
        out[s["sample_key"]] = (s.get("image") or s["sample_key"], counts)
    return out


def _paired_units(base: dict, other: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Counts summed per image over the sample keys both runs hold: arrays (images x counts) for each run."""
    keys = sorted(set(base) & set(other))
    images: dict[str, int] = {}
    for k in keys:
        images.setdefault(base[k][0], len(images))
    width = len(base[keys[0]][1]) if keys else 0
    a = np.zeros((len(images), width))
    b = np.zeros((len(images), width))
    for k in keys:
        i = images[base[k][0]]
        a[i] += base[k][1]
        b[i] += other[k][1]
    return a, b, len(keys)


def _stats(sums: np.ndarray, benchmark: str) -> dict[str, np.ndarray]:
    """Metrics from counts summed over images (last axis = counts); NaN where a denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if benchmark == "chair":
            return {"chair_i": 100.0 * sums[..., 1] / sums[..., 0], "chair_s": 100.0 * sums[..., 2] / sums[..., 3],
                    "chair_i_distinct": 100.0 * sums[..., 5] / sums[..., 4]}
        return {"accuracy": 100.0 * sums[..., 0] / sums[..., 1]}


def _changes(base: dict[str, np.ndarray], other: dict[str, np.ndarray], benchmark: str):
    """(metric, kind, baseline, value, change) for each reported metric; arrays broadcast over resamples."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if benchmark == "chair":
            for m in ("chair_i", "chair_s", "chair_i_distinct"):
                yield m, "relative", base[m], other[m], other[m] / base[m] - 1.0
        else:
            b, o = base["accuracy"], other["accuracy"]
            yield "accuracy", "points", b, o, o - b
            yield "accuracy_retained", "ratio", b, o, o / b


MAX_BOOT = 100_000


def compare_pair(base_samples: list[dict[str, Any]], samples: list[dict[str, Any]], benchmark: str, *,
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """Point estimates and paired bootstrap intervals of one run against a baseline run."""
    if benchmark not in BENCHMARKS:
        raise InvalidInput(f"cannot compare {benchmark!r} runs (supported: {', '.join(BENCHMARKS)})")
    a, b, n_samples = _paired_units(_unit_sums(base_samples, benchmark), _unit_sums(samples, benchmark))
    if len(a) == 0:
        return []
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    point = _changes(_stats(a.sum(0), benchmark), _stats(b.sum(0), benchmark), benchmark)
    boot = _changes(_stats(a[idx].sum(1), benchmark), _stats(b[idx].sum(1), benchmark), benchmark)
    tail = 100.0 * (1.0 - confidence) / 2.0
    out = []
    for (metric, kind, bv, v, change), (_, _, _, _, draws) in zip(point, boot):
        draws = draws[np.isfinite(draws)]
        lo, hi = np.percentile(draws, [tail, 100.0 - tail]) if len(draws) else (np.nan, np.nan)
        out.append(dict(metric=metric, kind=kind, baseline_value=float(bv), value=float(v), change=float(change),
                        ci_low=float(lo), ci_high=float(hi), images=len(a), samples=n_samples))
    return out


def compare_runs(db: Any, baseline: str = "base", *, benchmark: str | None = None, n_boot: int = 2000,
                 confidence: float = 0.95, seed: int = 0, unique_baseline: bool = False,
                 unpaired: list[dict[str, Any]] | None = None) -> list[Comparison]:
    """Every finished POPE / CHAIR run against the run labelled ``baseline`` (or with that run id) of its group.

    Where several runs of one group carry the label (settings no label shows: sampling, seed), the newest is
    the baseline, or with ``unique_baseline`` (the CLI) that is refused, naming their run ids. Runs that share
    no sample with their baseline are appended to ``unpaired`` when given."""
    if not 0.5 <= confidence < 1.0:
        raise InvalidInput(f"confidence must be in [0.5, 1), got {confidence}")
    if n_boot < 100:
        raise InvalidInput(f"--boot must be at least 100, got {n_boot}")
    if n_boot > MAX_BOOT:  # resamples x images indices are held at once: more would exhaust the memory
        raise InvalidInput(f"--boot must be at most {MAX_BOOT}, got {n_boot}")
    if seed < 0:  # numpy's generator takes no negative seed
        raise InvalidInput(f"--seed must be >= 0, got {seed}")
    every = [r for r in list_runs(db, with_metrics=False)
             if r["benchmark"] in BENCHMARKS and (benchmark is None or r["benchmark"] == benchmark)]
    runs = [r for r in every if r["status"] == "finished"]
    if not runs:
        what = f"{benchmark} runs" if benchmark else "POPE or CHAIR runs"
        raise InvalidInput(f"{db}: no finished {what} to compare")
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in reversed(runs):  # oldest first, so a group's order is the order the runs were made
        groups[_task(r)].append(r)
    out: list[Comparison] = []
    base_of: dict[str, dict[str, Any]] = {}  # each group's baseline run, by run id
    found = False
    for members in groups.values():
        bases = [r for r in members if baseline in (method_label(r), r["run_id"])]
        if not bases:
            continue
        if len(bases) > 1 and unique_baseline:
            raise InvalidInput(
                f"--baseline {baseline!r} matches {len(bases)} runs of one group ({bases[0]['benchmark']} "
                f"{bases[0].get('split') or ''}, model {bases[0]['model']}: runs "
                f"{', '.join(r['run_id'] for r in bases)}), which differ in settings the label does not show "
                "(sampling, seed, ...); pass one of these run ids as --baseline")
        found = True
        base = bases[-1]  # the newest run under that label
        base_of[base["run_id"]] = base
        base_samples = run_samples(db, base["run_id"])
        for r in members:
            if r["run_id"] == base["run_id"]:
                continue
            rows = compare_pair(base_samples, run_samples(db, r["run_id"]), r["benchmark"], n_boot=n_boot,
                                confidence=confidence, seed=seed)
            if not rows and unpaired is not None:
                unpaired.append({"benchmark": r["benchmark"], "split": r.get("split"), "method": method_label(r),
                                 "run_id": r["run_id"], "baseline_run_id": base["run_id"]})
            for row in rows:
                out.append(Comparison(benchmark=r["benchmark"], split=r.get("split"), variant=r.get("variant"),
                                      method=method_label(r), baseline=baseline, run_id=r["run_id"],
                                      baseline_run_id=base["run_id"], confidence=confidence, **row))
    compared = {c.baseline_run_id: _task(base_of[c.baseline_run_id]) for c in out}
    labels = _task_labels(list(set(compared.values())))
    for c in out:
        c.task = labels[compared[c.baseline_run_id]]
    if not found:
        labels = sorted({method_label(r) for r in runs})
        unfinished = sum(1 for r in every if r["status"] != "finished" and baseline in (method_label(r), r["run_id"]))
        them = "them" if unfinished > 1 else "it"
        note = (f" (only {unfinished} unfinished run{'s' * (unfinished > 1)}: rerun {them} to finish)"
                if unfinished else "")
        raise InvalidInput(f"no run labelled {baseline!r} to compare against{note}; labels in {db}: "
                           f"{', '.join(labels)}")
    return out


def _fmt_change(kind: str, v: float) -> str:
    if not np.isfinite(v):
        return "-"
    if kind == "relative":
        return f"{100.0 * v:+.1f}%"
    if kind == "points":
        return f"{v:+.2f}"
    return f"{100.0 * v:.1f}%"


def _fmt_value(v: float) -> str:
    return f"{v:.2f}" if np.isfinite(v) else "-"  # undefined: a CHAIR_i of captions without mentions


def format_comparisons(rows: list[Comparison]) -> str:
    """A markdown table; ``*`` marks an interval that excludes "no change"."""
    if not rows:
        return "(no run shares its questions with a baseline run)"
    conf = f"{100 * rows[0].confidence:g}% CI"
    with_task = any(c.task for c in rows)  # groups that differ in what no other column shows
    task_head, task_rule = ("task | ", "---|") if with_task else ("", "")
    lines = [f"| benchmark | split | {task_head}method | metric | {rows[0].baseline} | value | change | {conf} "
             "| images |", f"|---|---|{task_rule}---|---|---|---|---|---|---|"]
    for c in rows:
        mark = " *" if c.excludes_no_change else ""
        ci = f"[{_fmt_change(c.kind, c.ci_low)}, {_fmt_change(c.kind, c.ci_high)}]"
        task = f"{c.task} | " if with_task else ""
        lines.append(f"| {c.benchmark} | {c.split_label} | {task}{c.method} | {c.metric} | "
                     f"{_fmt_value(c.baseline_value)} | {_fmt_value(c.value)} | "
                     f"{_fmt_change(c.kind, c.change)}{mark} | {ci} | {c.images} |")
    return "\n".join(lines)
