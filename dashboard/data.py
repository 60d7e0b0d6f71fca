"""Data for the dashboard: plain functions over the results database (testable without Streamlit).

Reads go through :mod:`vlmguard.bench.db` (``list_runs``, ``run_samples``) and the flat row of
:func:`vlmguard.bench.report.flatten`, so the leaderboard shows exactly what ``vlmguard report`` shows.
Loads are cached per database *version* (size and mtime of the file and its WAL), so a page re-run is
instant while a benchmark that is still writing shows up on the next refresh.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from vlmguard.bench import db as dbm
from vlmguard.bench.report import flatten, is_partial, status_cell

# Columns of the leaderboard, in display order (metrics are percentages; times in milliseconds).
KNOB_COLUMNS = ("model", "dataset", "benchmark", "split", "variant", "pruning", "budget", "pruning_params",
                "decoding", "decoding_params", "image_aspect")
METRIC_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "ctr", "sycophancy", "over_correction",
                  "chair_s", "chair_i", "chair_i_distinct", "chair_recall", "len", "visual_tokens", "visual_tokens_kept",
                  "prefill_ms", "ttft_ms", "total_ms")
INFO_COLUMNS = ("method", "status", "n_samples", "n_expected", "run_id", "created_at", "updated_at")
LEADERBOARD_COLUMNS = (*KNOB_COLUMNS, *INFO_COLUMNS[:4], *METRIC_COLUMNS, *INFO_COLUMNS[4:])
# Columns the leaderboard offers as multi-select filters.
FILTER_COLUMNS = ("model", "dataset", "benchmark", "split", "pruning", "decoding")

FILL_HELP = """\
The results database is filled by the benchmark runner. For example, on the bundled tiny model and SynthCOCO:

```bash
vlmguard bench pope --dataset synthcoco --split random --limit 50 --db {db}
vlmguard bench pope --dataset synthcoco --split random --limit 50 --pruning fastv --budget 36 --db {db}
vlmguard bench chair --dataset synthcoco --limit 50 --decoding vcd --db {db}
vlmguard bench sweep configs/sweep.yaml --db {db}        # methods x budgets x benchmarks
```

or, with the service running (`vlmguard serve`), as a Ray Job from the **Jobs** page
(`vlmguard job submit bench pope --limit 50 --db {db}`).
"""


# ---- database state and cached loads --------------------------------------------------------------


def db_version(path: str | Path) -> tuple[int, int, int, int]:
    """Changes whenever the database (or its write-ahead log) is written: the cache key of the loads."""
    p = Path(path)
    out: list[int] = []
    for f in (p, p.with_name(p.name + "-wal")):
        try:
            st = f.stat()
            out += [st.st_mtime_ns, st.st_size]
        except FileNotFoundError:
            out += [0, 0]
    return (out[0], out[1], out[2], out[3])


def db_state(path: str | Path) -> str:
    """``missing`` (no file), ``empty`` (no runs yet) or ``ready``; InvalidInput for a file that is not a readable
    results database, or a directory (``vlmguard bench --db`` there would fail too)."""
    p = Path(path)
    if not p.exists():
        return "missing"
    dbm.require_db_file(p)  # a directory is an error, not a database to be written yet
    return "ready" if len(load_runs(p)) else "empty"


def load_runs(path: str | Path) -> pd.DataFrame:
    """Every run of the database as one leaderboard row (newest first); empty frame for a missing file."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        return _runs_frame([])
    return _load_runs_cached(str(p), db_version(p)).copy()


@lru_cache(maxsize=16)
def _load_runs_cached(path: str, version: tuple[int, int, int, int]) -> pd.DataFrame:
    return _runs_frame(dbm.list_runs(path))


def _runs_frame(runs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        row = flatten(run)
        row["status"] = status_cell(row)  # ``finished`` or ``partial N/M``, as in ``vlmguard report``
        row["pruning_params"] = _params_text(run.get("pruning_params"))
        row["decoding_params"] = _params_text(run.get("decoding_params"))
        row["updated_at"] = run.get("updated_at")
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS))
    for c in METRIC_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["budget"] = pd.to_numeric(df["budget"], errors="coerce")
    return df


def _params_text(params: Any) -> str:
    if not params:
        return ""
    if isinstance(params, str):
        return params
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(params.items()))


