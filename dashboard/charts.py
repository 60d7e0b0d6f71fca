"""Altair charts of the leaderboard (data prepared by :mod:`vlmguard.dashboard.data`) and of the Service page."""
from __future__ import annotations

import altair as alt
import pandas as pd

LABELS = {"accuracy": "POPE accuracy (%)", "f1": "POPE F1 (%)", "visual_tokens_kept": "visual tokens kept (mean)",
          "latency_ms": "latency per sample (ms)", "chair_i": "CHAIR_i (%)"}
NO_CHAIR_COLOR = "#7f7f7f"  # Pareto points of combinations without a CHAIR run


def tokens_chart(curve: pd.DataFrame, metric: str) -> alt.LayerChart:
    """POPE accuracy or F1 vs visual tokens kept, one line per pruner (+ decoder), dashed per split; runs that
    are not finished are labelled with their status (``partial N/M``), as in ``vlmguard report``'s plots."""
    base = alt.Chart(curve).encode(
        x=alt.X("visual_tokens_kept:Q", title=LABELS["visual_tokens_kept"]),
        y=alt.Y(f"{metric}:Q", title=LABELS[metric], scale=alt.Scale(zero=False)),
    )
    lines = base.mark_line(point=True).encode(
        color=alt.Color("series:N", title="pruner / decoder"),
        strokeDash=alt.StrokeDash("split:N"),
        detail="model:N",
        tooltip=["model", "split", "pruner", "budget", "decoding", alt.Tooltip(f"{metric}:Q", format=".2f"),
                 alt.Tooltip("visual_tokens_kept:Q", format=".1f"), "status", "run_id"],
    )
    partial = base.transform_filter(alt.datum.status != "finished").mark_text(
        align="left", dx=7, dy=-7, fontSize=11, color="#b35c00").encode(text="status:N")
    return (lines + partial).properties(height=340)


def chair_chart(long: pd.DataFrame) -> alt.Chart:
    """CHAIR_s and CHAIR_i per decoder (one bar per run and metric)."""
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("decoder:N", title="decoder"),
        xOffset="metric:N",
        y=alt.Y("mean(value):Q", title="CHAIR (%)"),
        color=alt.Color("metric:N", scale=alt.Scale(domain=["CHAIR_s", "CHAIR_i"], range=["#d62728", "#ff9896"])),
        tooltip=["decoder", "metric", alt.Tooltip("mean(value):Q", format=".2f", title="value"),
                 alt.Tooltip("count():Q", title="runs")],
    ).properties(height=320)


def hallucination_chart(kinds: pd.DataFrame) -> alt.Chart:
    """Hallucinated mentions per CHAIR run, stacked by kind (SynthCOCO scene graphs)."""
    return alt.Chart(kinds).mark_bar().encode(
        x=alt.X("method:N", title="method"),
        y=alt.Y("sum(count):Q", title="hallucinated mentions"),
        color=alt.Color("kind:N", title="kind"),
        column=alt.Column("model:N", title=None) if kinds["model"].nunique() > 1 else alt.Undefined,
        tooltip=["model", "method", "kind", "count", alt.Tooltip("mentions:Q", title="all mentions"), "run_id"],
    ).properties(height=300)


def pareto_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """Accuracy vs latency per pruner x decoder; colour = CHAIR_i, filled = on the Pareto front."""
    data = frame.dropna(subset=["accuracy", "latency_ms"]).assign(front=lambda d: d["pareto"].map({True: "on front", False: "dominated"}))
    base = alt.Chart(data).encode(
        x=alt.X("latency_ms:Q", title=LABELS["latency_ms"], scale=alt.Scale(zero=False)),
        y=alt.Y("accuracy:Q", title=LABELS["accuracy"], scale=alt.Scale(zero=False)),
    )

    def points(chart: alt.Chart, color) -> alt.Chart:
        return chart.mark_point(size=140, strokeWidth=2).encode(
            color=color, shape=alt.Shape("front:N", scale=alt.Scale(domain=["on front", "dominated"],
                                                                     range=["diamond", "circle"])),
            fill=color, tooltip=["model", "combo", alt.Tooltip("accuracy:Q", format=".2f"),
                                 alt.Tooltip("latency_ms:Q", format=".1f"), alt.Tooltip("chair_i:Q", format=".2f"),
                                 "front"],
        )

    if data["chair_i"].notna().any():
        # Vega-Lite drops a row whose colour field is null, so the combinations without a CHAIR run get a layer
        # of their own in a neutral colour (else only their labels would show).
        has_chair = "isValid(datum.chair_i) && isFinite(datum.chair_i)"
        dots = (points(base.transform_filter(has_chair),
                       alt.Color("chair_i:Q", title="CHAIR_i (%)", scale=alt.Scale(scheme="reds")))
                + points(base.transform_filter(f"!({has_chair})"), alt.value(NO_CHAIR_COLOR)))
    else:
        dots = points(base, alt.value("#1f77b4"))
    labels = base.mark_text(align="left", dx=9, dy=-6, fontSize=11).encode(text="combo:N")
    front = base.transform_filter(alt.datum.front == "on front").mark_line(strokeDash=[4, 3], color="gray").encode(
        order="latency_ms:Q", detail="model:N")
    return (front + dots + labels).properties(height=380)


# ---- the Service page (data prepared by :mod:`vlmguard.dashboard.service_metrics`) ----------------------------


def latency_chart(hist: pd.DataFrame) -> alt.Chart:
    """Successful requests per latency bucket, in bucket order."""
    return alt.Chart(hist).mark_bar().encode(
        x=alt.X("bucket:N", sort=list(hist["bucket"]), title="latency of successful requests"),
        y=alt.Y("requests:Q", title="requests"),
        tooltip=["bucket", "requests"],
    ).properties(height=260)


def batch_chart(batches: pd.DataFrame) -> alt.Chart:
    """Answers by how many requests were decoded, and prefilled, together with them."""
    long = batches.melt("requests together", var_name="step", value_name="answers")
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("requests together:O", title="requests together", axis=alt.Axis(labelAngle=0)),
        xOffset="step:N",
        y=alt.Y("answers:Q", title="answers"),
        color=alt.Color("step:N", title=None),
        tooltip=["requests together", "step", "answers"],
    ).properties(height=260)
