"""``vlmguard perf serve``: throughput and latency of the Ray service against calling the Engine directly.

Workload: ``--requests`` generation requests (random images, distinct among any 4 x C consecutive requests,
greedy, ``--new-tokens``), sent by C concurrent closed-loop clients (each sends its next request when the previous
answer arrived), for each C in ``--clients``. Three paths, measured one after another on the same model:

- ``engine``: the Engine in this process, one ``generate`` per request (one at a time, as a replica does
  without batching) -- the floor for latency;
- ``ray_unbatched``: the service over HTTP on loopback (``POST /v1/generate``), dynamic batching off;
- ``ray_batched``: the same with dynamic batching on (``--max-batch``, ``--batch-wait-ms``, ``--batch-mode``:
  in-flight, ``workers/inflight.py``, or whole batches, ``workers/batcher.py``).

Both apps use the ``--ingress`` topology: ``model`` (the model replica serves HTTP itself: client -> Serve
proxy -> replica) or ``separate`` (client -> proxy -> FastAPI ingress replica -> model replica). With
``--direct-ingress`` the cluster runs Ray Serve's direct ingress and the clients call the ingress replica's own
HTTP server (client -> replica).

Reported per path and C: requests/s and generated tokens/s in the steady state (see :func:`closed_loop`),
median and p90 latency. Ratios: batched over unbatched throughput at each C, and Ray's median latency over the
direct Engine's at 1 client.
Everything listens on 127.0.0.1 only and every loop is bounded by the request count.
"""
from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable, Sequence

from vlmguard.errors import VlmguardError
from vlmguard.perf.timing import environment, median, ratio

PROMPT = "Describe this image."
# a request on one path: call(i) -> (tokens generated, engine seconds[, requests prefilled with it])
Call = Callable[[int], tuple]


