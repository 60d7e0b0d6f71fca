"""``vlmguard serve`` and ``vlmguard job submit|status|logs|stop``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.interrupts import Terminated, ctrl_c_noted
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str), flush=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlmguard.workers.launch import DEFAULT_START_TIMEOUT_S

    sp = subparsers.add_parser(
        "serve", help="serve models over HTTP (Ray Serve; OpenAI-compatible + native API)",
        description="Start (or join, with --address) a Ray cluster and deploy the vlmguard app. Without "
                    "--detach it runs until Ctrl-C. Endpoints: POST /v1/chat/completions, POST /v1/completions, "
                    "POST /v1/responses, POST /v1/conversations, POST /v1/generate, POST /tokenize, GET /v1/models, "
                    "GET /health, GET /metrics.")
    sp.add_argument("--config", type=Path, help="service YAML (a Serve config file or a bare ServiceConfig)")
    sp.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
    sp.add_argument("--host", help="HTTP host (default: 127.0.0.1)")
    sp.add_argument("--address", help="join this Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of starting one")
    sp.add_argument("--model", help="serve this one model (overrides the config's models)")
    sp.add_argument("--replicas", type=int, help="replicas per model")
    sp.add_argument("--no-batching", dest="batching", action="store_false", default=None,
                    help="turn dynamic batching off")
    sp.add_argument("--max-batch-size", type=int)
    sp.add_argument("--batch-wait-ms", type=float)
    sp.add_argument("--batch-mode", choices=["inflight", "whole"],
                    help="inflight (default): requests join the running batch between decode steps; whole: the "
                         "next batch forms when the engine is free")
    sp.add_argument("--direct-ingress", action="store_true", default=None,
                    help="Ray Serve direct ingress: each replica also serves HTTP on its own port (printed), so "
                         "clients can skip the Serve proxy (clusters started here get the flag)")
    sp.add_argument("--throughput-optimized", action="store_true", default=None,
                    help="Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED; implies "
                         "--direct-ingress; clusters started here get the flag)")
    sp.add_argument("--prefix-cache-mb", type=float, metavar="MIB",
                    help="MiB per replica that keep image prefixes and visual tokens of earlier requests for later "
                         "ones about the same image (default: the config's, 1024; 0 turns it off)")
    sp.add_argument("--quantization", choices=QUANT_CHOICES,
                    help="every model's language-model weights quantized as they load (bitsandbytes; default: the "
                         "config's, none)")
    sp.add_argument("--responses-store-path", metavar="FILE",
                    help="keep the Responses and Conversations APIs' stored responses and conversations in this "
                         "SQLite file, so they outlive a restart (default: the config's; in memory)")
    sp.add_argument("--num-cpus", type=int, help="logical CPUs of a locally started cluster")
    sp.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard / Jobs API port (local cluster)")
    sp.add_argument("--detach", action="store_true",
                    help="start a background cluster (`ray start --head`), deploy and return; stop with --stop")
    sp.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, metavar="SECONDS",
                    help="give up (and remove the app) when its replicas are not running after this long: Ray cannot "
                         "place them on the cluster, or their model loads that long (default: %(default)g)")
    sp.add_argument("--stop", action="store_true",
                    help="remove the vlmguard app from the cluster (--address; default: the one Ray finds, "
                         "$RAY_ADDRESS or this machine's); other Serve apps stay")
    sp.add_argument("--json", action="store_true", help="print the service URL etc. as one JSON object")
    sp.set_defaults(func=cmd_serve)

    jp = subparsers.add_parser("job", help="benchmark sweeps as Ray Jobs against a running service")
    jsub = jp.add_subparsers(dest="job_command", metavar="ACTION")
    jsub.required = True
    su = jsub.add_parser(
        "submit", help="submit a job: `vlmguard job submit [--address URL] [--wait] bench pope --limit 20 ...`",
        description="Submit `bench BENCHMARK [bench options]` as a Ray Job. The job shards the benchmark over "
                    "the replicas of the running vlmguard app's model and writes to the results DB. Bench options "
                    "are those of `vlmguard bench` plus --app NAME and --shards N; --model picks a served model. "
                    "`bench sweep CONFIG.yaml [--db --limit --app --shards]` runs every benchmark of a sweep config "
                    "(`vlmguard bench sweep`) this way, on the served models it names.")
    _job_common(su)
    su.add_argument("--wait", action="store_true", help="wait for the job to end and print its logs")
    su.add_argument("--timeout", type=float, default=3600.0, help="with --wait: give up after this many seconds")
    su.add_argument("--python", help="python on the cluster (default: this interpreter)")
    su.add_argument("--submission-id", help="job id to use (default: generated)")
    su.add_argument("kind", choices=["bench"], help="job kind")
    su.add_argument("bench_args", nargs=argparse.REMAINDER, help="BENCHMARK and its options")
    su.set_defaults(func=cmd_job_submit, submit_options=[o for a in su._actions for o in a.option_strings
                                                         if o not in ("-h", "--help", "--json")])
    for name, func, helptext in (("status", cmd_job_status, "a job's status"), ("logs", cmd_job_logs, "a job's logs"),
                                 ("stop", cmd_job_stop, "stop a job")):
        p = jsub.add_parser(name, help=helptext)
        p.add_argument("job_id")
        _job_common(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
        p.set_defaults(func=func)


def _job_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray Jobs API (dashboard) address (default: $RAY_ADDRESS or "
                                     "http://127.0.0.1:8265)")
    p.add_argument("--json", action="store_true")


# ---- serve --------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from vlmguard.testing import random_family
    from vlmguard.workers.config import load_config, local_gpus
    from vlmguard.workers.launch import (apply_overrides, check_cluster_address, check_port_free, check_resources,
                                         start_detached_cluster, start_service)

    if args.stop:
        return _stop_service(args.address)
    wait_s = None if args.batch_wait_ms is None else args.batch_wait_ms / 1000.0
    config = apply_overrides(
        load_config(args.config), port=args.port, host=args.host, batching=args.batching, model=args.model,
        replicas=args.replicas, max_batch_size=args.max_batch_size, batch_wait_timeout_s=wait_s,
        direct_ingress=args.direct_ingress, batch_mode=args.batch_mode, throughput_optimized=args.throughput_optimized,
        prefix_cache_mb=args.prefix_cache_mb, quantization=args.quantization,
        responses_store_path=args.responses_store_path,
        names={"port": f"--port {args.port}", "host": f"--host {args.host}", "model": f"--model {args.model}",
               "replicas": f"--replicas {args.replicas}", "max_batch_size": f"--max-batch-size {args.max_batch_size}",
               "batch_wait_timeout_s": f"--batch-wait-ms {args.batch_wait_ms} (= {wait_s} s)",
               "batch_mode": f"--batch-mode {args.batch_mode}",
               "prefix_cache_mb": f"--prefix-cache-mb {args.prefix_cache_mb}",
               "quantization": f"--quantization {args.quantization}",
               "responses_store_path": f"--responses-store-path {args.responses_store_path}"})  # fails here
    address = args.address
    if not 0 < args.start_timeout < math.inf:
        raise InvalidInput(f"--start-timeout {args.start_timeout}: expected a number of seconds > 0")
    if args.num_cpus is not None and args.num_cpus < 0:
        raise InvalidInput(f"--num-cpus {args.num_cpus}: expected a number of CPUs >= 0")
    if address:
        check_cluster_address(address)  # nothing there: one line now, not minutes of Ray retrying
    elif not args.detach:  # a cluster of our own: its ports must be free (Serve would share a busy HTTP port)
        check_port_free(config.host, config.port, "HTTP port (--host/--port)")
        check_port_free("127.0.0.1", args.dashboard_port, f"--dashboard-port {args.dashboard_port}")
    for m in config.models:  # random:FAMILY models are built by the replicas wherever they run: check the family now
        if m.model.startswith("random:"):
            random_family(m.model)
    if not address:  # the replicas run on this machine: a model they could not load fails here, in one line
        from vlmguard.models.resolve import resolve_model_path

        for m in config.models:
            if not m.model.startswith("random:"):
                resolve_model_path(m.model)
        # replicas reserving GPUs this machine lacks, or more CPUs than --num-cpus gives, would wait for ever
        check_resources(config, {"GPU": local_gpus()}, "this machine", "or join a cluster (--address)")
        if args.num_cpus is not None:
            check_resources(config, {"CPU": args.num_cpus}, f"a cluster of --num-cpus {args.num_cpus}")
    if args.detach and not address:
        address = start_detached_cluster(num_cpus=args.num_cpus, dashboard_port=args.dashboard_port,
                                         direct_ingress=config.direct_ingress,
                                         throughput_optimized=config.throughput_optimized)
    svc = start_service(config, address=address, num_cpus=args.num_cpus, dashboard_port=args.dashboard_port,
                        start_timeout_s=args.start_timeout)
    if args.detach:
        _announce(svc, config, args)
        if not args.json:
            print("running in the background; stop with `vlmguard serve --stop` and `ray stop`")
        return 0
    try:  # from here on, Ctrl-C or SIGTERM shuts the service down, even while it is being announced
        _announce(svc, config, args)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (a container stop, systemd, kill: the CLI's handler, which
        # connect_ray kept through ray.init): shut down the same way
        print("shutting down" + (" (SIGTERM)" if isinstance(e, Terminated) else ""), file=sys.stderr)
    finally:
        svc.shutdown()
    return 0


def _announce(svc: Any, config: Any, args: argparse.Namespace) -> None:
    """Print where the service answers (one JSON object with --json)."""
    from vlmguard.workers.launch import DIRECT_INGRESS_ENV

    info = {"url": svc.url, "models": [m.served_name for m in config.models], "jobs_address": svc.dashboard_url,
            "openai_base_url": svc.url + "/v1", "detached": bool(args.detach), "direct_urls": svc.direct_urls}
    if args.json:
        _print_json(info)
    else:
        print(f"vlmguard serving {', '.join(info['models'])} at {svc.url}  (OpenAI base URL {svc.url}/v1)")
        for u in svc.direct_urls:
            print(f"direct ingress (replica's own server, no Serve proxy): {u}")
        if svc.dashboard_url:
            print(f"Ray dashboard / Jobs API: {svc.dashboard_url}")
    if config.direct_ingress and not svc.direct_urls:
        print(f"warning: direct ingress was asked for but the Ray cluster runs without it (start it with "
              f"{DIRECT_INGRESS_ENV}=1); serving through the Serve proxy only", file=sys.stderr)
    sys.stdout.flush()


def _stop_service(address: str | None) -> int:
    """``serve --stop``: remove the vlmguard apps (those with a ModelWorker deployment, as ``bench_job`` finds them)
    from the cluster at ``address`` (default: the one Ray finds: $RAY_ADDRESS or this machine's latest), naming
    it. Other programs' Serve apps stay; Serve itself is shut down only when no app is left."""
    from vlmguard.workers.launch import check_cluster_address
    from vlmguard.workers.ray_auth import use_local_auth_token

    env_address = os.environ.get("RAY_ADDRESS", "").strip()
    if address or env_address:  # ray.init("auto") connects to $RAY_ADDRESS: a silent one would hang it
        try:
            check_cluster_address(address or "auto")
        except VlmguardError:
            where = address if address and address != "auto" else f"{env_address} ($RAY_ADDRESS)"
            print(f"no Ray cluster is running at {where}: nothing to stop")
            return 0
    use_local_auth_token()
    import ray
    from ray import serve

    try:
        ray.init(address=address or "auto", log_to_driver=False)
    except ConnectionError:
        print(f"no Ray cluster is running{' at ' + address if address else ''}: nothing to stop")
        return 0
    where = ray.get_runtime_context().gcs_address
    apps = serve.status().applications
    ours = [name for name, app in apps.items() if any(d.startswith("ModelWorker_") for d in app.deployments)]
    if not ours:
        print(f"no vlmguard app on the Ray cluster at {where} (Serve apps there: {', '.join(apps) or 'none'}): "
              "nothing to stop")
        return 0
    for name in ours:
        serve.delete(name)
    others = [name for name in apps if name not in ours]
    if not others:
        serve.shutdown()  # nothing else on Serve: its proxies (and their HTTP port) go too
    print(f"vlmguard app {', '.join(ours)} removed from the Ray cluster at {where}"
          + (f" (Serve keeps running {', '.join(others)})" if others else "")
          + "; the cluster keeps running (`ray stop` ends it)")
    return 0


# ---- jobs ---------------------------------------------------------------------------------------------

def cmd_job_submit(args: argparse.Namespace) -> int:
    from vlmguard.workers import jobs

    bench_argv = list(args.bench_args)
    if "--json" in bench_argv:  # `job submit bench pope ... --json`: the job prints JSON anyway; this asks for ours
        bench_argv = [a for a in bench_argv if a != "--json"]
        args.json = True
    if not bench_argv:
        raise InvalidInput("job submit bench needs a benchmark: pope, pope-leading or chair, or sweep CONFIG.yaml")
    try:
        job_id = jobs.submit_bench(bench_argv, address=args.address, python=args.python,
                                   submission_id=args.submission_id)
    except InvalidInput as e:  # `job submit bench pope --wait`: the job's parser got an option of ours
        misplaced = [a.partition("=")[0] for a in bench_argv if a.partition("=")[0] in args.submit_options]
        if not misplaced or "unrecognized arguments" not in str(e):
            raise
        one = len(misplaced) == 1
        raise InvalidInput(f"{e} ({', '.join(misplaced)}: {'an option' if one else 'options'} of `job submit`, not "
                           f"of the benchmark; put {'it' if one else 'them'} before `bench`)") from None
    if not args.wait:
        if args.json:
            _print_json({"job_id": job_id, "status": "PENDING", "address": jobs.jobs_address(args.address)})
        else:
            print(f"submitted job {job_id}; follow with `vlmguard job logs {job_id} --follow`")
        return 0
    with ctrl_c_noted() as ctrl_c:
        st = jobs.wait(job_id, args.address, timeout_s=args.timeout, stop=ctrl_c)
    log_text = jobs.logs(job_id, args.address)
    if args.json:
        _print_json({**st, "result": _last_json(log_text)})
    else:
        sys.stdout.write(log_text)
        print(f"job {job_id}: {st['status']}")
    return 0 if st["status"] == "SUCCEEDED" else 1


def _last_json(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def cmd_job_status(args: argparse.Namespace) -> int:
    from vlmguard.workers import jobs

    st = jobs.status(args.job_id, args.address)
    if args.json:
        _print_json(st)
    else:
        print(f"{st['job_id']}: {st['status']}" + (f" ({st['message']})" if st.get("message") else ""))
    return 0


def cmd_job_logs(args: argparse.Namespace) -> int:
    from vlmguard.workers import jobs

    if args.follow:
        seen = 0
        with ctrl_c_noted() as ctrl_c:
            while not ctrl_c.is_set():
                text = jobs.logs(args.job_id, args.address)
                sys.stdout.write(text[seen:])
                sys.stdout.flush()
                seen = len(text)
                if jobs.status(args.job_id, args.address)["status"] in jobs.TERMINAL:
                    rest = jobs.logs(args.job_id, args.address)[seen:]
                    sys.stdout.write(rest)
                    return 0
                ctrl_c.wait(1.0)
        raise KeyboardInterrupt  # a Ctrl-C whose exception was swallowed on the way
    text = jobs.logs(args.job_id, args.address)
    if args.json:
        _print_json({"job_id": args.job_id, "logs": text})
    else:
        sys.stdout.write(text)
    return 0


def cmd_job_stop(args: argparse.Namespace) -> int:
    from vlmguard.workers import jobs

    stopped = jobs.stop(args.job_id, args.address)
    state = jobs.status(args.job_id, args.address)["status"]  # a stopped job turns STOPPED a moment later
    if args.json:
        _print_json({"job_id": args.job_id, "stopped": stopped, "status": state})
    else:
        print(f"job {args.job_id}: {'stop requested' if stopped else f'not running (already {state})'}")
    return 0
