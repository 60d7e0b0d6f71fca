"""Hang hunt: a peer that takes connections but never answers (or answers, then falls silent) must cost a bounded
wait and one error line, never an endless one. Each test runs against a tiny socket server of its own with short,
configurable timeouts; the bounds asserted are well above those timeouts and far below the old waits (for ever, or
``timeout`` times the attempts)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlmguard.cli import main
from vlmguard.client import APIError, APITimeoutError, AsyncClient, Client
from vlmguard.errors import VlmguardError
from vlmguard.workers import jobs, launch

ROOT = Path(__file__).resolve().parents[1]


class FakeServer:
    """A TCP server on 127.0.0.1: ``handler(conn)`` runs per connection in a thread (None: accept, never answer)."""

    def __init__(self, handler=None, backlog: int = 16):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.handler is not None:
                self.threads.append(threading.Thread(target=self._handle, args=(conn,), daemon=True))
                self.threads[-1].start()

    def _handle(self, conn):
        with contextlib.suppress(OSError):
            self.handler(conn)

    def close(self):
        """Stop every thread: on Linux closing a socket does not wake a thread blocked in its accept() or recv(),
        shutting it down does (threads left blocked outlive the tests and are killed in interpreter teardown)."""
        self.stopped.set()
        for sock in (self.sock, *self.conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for t in self.threads:
            t.join(timeout=5)
        assert not any(t.is_alive() for t in self.threads), "a fake server thread did not stop"


@pytest.fixture
def server_factory():
    made: list[FakeServer] = []

    def make(handler=None, backlog: int = 16) -> FakeServer:
        made.append(FakeServer(handler, backlog))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _read_request(conn: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head.split(b"\r\n")[0].decode()


def _answer_json(conn: socket.socket, obj) -> None:
    body = json.dumps(obj).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 + f"content-length: {len(body)}\r\n\r\n".encode() + body)


def fake_jobs_api(stall_after_version: bool = False, logs: str = "step 1\n"):
    """A Ray Jobs API stand-in: version check answered; jobs RUNNING for ever (or, ``stall_after_version``, every
    other request never answered)."""
    def handler(conn):
        line = _read_request(conn)
        method, path = line.split()[:2]
        if path == "/api/version":
            _answer_json(conn, {"ray_version": "2.60.0", "version": "4", "session_name": "x"})
        elif stall_after_version:  # never answer: hold the connection until the client or the server ends it
            while conn.recv(1):
                pass
        elif method == "POST":
            _answer_json(conn, {"job_id": "job1", "submission_id": "job1"})
        elif path.endswith("/logs"):
            _answer_json(conn, {"logs": logs})
        else:
            _answer_json(conn, {"type": "SUBMISSION", "job_id": None, "submission_id": path.rsplit("/", 1)[1],
                                "status": "RUNNING", "entrypoint": "python -m vlmguard.workers.bench_job pope",
                                "message": "running", "start_time": 1, "end_time": None, "metadata": {}})
    return handler


def _cli(argv: list[str], capsys) -> tuple[int, str, float]:
    t0 = time.monotonic()
    rc = main(argv)
    return rc, capsys.readouterr().err, time.monotonic() - t0


# ---- the Python client -----------------------------------------------------------------------------------------


@pytest.fixture
def dropping_address():
    """A listener that never accepts, its accept queue full: the kernel drops further connection attempts (SYNs),
    so connecting times out, as with a firewalled host."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    for s in [*fillers, sock]:
        s.close()


