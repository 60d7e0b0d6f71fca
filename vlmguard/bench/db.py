"""The results database: one SQLite file (WAL), written sample by sample, safe to resume and to share
between processes (Ray shards write to the same file; every write is idempotent per sample key).

Schema (``SCHEMA_VERSION`` 1)::

    runs      one row per benchmark run; run_id = first 16 hex of sha256(canonical JSON of ``knobs``),
              so re-running the same command (same protocol knobs) resumes the same run.
      run_id TEXT PK, benchmark TEXT ('pope' | 'pope-leading' | 'chair'), model TEXT, model_family TEXT,
      model_revision TEXT (weights fingerprint of a model loaded from a directory, so a retrained model
      under the same name starts new runs; added by migration to older databases), dtype TEXT (the weights'
      precision when not float32, so a bf16 run is not an fp32 one; NULL for float32 and in older databases),
      dataset TEXT, dataset_version TEXT, split TEXT (POPE split; image split for CHAIR),
      variant TEXT (POPE-leading template id / CHAIR preset), question_file TEXT, question_sha256 TEXT,
      prompt_preset TEXT, prompt TEXT (instruction / CHAIR prompt), parser TEXT,
      pruning TEXT, pruning_params TEXT (JSON), budget NUMERIC, decoding TEXT, decoding_params TEXT (JSON),
      max_new_tokens INT, do_sample INT, temperature REAL, top_p REAL, top_k INT, seed INT,
      presence_penalty REAL, frequency_penalty REAL, repetition_penalty REAL, min_new_tokens INT, image_aspect
      TEXT (NULL unless the run sets them, image_aspect when not the processor's own; added by migration to older
      databases),
      image_list TEXT (CHAIR image-id list), drop_incomplete INT, neutral_run_id TEXT (POPE-leading),
      knobs TEXT (canonical JSON of every knob above), package_version TEXT, n_expected INT,
      status TEXT ('running' | 'finished' | 'failed'), metrics TEXT (JSON, cached at finish),
      created_at TEXT, updated_at TEXT, finished_at TEXT (ISO-8601 UTC)
    samples   one row per generated answer / caption; UNIQUE(run_id, sample_key) makes writes idempotent
      id INT PK, run_id TEXT, sample_key TEXT ('q:<question_id>' | 'img:<image_id>'), item_id TEXT,
      image TEXT, prompt TEXT (the user text sent), output_text TEXT, label TEXT (POPE), prediction TEXT
      (parsed yes/no, NULL = unknown), correct INT, record TEXT (JSON: CHAIR per-caption record, or the
      POPE-leading cue), finish_reason TEXT, prompt_tokens INT, generated_tokens INT, visual_tokens INT,
      visual_tokens_kept REAL (mean over LLM layers), visual_tokens_kept_layers TEXT (JSON list),
      prefill_s REAL, ttft_s REAL, total_s REAL, timings TEXT (JSON), created_at TEXT, prefill_flops REAL (the
      answer's analytic prefill FLOPs, ``GenerationResult.prefill_flops["total"]``; NULL in older databases)
    meta      key/value (schema_version)

Query functions for the dashboard and reports: :func:`list_runs`, :func:`run_samples`, :func:`run_metrics`.
They take a path or an open connection.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlmguard.errors import InvalidInput

SCHEMA_VERSION = 1
DEFAULT_DB = Path("runs") / "vlmguard.sqlite"

RUN_COLUMNS = (
    "benchmark", "model", "model_family", "model_revision", "dtype", "dataset", "dataset_version", "split", "variant",
    "question_file", "question_sha256", "prompt_preset", "prompt", "parser", "pruning", "pruning_params",
    "budget", "decoding", "decoding_params", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
    "seed", "image_list", "drop_incomplete", "neutral_run_id", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_new_tokens", "image_aspect", "quantization",
)
SAMPLE_COLUMNS = (
    "sample_key", "item_id", "image", "prompt", "output_text", "label", "prediction", "correct", "record",
    "finish_reason", "prompt_tokens", "generated_tokens", "visual_tokens", "visual_tokens_kept",
    "visual_tokens_kept_layers", "prefill_s", "ttft_s", "total_s", "timings", "prefill_flops",
)
_JSON_RUN = {"pruning_params", "decoding_params"}
_JSON_SAMPLE = {"record", "visual_tokens_kept_layers", "timings"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY,
  benchmark TEXT NOT NULL, model TEXT NOT NULL, model_family TEXT, model_revision TEXT, dtype TEXT,
  dataset TEXT NOT NULL,
  dataset_version TEXT, split TEXT, variant TEXT, question_file TEXT, question_sha256 TEXT,
  prompt_preset TEXT, prompt TEXT, parser TEXT, pruning TEXT, pruning_params TEXT, budget NUMERIC,
  decoding TEXT, decoding_params TEXT, max_new_tokens INTEGER, do_sample INTEGER, temperature REAL,
  top_p REAL, top_k INTEGER, seed INTEGER, image_list TEXT, drop_incomplete INTEGER, neutral_run_id TEXT,
  presence_penalty REAL, frequency_penalty REAL, repetition_penalty REAL, min_new_tokens INTEGER, image_aspect TEXT,
  quantization TEXT,
  knobs TEXT NOT NULL, package_version TEXT, n_expected INTEGER, status TEXT NOT NULL DEFAULT 'running',
  metrics TEXT, created_at TEXT NOT NULL, updated_at TEXT, finished_at TEXT
);
CREATE TABLE IF NOT EXISTS samples (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
  sample_key TEXT NOT NULL, item_id TEXT, image TEXT, prompt TEXT, output_text TEXT, label TEXT,
  prediction TEXT, correct INTEGER, record TEXT, finish_reason TEXT, prompt_tokens INTEGER,
  generated_tokens INTEGER, visual_tokens INTEGER, visual_tokens_kept REAL, visual_tokens_kept_layers TEXT,
  prefill_s REAL, ttft_s REAL, total_s REAL, timings TEXT, created_at TEXT NOT NULL, prefill_flops REAL,
  UNIQUE (run_id, sample_key)
);
CREATE INDEX IF NOT EXISTS samples_by_run ON samples(run_id);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


BUSY_TIMEOUT_S = 60.0


def require_db_file(path: str | Path) -> None:
    """A reader's database must exist as a file (one line saying what is there instead)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"{p}: {'is a directory, not a results database' if p.is_dir() else 'results database not found'}")