def load_samples(path: str | Path, run_id: str) -> list[dict[str, Any]]:
    """All samples of one run (JSON columns decoded), cached per database version."""
    p = Path(path).expanduser().resolve()
    return list(_load_samples_cached(str(p), run_id, db_version(p)))


@lru_cache(maxsize=32)
def _load_samples_cached(path: str, run_id: str, version: tuple[int, int, int, int]) -> tuple[dict[str, Any], ...]:
    return tuple(dbm.run_samples(path, run_id))


def load_run(path: str | Path, run_id: str) -> dict[str, Any]:
    return dbm.get_run(str(Path(path).expanduser().resolve()), run_id)


def clear_caches() -> None:
    _load_runs_cached.cache_clear()
    _load_samples_cached.cache_clear()
    _comparisons_cached.cache_clear()


# ---- filtering ------------------------------------------------------------------------------------


@dataclass
class RunFilter:
    """Leaderboard filter: per column the allowed values (empty = all), a budget range, a text search."""

    values: dict[str, list[Any]] = field(default_factory=dict)
    budget_range: tuple[float, float] | None = None
    search: str = ""
    finished_only: bool = False


def filter_options(df: pd.DataFrame) -> dict[str, list[Any]]:
    """The distinct values of each filter column (missing values shown as ``(none)``)."""
    return {c: sorted({_opt(v) for v in df[c]}, key=str) for c in FILTER_COLUMNS}


def _opt(v: Any) -> Any:
    return "(none)" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def filter_runs(df: pd.DataFrame, flt: RunFilter) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for col, allowed in flt.values.items():
        if allowed:
            mask &= df[col].map(_opt).isin(list(allowed))
    if flt.budget_range is not None:
        lo, hi = flt.budget_range
        mask &= df["budget"].isna() | df["budget"].between(lo, hi)
    if flt.finished_only:
        mask &= df["status"] == "finished"
    if flt.search.strip():
        needle = flt.search.strip().lower()
        text = df[["model", "method", "pruning_params", "decoding_params", "run_id"]].astype(str).agg(" ".join, axis=1)
        mask &= text.str.lower().str.contains(needle, regex=False)
    return df[mask]


def visible_columns(df: pd.DataFrame) -> list[str]:
    """Leaderboard columns that carry a value in at least one shown run (POPE-only views hide CHAIR columns)."""
    keep = set(KNOB_COLUMNS) | set(INFO_COLUMNS)
    return [c for c in LEADERBOARD_COLUMNS if c in keep or df[c].notna().any()]


# ---- comparison data --------------------------------------------------------------------------------


def partial_note(row: pd.Series | dict[str, Any]) -> str:
    """`` (partial N/M)`` for a run that is not finished (its metrics cover the samples stored so far), else ``""``."""
    status = row.get("status")
    return f" ({status})" if is_partial(row) and isinstance(status, str) else ""


def method_combo(row: pd.Series | dict[str, Any]) -> str:
    """``pruner@budget + decoder`` (the Pareto view's unit)."""
    pr = row.get("pruning") or "none"
    b = row.get("budget")
    if pr != "none" and b is not None and not (isinstance(b, float) and math.isnan(b)):
        pr = f"{pr}@{int(b) if float(b).is_integer() else b}"
    return f"{pr} + {row.get('decoding') or 'greedy'}"


