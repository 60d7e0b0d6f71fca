"""``vlmguard dashboard``: start the Streamlit dashboard on localhost."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlmguard.dashboard.config import DEFAULT_SERVICE_URL, ENV_DB, ENV_IMAGE_DIRS, ENV_JOBS, ENV_SERVICE
from vlmguard.errors import InvalidInput

APP = Path(__file__).resolve().parent / "app.py"


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="start the Streamlit dashboard (leaderboard, playground, chat, jobs, service)",
                       description="Start the dashboard on localhost: the leaderboard reads the results database; "
                                   "the playground, chat and service pages talk to the service, the jobs page to "
                                   "Ray's Jobs API.")
    p.add_argument("--port", type=int, default=8501, help="port (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--db", default=None, help="results database (default: $VLMGUARD_DB or runs/vlmguard.sqlite)")
    p.add_argument("--service", default=None,
                   help=f"vlmguard service URL (default: $VLMGUARD_SERVICE_URL or {DEFAULT_SERVICE_URL})")
    p.add_argument("--jobs-address", default=None,
                   help="Ray Jobs API address (default: $VLMGUARD_JOBS_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--image-dir", action="append", default=[],
                   help="extra folder searched for drill-down images (repeatable; e.g. the COCO val2014 folder)")
    p.add_argument("--dry-run", action="store_true", help="print the Streamlit command instead of running it")
    p.set_defaults(func=run)


def streamlit_argv(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(args.port), "--server.address", args.host, "--server.headless", "true",
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
    ]


def dashboard_env(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if args.db:
        env[ENV_DB] = str(Path(args.db).expanduser().resolve())
    if args.service:
        env[ENV_SERVICE] = args.service
    if args.jobs_address:
        env[ENV_JOBS] = args.jobs_address
    if args.image_dir:
        env[ENV_IMAGE_DIRS] = os.pathsep.join(str(Path(d).expanduser().resolve()) for d in args.image_dir)
    return env


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InvalidInput(f"--port must be in 1..65535, got {args.port}")
    db, source = (args.db, "--db") if args.db else (os.environ.get(ENV_DB), f"${ENV_DB}")
    if db and Path(db).expanduser().is_dir():
        raise InvalidInput(f"{source} {db}: is a directory, expected an SQLite file")
    if db and Path(db).expanduser().is_file():  # a missing one is the leaderboard's "no runs yet" page
        from vlmguard.bench.db import connect

        try:  # opened as the leaderboard reads it: someone else's file (not SQLite, other tables) is refused
            connect(Path(db).expanduser(), create=False).close()
        except InvalidInput as e:
            raise InvalidInput(f"{source} {e}") from None
    for d in args.image_dir:  # a folder that is not there would just never show its images
        if not Path(d).expanduser().is_dir():
            what = "not a directory" if Path(d).expanduser().exists() else "not found"
            raise InvalidInput(f"--image-dir {d}: {what}")
    if args.service and "://" not in args.service:
        raise InvalidInput(f"--service {args.service!r}: expected a URL like http://127.0.0.1:8000")
    argv = streamlit_argv(args)
    env = dashboard_env(args)
    if args.dry_run:
        print(" ".join(argv))
        return 0
    from vlmguard.workers.launch import check_port_free

    check_port_free(args.host, args.port, f"--host {args.host} --port {args.port}")
    print(f"vlmguard dashboard on http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    # Replace this process by Streamlit, so signals (Ctrl-C, a test's terminate) reach the server itself.
    os.execve(sys.executable, argv, env)
    return 0  # not reached
