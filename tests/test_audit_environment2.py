"""More environments unlike the developer's shell: no HOME and no passwd entry for the uid (a container run with
``--user 4243``), a read-only HOME of a non-root user (Ray's token file), and a stderr whose reader left
(``vlmguard bench pope 2>&1 >out | head -1``). Each command either works or ends with one ``vlmguard: error:``
line, never a traceback."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlmguard.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "vlmguard.cli"]


@pytest.fixture
def no_home(monkeypatch):
    """HOME unset and no passwd entry for this uid: Path.home() raises RuntimeError, expanduser("~") gives "~"."""
    monkeypatch.delenv("HOME", raising=False)

    def getpwuid(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    with pytest.raises(RuntimeError):
        Path.home()


def test_bench_without_a_home_names_the_cache_variable(no_home, monkeypatch, tmp_path, capsys):
    """Before: RuntimeError("Could not determine home directory.") and its traceback."""
    monkeypatch.delenv("VLMGUARD_CACHE", raising=False)
    rc = main(["bench", "pope", "--split", "random", "--limit", "1", "--db", str(tmp_path / "x.sqlite"),
               "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err == ("vlmguard: error: cannot find a home folder for the SynthCOCO dataset cache "
                                       "(HOME is unset); set VLMGUARD_CACHE to a writable folder\n")
    assert not (tmp_path / "x.sqlite").exists()


def test_vlmguard_cache_is_used_without_a_home(no_home, monkeypatch, tmp_path):
    """Before: the default (under the home) was computed, and failed, even with VLMGUARD_CACHE set."""
    from vlmguard.synth.build import cache_dir, default_dataset_dir

    monkeypatch.setenv("VLMGUARD_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert default_dataset_dir() == tmp_path / "synthcoco-seed0"


def test_joining_a_ray_cluster_without_a_home_looks_for_no_token_there(no_home, monkeypatch):
    """``vlmguard serve --stop``, ``serve --address``, ``job ...``: before, RuntimeError and its traceback."""
    from vlmguard.workers.ray_auth import use_local_auth_token

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    use_local_auth_token()
    assert "RAY_AUTH_MODE" not in os.environ


@pytest.mark.parametrize("error", ["PermissionError: [Errno 13] Permission denied: '/home/ci/.ray'",
                                   "RuntimeError: Could not determine home directory"])
def test_a_home_ray_cannot_save_its_token_in_says_what_to_set(error):
    """A new local cluster saves its token in ~/.ray/auth_token (Ray >= 2.5x): a read-only HOME (a non-root user's;
    root writes anyway) or none stops ``vlmguard serve``. Before: Ray's error alone, nothing about what to set."""
    from vlmguard.workers.launch import ray_start_failure

    assert str(ray_start_failure(error)) == (f"could not start a local Ray cluster: {error}; Ray saves the cluster's "
                                             "token in ~/.ray/auth_token: run with HOME a writable folder, or with "
                                             "RAY_AUTH_TOKEN set to a secret of your own")


def _run_with_stderr_gone(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI with stderr a pipe whose reader left before the command wrote anything (its imports take
    seconds), progress bars on."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLMGUARD_DEBUG", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    env.update({"PYTHONPATH": str(ROOT)})
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([*CLI, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=w, text=True, timeout=120)
    finally:
        os.close(w)


def test_stderr_reader_gone_the_work_still_gets_done(tmp_path):
    """``vlmguard generate ... 2>&1 >answer | head -c 1``: before, the weight-loading progress bar's BrokenPipeError
    became "cannot load model ...: [Errno 32] Broken pipe", whose printing failed in turn: exit status 1, no answer."""
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    r = _run_with_stderr_gone(["generate", "--model", "tiny", "--image", str(image), "--prompt", "Is there a dog?",
                               "--max-new-tokens", "2"], tmp_path)  # no --json: it turns the progress bars off
    assert r.returncode == 0
    assert r.stdout.strip()  # the answer


def test_stderr_reader_gone_an_error_keeps_its_status(tmp_path):
    """An unknown pruning method with stderr's reader gone: still exit status 2 (before: 1, from the
    BrokenPipeError raised while printing the error line)."""
    r = _run_with_stderr_gone(["generate", "--model", "tiny", "--prompt", "x", "--pruning", "no-such-method"],
                              tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""


def test_a_shared_cache_world_is_readable_by_other_users(monkeypatch, tmp_path):
    """The default world is built in a temporary folder, then renamed into place. Before, that folder came from
    mkdtemp (mode 0700), so in a VLMGUARD_CACHE shared by several users only the first user could read it
    ("Permission denied: .../synthcoco-seed0/annotations"). Now the folder gets the umask's mode, as the files do."""
    import vlmguard.synth.build as build

    def quick_build(out, **kwargs):  # the layout default_dataset relies on, without rendering 500 images
        (out / "annotations").mkdir()
        (out / "manifest.json").write_text("{}\n")

    monkeypatch.setenv("VLMGUARD_CACHE", str(tmp_path / "shared"))
    monkeypatch.setattr(build, "build_dataset", quick_build)
    old = os.umask(0o022)
    try:
        target = build.default_dataset()
    finally:
        os.umask(old)
    assert target == tmp_path / "shared" / "synthcoco-seed0"
    assert target.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["synthcoco-seed0"]  # no temporary folder left
