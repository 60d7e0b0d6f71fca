"""Jobs: submit a benchmark sweep as a Ray Job, watch its status, progress and logs, see its runs appear."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import streamlit as st

from vlmguard.dashboard import data
from vlmguard.dashboard.service import JobRow, bench_argv
from vlmguard.dashboard.ui import config, jobs_backend, method_schemas
from vlmguard.errors import VlmguardError
from vlmguard.spec import parse_budget

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_LINES = 200


def render() -> None:
    cfg = config()
    st.title("Jobs")
    backend = jobs_backend(cfg)
    try:
        jobs = backend.list_jobs()
    except Exception as e:  # noqa: BLE001 - any failure: no cluster to talk to
        st.warning(
            f"**The Ray Jobs API is not reachable** at `{backend.address}`. Submitting and watching benchmark "
            "jobs needs the service: start it with `vlmguard serve` (or `make demo`), or point the dashboard at "
            "a cluster with `vlmguard dashboard --jobs-address http://HEAD:8265`. The **Leaderboard** works "
            "without it; benchmarks also run locally with `vlmguard bench ...`.",
            icon=":material/warning:",
        )
        st.caption(f"details: {getattr(e, 'message', None) or e}")
        return
    st.caption(f"Ray Jobs API: `{backend.address}` · results database: `{cfg.db}`")
    for msg in st.session_state.pop("jobs_flash", []):
        st.success(msg)
    _submit_form(backend, cfg)
    if not jobs:
        st.info("No jobs yet. Submit a benchmark sweep above, or with `vlmguard job submit bench pope --limit 20`.")
        return
    st.dataframe(
        [{"job": j.job_id, "status": j.status, "benchmark": j.bench_args, "started": j.started, "ended": j.ended,
          "message": j.message} for j in jobs],
        hide_index=True, key="jobs_table",
    )
    ids = [j.job_id for j in jobs]
    if st.session_state.get("jobs_pick") not in ids:
        st.session_state.pop("jobs_pick", None)
    job_id = st.selectbox("job", ids, key="jobs_pick")
    job = next(j for j in jobs if j.job_id == job_id)
    every = None if job.status in TERMINAL else 3.0
    st.fragment(run_every=every)(_job_detail)(backend, job, cfg.db)


def _submit_form(backend, cfg) -> None:
    schemas = method_schemas()
    with st.expander("Submit a benchmark sweep", expanded=False):
        with st.form("submit_job"):
            c1, c2, c3 = st.columns(3)
            with c1:
                benchmark = st.selectbox("benchmark", ["pope", "chair", "pope-leading"], key="job_bench")
                splits = st.multiselect("POPE splits", ["random", "popular", "adversarial"], default=["random"],
                                        key="job_splits")
                limit = st.number_input("samples per run (limit)", min_value=1, value=20, step=1, key="job_limit")
            with c2:
                pruning = st.selectbox("pruner", list(schemas["pruning"]), key="job_pruning")
                budgets = st.text_input("budgets (comma-separated; one job each)", "36", key="job_budgets")
                decoding = st.selectbox("decoder", list(schemas["decoding"]), key="job_decoding")
            with c3:
                dataset = st.text_input("dataset", "synthcoco", key="job_dataset")
                model = st.text_input("served model (blank: the first)", "", key="job_model")
                db = st.text_input("results database", str(Path(cfg.db).resolve()), key="job_db")
            submitted = st.form_submit_button("Submit")
        if submitted:
            try:
                points = _budgets(budgets) if pruning != "none" else [None]
            except ValueError as e:
                st.error(str(e))
                return
            done: list[str] = []
            for b in points:
                argv = bench_argv(benchmark, db=db, limit=int(limit), splits=splits, pruning=pruning, budget=b,
                                  decoding=decoding, dataset=dataset, model=model or None)
                try:
                    jid = backend.submit(argv)
                except VlmguardError as e:
                    st.error(f"submit failed: {e}")
                    return
                done.append(f"submitted `{jid}`: `bench {' '.join(argv)}`")
                st.session_state["jobs_pick"] = jid  # show the new job (set before the selectbox exists)
            st.session_state["jobs_flash"] = done
            st.rerun()


def _budgets(text: str) -> list[int | float]:
    out: list[int | float] = []
    for part in text.replace(" ", "").split(","):
        if part:
            out.append(parse_budget(part))  # as `vlmguard bench pope --budget` reads it: '1.0' all tokens, '1' one
    if not out:
        raise ValueError("give at least one budget")
    return out


def _job_detail(backend, job: JobRow, dashboard_db: Path) -> None:
    stale = ""
    try:
        fresh = {j.job_id: j for j in backend.list_jobs()}.get(job.job_id, job)
    except Exception as e:  # noqa: BLE001 - keep showing the last known state, and say why
        fresh, stale = job, f" · status not refreshed: {getattr(e, 'message', None) or e}"
    st.subheader(f"Job `{fresh.job_id}`: {fresh.status}")
    st.caption(f"`bench {fresh.bench_args}` · started {fresh.started or '-'} · ended {fresh.ended or '-'}{stale}")
    if fresh.status not in TERMINAL and st.button("Stop job", key=f"stop_{fresh.job_id}"):
        _stop(backend, fresh.job_id)
    _progress(Path(fresh.db or dashboard_db), fresh)
    try:
        logs = backend.logs(fresh.job_id)
    except Exception as e:  # noqa: BLE001
        logs = f"(logs unavailable: {e})"
    lines = logs.splitlines()
    st.markdown(f"**Logs** (last {min(len(lines), LOG_LINES)} of {len(lines)} lines)")
    st.code("\n".join(lines[-LOG_LINES:]) or "(no output yet)", language="text")


def _stop(backend, job_id: str) -> None:
    try:
        backend.stop(job_id)
    except VlmguardError as e:  # a cluster that stopped answering, a job it no longer knows
        st.error(f"stop failed: {e}")
        return
    st.toast(f"stop requested for {job_id}")


def _progress(db: Path, job: JobRow) -> None:
    try:
        runs = _job_runs(db, job)
    except VlmguardError as e:  # not a results database, or a damaged one: the job's logs still show
        st.warning(f"Cannot read the results database: {e}")
        return
    if runs.empty:
        st.caption(f"No runs written to `{db}` since the job started yet.")
    else:
        st.markdown("**Progress** (samples stored in the results database)")
        for _, r in runs.iterrows():
            n, m = int(r["n_samples"] or 0), int(r["n_expected"] or 0)
            # the status column reads 'partial N/M' for a run still writing (or killed): N/M is already here
            done = " · finished" if r["status"] == "finished" else ""
            label = f"{r['benchmark']} {r['split'] or ''} · {r['method']} · {n}/{m}{done}"
            st.progress(min(1.0, n / m) if m else 0.0, text=label)
        cols = [c for c in ("run_id", "benchmark", "split", "method", "status", "n_samples", "accuracy", "f1",
                            "chair_s", "chair_i", "visual_tokens_kept", "total_ms") if runs[c].notna().any()]
        st.dataframe(runs[cols], hide_index=True)


def _job_runs(db: Path, job: JobRow):
    """Runs of the job's database written since the job started."""
    runs = data.load_runs(db)
    if runs.empty or not job.start_time:
        return runs.iloc[0:0]
    start = datetime.fromtimestamp(job.start_time / 1000.0, tz=timezone.utc).isoformat(timespec="milliseconds")
    return runs[runs["updated_at"].fillna("") >= start]


if __name__ == "__main__":
    render()
