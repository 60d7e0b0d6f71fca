"""Helpers for tests that drive the ``vlmguard`` command line in-process."""
from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import time
from typing import Callable

from vlmguard.cli import main


def run_json(argv: list[str]) -> dict:
    """Run ``vlmguard ARGV`` (expected to succeed) and return the JSON object on its last stdout line."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def check_plot_and_table(result: dict, out, tmp_path, capsys, head: str, n_rows: int) -> None:
    """The report ``out`` a perf command wrote is ``result``, ``perf plot`` draws it and prints its markdown table:
    a header starting with ``head``, then ``n_rows`` rows."""
    assert json.loads(out.read_text()) == result
    png = tmp_path / "report.png"
    assert main(["perf", "plot", str(out), "--out", str(png), "--markdown"]) == 0
    assert png.stat().st_size > 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(head) and len(table) == 2 + n_rows + 1  # head, rule, rows, the figure's path


def check_one_line_error(argv: list[str], message: str, capsys) -> None:
    """``vlmguard ARGV`` fails with exit code 2 and one stderr line naming ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmguard: error: ") and message in err and err.count("\n") == 1, err


def stop_with_sigterm(cmd: list[str], started: Callable[[], bool], cwd=None, wait_s: float = 120) -> tuple[int, str]:
    """Run ``cmd``, send it SIGTERM once ``started()`` (it has done some of its work), and return its exit status
    and stderr; it must still be running then."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + wait_s
    try:
        while time.time() < deadline and proc.poll() is None and not started():
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err
