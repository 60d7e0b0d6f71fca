"""Benchmark runs never lose results, and a results database they cannot use is named in one line:
SIGTERM stops `vlmguard bench` with a message (it died silently) and the run resumes with nothing lost;
an SQLite file of another program or of a newer schema is refused untouched (bench crashed with a raw
sqlite traceback after altering the file; report did the same); a WAL database on a read-only mount is
read by report (it failed with 'unable to open database file')."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import stop_with_sigterm

from vlmguard.bench import db as dbm
from vlmguard.bench.datasets import synth_dataset
from vlmguard.bench.runner import default_spec, run_benchmark
from vlmguard.cli import main
from vlmguard.errors import InvalidInput

from test_bench_runner import SYNTH, FakeEngine, _count

REPO = Path(__file__).resolve().parents[1]


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigterm_stops_a_bench_run_in_one_line_and_it_resumes(tmp_path):
    db = tmp_path / "t.sqlite"
    cmd = [sys.executable, "-m", "vlmguard.cli", "bench", "pope", "--model", "tiny", "--dataset", str(SYNTH),
           "--split", "all", "--batch-size", "1", "--max-new-tokens", "4", "--db", str(db), "--no-progress"]
    returncode, err = stop_with_sigterm(cmd, lambda: _stored(db) >= 1, cwd=REPO)
    assert returncode == 128 + signal.SIGTERM, (returncode, err)
    assert err.strip().splitlines() == [err.strip()] and "terminated" in err and "Traceback" not in err
    stored = _stored(db)
    assert 1 <= stored < 72
    done = subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["status"] for r in out["runs"]] == ["finished"] * 3
    assert sum(r["n_new"] for r in out["runs"]) == 72 - stored  # nothing regenerated, nothing lost
    for r in out["runs"]:
        assert _count(db, r["run_id"]) == (24, 24)


def _foreign(path: Path) -> Path:
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE runs (x)")
        c.execute("CREATE TABLE other (y)")
    return path


def test_a_foreign_sqlite_file_is_refused_in_one_line_and_left_untouched(tmp_path, capsys):
    db = _foreign(tmp_path / "other.sqlite")
    before = db.read_bytes()
    with pytest.raises(InvalidInput, match=r"--db .*other\.sqlite: not a vlmguard results database \(its runs table"):
        dbm.check_db(db)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmguard: error:") and "not a vlmguard results database" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(InvalidInput, match="not a vlmguard results database"):
        run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope"), db, split="random",
                      progress=False)
    assert db.read_bytes() == before


def test_a_database_of_a_newer_schema_is_refused(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope"), db, split="random", limit=4,
                  progress=False)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(dbm.SCHEMA_VERSION + 1),))
    with pytest.raises(InvalidInput, match=rf"newer vlmguard \(results schema version {dbm.SCHEMA_VERSION + 1}\b"):
        dbm.check_db(db)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "newer vlmguard" in err and len(err.splitlines()) == 1


def test_a_wal_database_on_a_read_only_mount_is_read_and_a_write_names_the_cause(tmp_path, monkeypatch, capsys):
    """On a read-only mount SQLite cannot create a WAL database's -shm file: a plain open answers 'unable to
    open database file' at the first query (simulated here: root ignores permissions, mounts need privileges)."""
    db = tmp_path / "r.sqlite"
    run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope"), db, split="random",
                  progress=False)
    real_connect = sqlite3.connect

    class NoShm:
        def __init__(self, conn: sqlite3.Connection) -> None:
            object.__setattr__(self, "_conn", conn)

        def execute(self, sql, *args):
            if not sql.startswith("PRAGMA busy_timeout"):
                raise sqlite3.OperationalError("unable to open database file")
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def __setattr__(self, name, value):
            setattr(self._conn, name, value)

    def connect(database, *args, uri=False, **kw):
        conn = real_connect(database, *args, uri=uri, **kw)
        return conn if uri else NoShm(conn)

    real_access = os.access
    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode, **kw))
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert row["n_samples"] == 24 and row["status"] == "finished"
    with pytest.raises(InvalidInput, match="read-only"):
        dbm.check_db(db)


def test_ctrl_c_while_the_command_line_starts_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first second (the subcommands' modules importing) printed a KeyboardInterrupt traceback."""
    import vlmguard.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["report"]) == 130
    assert capsys.readouterr().err == "vlmguard: interrupted\n"
