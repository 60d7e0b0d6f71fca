"""Leaderboard: every run of the results database, filterable, with comparison plots and a per-sample drill-down."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st
from PIL import Image

from vlmguard.dashboard import charts, data
from vlmguard.dashboard.ui import config
from vlmguard.errors import VlmguardError


def render() -> None:
    cfg = config()
    st.title("Leaderboard")
    st.caption(f"Results database: `{cfg.db}`")
    try:
        state = data.db_state(cfg.db)
    except VlmguardError as e:  # not an SQLite file, or not ours
        st.error(f"Cannot read the results database: {e}")
        return
    if state != "ready":
        what = "does not exist yet" if state == "missing" else "has no runs yet"
        st.info(f"**The results database {what}.**\n\n" + data.FILL_HELP.format(db=cfg.db), icon=":material/info:")
        return
    if st.button("Reload", help="re-read the database (new runs appear automatically on the next interaction)"):
        data.clear_caches()
    runs = data.load_runs(cfg.db)
    shown = data.filter_runs(runs, _filters(runs))
    st.markdown(f"**{len(shown)} of {len(runs)} runs**")
    _table(shown)
    tab_tokens, tab_chair, tab_vs, tab_pareto, tab_samples = st.tabs(
        ["Accuracy vs tokens kept", "CHAIR per decoder", "Against a baseline",
         "Pareto: accuracy / speed / hallucination", "Samples"])
    with tab_tokens:
        _tokens_plot(shown)
    with tab_chair:
        _readable(_chair_plot, cfg, shown)
    with tab_vs:
        _readable(_baseline_table, cfg, shown)
    with tab_pareto:
        _pareto_plot(shown)
    with tab_samples:
        _readable(_drilldown, cfg, shown)


def _readable(draw, cfg, shown: pd.DataFrame) -> None:
    """A tab that reads samples: a database damaged there (its runs read fine) is a message in that tab."""
    try:
        draw(cfg, shown)
    except VlmguardError as e:
        st.error(f"Cannot read the results database: {e}")


def _filters(runs: pd.DataFrame) -> data.RunFilter:
    opts = data.filter_options(runs)
    with st.expander("Filters", expanded=True):
        cols = st.columns(len(data.FILTER_COLUMNS))
        values = {}
        for col, name in zip(cols, data.FILTER_COLUMNS):
            with col:
                values[name] = st.multiselect(name, opts[name], key=f"flt_{name}", placeholder="all")
        c1, c2, c3 = st.columns([2, 2, 1])
        with c1:
            search = st.text_input("search (model, method, parameters, run id)", key="flt_search")
        budget_range = None
        budgets = runs["budget"].dropna()
        with c2:
            if budgets.nunique() > 1:
                lo, hi = float(budgets.min()), float(budgets.max())
                budget_range = st.slider("budget", lo, hi, (lo, hi), key="flt_budget")
        with c3:
            finished = st.checkbox("finished runs only", key="flt_finished")
    return data.RunFilter(values=values, budget_range=budget_range, search=search, finished_only=finished)


def _table(shown: pd.DataFrame) -> None:
    cols = data.visible_columns(shown)
    fmt = {c: st.column_config.NumberColumn(c, format="%.2f") for c in data.METRIC_COLUMNS if c in cols}
    fmt["budget"] = st.column_config.NumberColumn("budget", format="%g")
    st.dataframe(shown[cols], hide_index=True, column_config=fmt, key="leaderboard_table")


def _tokens_plot(shown: pd.DataFrame) -> None:
    metric = st.radio("metric", ["accuracy", "f1"], horizontal=True, key="tokens_metric",
                      format_func=lambda m: {"accuracy": "accuracy", "f1": "F1"}[m])
    curve = data.tokens_curve(shown, metric)
    if curve.empty:
        st.info("No POPE runs with visual-token counts among the shown runs.")
        return
    st.altair_chart(charts.tokens_chart(curve, metric), width="stretch")


def _chair_plot(cfg, shown: pd.DataFrame) -> None:
    long = data.chair_by_decoder(shown)
    if long.empty:
        st.info("No CHAIR runs among the shown runs (`vlmguard bench chair ...`).")
        return
    st.altair_chart(charts.chair_chart(long), width="stretch")
    st.dataframe(long.pivot_table(index=["decoder", "method", "model"], columns="metric", values="value").reset_index(),
                 hide_index=True)
    kinds = data.hallucination_kinds(cfg.db, shown)
    if kinds.empty:
        return
    st.subheader("Hallucinations by kind (SynthCOCO)")
    st.caption("Each mention CHAIR counts as hallucinated, traced in the world's scene graph: a nearly invisible "
               "object that is there (the planted prior), the co-occurrence partner of a visible object, another "
               "object of the scene's type, or one foreign to it (`vlmguard synth hallucinations`).")
    st.altair_chart(charts.hallucination_chart(kinds), width="stretch")
    st.dataframe(kinds.pivot_table(index="kind", columns="method", values="count", aggfunc="sum").reset_index(),
                 hide_index=True, key="hallucination_kinds")


def _baseline_table(cfg, shown: pd.DataFrame) -> None:
    labels = sorted(set(shown["method"])) if len(shown) else []
    if not labels:
        st.info("No runs shown.")
        return
    baseline = st.selectbox("baseline", labels, index=labels.index("base") if "base" in labels else 0,
                            key="vs_baseline", help="method label of the run every other run is compared with")
    frame = data.comparisons(cfg.db, baseline, shown)
    if frame.empty:
        st.info(f"No shown POPE or CHAIR run shares its questions with a `{baseline}` run.")
        return
    st.caption("Each run against the baseline run of the same benchmark, split and questions: CHAIR_i, CHAIR_s and "
               "CHAIR_i over distinct objects as relative changes (%), POPE accuracy in points and as the share of "
               "the baseline's kept (%), with 95% paired bootstrap intervals over images (`vlmguard compare`). "
               "'significant': the interval excludes no change. Where several runs of a group carry the baseline's "
               "label (settings it does not show: sampling, seed), the newest is the baseline: `baseline_run`.")
    st.dataframe(frame.drop(columns="run_id"), hide_index=True, key="vs_table",
                 column_config={c: st.column_config.NumberColumn(format="%.2f")
                                for c in ("baseline", "value", "change", "ci_low", "ci_high")})


def _pareto_plot(shown: pd.DataFrame) -> None:
    speed = st.radio("speed", ["total_ms", "prefill_ms", "ttft_ms"], horizontal=True, key="pareto_speed")
    splits = data.pope_splits(shown)  # one split at a time: accuracies of different splits are not comparable
    split = st.radio("POPE split", splits, horizontal=True, key="pareto_split") if splits else None
    frame = data.pareto_frame(shown, speed, split)
    pts = frame.dropna(subset=["accuracy", "latency_ms"]) if not frame.empty else frame
    if pts.empty:
        st.info("The Pareto view needs POPE runs with timings (and CHAIR runs of the same method for the "
                "hallucination axis).")
        return
    st.caption("Higher accuracy, lower latency and lower CHAIR_i are better; diamonds are not dominated on the "
               "axes each pair of combinations shares (per model); grey points have no CHAIR run; '(partial)': a "
               "run of the combination is not finished, its numbers cover the samples stored so far.")
    st.altair_chart(charts.pareto_chart(frame), width="stretch")
    st.dataframe(frame[["model", "combo", "accuracy", "latency_ms", "chair_i", "chair_s", "pareto"]], hide_index=True)


def _run_label(row: pd.Series) -> str:
    bits = [row["benchmark"], row["model"], row["method"]]
    if isinstance(row.get("split"), str):
        bits.append(row["split"])
    return f"{' · '.join(str(b) for b in bits)}{data.partial_note(row)}  ({row['run_id']})"


def _drilldown(cfg, shown: pd.DataFrame) -> None:
    if shown.empty:
        st.info("No runs match the filters.")
        return
    labels = {r["run_id"]: _run_label(r) for _, r in shown.iterrows()}
    run_id = st.selectbox("run", list(labels), format_func=labels.get, key="drill_run")
    run = data.load_run(cfg.db, run_id)
    samples = data.load_samples(cfg.db, run_id)
    if not samples:
        st.info("This run has no samples yet.")
        return
    bench = run["benchmark"]
    frame = data.samples_frame(samples, bench)
    only = st.checkbox("only hallucinated captions" if bench == "chair" else "only wrong answers", key="drill_only")
    if only:
        frame = frame[frame["hallucinated"] != ""] if bench == "chair" else frame[frame["correct"] == False]  # noqa: E712
    st.dataframe(frame, hide_index=True, key="drill_table")
    if frame.empty:
        st.info("No sample matches.")
        return
    by_key = {s["sample_key"]: s for s in samples}
    key = st.selectbox("sample", list(frame["sample_key"]), key="drill_sample",
                       format_func=lambda k: f"{k} · {by_key[k].get('image')}")
    _sample_detail(cfg, run, by_key[key])


def _sample_detail(cfg, run: dict, s: dict) -> None:
    left, right = st.columns([1, 2])
    with left:
        path = data.find_image(run, s.get("image"), cfg.image_dirs)
        if path is not None:
            with Image.open(path) as im:
                st.image(im.convert("RGB"), caption=s.get("image"), width=320)
        else:
            st.info(f"Image `{s.get('image')}` not found (dataset `{run.get('dataset')}`); add its folder to "
                    "`VLMGUARD_IMAGE_DIRS` to see it here.")
    with right:
        st.markdown("**Question / prompt**")
        st.text(s.get("prompt") or "")
        if run["benchmark"] == "chair":
            rec = s.get("record") or {}
            marked, found = data.highlight_caption(rec)
            st.markdown("**Caption** (hallucinated objects highlighted)")
            st.markdown(f'<div class="caption-drill">{marked}</div>', unsafe_allow_html=True)
            halluc = rec.get("mscoco_hallucinated_words") or []
            st.markdown("**Hallucinated objects:** " + (", ".join(f"{w} → {c}" for w, c in halluc) or "none"))
            st.markdown("**Objects in the image (ground truth):** " + ", ".join(rec.get("mscoco_gt_words") or []))
            m = rec.get("metrics") or {}
            c1, c2, c3 = st.columns(3)
            c1.metric("CHAIR_s", m.get("CHAIRs"))
            c2.metric("CHAIR_i", _num(m.get("CHAIRi")))
            c3.metric("recall", _num(m.get("Recall")))
        else:
            st.markdown("**Answer**")
            st.text(s.get("output_text") or "")
            c1, c2, c3 = st.columns(3)
            c1.metric("label", s.get("label") or "-")
            c2.metric("parsed prediction", s.get("prediction") or "unknown")
            c3.metric("correct", "yes" if s.get("correct") else "no")
            cue = (s.get("record") or {}).get("cue")
            if cue:
                st.caption(f"leading cue: {cue}")
        t = s.get("timings") or {}
        st.caption(f"visual tokens kept (mean over layers): {_num(s.get('visual_tokens_kept'))} of "
                   f"{s.get('visual_tokens')} · prefill {_ms(t.get('prefill_s'))} · total {_ms(t.get('total_s'))}")


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _ms(v) -> str:
    return "-" if v is None else f"{1000 * v:.1f} ms"


if __name__ == "__main__":
    render()