def connect(path: str | Path = DEFAULT_DB, *, create: bool = True) -> sqlite3.Connection:
    """Open (and create) the database: WAL journal, 60 s busy timeout, rows as ``sqlite3.Row``.

    ``create=False`` (readers): the file must exist; one this process cannot write is opened read-only."""
    p = Path(path)
    if not create:
        require_db_file(p)
    if p.is_dir():
        raise InvalidInput(f"{p}: is a directory, expected an SQLite file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInput(f"{p}: cannot create the results database's folder ({e.strerror or e})") from None
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.02
    while True:
        try:
            conn = sqlite3.connect(str(p), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise InvalidInput(f"{p}: cannot open the results database ({e})") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            problem = _schema_problem(conn, create=create)
            if problem is not None:
                conn.close()  # never turn some other SQLite file, or a newer schema, into this version's database
                raise InvalidInput(f"{p}: {problem}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            return conn
        except sqlite3.DatabaseError as e:
            conn.close()
            unable = isinstance(e, sqlite3.OperationalError) and "unable to open" in str(e)
            if _is_readonly(e) or (unable and not _writable(p)):
                # A file this process may not write (another user's results, a read-only folder or mount, where
                # SQLite can create neither the file nor a WAL database's -shm): a reader (report, compare,
                # dashboard) opens it read-only without the schema script's write; a writer fails naming the
                # cause rather than calling the file "not a results database".
                if create:
                    raise InvalidInput(f"{p}: the results database (or its folder) is read-only, "
                                       "cannot write results to it") from None
                return _connect_readonly(p)
            # Opening a new database while other connections open it too (two shards of one job, a
            # reader watching it) can hit SQLITE_BUSY in the journal-mode switch or the schema script
            # without SQLite's busy handler waiting: wait and try again rather than fail the job.
            if _is_busy(e) and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            if _is_busy(e):
                raise InvalidInput(f"{p}: the results database stayed locked for {BUSY_TIMEOUT_S:.0f} s "
                                   f"(another process is writing it?)") from None
            if unable:
                raise InvalidInput(f"{p}: cannot open the results database ({e})") from None
            raise InvalidInput(f"{p}: not a vlmguard results database ({e})") from None


def check_db(path: str | Path, option: str = "--db") -> Path:
    """Open (creating when missing) the results database a command will write, before its work starts, so
    a bad path (a folder, an unwritable place, not a database) fails at once with one line naming ``option``."""
    p = Path(path)
    try:
        conn = connect(p)
        try:
            missing = _missing_columns(conn)
        finally:
            conn.close()
        if missing:
            raise InvalidInput(f"{p}: not a vlmguard results database ({missing})")
    except InvalidInput as e:
        raise InvalidInput(f"{option} {e}") from None
    return p


# Columns every results database has had (an earlier version's runs table lacks some run columns, added by
# ``_migrate``); a table of these names without them belongs to some other program.
_KEY_COLUMNS = {
    "runs": {"run_id", "benchmark", "model", "knobs", "status", "created_at"},
    "samples": {"run_id", "sample_key"},
    "meta": {"key", "value"},
}


def _schema_problem(conn: sqlite3.Connection, *, create: bool) -> str | None:
    """Why an existing SQLite file is not a results database this version may open, or None.

    An empty file (or one holding only the ``meta`` table of an interrupted creation) is a new database for
    a writer. Nothing is written before this check passes."""
    tables = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if "runs" not in tables and not (create and tables <= {"meta"}):
        return "not a vlmguard results database (it has no runs table)"
    for table, need in _KEY_COLUMNS.items():
        if table in tables:
            lacking = need - {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if lacking:
                return f"not a vlmguard results database (its {table} table has no {', '.join(sorted(lacking))} column)"
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if "meta" in tables else None
    if row is None:
        return None
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        return f"not a vlmguard results database (schema_version {row[0]!r})"
    if version > SCHEMA_VERSION:
        return (f"written by a newer vlmguard (results schema version {version}, this version knows {SCHEMA_VERSION}); "
                f"upgrade vlmguard or use another --db")
    return None


@lru_cache(maxsize=1)
def _schema_columns() -> dict[str, frozenset[str]]:
    """The columns of this version's ``runs`` and ``samples`` tables, read from ``_SCHEMA`` itself."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(_SCHEMA)
        return {t: frozenset(r[1] for r in mem.execute(f"PRAGMA table_info({t})")) for t in ("runs", "samples")}
    finally:
        mem.close()


def _missing_columns(conn: sqlite3.Connection) -> str | None:
    """The columns a writer needs that the (migrated) database lacks, in words, or None."""
    for table, cols in _schema_columns().items():
        lacking = cols - {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if lacking:
            return f"its {table} table has no {', '.join(sorted(lacking))} column"
    return None


def _writable(p: Path) -> bool:
    return (not p.exists() or os.access(p, os.W_OK)) and os.access(p.parent, os.W_OK)


def _is_readonly(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == 8) or "readonly" in str(e)  # SQLITE_READONLY (any extended code)


def _connect_readonly(p: Path) -> sqlite3.Connection:
    """Open an existing results database that this process cannot write, for reading only.

    A WAL database in a folder this process cannot write either has no ``-shm`` file SQLite could create:
    it is then read as immutable, but only when no ``-wal`` file holds samples not yet in the main file."""
    wal = Path(f"{p}-wal")
    modes = ["mode=ro"]
    if not (wal.exists() and wal.stat().st_size > 0):
        modes.append("mode=ro&immutable=1")
    err: sqlite3.Error | None = None
    for mode in modes:
        conn = None
        try:
            conn = sqlite3.connect(f"{p.resolve().as_uri()}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("SELECT COUNT(*) FROM runs").fetchone()
            conn.execute("SELECT COUNT(*) FROM samples").fetchone()
            problem = _schema_problem(conn, create=False)
            if problem is not None:
                conn.close()
                raise InvalidInput(f"{p}: {problem}")
            return conn
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            err = e
    raise InvalidInput(f"{p}: cannot read the read-only results database ({err})")


def _is_busy(e: sqlite3.DatabaseError) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def _migrate(conn: sqlite3.Connection) -> None:
    """Add run and sample columns that databases written by earlier versions lack (their rows keep NULL there)."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    for col, kind in (("model_revision", "TEXT"), ("dtype", "TEXT"), ("presence_penalty", "REAL"),
                      ("frequency_penalty", "REAL"), ("repetition_penalty", "REAL"), ("min_new_tokens", "INTEGER"),
                      ("image_aspect", "TEXT"), ("quantization", "TEXT")):
        if col not in have:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {col} {kind}")
    if "prefill_flops" not in {r[1] for r in conn.execute("PRAGMA table_info(samples)")}:
        conn.execute("ALTER TABLE samples ADD COLUMN prefill_flops REAL")


@contextmanager
def _open(db: Any) -> Iterator[sqlite3.Connection]:
    if isinstance(db, sqlite3.Connection):
        yield db
        return
    conn = connect(db, create=False)
    try:
        yield conn
    except sqlite3.DatabaseError as e:  # a damaged file: its first pages read, a later one does not
        raise InvalidInput(f"{db}: cannot read the results database ({e})") from None
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_id_for(knobs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(knobs).encode()).hexdigest()[:16]


def ensure_run(conn: sqlite3.Connection, knobs: dict[str, Any], *, n_expected: int, package_version: str) -> str:
    """Create the run for these knobs, or reopen it (resume). Returns the run id."""
    unknown = set(knobs) - set(RUN_COLUMNS)
    if unknown:
        raise ValueError(f"unknown run knobs: {sorted(unknown)}")
    run_id = run_id_for(knobs)
    values = {k: (canonical_json(knobs.get(k)) if k in _JSON_RUN else knobs.get(k)) for k in RUN_COLUMNS}
    if isinstance(values.get("do_sample"), bool):
        values["do_sample"] = int(values["do_sample"])
    if isinstance(values.get("drop_incomplete"), bool):
        values["drop_incomplete"] = int(values["drop_incomplete"])
    ts = now()
    cols = ", ".join(RUN_COLUMNS)
    marks = ", ".join("?" for _ in RUN_COLUMNS)
    with transaction(conn):
        conn.execute(
            f"INSERT OR IGNORE INTO runs (run_id, {cols}, knobs, package_version, n_expected, status, created_at, updated_at)"
            f" VALUES (?, {marks}, ?, ?, ?, 'running', ?, ?)",
            (run_id, *[values[k] for k in RUN_COLUMNS], canonical_json(knobs), package_version, n_expected, ts, ts),
        )
        conn.execute(
            "UPDATE runs SET n_expected = MAX(COALESCE(n_expected, 0), ?), package_version = ?, updated_at = ?,"
            " status = CASE WHEN status = 'finished' AND ? <= (SELECT COUNT(*) FROM samples WHERE run_id = ?)"
            " THEN 'finished' ELSE 'running' END WHERE run_id = ?",
            (n_expected, package_version, ts, n_expected, run_id, run_id),
        )
    return run_id


def done_keys(conn: sqlite3.Connection, run_id: str) -> set[str]:
    return {r[0] for r in conn.execute("SELECT sample_key FROM samples WHERE run_id = ?", (run_id,))}


def add_samples(conn: sqlite3.Connection, run_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Insert samples; a key already present is ignored (idempotent). Returns how many were new."""
    cols = ", ".join(SAMPLE_COLUMNS)
    marks = ", ".join("?" for _ in SAMPLE_COLUMNS)
    ts = now()
    inserted = 0
    with transaction(conn):
        for row in rows:
            vals = []
            for k in SAMPLE_COLUMNS:
                v = row.get(k)
                if k in _JSON_SAMPLE and v is not None:
                    v = json.dumps(v, ensure_ascii=False)
                elif isinstance(v, bool):
                    v = int(v)
                vals.append(v)
            cur = conn.execute(
                f"INSERT OR IGNORE INTO samples (run_id, {cols}, created_at) VALUES (?, {marks}, ?)",
                (run_id, *vals, ts),
            )
            inserted += cur.rowcount
        conn.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (ts, run_id))
    return inserted


def finish_run(conn: sqlite3.Connection, run_id: str, metrics: dict[str, Any] | None, status: str = "finished") -> None:
    ts = now()
    with transaction(conn):
        conn.execute(
            "UPDATE runs SET status = ?, metrics = ?, finished_at = ?, updated_at = ? WHERE run_id = ?",
            (status, json.dumps(metrics) if metrics is not None else None, ts if status == "finished" else None, ts, run_id),
        )


def finish_if_complete(conn: sqlite3.Connection, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics over the stored samples, and the run marked finished (metrics cached) when every expected
    sample is stored. One write transaction: a process that meanwhile raises ``n_expected`` (the same run
    with a larger --limit) or adds samples cannot leave the run finished with stale metrics. A run already
    finished keeps its ``finished_at``. Returns (run, metrics)."""
    from vlmguard.bench.metrics import metrics_for_run

    with transaction(conn):
        run = get_run(conn, run_id)
        metrics = metrics_for_run(conn, run)
        if run["n_samples"] >= (run["n_expected"] or 0):
            ts = now()
            conn.execute(
                "UPDATE runs SET finished_at = CASE WHEN status = 'finished' AND finished_at IS NOT NULL"
                " THEN finished_at ELSE ? END, status = 'finished', metrics = ?, updated_at = ? WHERE run_id = ?",
                (ts, json.dumps(metrics), ts, run_id),
            )
            run["status"] = "finished"
    return run, metrics


def _decode_run(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k in (*_JSON_RUN, "knobs", "metrics"):
        if d.get(k) is not None:
            d[k] = json.loads(d[k])
    return d


def _decode_sample(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k in _JSON_SAMPLE:
        if d.get(k) is not None:
            d[k] = json.loads(d[k])
    return d


def get_run(db: Any, run_id: str) -> dict[str, Any]:
    with _open(db) as conn:
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise InvalidInput(f"no run {run_id!r} in the results database")
        d = _decode_run(row)
        d["n_samples"] = conn.execute("SELECT COUNT(*) FROM samples WHERE run_id = ?", (run_id,)).fetchone()[0]
        return d


def run_samples(db: Any, run_id: str) -> list[dict[str, Any]]:
    """All samples of a run, in insertion order, JSON columns decoded."""
    with _open(db) as conn:
        return [_decode_sample(r) for r in conn.execute("SELECT * FROM samples WHERE run_id = ? ORDER BY id", (run_id,))]


def run_metrics(db: Any, run_id: str) -> dict[str, Any]:
    """Metrics recomputed from the stored samples (so partial and resumed runs are always current)."""
    from vlmguard.bench.metrics import metrics_for_run

    with _open(db) as conn:
        run = get_run(conn, run_id)
        return metrics_for_run(conn, run)


def list_runs(db: Any, *, with_metrics: bool = True) -> list[dict[str, Any]]:
    """Every run (newest first) with its knobs, sample count and metrics."""
    with _open(db) as conn:
        counts = dict(conn.execute("SELECT run_id, COUNT(*) FROM samples GROUP BY run_id").fetchall())
        out = []
        for row in conn.execute("SELECT * FROM runs ORDER BY created_at DESC, run_id"):
            d = _decode_run(row)
            d["n_samples"] = counts.get(d["run_id"], 0)
            if with_metrics:
                if d["status"] != "finished" or d.get("metrics") is None:
                    from vlmguard.bench.metrics import metrics_for_run

                    d["metrics"] = metrics_for_run(conn, d)
            out.append(d)
        return out
