"""Audit of `vlmguard serve` / `vlmguard job`: bad configs, busy ports, unreachable clusters and failed jobs are
one line, found before Ray starts. Nothing here starts Ray: starting it is patched to fail the test."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from vlmguard.cli import main
from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.workers import jobs, launch
from vlmguard.workers.config import ServiceConfig, parse_config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmguard: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("data, what", [
    ({"applications": 5}, "applications"),
    ({"applications": [{"import_path": "vlmguard.workers.app:build_app", "args": [1, 2]}]}, "args"),
    ({"http_options": 5, "applications": [{"import_path": "vlmguard.workers.app:build_app"}]}, "http_options"),
])
def test_audit_serve_config_sections_of_the_wrong_type_are_one_line(data, what):
    with pytest.raises(InvalidInput, match=what):
        parse_config(data, "f.yaml")


def test_audit_serve_busy_http_port_refused_before_ray(no_ray, capsys):
    # Serve's proxy binds with SO_REUSEPORT: a second service would silently share a running one's port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--dashboard-port", "0"]) == 2
    assert "Address already in use" in _one_error_line(capsys)


@pytest.mark.parametrize("argv, needle", [
    (["--dashboard-port", "-1"], "--dashboard-port -1"),
    (["--dashboard-port", "70000"], "--dashboard-port 70000"),
    (["--num-cpus", "-1"], "--num-cpus -1"),
    (["--prefix-cache-mb", "-5"], "--prefix-cache-mb -5.0"),
])
def test_audit_serve_bad_cluster_options_before_ray(no_ray, capsys, argv, needle):
    assert main(["serve", "--port", "0", *argv]) == 2
    assert needle in _one_error_line(capsys)


def test_audit_serve_address_without_cluster_is_one_line(no_ray, capsys):
    address = f"127.0.0.1:{_closed_port()}"
    assert main(["serve", "--address", address]) == 2
    assert f"no Ray cluster answers at {address}" in _one_error_line(capsys)
    assert main(["serve", "--stop", "--address", address]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_audit_serve_port_zero_in_config_gets_a_free_port_and_start_errors_are_one_line(monkeypatch):
    from ray import serve

    seen = {}

    def fake_start(http_options=None, **k):
        seen.update(http_options)
        raise RuntimeError("ray::ProxyActor.ready() (pid=1, ip=127.0.0.1)\n  File \"proxy.py\", line 1, in ready\n"
                           "    raise e\nRuntimeError: Failed to bind to address '127.0.0.1:8100'.")

    monkeypatch.setattr(launch, "connect_ray", lambda *a, **k: (False, None))
    monkeypatch.setattr(launch, "_check_cluster_resources", lambda *a: None)  # no cluster behind the fake
    monkeypatch.setattr(serve, "start", fake_start)
    with pytest.raises(VlmguardError) as ei:
        launch.start_service(ServiceConfig(port=0))
    assert seen["port"] != 0  # port 0 used to be passed on: the proxy got some port, the URL said :0
    assert "\n" not in str(ei.value) and "Failed to bind to address '127.0.0.1:8100'" in str(ei.value)


def test_audit_job_status_of_a_failed_job_is_one_line(monkeypatch):
    message = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
               "Running entrypoint for job j: python -m vlmguard.workers.bench_job pope --app nosuch\n"
               "2026-12-05 08:04:08,960\tINFO worker.py:2029 -- Connected to Ray cluster.\n"
               "vlmguard: error: no Serve application 'nosuch' on this cluster (running: vlmguard)\n")
    info = SimpleNamespace(status="FAILED", message=message, entrypoint="x", start_time=0, end_time=1)
    monkeypatch.setattr(jobs, "client", lambda address=None: SimpleNamespace(get_job_info=lambda job_id: info))
    st = jobs.status("j")
    assert st["message"] == ("Job entrypoint command failed with exit code 2: no Serve application 'nosuch' on "
                             "this cluster (running: vlmguard)")
    info.message = "Job finished successfully."
    assert jobs.status("j")["message"] == "Job finished successfully."


def test_audit_job_lookup_says_no_job_only_when_the_api_does(monkeypatch):
    """Ray's Jobs API answers an unknown id with HTTP 404 ("Job ... does not exist"): that is "no job". Any
    other refusal (a server error, an auth refusal) used to read "no job" too; it now carries the API's line."""
    def failing(message):
        def get_job_info(job_id):
            raise RuntimeError(message)
        return lambda address=None: SimpleNamespace(get_job_info=get_job_info)

    monkeypatch.setattr(jobs, "client", failing("Request failed with status code 404: Job raysubmit_x does not exist."))
    with pytest.raises(InvalidInput, match="no job 'raysubmit_x'"):
        jobs.status("raysubmit_x")
    monkeypatch.setattr(jobs, "client", failing("Request failed with status code 500: internal error.\nTraceback"))
    with pytest.raises(VlmguardError) as ei:
        jobs.status("raysubmit_x")
    msg = str(ei.value)
    assert "no job" not in msg and "status code 500: internal error." in msg and "\n" not in msg