def tokens_curve(df: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """POPE ``metric`` vs mean visual tokens kept, one series per pruner (per model and split)."""
    sel = df[(df["benchmark"] == "pope") & df[metric].notna() & df["visual_tokens_kept"].notna()]
    out = sel.assign(pruner=sel["pruning"].fillna("none"), series=sel["pruning"].fillna("none") + " / " +
                     sel["decoding"].fillna("greedy"))
    cols = ["model", "split", "pruner", "budget", "decoding", "series", "visual_tokens_kept", metric, "status",
            "run_id"]
    return out[cols].sort_values(["model", "series", "visual_tokens_kept"]).reset_index(drop=True)


def chair_by_decoder(df: pd.DataFrame) -> pd.DataFrame:
    """CHAIR_s / CHAIR_i per decoder (long format: one row per run and metric)."""
    sel = df[(df["benchmark"] == "chair") & (df["chair_s"].notna() | df["chair_i"].notna())]
    if sel.empty:
        return pd.DataFrame(columns=["decoder", "method", "model", "metric", "value", "run_id"])
    sel = sel.assign(decoder=sel["decoding"].fillna("greedy"),
                     method=sel.apply(lambda r: method_combo(r) + partial_note(r), axis=1))
    long = sel.melt(id_vars=["decoder", "method", "model", "run_id"], value_vars=["chair_s", "chair_i"],
                    var_name="metric", value_name="value").dropna(subset=["value"])
    long["metric"] = long["metric"].map({"chair_s": "CHAIR_s", "chair_i": "CHAIR_i"})
    return long.sort_values(["decoder", "method", "metric"]).reset_index(drop=True)


def pope_splits(df: pd.DataFrame) -> list[str]:
    """The POPE splits of the runs, "random" first when present (the Pareto view's default)."""
    splits = sorted(df.loc[df["benchmark"] == "pope", "split"].dropna().unique())
    return sorted(splits, key=lambda s: s != "random")


def pareto_frame(df: pd.DataFrame, speed: str = "total_ms", split: str | None = None) -> pd.DataFrame:
    """Accuracy (POPE on ``split``; None: the mean over whatever splits each combination has, which compares
    unlike things), latency and hallucination (CHAIR_i) per model x pruner x decoder.

    A combination is on the Pareto front when no other combination of the same model is at least as good
    on every available axis (higher accuracy, lower latency, lower CHAIR_i) and better on one; both are points
    of the chart (a POPE accuracy and a latency): a combination without is never on the front.
    """
    keys = ["model", "pruning", "budget", "decoding", "decoding_params"]
    d = df.assign(pruning=df["pruning"].fillna("none"), decoding=df["decoding"].fillna("greedy"),
                  budget=df["budget"].fillna(-1), decoding_params=df["decoding_params"].fillna(""))
    d = d.assign(partial=d["status"] != "finished")
    pope_runs = d[(d["benchmark"] == "pope") & ((d["split"] == split) if split is not None else True)]
    pope = pope_runs.groupby(keys, dropna=False).agg(
        accuracy=("accuracy", "mean"), latency_ms=(speed, "mean"), pope_runs=("run_id", "count"),
        pope_partial=("partial", "any"))
    chair = d[d["benchmark"] == "chair"].groupby(keys, dropna=False).agg(
        chair_i=("chair_i", "mean"), chair_s=("chair_s", "mean"), chair_latency_ms=(speed, "mean"),
        chair_partial=("partial", "any"))
    out = pope.join(chair, how="outer").reset_index()
    if out.empty:
        return pd.DataFrame(columns=[*keys, "combo", "accuracy", "latency_ms", "chair_i", "chair_s", "partial",
                                     "pareto"])
    out["latency_ms"] = out["latency_ms"].fillna(out["chair_latency_ms"])
    out["budget"] = out["budget"].where(out["budget"] >= 0)
    # a combination with a run that is not finished is marked: its numbers cover only the samples stored so far
    out["partial"] = out["pope_partial"].eq(True) | out["chair_partial"].eq(True)
    out["combo"] = out.apply(method_combo, axis=1) + out["partial"].map({True: " (partial)", False: ""})
    out["pareto"] = False
    # the front is among the combinations the chart draws: one without a POPE run on the split (its latency is a
    # CHAIR run's, captions of many tokens) is no point there, and must not make a drawn point look dominated
    drawn = out["accuracy"].notna() & out["latency_ms"].notna()
    for _, grp in out[drawn].groupby("model"):
        flags = pareto_mask([(r.accuracy, r.latency_ms, r.chair_i) for r in grp.itertuples()],
                            senses=(+1, -1, -1))
        out.loc[grp.index, "pareto"] = flags
    return (out.drop(columns=["chair_latency_ms", "pope_runs", "pope_partial", "chair_partial"])
            .sort_values(["model", "combo"]).reset_index(drop=True))


def pareto_mask(points: Sequence[Sequence[float | None]], senses: Sequence[int]) -> list[bool]:
    """Non-dominated points. ``senses[k]`` is +1 when axis k is better higher, -1 when lower.

    Missing values (None/NaN) are skipped pairwise: two points are compared on the axes both have; a
    point with no value on any axis is never on the front.
    """
    def val(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    pts = [[val(x) for x in p] for p in points]
    out = []
    for i, p in enumerate(pts):
        if all(x is None for x in p):
            out.append(False)
            continue
        dominated = False
        for j, q in enumerate(pts):
            if i == j:
                continue
            axes = [k for k in range(len(senses)) if p[k] is not None and q[k] is not None]
            if not axes:
                continue
            ge = all(senses[k] * q[k] >= senses[k] * p[k] for k in axes)  # type: ignore[operator]
            gt = any(senses[k] * q[k] > senses[k] * p[k] for k in axes)  # type: ignore[operator]
            if ge and gt:
                dominated = True
                break
        out.append(not dominated)
    return out


# ---- per-sample drill-down --------------------------------------------------------------------------


def samples_frame(samples: Sequence[dict[str, Any]], benchmark: str) -> pd.DataFrame:
    """The drill-down table of one run."""
    rows = []
    for s in samples:
        row = {"sample_key": s["sample_key"], "image": s.get("image"), "prompt": s.get("prompt"),
               "answer": s.get("output_text")}
        if benchmark == "chair":
            rec = s.get("record") or {}
            row["hallucinated"] = ", ".join(w for w, _ in rec.get("mscoco_hallucinated_words") or [])
            row["CHAIR_i"] = (rec.get("metrics") or {}).get("CHAIRi")
        else:
            row.update(label=s.get("label"), prediction=s.get("prediction"), correct=_bool(s.get("correct")))
        row["visual_tokens_kept"] = s.get("visual_tokens_kept")
        row["total_ms"] = None if s.get("total_s") is None else 1000.0 * s["total_s"]
        rows.append(row)
    return pd.DataFrame(rows)


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def _surface_pattern(word: str) -> re.Pattern[str]:
    """Surface forms of a CHAIR lemma in the caption (plural -s/-es/-ies, and the common irregulars)."""
    irregular = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
                 "knife": "knives", "sheep": "sheep", "foot": "feet"}
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    if word.endswith("fe"):
        forms.add(word[:-2] + "ves")
    if word in irregular:
        forms.add(irregular[word])
    alts = "|".join(sorted((re.escape(f).replace(r"\ ", r"[\s-]+") for f in forms), key=len, reverse=True))
    return re.compile(rf"\b({alts})\b", re.IGNORECASE)


def highlight_caption(record: dict[str, Any]) -> tuple[str, list[str]]:
    """HTML of the caption with its hallucinated object mentions in ``<mark>``, and the mentions found.

    The CHAIR record lists hallucinated mentions as ``[word, category]`` with ``word`` a lemma of the
    caption; every surface form of those lemmas is marked. Everything else is HTML-escaped.
    """
    caption = record.get("caption") or ""
    words = sorted({w for w, _ in record.get("mscoco_hallucinated_words") or []}, key=len, reverse=True)
    spans: list[tuple[int, int]] = []
    for w in words:
        for m in _surface_pattern(w).finditer(caption):
            if not any(a < m.end() and m.start() < b for a, b in spans):
                spans.append((m.start(), m.end()))
    spans.sort()
    out, pos, found = [], 0, []
    for a, b in spans:
        out.append(html.escape(caption[pos:a]))
        out.append(f'<mark class="hallucinated" style="background:#ffb3b3;padding:0 2px">{html.escape(caption[a:b])}</mark>')
        found.append(caption[a:b])
        pos = b
    out.append(html.escape(caption[pos:]))
    return "".join(out), found


def find_image(run: dict[str, Any], image_name: str | None, extra_dirs: Sequence[Path] = ()) -> Path | None:
    """The image file of a sample: an absolute path, the run's SynthCOCO dataset, or the extra folders."""
    if not image_name:
        return None
    p = Path(image_name)
    if p.is_absolute() and p.is_file():
        return p
    for d in _dataset_image_dirs(run.get("dataset") or "", run.get("split") if run.get("benchmark") == "chair" else None):
        if (d / image_name).is_file():
            return d / image_name
    for d in extra_dirs:
        for cand in (d / image_name, *d.glob(f"*/{image_name}")):
            if cand.is_file():
                return cand
    return None


def _synth_root(dataset: str) -> Path | None:
    """The SynthCOCO directory a run names, when it is on this machine (nothing is built)."""
    if dataset == "synthcoco":
        from vlmguard.synth.build import default_dataset_dir

        root = default_dataset_dir()
    elif dataset:
        root = Path(dataset)
    else:
        return None
    return root if root.is_dir() else None


def _dataset_image_dirs(dataset: str, image_split: str | None) -> list[Path]:
    """Image folders of a SynthCOCO dataset named by a run, without building anything."""
    root = _synth_root(dataset)
    images = root / "images" if root is not None else None
    if images is None or not images.is_dir():
        return []
    dirs = [images / image_split] if image_split and (images / image_split).is_dir() else []
    return dirs + sorted(d for d in images.iterdir() if d.is_dir() and d not in dirs)


HALLUCINATION_COLUMNS = ("run_id", "model", "method", "kind", "count", "mentions")


def hallucination_kinds(path: str | Path, shown: pd.DataFrame) -> pd.DataFrame:
    """The hallucinated mentions of the shown CHAIR runs by kind (``vlmguard synth hallucinations``), one row
    per run and kind, for the runs whose SynthCOCO dataset is on this machine in the version they ran on."""
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.errors import VlmguardError
    from vlmguard.synth.hallucinations import KIND_TITLES, KINDS, breakdown

    rows: list[dict[str, Any]] = []
    chair = shown[shown["benchmark"] == "chair"] if len(shown) else shown
    for _, r in chair.iterrows():
        root = _synth_root(str(r.get("dataset") or ""))
        if root is None:
            continue
        run = load_run(path, r["run_id"])
        try:
            if synth_dataset(root).version != run.get("dataset_version"):
                continue  # another world under the same name: its scene graphs would not match
            scenes = _scenes(str(root), run.get("split") or "test")
        except VlmguardError:  # not SynthCOCO
            continue
        # (a damaged database raises InvalidInput here, which the page shows; it no longer skips the run silently)
        records = [s["record"] for s in load_samples(path, r["run_id"]) if s.get("record")]
        try:
            b = breakdown(records, scenes)
        except VlmguardError:  # not these images
            continue
        method = r["method"] + partial_note(r)
        rows += [{"run_id": r["run_id"], "model": r["model"], "method": method, "kind": KIND_TITLES[k],
                  "count": b.counts[k], "mentions": b.mentions} for k in KINDS]
    return pd.DataFrame(rows, columns=list(HALLUCINATION_COLUMNS))


COMPARISON_COLUMNS = ("benchmark", "split", "method", "metric", "baseline", "value", "change", "ci_low", "ci_high",
                      "significant", "images", "baseline_run", "run_id")


def comparisons(path: str | Path, baseline: str, shown: pd.DataFrame) -> pd.DataFrame:
    """The shown runs against the run labelled ``baseline`` of their group (``vlmguard compare``; where several
    runs of a group carry the label, the newest, named in ``baseline_run``), with paired bootstrap 95% intervals;
    changes in percent (relative for CHAIR, points for POPE accuracy, share kept for ``accuracy_retained``). Empty
    when no shown run has such a baseline."""
    p = Path(path).expanduser().resolve()
    frame = _comparisons_cached(str(p), baseline, db_version(p))
    return frame[frame["run_id"].isin(set(shown["run_id"]))].reset_index(drop=True)


@lru_cache(maxsize=8)
def _comparisons_cached(path: str, baseline: str, version: tuple[int, int, int, int]) -> pd.DataFrame:
    from vlmguard.bench.compare import compare_runs
    from vlmguard.errors import InvalidInput

    try:
        rows = compare_runs(path, baseline)
    except InvalidInput:  # no POPE / CHAIR runs, or none under that label
        rows = []
    scale = {"relative": 100.0, "points": 1.0, "ratio": 100.0}
    out = [{"benchmark": c.benchmark, "split": c.split_label, "method": c.method, "metric": c.metric,
            "baseline": c.baseline_value, "value": c.value, "change": scale[c.kind] * c.change,
            "ci_low": scale[c.kind] * c.ci_low, "ci_high": scale[c.kind] * c.ci_high,
            "significant": c.excludes_no_change, "images": c.images, "baseline_run": c.baseline_run_id,
            "run_id": c.run_id} for c in rows]
    return pd.DataFrame(out, columns=list(COMPARISON_COLUMNS))


def _scenes(root: str, split: str) -> dict:
    """A SynthCOCO split's scene graphs, cached while its annotation file is unchanged."""
    f = Path(root) / "annotations" / f"instances_{split}.json"
    return _scenes_cached(root, split, f.stat().st_mtime_ns if f.is_file() else 0)


@lru_cache(maxsize=8)
def _scenes_cached(root: str, split: str, mtime_ns: int) -> dict:
    from vlmguard.synth.hallucinations import load_scenes

    return load_scenes(root, split)
