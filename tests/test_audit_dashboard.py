"""Dashboard audit: a damaged or foreign results database is a message on every page (never a traceback), a
directory is not "a database that does not exist yet", budgets read as ``vlmguard bench --budget`` reads them
('1.0' is all tokens, not one), and the Pareto front is drawn among the points the chart shows."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from test_dashboard_data import shared_fixture_db
from test_dashboard_pages import StubClient, StubJobs, all_text, page, quiet_env
from vlmguard.bench import db as dbm
from vlmguard.dashboard import data
from vlmguard.dashboard.service import CLIENT_KEY, JOBS_KEY, JobRow
from vlmguard.errors import InvalidInput


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    return shared_fixture_db(tmp_path_factory)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)
    data.clear_caches()  # the pages' cached reads must see each test's database as it is now


def _damaged_samples_copy(src: Path, dst: Path) -> None:
    """A copy of ``src`` with one page overwritten where its runs still list but some run's samples do not read
    (``database disk image is malformed``), as after a disk error in the middle of the file."""
    raw = src.read_bytes()
    size = int.from_bytes(raw[16:18], "big") or 65536
    for page_no in range(1, len(raw) // size):
        bad = bytearray(raw)
        bad[page_no * size:(page_no + 1) * size] = b"\x5a" * size
        for suffix in ("-wal", "-shm"):
            Path(str(dst) + suffix).unlink(missing_ok=True)
        dst.write_bytes(bytes(bad))
        try:
            runs = dbm.list_runs(dst)
        except Exception:  # noqa: BLE001 - this page breaks the listing too: try another
            continue
        try:
            for r in runs:
                dbm.run_samples(dst, r["run_id"])
        except (sqlite3.DatabaseError, InvalidInput):  # (the results module names the file since 2026-12-05)
            return
    raise AssertionError("no page of the fixture database breaks only its samples")


def test_damaged_or_foreign_database_is_a_message_not_a_traceback(fixture_db, tmp_path, monkeypatch):
    """A damaged samples page raised sqlite3.DatabaseError out of the CHAIR / baseline / samples tabs (the runs
    listed fine); the jobs page's progress raised on a foreign file or one that is no database, hiding the job's
    logs."""
    damaged = tmp_path / "damaged.sqlite"
    _damaged_samples_copy(fixture_db, damaged)
    monkeypatch.setenv("VLMGUARD_DB", str(damaged))
    at = page("leaderboard_page.py").run()
    assert not at.exception, at.exception
    assert any(e.value.startswith("Cannot read the results database") and "malformed" in e.value for e in at.error)
    assert len(at.dataframe[0].value) == len(dbm.list_runs(damaged))  # the leaderboard itself still shows

    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database " * 100)
    for db in (foreign, text):
        jobs = StubJobs([JobRow("raysubmit_a", "RUNNING", f"python -m vlmguard.workers.bench_job pope --db {db}",
                                start_time=1_000)])
        at = page("jobs_page.py")
        at.session_state[JOBS_KEY] = jobs
        at.run()
        assert not at.exception, at.exception
        assert any("Cannot read the results database" in w.value for w in at.warning)
        assert "log line 299" in all_text(at)  # the job's logs still show


def test_directory_as_database_is_an_error_not_missing(tmp_path, monkeypatch):
    """A directory read as 'does not exist yet' and suggested `vlmguard bench ... --db DIR`, which fails."""
    monkeypatch.setenv("VLMGUARD_DB", str(tmp_path))
    at = page("leaderboard_page.py").run()
    assert not at.exception
    assert not at.info and "is a directory" in at.error[0].value


def test_budgets_read_as_the_benchmark_cli_reads_them(fixture_db, monkeypatch):
    """'1.0' is the kept fraction 1 (all tokens, as `vlmguard bench --budget 1.0` and the engine read it): the
    playground sent 1 token and the jobs page submitted `--budget 1`; '2.5' was rounded to 2 tokens (playground) or
    cut to 2 (jobs); 'inf' raised OverflowError on the jobs page; '0' and '-5' were submitted as jobs."""
    stub = StubClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.checkbox(key="pg_compare").uncheck()
    at.selectbox(key="pg_pruning").select("fastv")
    at.text_input(key="pg_budget").input("1.0")
    at.button(key="pg_go").click().run()
    assert not at.exception
    (call,) = stub.calls
    assert call["budget"] == 1.0 and isinstance(call["budget"], float)
    at.text_input(key="pg_budget").input("36.0").run()
    assert not at.error and not at.button(key="pg_go").disabled
    at.text_input(key="pg_budget").input("2.5").run()
    assert at.button(key="pg_go").disabled and any("kept fraction" in e.value for e in at.error)

    monkeypatch.setenv("VLMGUARD_DB", str(fixture_db))
    for text, want in (("1.0, 16", ["1.0", "16"]), ("inf", None), ("36.5", None), ("0", None), ("-5", None)):
        jobs = StubJobs([])
        at = page("jobs_page.py")
        at.session_state[JOBS_KEY] = jobs
        at.run()
        at.selectbox(key="job_pruning").select("fastv")
        at.text_input(key="job_budgets").input(text)
        next(b for b in at.button if b.label == "Submit").click().run()
        assert not at.exception, (text, at.exception)
        assert [argv[argv.index("--budget") + 1] for argv in jobs.submitted] == (want or []), text
        assert bool(at.error) == (want is None), text


def test_pareto_front_is_among_the_points_drawn():
    """On a POPE split where a combination has only a CHAIR run, that run's latency (captions) was compared with the
    POPE runs' and made the only point drawn look dominated by one the chart does not show."""
    def run(**kw):
        base = dict(model="m", pruning=None, budget=None, decoding=None, decoding_params=None, status="finished",
                    split=None, accuracy=None, total_ms=None, chair_i=None, chair_s=None)
        return {**base, **kw}

    df = pd.DataFrame([
        run(benchmark="pope", run_id="p", split="popular", pruning="random", budget=8, accuracy=73.0, total_ms=50.0),
        run(benchmark="chair", run_id="c", split="test", decoding="m3id", total_ms=40.0, chair_i=15.0, chair_s=20.0),
    ])
    frame = data.pareto_frame(df, "total_ms", "popular").set_index("combo")
    assert frame.loc["random@8 + greedy", "pareto"]  # the one point of the chart is not dominated
    assert not frame.loc["none + m3id", "pareto"]  # no POPE accuracy: not a point of the chart
    shown = frame.dropna(subset=["accuracy", "latency_ms"])
    assert list(shown.index) == ["random@8 + greedy"]


