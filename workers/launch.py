"""Starting the service: a Ray cluster (local, or an existing one by address), Serve, and the app.

:func:`start_service` is what ``vlmguard serve``, the tests, ``vlmguard demo`` and ``vlmguard perf serve``
use; it returns a :class:`Service` with the base URL, e.g.::

    svc = start_service(ServiceConfig(models=[ModelConfig(model="tiny", num_replicas=2)]), port=0)
    ... requests against svc.url ...
    svc.shutdown()

``port=0`` picks a free loopback port. ``batching=False`` turns dynamic batching off on every model (for
throughput comparisons).
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.interrupts import sigterm_kept
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.jobs import LOOPBACK_HOSTS, error_text
from vlmguard.workers.ray_auth import use_local_auth_token

DEFAULT_DASHBOARD_PORT = 8265
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# Ray Serve's throughput-optimized mode (Ray >= 2.55, "Enable High Throughput on Ray Serve"): user code on the
# replica's own event loop, gRPC between deployments, buffered request logs, direct ingress on
THROUGHPUT_OPTIMIZED_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
DEFAULT_START_TIMEOUT_S = 900.0  # replicas not running by then (unplaceable, or a model loading that long): give up
OWNED_CLUSTER_DRAIN_S = 5.0  # min drain of a direct-ingress replica on a cluster that ends with this process


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, option: str) -> None:
    """Bind ``host:port`` now, as a server about to listen there would, so a busy or unusable port, or a host
    name that does not resolve, is one line before the server starts (``serve``: before Ray; ``dashboard``:
    before Streamlit). Serve's proxies bind with SO_REUSEPORT: a second service on the port of a running one
    would share it silently (requests split between the two); this probe does not, so it is refused."""
    if port == 0:
        return
    if not 0 < port <= 65535:  # getaddrinfo would take 70000 as 70000 % 65536
        raise InvalidInput(f"{option}: cannot listen on {host}:{port} (a port is 1-65535)")
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InvalidInput(f"{option}: cannot resolve host {host!r} ({e.strerror})") from None
    except UnicodeError as e:  # a host name with a label over 63 characters
        raise InvalidInput(f"{option}: cannot resolve host {host!r} ({e})") from None
    try:
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        reason = e.strerror or str(e)
        hint = "; is a service already running there? pick another port" if e.errno == errno.EADDRINUSE else ""
        raise InvalidInput(f"{option}: cannot listen on {host}:{port} ({reason}){hint}") from None


CLUSTER_PROBE_TIMEOUT_S = 5.0  # `serve --address HOST:PORT`: a connection, then a first answer, each within this
# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with its own
# SETTINGS at once
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_cluster_address(address: str, timeout_s: float | None = None) -> None:
    """A ``HOST:PORT`` cluster address where nothing answers is one line now (``ray.init`` would retry for
    minutes); so is one that takes connections but stays silent when spoken to as the GCS's gRPC server is
    (``ray.init`` would wait for ever). ``auto`` is checked as the ``$RAY_ADDRESS`` it stands for, when set;
    ``local``, ``auto`` alone and URL-style (``ray://``) addresses are left to Ray."""
    shown = address
    if address == "auto" and os.environ.get("RAY_ADDRESS", "").strip():  # what ray.init("auto") connects to
        address = os.environ["RAY_ADDRESS"].strip()
        shown = f"{address} ($RAY_ADDRESS)"
    host, sep, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not sep or not port.isdigit():
        return
    timeout_s = CLUSTER_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise VlmguardError(f"no Ray cluster answers at {shown} ({reason})") from None
    with conn:
        try:  # any answer, a closed connection included (a TLS-only GCS, say), is left to Ray; silence is not
            conn.sendall(_H2_PREFACE)
            conn.recv(1)
        except socket.timeout:
            raise VlmguardError(f"no Ray cluster answers at {shown}: something there takes connections but sent "
                                f"nothing in {timeout_s:g} s (a Ray cluster's GCS port answers at once; the default "
                                "is 6379)") from None
        except OSError:
            pass


def check_resources(config: ServiceConfig, have: dict[str, float], where: str, other_way: str = "") -> None:
    """Replicas reserving more CPUs or GPUs (of those in ``have``) than ``where`` has would wait for them for ever
    (Serve keeps them pending, ``serve.run`` never returns): one line naming the numbers of every resource short
    instead (and ``other_way`` out, after the hints)."""
    short = []
    for kind, hint in (("CPU", "lower num_cpus per replica or num_replicas, or give the cluster more CPUs"),
                       ("GPU", "set device cpu, a fractional num_gpus or fewer replicas")):
        if kind not in have:
            continue
        per = {m.served_name: (m.num_replicas, m.num_cpus if kind == "CPU" else m.gpus_per_replica(have[kind]))
               for m in config.models}
        if sum(n * each for n, each in per.values()) > have[kind]:
            asks = ", ".join(f"{name} {n * each:g} ({n} replica{'s' if n > 1 else ''} x {each:g})"
                             for name, (n, each) in per.items() if each)
            short.append(f"more {kind}s than {where} has ({have[kind]:g}): {asks}; {hint}")
    if short:
        raise InvalidInput("the replicas reserve " + "; and ".join(short) + (f", {other_way}" if other_way else ""))


@dataclass
class Service:
    url: str  # base URL of the HTTP API, e.g. http://127.0.0.1:8000
    config: ServiceConfig
    dashboard_url: str | None = None  # Ray dashboard / Jobs API address (None when unknown)
    owns_cluster: bool = False  # this process started the Ray cluster (shutdown() stops it)
    info: dict[str, Any] = field(default_factory=dict)
    # base URLs of the ingress replicas' own HTTP servers (Ray Serve direct ingress; empty without it)
    direct_urls: list[str] = field(default_factory=list)

    def shutdown(self, keep_cluster: bool = False) -> None:
        import ray
        from ray import serve

        if not self.owns_cluster:  # someone else's cluster: remove only our app
            serve.delete(self.config.app_name)
            return
        try:
            serve.shutdown()
        finally:
            if not keep_cluster and ray.is_initialized():
                ray.shutdown()


# config field -> the apply_overrides argument that sets it (to name that argument in an error)
_OVERRIDE_OF_FIELD = {"port": "port", "host": "host", "model": "model", "num_replicas": "replicas",
                      "enabled": "batching", "max_batch_size": "max_batch_size",
                      "batch_wait_timeout_s": "batch_wait_timeout_s", "mode": "batch_mode",
                      "direct_ingress": "direct_ingress", "prefix_cache_mb": "prefix_cache_mb",
                      "quantization": "quantization", "responses_store_path": "responses_store_path"}


def apply_overrides(config: ServiceConfig, *, port: int | None = None, host: str | None = None,
                    batching: bool | None = None, model: str | None = None, replicas: int | None = None,
                    max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None,
                    batch_mode: str | None = None, direct_ingress: bool | None = None,
                    throughput_optimized: bool | None = None, prefix_cache_mb: float | None = None,
                    quantization: str | None = None, responses_store_path: str | None = None,
                    names: dict[str, str] | None = None) -> ServiceConfig:
    """The config with these overrides (None: keep the config's). A bad value is one InvalidInput line that
    names the override, as ``names`` spells it (the CLI passes its option names, e.g. ``--replicas``)."""
    given = {k for k, v in dict(port=port, host=host, batching=batching, model=model, replicas=replicas,
                                max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                                batch_mode=batch_mode, direct_ingress=direct_ingress,
                                throughput_optimized=throughput_optimized, prefix_cache_mb=prefix_cache_mb,
                                quantization=quantization, responses_store_path=responses_store_path).items()
             if v is not None}
    data = config.model_dump()
    if responses_store_path is not None:
        data["responses_store_path"] = responses_store_path
    if direct_ingress is not None:
        data["direct_ingress"] = direct_ingress
    if throughput_optimized is not None:
        data["throughput_optimized"] = throughput_optimized
    if port is not None:
        data["port"] = port
    if host is not None:
        data["host"] = host
    if model is not None:
        data["models"] = [{**data["models"][0], "model": model, "name": None}]
    for m in data["models"]:
        if replicas is not None:
            m["num_replicas"] = replicas
        if batching is not None:
            m["batching"]["enabled"] = batching
        if max_batch_size is not None:
            m["batching"]["max_batch_size"] = max_batch_size
        if batch_wait_timeout_s is not None:
            m["batching"]["batch_wait_timeout_s"] = batch_wait_timeout_s
        if batch_mode is not None:
            m["batching"]["mode"] = batch_mode
        if prefix_cache_mb is not None:
            m["prefix_cache_mb"] = prefix_cache_mb
        if quantization is not None:
            m["quantization"] = quantization
    try:
        return ServiceConfig(**data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = err.get("loc", ())
            override = _OVERRIDE_OF_FIELD.get(str(loc[-1])) if loc else None
            if override in given:
                label = (names or {}).get(override, override)
            else:
                label = "service config " + ".".join(str(x) for x in loc)
            parts.append(f"{label}: {err.get('msg', '').removeprefix('Value error, ')}")
        raise InvalidInput("; ".join(dict.fromkeys(parts))) from None


@contextmanager
def cluster_env(direct_ingress: bool, drain_s: float | None = None, throughput_optimized: bool = False):
    """Environment for the Ray processes started inside the block (they inherit it; this process's is
    restored afterwards): Serve's direct-ingress flag when asked for, and optionally the shortest drain of a
    direct-ingress replica at shutdown (Ray's default, 30 s, gives load balancers time to notice); Serve's
    throughput-optimized mode when asked for (it turns direct ingress on too)."""
    direct_ingress = direct_ingress or throughput_optimized
    if not direct_ingress:
        yield
        return
    env = {DIRECT_INGRESS_ENV: "1"}
    if throughput_optimized:
        env[THROUGHPUT_OPTIMIZED_ENV] = "1"
    if drain_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(drain_s)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard_port: int | None = None,
                direct_ingress: bool = False, throughput_optimized: bool = False) -> tuple[bool, str | None]:
    """Connect to ``address`` or start a local cluster owned by this process. Returns (owns, dashboard URL).
    ``direct_ingress`` / ``throughput_optimized`` start a local cluster with Serve's direct ingress / its
    throughput-optimized mode on (no effect on joined clusters)."""
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return False, _dashboard_url(ctx)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_cluster_address(address)
        use_local_auth_token()
        with sigterm_kept():
            ctx = ray.init(address=address, log_to_driver=False)
        return False, _dashboard_url(ctx)
    port = dashboard_port if dashboard_port is not None else DEFAULT_DASHBOARD_PORT
    if port == 0:
        port = free_port()
    # address="local": always a fresh cluster, never one some `ray start` left on this machine. It ends with
    # this process, so a direct-ingress replica's drain at shutdown (for load balancers) is kept short.
    # sigterm_kept: SIGTERM still unwinds this process (the CLI's handler), which shuts down the cluster it owns
    with cluster_env(direct_ingress, drain_s=OWNED_CLUSTER_DRAIN_S, throughput_optimized=throughput_optimized), \
            sigterm_kept():
        try:
            ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=port, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - Ray's processes could not start here: one line, with a hint
            raise ray_start_failure(f"{type(e).__name__}: {e}") from e
    return True, _dashboard_url(ctx) or f"http://127.0.0.1:{port}"


def ray_start_failure(text: str) -> VlmguardError:
    """A local Ray cluster that would not start (``text``: the error, or ``ray start``'s output) -> one line. Ray puts
    its sockets under $TMPDIR (its session files under $RAY_TMPDIR, else $TMPDIR), and a socket's path is limited to
    107 bytes, so a long TMPDIR (a CI runner's, a job scheduler's) stops Ray from starting at all: the error says
    what to set (RAY_TMPDIR alone is not enough: `ray start` then fails with "AF_UNIX path too long"). A new cluster's
    token goes to ~/.ray/auth_token, so a read-only HOME, or none at all, stops it too."""
    hint = ("; Ray keeps its sockets under $TMPDIR: run with TMPDIR (and RAY_TMPDIR, if set) a short folder, e.g. "
            "TMPDIR=/tmp" if "AF_UNIX path" in text else "")
    if "/.ray" in text or "home directory" in text:
        hint += ("; Ray saves the cluster's token in ~/.ray/auth_token: run with HOME a writable folder, or with "
                 "RAY_AUTH_TOKEN set to a secret of your own")
    lines = [line for line in text.strip().splitlines() if line.strip()] or [text]
    why = error_text(text, 400) if "Traceback" in text else error_text(lines[-1], 400)  # `ray start` logs, then why
    return VlmguardError(f"could not start a local Ray cluster: {why}{hint}")


def _dashboard_url(ctx: Any) -> str | None:
    url = getattr(ctx, "dashboard_url", None) or (ctx.get("webui_url") if isinstance(ctx, dict) else None)
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def start_service(config: ServiceConfig | None = None, *, address: str | None = None, port: int | None = None,
                  batching: bool | None = None, num_cpus: int | None = None, dashboard_port: int | None = None,
                  wait_s: float = 300.0, start_timeout_s: float = DEFAULT_START_TIMEOUT_S) -> Service:
    """Deploy the app (starting or joining a Ray cluster first) and wait until /health answers ok. Replicas not
    running within ``start_timeout_s`` (Ray cannot place them, or their model loads that long) end the attempt:
    the app is removed and the error says what Serve reports them waiting for."""
    if address:
        use_local_auth_token()
    from ray import serve

    if port is None and config is not None and config.port == 0:  # port 0 in the config: a free port, too
        port = 0
    config = apply_overrides(config or ServiceConfig(), batching=batching,
                             port=free_port(config.host if config else "127.0.0.1") if port == 0 else port)
    owns, dash = connect_ray(address, num_cpus=num_cpus, dashboard_port=dashboard_port,
                             direct_ingress=config.direct_ingress, throughput_optimized=config.throughput_optimized)
    try:
        _check_cluster_resources(config, owns, start_timeout_s)
        serve.start(http_options={"host": config.host, "port": config.port})
        deploy_app(config, timeout_s=start_timeout_s)
    except Exception as e:
        if owns:
            import ray

            ray.shutdown()
        if isinstance(e, VlmguardError):
            raise
        raise VlmguardError(f"could not start the service: {type(e).__name__}: {error_text(e, 500)}") from e
    url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '') else config.host}:{_serve_port(config)}"
    url += config.route_prefix.rstrip("/")
    svc = Service(url=url, config=config, dashboard_url=dash, owns_cluster=owns)
    wait_healthy(svc.url, timeout_s=wait_s, api_keys=config.resolved_api_keys())
    if config.direct_ingress:
        expected = config.models[0].num_replicas if config.ingress_in_model else config.ingress_replicas
        svc.direct_urls = direct_ingress_urls(config, wait_s=wait_s, expected=expected)
        if len(svc.direct_urls) < expected:
            svc.shutdown()
            raise VlmguardError(f"direct ingress is on, but {len(svc.direct_urls)} of {expected} ingress replicas "
                                f"published their HTTP address within {wait_s:.0f} s")
        for u in svc.direct_urls:
            wait_healthy(u, timeout_s=wait_s)
    return svc