@pytest.mark.timeout(30)
def test_client_connect_timeout_bounds_a_host_that_drops_connections(dropping_address):
    # `timeout` is sized for generation (minutes); before, each of the 1 + max_retries attempts waited that long
    c = Client(dropping_address, timeout=20.0, connect_timeout=0.3, max_retries=2, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(APIError) as ei:
        c.health()
    elapsed = time.monotonic() - t0
    assert ei.value.status == 0 and "cannot reach" in str(ei.value) and "ConnectTimeout" in str(ei.value)
    assert elapsed < 8.0, elapsed
    c.close()


def test_client_default_connect_timeout_is_short_but_read_timeout_unchanged():
    c, a = Client("http://127.0.0.1:1"), AsyncClient("http://127.0.0.1:1", timeout=50.0)
    assert c._http.timeout.connect == 10.0 and c._http.timeout.read == 300.0
    assert a._http.timeout.connect == 10.0 and a._http.timeout.read == 50.0
    assert Client("http://127.0.0.1:1", timeout=2.0)._http.timeout.connect == 2.0  # never above timeout
    c.close()


@pytest.mark.timeout(60)
def test_client_status_calls_wait_their_own_short_timeout_not_the_generation_one(server_factory, monkeypatch):
    """health, models and metrics are answered without the engine: against a silent server they fail in
    STATUS_TIMEOUT_S (or a per-call timeout), not in the client's generation timeout (300 s by default)."""
    import asyncio

    from vlmguard import client as client_module

    monkeypatch.setattr(client_module, "STATUS_TIMEOUT_S", 0.4)
    silent = server_factory()
    c, a = Client(silent.url, timeout=300.0), AsyncClient(silent.url, timeout=300.0)
    calls = [c.health, c.models, c.metrics, lambda: c.health(timeout=0.2),
             *(lambda f=f: asyncio.run(f()) for f in (a.health, a.models, a.metrics))]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(APITimeoutError, match=r"within the client's timeout of 0\.[24] s"):
            call()
        assert time.monotonic() - t0 < 5.0
    assert Client(silent.url, timeout=0.1)._status_timeout(None) == 0.1  # never above the client's own
    assert c._http.timeout.read == 300.0  # generation keeps the client's timeout
    c.close()
    asyncio.run(a.aclose())


@pytest.mark.timeout(30)
def test_client_silent_server_and_stalled_stream_time_out_with_a_message(server_factory):
    silent = server_factory()
    c = Client(silent.url, timeout=0.5, max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(APITimeoutError, match="no answer from .* within the client's timeout of 0.5 s"):
        c.models()
    assert time.monotonic() - t0 < 5.0

    def stall(conn):  # headers and a first chunk, then nothing
        _read_request(conn)
        chunk = json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Yes"}}]})
        event = f"data: {chunk}\n\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + f"{len(event):x}\r\n".encode() + event + b"\r\n")
        while conn.recv(1):  # nothing more: hold the connection until the client or the server ends it
            pass

    stalled = server_factory(stall)
    c = Client(stalled.url, timeout=0.5)
    got, t0 = [], time.monotonic()
    with pytest.raises(APITimeoutError, match="within the client's timeout"):
        for ch in c.chat_stream("Is there a dog?"):
            got.append(ch.choices[0].delta.content)
    assert got == ["Yes"] and time.monotonic() - t0 < 5.0


# ---- vlmguard job ... against a Jobs API that does not answer ---------------------------------------------------


@pytest.fixture
def short_jobs_timeouts(monkeypatch):
    monkeypatch.setattr(jobs, "JOBS_CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(jobs, "JOBS_READ_TIMEOUT_S", 0.5)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("action", ["status", "logs", "stop"])
def test_job_commands_against_a_silent_jobs_api_fail_in_one_line(server_factory, short_jobs_timeouts, capsys,
                                                                  action):
    srv = server_factory()  # accepts, never answers: before, `vlmguard job ...` waited for ever
    rc, err, elapsed = _cli(["job", action, "raysubmit_x", "--address", srv.url], capsys)
    assert rc == 2 and elapsed < 8.0, (rc, elapsed)
    assert err.strip() == (f"vlmguard: error: the Ray Jobs API at {srv.url} did not answer (version check) within "
                           "0.5 s: is it a Ray dashboard (default port 8265), and is its head node overloaded?")


@pytest.mark.timeout(20)
def test_job_submit_against_a_silent_jobs_api_fails_in_one_line(server_factory, short_jobs_timeouts, capsys,
                                                               tmp_path):
    srv = server_factory()
    rc, err, elapsed = _cli(["job", "submit", "--address", srv.url, "bench", "pope", "--limit", "2",
                             "--db", str(tmp_path / "r.sqlite")], capsys)
    assert rc == 2 and elapsed < 8.0, (rc, elapsed)
    assert err.startswith("vlmguard: error: the Ray Jobs API at") and "did not answer" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("action,what", [("status", "job info"), ("logs", "job logs"), ("stop", "stop job")])
def test_job_commands_when_the_jobs_api_falls_silent_after_the_version_check(server_factory, short_jobs_timeouts,
                                                                              capsys, action, what):
    srv = server_factory(fake_jobs_api(stall_after_version=True))
    rc, err, elapsed = _cli(["job", action, "raysubmit_x", "--address", srv.url], capsys)
    assert rc == 2 and elapsed < 8.0, (rc, elapsed)
    # not "no job 'raysubmit_x'": the job may well exist, the API did not answer
    assert f"the Ray Jobs API at {srv.url} did not answer ({what}) within 0.5 s" in err
    assert "no job" not in err


@pytest.mark.timeout(20)
def test_job_submit_wait_honours_its_timeout_on_a_job_that_never_ends(server_factory, short_jobs_timeouts, capsys,
                                                                      tmp_path):
    srv = server_factory(fake_jobs_api())
    rc, err, elapsed = _cli(["job", "submit", "--address", srv.url, "--wait", "--timeout", "1.5", "bench", "pope",
                             "--limit", "2", "--db", str(tmp_path / "r.sqlite")], capsys)
    assert rc == 2 and 1.5 <= elapsed < 8.0, (rc, elapsed)
    assert err.strip() == "vlmguard: error: job job1 still RUNNING after 2 s"


def _default_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(30)
def test_job_logs_follow_stops_on_ctrl_c(server_factory):
    """``logs --follow`` follows a job until it ends, as ``tail -f`` does; Ctrl-C ends it in one line, exit 130."""
    srv = server_factory(fake_jobs_api(logs="step 1 of a job that never ends\n"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLMGUARD_DEBUG", None)
    # Ctrl-C as a terminal sends it: a suite started in the background by a non-interactive shell (`cmd &`) runs with
    # SIGINT ignored, and a child inherits that (two full-suite runs started so failed here, the command ignoring it)
    p = subprocess.Popen([sys.executable, "-m", "vlmguard.cli", "job", "logs", "raysubmit_x", "--follow",
                          "--address", srv.url], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_default_ctrl_c)
    try:
        first = p.stdout.readline()  # it is following
        assert first == "step 1 of a job that never ends\n"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and err.strip() == "vlmguard: interrupted", (p.returncode, err)


def _swallowed_ctrl_c() -> None:
    """Ctrl-C delivered where Python ignores exceptions (a finalizer or weakref callback prints "Exception ignored"
    and goes on): the KeyboardInterrupt never reaches the command's loop."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here
    except KeyboardInterrupt:
        pass


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [["job", "logs", "raysubmit_x", "--follow"],
                                  ["job", "submit", "--wait", "bench", "pope", "--limit", "2"]])
def test_job_polling_loops_end_on_a_ctrl_c_whose_exception_was_swallowed(monkeypatch, capsys, argv):
    """Before, `job logs --follow` (and `job submit --wait`) polled on for ever after such a Ctrl-C: one full-suite
    run timed out in test_job_logs_follow_stops_on_ctrl_c. Now the Ctrl-C is noted and the loop ends at its next
    check, exit 130, and Python's own Ctrl-C handler is back afterwards."""
    polls = []

    def status(job_id, address=None):
        polls.append(job_id)
        if len(polls) == 2:
            _swallowed_ctrl_c()
        return {"job_id": job_id, "status": "RUNNING", "message": None}

    monkeypatch.setattr(jobs, "status", status)
    monkeypatch.setattr(jobs, "logs", lambda job_id, address=None: "step 1\n")
    monkeypatch.setattr(jobs, "submit_bench", lambda argv, **kw: "raysubmit_x")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell (see above)
    try:
        rc, err, elapsed = _cli(argv, capsys)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130 and err.strip() == "vlmguard: interrupted", (rc, err)
    assert len(polls) == 2 and elapsed < 10.0
    assert after is signal.default_int_handler


# ---- vlmguard serve --address / --stop against something that does not answer as a Ray cluster ----------------


def test_check_cluster_address_refuses_a_silent_server(server_factory):
    srv = server_factory()
    t0 = time.monotonic()
    with pytest.raises(VlmguardError, match=f"no Ray cluster answers at 127.0.0.1:{srv.port}: something there takes "
                                            "connections but sent nothing in 0.4 s"):
        launch.check_cluster_address(f"127.0.0.1:{srv.port}", timeout_s=0.4)
    assert time.monotonic() - t0 < 4.0


def test_check_cluster_address_accepts_a_server_that_answers_or_closes(server_factory):
    def settings(conn):  # what a gRPC server (Ray's GCS) sends at once: its SETTINGS frame
        conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        while conn.recv(1024):  # read the client's preface, until it or the server ends the connection
            pass

    answering = server_factory(settings)
    launch.check_cluster_address(f"127.0.0.1:{answering.port}", timeout_s=2.0)
    closing = server_factory(lambda conn: conn.close())  # a TLS-only GCS may hang up: left to Ray to explain
    launch.check_cluster_address(f"127.0.0.1:{closing.port}", timeout_s=2.0)


@pytest.mark.timeout(20)
def test_serve_and_serve_stop_against_a_silent_server(server_factory, monkeypatch, capsys):
    monkeypatch.setattr(launch, "CLUSTER_PROBE_TIMEOUT_S", 0.5)
    srv = server_factory()
    address = f"127.0.0.1:{srv.port}"
    rc, err, elapsed = _cli(["serve", "--address", address], capsys)  # before: ray.init waited for ever
    assert rc == 2 and elapsed < 8.0, (rc, elapsed)
    assert err.strip() == (f"vlmguard: error: no Ray cluster answers at {address}: something there takes connections "
                           "but sent nothing in 0.5 s (a Ray cluster's GCS port answers at once; the default is 6379)")
    t0 = time.monotonic()
    assert main(["serve", "--stop", "--address", address]) == 0
    assert time.monotonic() - t0 < 8.0
    assert capsys.readouterr().out.strip() == f"no Ray cluster is running at {address}: nothing to stop"


@pytest.mark.timeout(20)
def test_serve_stop_and_serve_address_auto_check_a_silent_ray_address_from_the_environment(server_factory,
                                                                                           monkeypatch, capsys):
    """``ray.init("auto")`` connects to ``$RAY_ADDRESS``: a silent one hung ``serve --stop`` (no --address) and
    ``serve --address auto`` the same way."""
    monkeypatch.setattr(launch, "CLUSTER_PROBE_TIMEOUT_S", 0.5)
    srv = server_factory()
    address = f"127.0.0.1:{srv.port}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    t0 = time.monotonic()
    assert main(["serve", "--stop"]) == 0
    assert time.monotonic() - t0 < 8.0
    assert capsys.readouterr().out.strip() == f"no Ray cluster is running at {address} ($RAY_ADDRESS): nothing to stop"
    rc, err, elapsed = _cli(["serve", "--address", "auto"], capsys)
    assert rc == 2 and elapsed < 8.0, (rc, elapsed)
    assert err.startswith(f"vlmguard: error: no Ray cluster answers at {address} ($RAY_ADDRESS): something there ")