def test_playground_says_the_api_key_was_refused_not_that_the_service_is_down():
    """A service that answers 401 (no or a wrong VLMGUARD_API_KEY) read as 'not reachable ... start it with
    `vlmguard serve`', which is no help: it is up."""
    from vlmguard.client import APIError

    class Refusing(StubClient):
        def models(self):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')")

    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = Refusing()
    at.run()
    assert not at.exception
    (warning,) = [w.value for w in at.warning]
    assert "refused the dashboard's API key" in warning and "VLMGUARD_API_KEY" in warning
    assert "not reachable" not in warning and not at.button


def test_tokens_sampled_off_the_main_branch_are_not_credited_to_the_decoder():
    """With temperature > 0 a drawn token other than the main branch's most likely read 'the decoder changed N
    token(s)', in the plain model's (greedy) column too."""

    class Sampling(StubClient):
        def _result(self, spec):
            r = super()._result(spec)
            if spec.get("do_sample"):  # the draw at step 1 is not the main branch's most likely token
                r.steps[1].main_top_id = 98
            return r

    stub = Sampling()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.selectbox(key="pg_pruning").select("fastv")
    at.text_input(key="pg_budget").input("6")
    at.selectbox(key="pg_decoding").select("vcd")
    at.slider(key="pg_temperature").set_value(0.7)
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    with_methods, plain = [m.value for m in at.markdown if m.value.startswith("**Per-token probabilities**")]
    assert "sampling or the decoder changed 2 token(s): `0:No`, `1:dog`" in with_methods
    assert "sampling changed 1 token(s): `1:a`" in plain and "decoder changed" not in plain
    at.slider(key="pg_temperature").set_value(0.0)
    at.button(key="pg_go").click().run()
    assert "the decoder changed 1 token(s): `0:No`" in all_text(at)  # greedy selection: the decoder's doing



def test_report_on_a_damaged_database_is_one_line(fixture_db, tmp_path, capsys):
    """`vlmguard report` on a file damaged mid-way (its runs no longer read) printed a raw sqlite3 traceback."""
    from vlmguard.cli import main

    raw, bad = fixture_db.read_bytes(), tmp_path / "damaged.sqlite"
    size = int.from_bytes(raw[16:18], "big") or 65536
    for page_no in range(1, len(raw) // size):  # the first page whose damage breaks the listing of runs
        bad.write_bytes(raw[:page_no * size] + b"\x5a" * size + raw[(page_no + 1) * size:])
        try:
            dbm.list_runs(bad)
        except InvalidInput as e:
            if "cannot read" in str(e):  # it opened, then a later page failed (not the file's first pages)
                break
    else:
        raise AssertionError("no damaged page breaks the listing of runs after the database opened")
    assert main(["report", "--db", str(bad), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlmguard: error: {bad}: cannot read the results database") and err.count("\n") == 1, err