def _check_cluster_resources(config: ServiceConfig, owns: bool, start_timeout_s: float) -> None:
    """:func:`check_resources` against the connected cluster. A cluster on this machine cannot grow: too few
    CPUs/GPUs fail; another may have an autoscaler adding nodes for the pending replicas: a warning."""
    try:
        _check_against_cluster(config)
    except InvalidInput as e:
        import ray

        if owns or ray.get_runtime_context().gcs_address.rpartition(":")[0] in LOOPBACK_HOSTS:
            raise
        print(f"warning: {e}; the replicas stay pending until the cluster grows (an autoscaler), for at most "
              f"{start_timeout_s:g} s (--start-timeout)", file=sys.stderr)


def _check_against_cluster(config: ServiceConfig) -> None:
    import ray

    res, gcs = ray.cluster_resources(), ray.get_runtime_context().gcs_address
    check_resources(config, {"CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0)}, f"the Ray cluster at {gcs}")


def deploy_app(config: ServiceConfig, *, timeout_s: float = DEFAULT_START_TIMEOUT_S, poll_s: float = 0.5,
               report_every_s: float = 30.0) -> None:
    """Deploy the app on the connected cluster's Serve and wait until Serve reports it RUNNING, for at most
    ``timeout_s``. (``serve.run`` waits without a bound: replicas that Ray can never place, on a cluster short of
    the CPUs/GPUs they reserve and without an autoscaler, kept ``vlmguard serve`` waiting for ever.) While it
    waits it says every ``report_every_s`` on stderr what the replicas wait for; past the limit, or on Ctrl-C,
    the app is removed (unless this was a redeploy of a running app) and the error names the shortfall."""
    from ray import serve

    from vlmguard.workers.app import build_app

    name = config.app_name
    existed = name in serve.status().applications  # an update of a running app: not ours to remove
    serve.run_many([serve.RunTarget(target=build_app(config), name=name, route_prefix=config.route_prefix)],
                   wait_for_applications_running=False)
    start = time.monotonic()
    next_report = start + report_every_s
    try:
        while True:
            app = serve.status().applications.get(name)
            if app is None:
                raise VlmguardError(f"the app {name!r} was removed while it deployed (`vlmguard serve --stop`?)")
            status = str(getattr(app.status, "value", app.status))
            if status == "RUNNING":
                return
            if status == "DEPLOY_FAILED":
                raise VlmguardError(f"deploying the app {name!r} failed: "
                                    f"{_unhealthy_deployments(app) or error_text(app.message, 500)}")
            waited = time.monotonic() - start
            if waited >= timeout_s:
                done = ("and Serve goes on rolling out this update of the running app (`vlmguard serve --stop` "
                        "removes the app)" if existed else "so it was removed")
                raise VlmguardError(f"the app {name!r} was not running after {timeout_s:g} s (--start-timeout), "
                                    f"{done}: {_pending_reason(config, app)}")
            if time.monotonic() >= next_report:
                print(f"waiting for the app {name!r} ({waited:.0f} of at most {timeout_s:g} s): "
                      f"{_pending_reason(config, app)}", file=sys.stderr, flush=True)
                next_report += report_every_s
            time.sleep(poll_s)
    except BaseException:
        if existed:
            raise
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - the error that brought us here is the one to report
            pass
        raise


def _pending_reason(config: ServiceConfig, app: Any) -> str:
    """Why an app is not running yet: a resource shortfall of the cluster when there is one, then what Serve says
    of each deployment that is not healthy (after 30 s it names the resources a replica waits for)."""
    parts = []
    try:
        _check_against_cluster(config)
    except InvalidInput as e:
        parts.append(str(e))
    parts.append(_unhealthy_deployments(app))
    return "; ".join(p for p in parts if p) or "its replicas are starting"


def _unhealthy_deployments(app: Any) -> str:
    """Each deployment of a Serve app status that is not healthy, with the last error line of Serve's message
    (a replica constructor's traceback ends in the error that stopped it)."""
    parts = []
    for dname, dep in (app.deployments or {}).items():
        dstatus = str(getattr(dep.status, "value", dep.status))
        if dstatus != "HEALTHY":
            message = error_text(str(dep.message or ""), 400)
            parts.append(f"{dname} {dstatus}" + (f": {message}" if message else ""))
    return "; ".join(parts)


def direct_ingress_urls(config: ServiceConfig, wait_s: float = 15.0, expected: int = 1) -> list[str]:
    """Base URLs of the app's ingress replicas' own HTTP servers, from Serve's target groups (what a load
    balancer reads; ``GET /api/serve/applications/`` on the dashboard returns the same), once ``expected`` of
    them are published or ``wait_s`` has passed (replicas publish theirs a little after they turn healthy,
    later on a loaded machine). Empty when the cluster runs without direct ingress."""
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + wait_s
    while True:
        groups = _get_global_client().get_serve_details().get("target_groups") or []
        urls = []
        for g in groups:
            if g.get("app_name") != config.app_name or str(g.get("protocol")).rsplit(".", 1)[-1] != "HTTP":
                continue
            for t in g.get("targets") or []:
                if str(t.get("name", "")).startswith("SERVE_REPLICA::"):
                    host = t["ip"] if config.host in ("0.0.0.0", "") else config.host
                    urls.append(f"http://{host}:{t['port']}{g['route_prefix'].rstrip('/')}")
        if len(urls) >= expected or time.monotonic() > deadline:
            return sorted(urls)
        time.sleep(0.5)


def _serve_port(config: ServiceConfig) -> int:
    """The port Serve's proxy actually listens on (an existing Serve instance keeps its own options)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return int(http.port)
    except Exception:  # noqa: BLE001 - fall back to what we asked for
        return config.port


def wait_healthy(url: str, *, timeout_s: float = 300.0, api_keys: list[str] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=10.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}"
        time.sleep(0.5)
    raise VlmguardError(f"service at {url} did not become healthy within {timeout_s:.0f} s ({last})")


def start_detached_cluster(*, num_cpus: int | None = None, port: int = 6379,
                           dashboard_port: int = DEFAULT_DASHBOARD_PORT, direct_ingress: bool = False,
                           throughput_optimized: bool = False) -> str:
    """``ray start --head`` on loopback (outlives this process). Returns the cluster address: that of the cluster
    already running on ``port`` when there is one."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin if os.path.exists(ray_bin) else "ray", "start", "--head", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # Its own session: the cluster's processes form one process group, out of reach of the terminal's Ctrl-C, and
    # a start that fails part-way can be ended whole without touching any other Ray cluster on the machine
    with cluster_env(direct_ingress, throughput_optimized=throughput_optimized):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        stdout, stderr = proc.communicate()
    address = f"127.0.0.1:{port}"
    if proc.returncode != 0:
        out = (stderr or stdout).strip()
        if "already running" in out:  # a cluster left by an earlier --detach (or `ray start`): deploy onto it
            return address
        end_process_group(proc.pid)  # e.g. a GCS server and a dashboard left running when its raylet failed
        raise ray_start_failure(out)
    return address


def end_process_group(pgid: int, grace_s: float = 3.0, kill_wait_s: float = 2.0) -> None:
    """SIGTERM every process of group ``pgid``, then SIGKILL what is left after ``grace_s`` and wait up to
    ``kill_wait_s`` for it to be gone: a killed process may still run for a moment (Ray's autoscaler monitor, slow to
    honour SIGTERM, was still listed right after the SIGKILL)."""
    try:  # ProcessLookupError: the group is empty (again)
        os.killpg(pgid, signal.SIGTERM)
        _wait_group(pgid, grace_s)
        os.killpg(pgid, signal.SIGKILL)
        _wait_group(pgid, kill_wait_s)
    except ProcessLookupError:
        return


def _wait_group(pgid: int, seconds: float) -> None:
    """Until group ``pgid`` is empty (ProcessLookupError) or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        os.killpg(pgid, 0)
