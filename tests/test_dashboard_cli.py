"""``vlmguard dashboard``: argument checks, the Streamlit command line and the environment it passes."""
from __future__ import annotations

import argparse
import os

from vlmguard.cli import build_parser, main
from vlmguard.dashboard.cli import APP, dashboard_env, streamlit_argv


def test_dry_run_prints_the_streamlit_command(capsys):
    assert main(["dashboard", "--dry-run", "--port", "8765"]) == 0
    out = capsys.readouterr().out.strip()
    assert "-m streamlit run" in out and str(APP) in out and "--server.port 8765" in out
    assert "--server.address 127.0.0.1" in out and "--server.headless true" in out


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert main(["dashboard", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "vlmguard: error: --port must be in 1..65535, got 70000"
    assert main(["dashboard", "--service", "localhost:8000"]) == 2
    assert "expected a URL" in capsys.readouterr().err
    assert main(["dashboard", "--db", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_environment_carries_db_service_and_image_dirs(tmp_path):
    args = build_parser().parse_args(["dashboard", "--db", str(tmp_path / "r.sqlite"), "--service",
                                      "http://svc:8000", "--jobs-address", "http://head:8265",
                                      "--image-dir", str(tmp_path)])
    env = dashboard_env(args, base={})
    assert env == {"VLMGUARD_DB": str(tmp_path / "r.sqlite"), "VLMGUARD_SERVICE_URL": "http://svc:8000",
                   "VLMGUARD_JOBS_ADDRESS": "http://head:8265", "VLMGUARD_IMAGE_DIRS": str(tmp_path)}
    assert dashboard_env(argparse.Namespace(db=None, service=None, jobs_address=None, image_dir=[]),
                         base={"X": "1"}) == {"X": "1"}
    assert streamlit_argv(args)[:4][1:] == ["-m", "streamlit", "run"] and os.path.isfile(streamlit_argv(args)[4])