def _p90(xs: Sequence[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


class _Recorder:
    """Timings of the answers of one path: latency, what the path added around the engine, finish times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.added: list[float] = []
        self.done_at: list[tuple[float, int]] = []  # (finish time, tokens) per answer
        self.prefill_batch: list[int] = []  # requests prefilled together with each answered one
        self.errors: list[str] = []

    def run(self, call: Call, i: int, clock: float | None = None) -> float:
        """One call; returns its latency (0 on error). ``clock``: the finish time to record (default: now)."""
        t0 = time.perf_counter()
        try:
            n, engine_s, *rest = call(i)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
            return 0.0
        t1 = time.perf_counter()
        dt = t1 - t0
        with self.lock:
            self.done_at.append((t1 if clock is None else clock + dt, n))
            self.latencies.append(dt)
            self.added.append(dt - engine_s)
            self.prefill_batch.append(int(rest[0]) if rest else 1)
        return dt

    def result(self, clients: int, wall: float) -> dict[str, Any]:
        lat = self.latencies
        rps, tps = steady_throughput(sorted(self.done_at), clients, wall)
        return {
            "clients": clients,
            "requests": len(lat),
            "errors": len(self.errors),
            "error_samples": self.errors[:3],
            "wall_s": wall,
            "requests_per_s": rps,
            "tokens_per_s": tps,
            "wall_requests_per_s": len(lat) / wall if wall > 0 else None,
            "tokens": sum(k for _, k in self.done_at),
            "latency_median_s": median(lat),
            "latency_p90_s": _p90(lat),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "added_latency_median_s": median(self.added),
            "mean_prefill_batch": statistics.fmean(self.prefill_batch) if self.prefill_batch else None,
        }


def closed_loop(call: Call, n_requests: int, clients: int) -> dict[str, Any]:
    """Run ``n_requests`` calls from ``clients`` threads and time them.

    ``call(i) -> (tokens generated, engine seconds[, requests prefilled with it])``: the engine's own
    ``timings.total_s`` for the request, so ``latency - engine seconds`` is what the path adds around the
    engine (queueing, HTTP, Ray, JSON); the third is ``timings.prefill_batch`` (how the batches formed).

    Throughput is that of the steady state: answers between the ``clients``-th and the
    ``clients``-th-from-last, over the time between them. Before it the clients are still sending their
    first requests (a batching server's first batch holds whoever came first), after it fewer than
    ``clients`` are left; with few rounds per client those edges would dominate. With fewer than
    ``2 * clients + 1`` answers the whole run is used. ``wall_requests_per_s`` is answers / wall time.
    """
    rec = _Recorder()
    lock = threading.Lock()
    next_i = [0]

    def client() -> None:
        while True:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            rec.run(call, i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return rec.result(clients, time.perf_counter() - t0)


def one_client_interleaved(calls: dict[str, Call],
                           n_requests: int) -> dict[str, dict[str, Any]]:
    """One client, the paths taking turns request by request (engine, ray_unbatched, ray_batched, engine,
    ...), so a drift in the machine's speed hits every path alike; each path's clock is its own time."""
    recs = {p: _Recorder() for p in calls}
    own = dict.fromkeys(calls, 0.0)
    for i in range(n_requests):
        for path, call in calls.items():
            own[path] += recs[path].run(call, i, clock=own[path])
    return {p: recs[p].result(1, own[p]) for p in calls}


def steady_throughput(done_at: list[tuple[float, int]], clients: int,
                      wall: float) -> tuple[float | None, float | None]:
    """(requests/s, tokens/s) between the ``clients``-th answer and the ``clients``-th from last; the
    tokens of the answers after the first edge. Whole run when there are too few answers for a window."""
    n = len(done_at)
    if n > 2 * clients:
        first, last = clients - 1, n - clients
        span = done_at[last][0] - done_at[first][0]
        if span > 0:
            return (last - first) / span, sum(k for _, k in done_at[first + 1:last + 1]) / span
    if wall <= 0:
        return None, None
    return n / wall, sum(k for _, k in done_at) / wall


# --mixed-settings: request i asks for MIXED_LENGTHS[i % 3] x --new-tokens, and odd requests sample with their
# own seed (what clients of one service send: their own max_tokens, temperature and seed)
MIXED_LENGTHS = (0.5, 1.0, 1.5)
MIXED_TEMPERATURE = 0.7


def request_spec(args: Any, i: int = 0) -> dict[str, Any]:
    """The generation spec of request ``i`` on every path (JSON form, as the HTTP API takes it)."""
    spec: dict[str, Any] = {"max_new_tokens": args.new_tokens, "diagnostics": False,
                            "decoding": getattr(args, "decoding", "greedy")}
    if getattr(args, "mixed_settings", False):
        spec["max_new_tokens"] = max(1, round(args.new_tokens * MIXED_LENGTHS[i % len(MIXED_LENGTHS)]))
        if i % 2:
            spec.update(do_sample=True, temperature=MIXED_TEMPERATURE, seed=i)
    return spec


def max_request_tokens(args: Any) -> int:
    """The longest ``max_new_tokens`` any request asks for (the services' limit)."""
    return max(request_spec(args, i)["max_new_tokens"] for i in range(len(MIXED_LENGTHS)))


def engine_caller(engine: Any, images: list, spec_for: Callable[[int], dict[str, Any]]
                  ) -> Call:
    from vlmguard.results import Request
    from vlmguard.spec import GenerationSpec

    lock = threading.Lock()  # an Engine runs one generate() at a time

    def call(i: int) -> int:
        spec = GenerationSpec(**spec_for(i))
        with lock:
            r = engine.generate([Request(prompt=PROMPT, images=[images[i % len(images)]])], spec)[0]
        return len(r.token_ids), r.timings.total_s, r.timings.prefill_batch

    return call


def http_caller(url: str, image_urls: list[str], spec_for: Callable[[int], dict[str, Any]],
                headers: dict[str, str]) -> Call:
    import httpx

    local = threading.local()

    def call(i: int) -> int:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=600.0, headers=headers)
        body = {"prompt": PROMPT, "images": [image_urls[i % len(image_urls)]],
                "spec": spec_for(i)}
        r = client.post(url + "/v1/generate", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        data = r.json()
        return (len(data["token_ids"]), float(data["timings"]["total_s"]),
                int(data["timings"].get("prefill_batch") or 1))

    return call


def _aggregate(path: str, clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeated measurements of a (path, clients) cell: medians, totals, samples."""
    keys = ("requests_per_s", "tokens_per_s", "wall_requests_per_s", "latency_median_s", "latency_p90_s",
            "latency_mean_s", "added_latency_median_s", "mean_prefill_batch")
    row: dict[str, Any] = {"path": path, "clients": clients,
                           "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
                           "error_samples": [e for r in runs for e in r["error_samples"]][:3],
                           "tokens": sum(r["tokens"] for r in runs)}
    for k in keys:
        row[k] = median(r[k] for r in runs)
    row["samples"] = {"requests_per_s": [r["requests_per_s"] for r in runs],
                      "latency_median_s": [r["latency_median_s"] for r in runs]}
    return row


def measure_paths(calls: dict[str, Call], clients: Sequence[int], n_requests: int, repeats: int,
                  warmup: int, progress=None) -> list[dict[str, Any]]:
    """For each client count, ``repeats`` rounds in which the paths take turns (round-robin, so the load of a
    shared machine hits them alike; at one client request by request); medians over rounds."""
    for path, call in calls.items():  # untimed: first-call costs, allocator and batcher warm-up
        for i in range(warmup * max(clients)):
            call(i)
    rows = []
    for c in clients:
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in calls}
        for rep in range(repeats):
            if c == 1:
                one = one_client_interleaved(calls, n_requests)
            for path, call in calls.items():
                r = one[path] if c == 1 else closed_loop(call, max(n_requests, c), c)
                runs[path].append(r)
                if progress:
                    progress(f"round {rep + 1}/{repeats} {path} clients={c}: {r['requests_per_s'] or 0:.2f} req/s, "
                             f"median latency {r['latency_median_s'] or 0:.3f}s, errors {r['errors']}")
        rows += [_aggregate(p, c, runs[p]) for p in calls]
    return rows


def run_serve(args: Any, progress=None) -> dict[str, Any]:
    """Start the service twice (batching off / on, two apps on one private local Ray cluster), then measure
    the direct Engine and both apps round-robin for each client count."""
    from vlmguard.images import image_to_data_url
    from vlmguard.perf.models import bench_image, load_engine, servable_model
    from vlmguard.perf.timing import set_threads

    from vlmguard.spec import GenerationSpec

    spec_json = request_spec(args)
    for i in range(len(MIXED_LENGTHS) if getattr(args, "mixed_settings", False) else 1):
        GenerationSpec.build(**request_spec(args, i)).resolve()  # bad methods or lengths fail before Ray starts

    def spec_for(i: int) -> dict[str, Any]:
        return request_spec(args, i)

    threads = set_threads(args.threads or 1)
    clients = sorted(set(args.clients))
    configs = {}
    if not args.no_ray:  # the services' options, checked before the model loads and Ray starts
        configs = {batching: _service_config(args, batching, threads, clients) for batching in (False, True)}
    services: list[Any] = []
    started_ray = False
    saved = ExitStack()
    try:
        # the replicas and the direct Engine load the same model (a benchmark shape: saved for the run)
        model = args.shape if args.no_ray else saved.enter_context(
            servable_model(args.shape, device=args.device, dtype=args.dtype, seed=args.seed))
        engine = load_engine(model, device=args.device, dtype=args.dtype, attn=args.attn, seed=args.seed)
        # distinct images for every request a batch can hold (4x the most clients): a batch whose requests repeated
        # an image and prompt would share their whole prefill (vlmguard/prefix_sharing.py) and measure that, not
        # batching
        images = [bench_image(engine, args.seed + i) for i in range(max(8, 4 * max(clients)))]
        calls: dict[str, Call] = {"engine": engine_caller(engine, images, spec_for)}
        env = environment(engine)
        configs = {batching: served(cfg, model) for batching, cfg in configs.items()}
        if not args.no_ray:
            direct = _direct_ingress(args)
            started_ray = _private_ray(direct, _throughput_optimized(args))
            image_urls = [image_to_data_url(im) for im in images]
            for batching in (False, True):
                svc = _start(configs[batching], batching, progress)
                services.append(svc)
                path = "ray_batched" if batching else "ray_unbatched"
                if direct and not svc.direct_urls:
                    raise VlmguardError("--direct-ingress: the Ray cluster runs without Serve's direct ingress "
                                        "(perf serve needs a cluster of its own; is another one initialised?)")
                calls[path] = http_caller(svc.direct_urls[0] if direct else svc.url, image_urls, spec_for, {})
        rows = measure_paths(calls, clients, args.requests, args.repeats, args.warmup, progress)
    finally:
        tear_down(services, started_ray, saved)
    return {
        "command": "perf serve",
        "shape": args.shape,
        "new_tokens": args.new_tokens,
        "decoding": spec_json["decoding"],
        "mixed_settings": bool(getattr(args, "mixed_settings", False)),
        "requests": args.requests,
        "repeats": args.repeats,
        "clients": clients,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "batch_mode": getattr(args, "batch_mode", "inflight"),
        "ingress": None if args.no_ray else args.ingress,
        "direct_ingress": None if args.no_ray else _direct_ingress(args),
        "throughput_optimized": None if args.no_ray else _throughput_optimized(args),
        "environment": env,
        "rows": rows,
        "summary": serve_summary(rows),
        "targets": serve_targets(rows),
    }


def _throughput_optimized(args: Any) -> bool:
    return bool(getattr(args, "throughput_optimized", False))


def _direct_ingress(args: Any) -> bool:
    """Whether the clients call the replicas' own servers: asked for, or turned on by Serve's throughput mode."""
    return bool(getattr(args, "direct_ingress", False)) or _throughput_optimized(args)


def _private_ray(direct_ingress: bool = False, throughput_optimized: bool = False) -> bool:
    """A private local Ray cluster (even when another one runs on this machine). True if we started it."""
    import os

    import ray

    from vlmguard.interrupts import sigterm_kept
    from vlmguard.workers.launch import cluster_env

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a benchmark's replicas need no drain at the end; SIGTERM still unwinds the run, which shuts its cluster down
    with cluster_env(direct_ingress, drain_s=0, throughput_optimized=throughput_optimized), sigterm_kept():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return True


def tear_down(services: Sequence[Any], started_ray: bool, saved: ExitStack) -> None:
    """After a run: remove the benchmark's apps, end the Ray cluster if the run started it, then drop the saved
    model (``saved``: what ``servable_model`` wrote)."""
    for svc in services:
        try:
            svc.shutdown(keep_cluster=True)
        except Exception:  # noqa: BLE001 - best effort while tearing down
            pass
    if started_ray:
        import ray

        ray.shutdown()
    saved.close()


def _service_config(args: Any, batching: bool, threads: int, clients: list[int]) -> Any:
    """The ServiceConfig of one app; an option out of its range is one line naming the option (it was a
    pydantic traceback once Ray had started)."""
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig, local_gpus

    name = "perf-batched" if batching else "perf-unbatched"
    wait_s = args.batch_wait_ms / 1000.0
    options = {"max_batch_size": f"--max-batch {args.max_batch}",
               "batch_wait_timeout_s": f"--batch-wait-ms {args.batch_wait_ms} (= {wait_s} s)",
               "max_new_tokens_limit": f"--new-tokens {args.new_tokens}"}
    # the two apps (batching off / on) are up together, each with one replica: on CUDA they share the GPU (half
    # each; a whole GPU each would leave the second replica waiting for ever on a one-GPU machine)
    cuda = ModelConfig(device=args.device).runs_on_cuda(local_gpus())

    # no prefix cache: the requests go round their images, and the direct Engine path keeps none, so a replica's
    # cache would measure caching, not batching (``vlmguard perf prefix --cache`` measures it)
    def build() -> Any:
        return ServiceConfig(
            models=[ModelConfig(model=args.shape, device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                                num_replicas=1, num_cpus=0, num_gpus=0.5 if cuda else None, torch_threads=threads,
                                max_ongoing_requests=max(64, max(clients)), max_queued_requests=-1,
                                max_new_tokens_limit=max(max_request_tokens(args), 1), prefix_cache_mb=0,
                                batching=BatchingConfig(enabled=batching, max_batch_size=args.max_batch,
                                                        mode=getattr(args, "batch_mode", "inflight"),
                                                        batch_wait_timeout_s=wait_s))],
            api_keys=[], api_key_env=None, host="127.0.0.1", request_timeout_s=600.0, app_name=name,
            route_prefix=f"/{name}", ingress=args.ingress,
            direct_ingress=_direct_ingress(args), throughput_optimized=_throughput_optimized(args))

    return checked_config(build, options)


def checked_config(build: Callable[[], Any], options: dict[str, str]) -> Any:
    """``build()``'s ServiceConfig; a value out of range is one line naming the command-line option it came from
    (``options``: config field -> the option as given), not a pydantic traceback once Ray has started."""
    from pydantic import ValidationError

    from vlmguard.errors import InvalidInput

    try:
        return build()
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][-1]) if err.get("loc") else "option"
        raise InvalidInput(f"{options.get(field, field)}: {err['msg']}") from None


def served(cfg: Any, model: str) -> Any:
    """``cfg`` with its model loaded from ``model`` (``servable_model``'s answer), still served under its name."""
    m = cfg.models[0]
    return cfg.model_copy(update={"models": [m.model_copy(update={"model": model, "name": m.served_name})]})


def _start(cfg: Any, batching: bool, progress) -> Any:
    from vlmguard.workers.launch import start_service

    if progress:
        progress(f"starting the service app {cfg.app_name} (dynamic batching {'on' if batching else 'off'})")
    return start_service(cfg, port=0)


def serve_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["path"], r["clients"]): r for r in rows}
    out: dict[str, Any] = {"batching_speedup": {}, "batching_speedup_per_round": {},
                           "ray_latency_overhead_1_client": {}, "ray_latency_overhead_1_client_per_round": {}}
    for (path, c), r in by.items():
        if path == "ray_batched" and ("ray_unbatched", c) in by:
            un = by[("ray_unbatched", c)]
            out["batching_speedup"][str(c)] = ratio(r["requests_per_s"], un["requests_per_s"])
            out["batching_speedup_per_round"][str(c)] = [ratio(b, u) for b, u in
                                                         _round_pairs(r, un, "requests_per_s")]
    eng = by.get(("engine", 1))
    for path in ("ray_unbatched", "ray_batched"):
        if eng and (path, 1) in by:
            r = by[(path, 1)]
            out["ray_latency_overhead_1_client"][path] = ratio(r["latency_median_s"], eng["latency_median_s"])
            out["ray_latency_overhead_1_client_per_round"][path] = [
                ratio(a, b) for a, b in _round_pairs(r, eng, "latency_median_s")]
    return out


def _round_pairs(a: dict[str, Any], b: dict[str, Any], key: str) -> list[tuple[float, float]]:
    """(a, b) values of ``key`` round by round (the rows' raw samples)."""
    return list(zip((a.get("samples") or {}).get(key, []), (b.get("samples") or {}).get(key, [])))


def serve_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue-8 targets: batching >= 3x unbatched throughput at 16 clients; Ray <= 1.15x Engine latency at 1."""
    s = serve_summary(rows)
    out = []
    v = s["batching_speedup"].get("16")
    if v is not None:
        out.append({"metric": "batching_speedup_16_clients", "value": v, "threshold": 3.0, "met": v >= 3.0})
    for path, v in s["ray_latency_overhead_1_client"].items():
        if v is not None:
            out.append({"metric": f"{path}_latency_over_engine_1_client", "value": v, "threshold": 1.15,
                        "met": v <= 1.15})
    return out


def serve_table(result: dict[str, Any]) -> str:
    from vlmguard.perf.report import fmt, table

    rows = [[r["path"], r["clients"], r["requests"], r["errors"], r["requests_per_s"], r["tokens_per_s"],
             r["latency_median_s"], r["latency_p90_s"], r["added_latency_median_s"], r.get("mean_prefill_batch")]
            for r in result["rows"]]
    env = result["environment"]
    s = result["summary"]
    lines = [f"perf serve  shape={result['shape']}  decoding={result.get('decoding', 'greedy')}  "
             f"new_tokens={result['new_tokens']}{' (mixed settings)' if result.get('mixed_settings') else ''}  "
             f"requests={result['requests']}  "
             f"max_batch={result['max_batch']}  batch_wait_ms={result['batch_wait_ms']}  "
             f"batch_mode={result.get('batch_mode', 'whole')}  "
             f"ingress={result.get('ingress')}{' (direct)' if result.get('direct_ingress') else ''}"
             f"{' (throughput-optimized)' if result.get('throughput_optimized') else ''}  "
             f"threads={env.get('threads')}",
             table(["path", "clients", "requests", "errors", "req/s", "tok/s", "p50_s", "p90_s", "added_p50_s",
                    "prefill_n"], rows)]
    if s["batching_speedup"]:
        lines.append("batching speed-up (batched / unbatched req/s): "
                     + ", ".join(f"{c} clients {fmt(v)}x" for c, v in s["batching_speedup"].items()))
    if any(s.get("batching_speedup_per_round", {}).values()):
        lines.append("  per round (paths adjacent in time): " + "; ".join(
            f"{c} clients " + ", ".join(fmt(v) for v in vs) for c, vs in s["batching_speedup_per_round"].items()))
    if s["ray_latency_overhead_1_client"]:
        lines.append("Ray latency / Engine latency at 1 client: "
                     + ", ".join(f"{p} {fmt(v)}x" for p, v in s["ray_latency_overhead_1_client"].items()))
        per = s.get("ray_latency_overhead_1_client_per_round", {})
        if any(per.values()):
            lines.append("  per round: " + "; ".join(f"{p} " + ", ".join(fmt(v) for v in vs) for p, vs in per.items()))
    return "\n".join(lines)
