"""Reports from the results database: a flat table (stdout + CSV) and PNG plots (matplotlib, Agg).

Plots: POPE accuracy vs visual tokens kept, CHAIR_s / CHAIR_i per method, POPE accuracy vs prefill time.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from vlmguard.bench.db import list_runs
from vlmguard.penalties import NEUTRAL

# what a run that records nothing in these columns ran with (they are NULL unless set: older runs keep their ids)
NULL_MEANS = {"image_aspect": "native", "dtype": "float32", "quantization": "none"}

COLUMNS = (
    "run_id", "benchmark", "model", "dataset", "split", "variant", "method", "pruning", "budget", "decoding",
    "image_aspect", "status", "n_samples", "n_expected", "accuracy", "precision", "recall", "f1", "yes_ratio", "ctr",
    "sycophancy", "over_correction", "chair_s", "chair_i", "chair_i_distinct", "chair_recall", "len", "visual_tokens",
    "visual_tokens_kept", "prefill_gflops", "prefill_ms", "ttft_ms", "total_ms", "created_at",
)


def model_label(run: dict[str, Any]) -> str:
    """The model's name, with its weights' precision where it is not the default (``llava-1.5-7b [bfloat16,
    bnb-nf4]``): runs of one model in two precisions are two rows that no method label tells apart."""
    precision = [str(run[k]) for k in ("dtype", "quantization") if run.get(k) not in (None, NULL_MEANS[k])]
    return f"{run['model']} [{', '.join(precision)}]" if precision else run["model"]


def method_label(run: dict[str, Any]) -> str:
    """``pruner@budget+decoder``, each with the parameters the run set (``m3id[beta=0.1,gate=False]``), so that
    runs of one method with different settings stay apart in a report."""
    parts = []
    if run.get("pruning") and run["pruning"] != "none":
        b = run.get("budget")
        label = f"{run['pruning']}@{_fmt_num(b)}" if b is not None else run["pruning"]
        parts.append(label + _params(run.get("pruning_params")))
    if run.get("decoding") and run["decoding"] not in ("greedy",):
        parts.append(run["decoding"] + _params(run.get("decoding_params")))
    penalties = {k.removesuffix("_penalty"): run[k] for k, neutral in NEUTRAL.items()
                 if run.get(k) not in (None, neutral)}
    if penalties:
        parts.append("penalty" + _params(penalties))
    if run.get("min_new_tokens"):
        parts.append(f"min_new_tokens={run['min_new_tokens']}")
    parts += _generation_parts(run)
    return "+".join(parts) or "base"


SAMPLING_KNOBS = (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("seed", None))


def _generation_parts(run: dict[str, Any]) -> list[str]:
    """The run's token selection where it differs from its benchmark preset's (``sample[...]`` with the sampling
    knobs set, or ``greedy`` under a preset that samples): runs of one method that sample are other runs in a
    report, not rows of the same label. (The answer length is a task key, as the split is: ``vlmguard compare``
    never compares runs of other lengths.)"""
    preset = _preset_generation(run)
    if preset is None:
        return []
    out = []
    sampling = bool(run.get("do_sample"))
    knobs = {k: run.get(k) for k, default in SAMPLING_KNOBS
             if sampling and run.get(k) is not None and run.get(k) != preset.get(k, default)}
    if sampling != bool(preset.get("do_sample")) or knobs:
        out.append(("sample" + _params(knobs)) if sampling else "greedy")
    return out


def _preset_generation(run: dict[str, Any]) -> dict[str, Any] | None:
    """The generation defaults of the preset a run was made with (CHAIR: its ``variant``; POPE: its prompt
    preset), None for a preset this version does not know."""
    from vlmguard.bench.prompts import get_chair_preset, get_pope_prompt
    from vlmguard.errors import InvalidInput

    try:
        if run.get("benchmark") == "chair":
            get_chair_preset(run.get("variant"))
            return {"do_sample": False}  # every CHAIR preset is greedy
        return get_pope_prompt(run.get("prompt_preset")).to_dict()
    except InvalidInput:
        return None


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return ""
    return "[" + ",".join(f"{k}={_fmt_num(v)}" for k, v in sorted(params.items())) + "]"


def _fmt_num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _ms(v: float | None) -> float | None:
    return None if v is None else 1000.0 * v


def flatten(run: dict[str, Any]) -> dict[str, Any]:
    m = run.get("metrics") or {}
    perf = m.get("perf") or {}
    row = {
        "run_id": run["run_id"],
        "benchmark": run["benchmark"],
        "model": model_label(run),
        "dataset": run["dataset"],
        "split": run.get("split"),
        "variant": run.get("variant"),
        "method": method_label(run),
        "pruning": run.get("pruning"),
        "budget": run.get("budget"),
        "decoding": run.get("decoding"),
        # no method label shows it (a baseline is "base" whatever its images): runs on padded and on cropped images
        # would be rows that differ in nothing shown; NULL is a run on the processor's own images
        "image_aspect": run.get("image_aspect") or NULL_MEANS["image_aspect"],
        "status": run.get("status"),
        "n_samples": run.get("n_samples"),
        "n_expected": run.get("n_expected"),
        "accuracy": m.get("accuracy"),
        "precision": m.get("precision"),
        "recall": m.get("recall") if run["benchmark"] != "chair" else None,
        "f1": m.get("f1"),
        "yes_ratio": m.get("yes_ratio"),
        "ctr": m.get("ctr"),
        "sycophancy": m.get("sycophancy"),
        "over_correction": m.get("over_correction"),
        "chair_s": m.get("chair_s"),
        "chair_i": m.get("chair_i"),
        "chair_i_distinct": m.get("chair_i_distinct"),
        "chair_recall": m.get("recall") if run["benchmark"] == "chair" else None,
        "len": m.get("len"),
        "visual_tokens": perf.get("visual_tokens"),
        "visual_tokens_kept": perf.get("visual_tokens_kept"),
        # mean analytic prefill FLOPs of the run's answers (docs/pruning.md), in GFLOPs
        "prefill_gflops": None if perf.get("prefill_flops") is None else perf["prefill_flops"] / 1e9,
        "prefill_ms": _ms(perf.get("prefill_s")),
        "ttft_ms": _ms(perf.get("ttft_s")),
        "total_ms": _ms(perf.get("total_s")),
        "created_at": run.get("created_at"),
    }
    return row


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else str(v)
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


POPE_VIEW = ("run_id", "model", "split", "method", "image_aspect", "status", "n_samples", "accuracy", "f1",
             "yes_ratio", "visual_tokens_kept", "prefill_gflops", "prefill_ms")
LEADING_VIEW = ("run_id", "model", "split", "variant", "method", "image_aspect", "status", "n_samples", "accuracy",
                "ctr", "sycophancy", "over_correction")
CHAIR_VIEW = ("run_id", "model", "variant", "method", "image_aspect", "status", "n_samples", "chair_s", "chair_i",
              "chair_i_distinct", "chair_recall", "len", "visual_tokens_kept")


def is_partial(row: dict[str, Any]) -> bool:
    """A run that is not finished: killed (or still running) before all its samples were stored."""
    return row.get("status") != "finished"


def status_cell(row: dict[str, Any]) -> str:
    """``finished``, or ``partial 32/120`` for a run whose metrics cover only the samples stored so far (the
    database cannot tell a killed run from one still running: both are ``running`` there)."""
    if not is_partial(row):
        return "finished"
    n, expected = row.get("n_samples"), row.get("n_expected")
    return f"partial {n}/{expected}" if expected is not None else f"partial {n}"


def text_report(rows: list[dict[str, Any]]) -> str:
    out = []
    for bench, view in (("pope", POPE_VIEW), ("pope-leading", LEADING_VIEW), ("chair", CHAIR_VIEW)):
        sel = [{**r, "status": status_cell(r)} for r in rows if r["benchmark"] == bench]
        if sel:
            out.append(f"== {bench} ({len(sel)} runs)")
            out.append(format_table(sel, view))
    return "\n\n".join(out) if out else "no runs in the database"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def _plot_label(row: dict[str, Any]) -> str:
    return f"{row['method']} ({status_cell(row)})" if is_partial(row) else row["method"]


def _plot_scatter(rows: list[dict[str, Any]], x: str, xlabel: str, title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["benchmark"] == "pope" and r.get(x) is not None and r.get("accuracy") is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in pts:
        key = (r["model"], str(r.get("split")))
        series.setdefault(key, []).append(r)
    markers = {"random": "o", "popular": "s", "adversarial": "^"}
    for (model, split), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r["accuracy"] for r in rs], marker=markers.get(split, "o"), linestyle=":",
                label=f"{model} / {split}")
        for r in rs:
            ax.annotate(_plot_label(r), (r[x], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("POPE accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_chair(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["benchmark"] == "chair" and r.get("chair_s") is not None]
    if not pts:
        return False
    labels = [f"{_plot_label(r)}\n{r.get('variant') or ''} {r['model']}" for r in pts]
    xs = range(len(pts))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(pts)), 4.5))
    w = 0.4
    ax.bar([i - w / 2 for i in xs], [r["chair_s"] for r in pts], w, label="CHAIR_s")
    # an undefined CHAIR_i (no caption mentions an object) draws no bar, not a bar at 0 (a perfect score)
    ax.bar([i + w / 2 for i in xs], [math.nan if r["chair_i"] is None else r["chair_i"] for r in pts], w,
           label="CHAIR_i")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("%")
    ax.set_title("CHAIR by method (lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_report(db: Any, out_dir: str | Path) -> dict[str, Any]:
    """Write ``runs.csv`` and the PNG plots into ``out_dir``; return rows, table text and file list."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [flatten(r) for r in list_runs(db)]
    files = []
    csv_path = out / "runs.csv"
    write_csv(rows, csv_path)
    files.append(str(csv_path))
    plots = {
        "pope_accuracy_vs_visual_tokens.png": lambda p: _plot_scatter(
            rows, "visual_tokens_kept", "visual tokens kept (mean per LLM layer)", "POPE accuracy vs visual tokens kept", p
        ),
        "chair_by_method.png": lambda p: _plot_chair(rows, p),
        "pope_accuracy_vs_prefill.png": lambda p: _plot_scatter(
            rows, "prefill_ms", "mean prefill time (ms)", "POPE accuracy vs prefill time", p
        ),
    }
    skipped = []
    for name, fn in plots.items():
        if fn(out / name):
            files.append(str(out / name))
        else:
            skipped.append(name)
    return {"rows": rows, "table": text_report(rows), "files": files, "skipped_plots": skipped}
