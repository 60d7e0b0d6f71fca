"""Benchmark sweeps as Ray Jobs (Ray Jobs API, ``JobSubmissionClient``).

The job's entrypoint is ``python -m vlmguard.workers.bench_job <benchmark> <args>`` (see ``bench_job.py``).
Paths in the arguments (database, dataset directory, image-id list, ...) are made absolute, because the
job runs in its own working directory on the cluster's head node; on a remote cluster they must name
paths that exist there.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.registry import PLUGINS_ENV

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
PATH_FLAGS = ("--db", "--coco-images", "--coco-annotations", "--pope-dir", "--gt", "--image-ids")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 90.0
# every Jobs API request: (connect, read) seconds; Ray's JobSubmissionClient sets none (requests waits for ever), so a
# head node that takes connections but never answers would hang `vlmguard job ...` without a word
JOBS_CONNECT_TIMEOUT_S = 10.0
JOBS_READ_TIMEOUT_S = 60.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_T = TypeVar("_T")
_EXC_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception): (.+)$")


def error_text(e: BaseException | str, limit: int = 300) -> str:
    """One line for a Jobs API error: Ray puts the server's whole traceback into the message, whose last
    ``SomethingError: ...`` line says what went wrong (a submission id in use, a bad runtime env, ...)."""
    text = str(e)
    found = [m.group(1) for line in text.splitlines() if (m := _EXC_LINE.match(line))]
    if found and "Traceback" in text:
        text = found[-1]
    return " ".join(text.split()).rstrip(".")[:limit]


def _is_loopback(address: str | None) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(jobs_address(address)).hostname or "") in LOOPBACK_HOSTS


def jobs_address(address: str | None) -> str:
    addr = address or os.environ.get("VLMGUARD_JOBS_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_JOBS_ADDRESS
    if addr == "auto" or "://" not in addr and addr.endswith(":6379"):
        addr = DEFAULT_JOBS_ADDRESS  # a GCS address is not the Jobs API; use the local dashboard
    if "://" not in addr:
        addr = "http://" + addr
    return addr


def _bounded_client_class():
    """``JobSubmissionClient`` whose requests time out: Ray offers no timeout setting, but every request goes through
    its ``_do_request``, which passes keyword arguments on to ``requests``."""
    from ray.job_submission import JobSubmissionClient

    class BoundedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", (JOBS_CONNECT_TIMEOUT_S, JOBS_READ_TIMEOUT_S))
            return super()._do_request(method, endpoint, **kwargs)

    return BoundedJobSubmissionClient


def _timed_out(e: BaseException) -> bool:
    """A request that reached the server and got no answer in time (not a connection that could not be made)."""
    import requests

    return isinstance(e, requests.exceptions.Timeout) and not isinstance(e, requests.exceptions.ConnectTimeout)


def _no_answer(e: BaseException, addr: str, what: str) -> VlmguardError | None:
    """A Jobs API request that timed out or lost its connection -> one line (None for other errors)."""
    import requests

    if _timed_out(e):
        return VlmguardError(f"the Ray Jobs API at {addr} did not answer ({what}) within {JOBS_READ_TIMEOUT_S:g} s: "
                             "is it a Ray dashboard (default port 8265), and is its head node overloaded?")
    if isinstance(e, (requests.exceptions.ConnectionError, ConnectionError)):
        detail = " ".join(str(e).split())[:200]
        return VlmguardError(f"cannot reach the Ray Jobs API at {addr} ({what}; {type(e).__name__}: {detail})")
    return None


def client(address: str | None = None):
    from vlmguard.workers.ray_auth import use_local_auth_token

    use_local_auth_token()
    addr = jobs_address(address)
    try:
        return _bounded_client_class()(addr)
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        if _timed_out(e):
            raise _no_answer(e, addr, "version check") from None
        detail = " ".join(str(e).split())[:300]
        raise VlmguardError(f"cannot reach the Ray Jobs API at {addr} ({type(e).__name__}: {detail}); start the "
                            "service with `vlmguard serve` or pass --address http://HEAD:8265") from None


def absolutize(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out):
        flag, eq, val = a.partition("=")
        if flag in PATH_FLAGS and eq:
            out[i] = f"{flag}={Path(val).expanduser().resolve()}"
        elif a in PATH_FLAGS and i + 1 < len(out):
            out[i + 1] = str(Path(out[i + 1]).expanduser().resolve())
        elif a == "--dataset" and i + 1 < len(out) and out[i + 1] not in ("synthcoco", "coco"):
            out[i + 1] = str(Path(out[i + 1]).expanduser().resolve())
    return out


def bench_entrypoint(bench_argv: list[str], python: str | None = None) -> str:
    from vlmguard.bench.db import DEFAULT_DB

    py = python or sys.executable
    if bench_argv[:1] == ["sweep"]:  # the config and its relative paths are read from this directory, as here
        argv = ["sweep", str(Path(bench_argv[1]).expanduser().resolve()), *absolutize(bench_argv[2:]),
                "--chdir", str(Path.cwd())]
        return shlex.join([py, "-m", "vlmguard.workers.bench_job", *argv])
    argv = absolutize(bench_argv)
    if not any(a == "--db" or a.startswith("--db=") for a in argv):
        # the default DB is where `vlmguard bench` puts it (runs/ under this directory), not under the directory
        # the cluster was started from, the job's working directory
        argv += ["--db", str(Path(DEFAULT_DB).expanduser().resolve())]
    return shlex.join([py, "-m", "vlmguard.workers.bench_job", *argv])


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad argument as InvalidInput (one line) instead of printing usage and exiting; its ``--help`` names
    the command the user typed, not the module the job runs."""

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any):
        if prog:
            prog = prog.replace("python -m vlmguard.workers.bench_job", "vlmguard job submit bench")
        super().__init__(*args, prog=prog, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise InvalidInput(f"bad benchmark job arguments: {message}")


def check_bench_args(bench_argv: list[str], *, local_paths: bool = False) -> argparse.Namespace:
    """Check a benchmark job's arguments here, before any cluster is contacted, as ``vlmguard bench`` checks
    its own: the syntax, the generation spec (methods and their parameters resolved) and the dataset.
    The default ``synthcoco`` is not built here: the job builds (or finds) it on the cluster.
    ``local_paths`` (the Jobs API is on this machine): the results DB and the other named files too."""
    from vlmguard.bench.cli import _dataset_from_args, _spec_from_args
    from vlmguard.workers.bench_job import build_sweep_parser, parse_job_args

    if bench_argv[:1] == ["sweep"]:
        return _check_sweep_args(build_sweep_parser(_ArgumentParser).parse_args(bench_argv[1:]), local_paths)
    args = parse_job_args(bench_argv, _ArgumentParser)
    unused = [flag for flag, used in (("--device", args.device != "auto"), ("--dtype", args.dtype != "auto"),
                                      ("--quantization", args.quantization != "none"),
                                      ("--shard-index", args.shard_index != 0),
                                      ("--num-shards", args.num_shards != 1)) if used]
    if unused:
        raise InvalidInput(f"bad benchmark job arguments: {', '.join(unused)} cannot be used in a job (the service's "
                           "replicas have their device, dtype and quantization; --shards N splits the job)")
    _spec_from_args(args).resolve()
    if args.dataset != "synthcoco":
        _dataset_from_args(args)
    if local_paths:
        _check_local_paths(args)
    return args


def _check_sweep_args(args: argparse.Namespace, local_paths: bool) -> argparse.Namespace:
    """A sweep job's config, checked here as `vlmguard bench sweep` checks it (keys, methods, parameters), and,
    with the Jobs API on this machine, its results database."""
    from vlmguard.bench.db import check_db
    from vlmguard.bench.sweep import config_db, load_config

    cfg = load_config(args.config)
    if cfg.get("quantization", "none") != "none":
        raise InvalidInput(f"{args.config}: quantization cannot be used in a job (the service's replicas load their "
                           "weights as the service's config says)")
    if local_paths:
        db = Path(config_db(cfg, args.db)).expanduser()
        if db.exists():
            check_db(db, "--db" if args.db else f"{args.config}: db")
    return args


def _check_local_paths(args: argparse.Namespace) -> None:
    """What the job would fail on at its start: a --db that is a folder or not a database, missing files."""
    from vlmguard.bench.db import check_db

    for flag in PATH_FLAGS[1:]:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and not Path(value).expanduser().exists():
            raise InvalidInput(f"{flag} {value}: file not found")
    db = Path(args.db).expanduser()
    if db.exists():
        check_db(db)  # as `vlmguard bench` does: a folder, another kind of file -> one line naming --db
        return
    parent = next((p for p in db.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InvalidInput(f"--db {db}: cannot create the results database's folder ({parent} is a file)")


def submit_bench(bench_argv: list[str], *, address: str | None = None, python: str | None = None,
                 submission_id: str | None = None, env: dict[str, str] | None = None) -> str:
    """Submit ``bench_job`` with these arguments; returns the submission id."""
    check_bench_args(bench_argv, local_paths=_is_loopback(address))  # fail here, not on the cluster
    c = client(address)
    env_vars = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("VLMGUARD_SHARED", "VLMGUARD_CACHE", "HF_HOME", "HF_HUB_OFFLINE", PLUGINS_ENV):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    env_vars.update(env or {})
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(entrypoint=bench_entrypoint(bench_argv, python), submission_id=submission_id,
                                runtime_env={"env_vars": env_vars}, metadata={"vlmguard": "bench"})
        except OSError as e:  # requests' errors: a timeout, a lost connection
            raise (_no_answer(e, jobs_address(address), "submit") or e) from None
        except RuntimeError as e:  # a freshly started head node's job agent is not up yet
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise VlmguardError(f"job submission failed: {error_text(e)}") from None
            time.sleep(1.0)


def status_message(message: str | None) -> str | None:
    """A job's status message in one line: Ray appends a failed job's last logs to it; the job's own error line
    (``vlmguard: error: ...``, what ``bench_job`` prints), else its last ``XError: ...`` line, says why."""
    if not message or "\n" not in message.strip():
        return message
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    head = lines[0].split(", last available logs")[0].rstrip(":")
    ours = [line.split("vlmguard: error: ", 1)[1] for line in lines if "vlmguard: error: " in line]
    why = ours[-1] if ours else next((m.group(1) for line in reversed(lines) if (m := _EXC_LINE.match(line))), None)
    return f"{head}: {why}" if why else head


def _job_call(job_id: str, address: str | None, what: str, call: Callable[[Any], _T]) -> _T:
    """``call(client)`` for one job: a Jobs API that does not answer, or a connection lost, is one line naming
    ``what``; the API's "not found" (HTTP 404: an unknown id) says there is no such job; any other refusal (a
    server error, a missing auth token) is one line with the API's own first line."""
    c = client(address)
    try:
        return call(c)
    except Exception as e:  # noqa: BLE001
        if (err := _no_answer(e, jobs_address(address), what)) is not None:
            raise err from None
        text = " ".join(str(e).split())
        if not text or "status code 404" in text or "does not exist" in text:
            raise InvalidInput(f"no job {job_id!r} at {jobs_address(address)} ({type(e).__name__})") from None
        raise VlmguardError(f"the Ray Jobs API at {jobs_address(address)} refused the {what} of job {job_id!r}: "
                            f"{text[:300]}") from None


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    info = _job_call(job_id, address, "job info", lambda c: c.get_job_info(job_id))
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "message": status_message(info.message),
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def logs(job_id: str, address: str | None = None) -> str:
    return _job_call(job_id, address, "job logs", lambda c: c.get_job_logs(job_id))


def stop(job_id: str, address: str | None = None) -> bool:
    return bool(_job_call(job_id, address, "stop job", lambda c: c.stop_job(job_id)))


def wait(job_id: str, address: str | None = None, timeout_s: float = 3600.0, poll_s: float = 1.0,
         stop: threading.Event | None = None) -> dict[str, Any]:
    """Poll until the job ends; ``stop`` set (Ctrl-C noted by the CLI) raises KeyboardInterrupt at the next poll."""
    deadline = time.monotonic() + timeout_s
    stop = stop or threading.Event()
    while not stop.is_set():
        st = status(job_id, address)
        if st["status"] in TERMINAL:
            return st
        if time.monotonic() > deadline:
            raise VlmguardError(f"job {job_id} still {st['status']} after {timeout_s:.0f} s")
        stop.wait(poll_s)
    raise KeyboardInterrupt
