"""Metrics of a stored run, recomputed from its samples (POPE, POPE-leading, CHAIR) plus timing figures."""
from __future__ import annotations

import json
import sqlite3
import statistics
from typing import Any

from vlmguard.bench.chair_score import aggregate as chair_aggregate
from vlmguard.bench.pope_leading import flip_metrics
from vlmguard.bench.pope_metrics import pope_metrics
from vlmguard.bench.pope_parsers import PARSERS, unknown_is_miss


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def perf_metrics(rows: list[sqlite3.Row | dict[str, Any]]) -> dict[str, Any]:
    gen = [r["generated_tokens"] for r in rows if r["generated_tokens"] is not None]
    tot = [r["total_s"] for r in rows if r["total_s"] is not None]
    return {
        "visual_tokens": _mean([r["visual_tokens"] for r in rows]),
        "visual_tokens_kept": _mean([r["visual_tokens_kept"] for r in rows]),
        "prefill_flops": _mean([r["prefill_flops"] for r in rows]),
        "prefill_s": _mean([r["prefill_s"] for r in rows]),
        "ttft_s": _mean([r["ttft_s"] for r in rows]),
        "total_s": _mean(tot),
        "generated_tokens": _mean(gen),
    }


def metrics_for_run(conn: sqlite3.Connection, run: dict[str, Any], keys: set[str] | None = None) -> dict[str, Any]:
    """Metrics over the run's stored samples, or over those of them whose sample key is in ``keys`` (the items
    a command selected with --limit, when the run holds more)."""
    run_id = run["run_id"]
    rows = conn.execute(
        "SELECT sample_key, label, prediction, record, visual_tokens, visual_tokens_kept, prefill_s, ttft_s,"
        " total_s, generated_tokens, prefill_flops FROM samples WHERE run_id = ? ORDER BY id",
        (run_id,),
    ).fetchall()
    if keys is not None:
        rows = [r for r in rows if r["sample_key"] in keys]
    bench = run["benchmark"]
    # recall's treatment of unknown answers follows the run's parser (lmms-eval's ``exact`` vs the rest)
    parser_name = run.get("parser")
    miss = unknown_is_miss(parser_name) if parser_name in PARSERS.names() else True
    if bench == "pope":
        out = pope_metrics(((r["prediction"], r["label"]) for r in rows), unknown_is_miss=miss)
    elif bench == "pope-leading":
        neutral: dict[str, str | None] = {}
        if run.get("neutral_run_id"):
            neutral = dict(
                conn.execute(
                    "SELECT sample_key, prediction FROM samples WHERE run_id = ?", (run["neutral_run_id"],)
                ).fetchall()
            )
        groups: dict[str, list[tuple[str, str, str | None, str | None]]] = {"all": [], "misleading": [], "consistent": []}
        unpaired = 0
        for r in rows:
            if r["sample_key"] not in neutral:
                unpaired += 1
                continue
            cue = json.loads(r["record"])["cue"]
            item = (r["label"], "yes" if cue["polarity"] == "affirm" else "no", neutral[r["sample_key"]], r["prediction"])
            groups["all"].append(item)
            groups["misleading" if cue["misleading"] else "consistent"].append(item)
        out = flip_metrics(groups["all"], unknown_is_miss=miss)
        out["subsets"] = {k: flip_metrics(v, unknown_is_miss=miss) for k, v in groups.items() if k != "all"}
        out["unpaired"] = unpaired
        if unpaired:
            out["flags"].append(f"{unpaired} samples have no neutral answer yet (neutral run incomplete)")
    elif bench == "chair":
        out = chair_aggregate(json.loads(r["record"]) for r in rows)
    else:
        out = {"n": len(rows), "flags": [f"unknown benchmark {bench!r}"]}
    expected = len(keys) if keys is not None else run.get("n_expected")
    out["complete"] = expected is not None and len(rows) >= expected
    out["perf"] = perf_metrics(rows)
    return out
