"""Helpers for tests that drive the ``vlmguard`` command line in-process."""
from __future__ import annotations

import contextlib
import io
import json

from vlmguard.cli import main


def run_json(argv: list[str]) -> dict:
    """Run ``vlmguard ARGV`` (expected to succeed) and return the JSON object on its last stdout line."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])
