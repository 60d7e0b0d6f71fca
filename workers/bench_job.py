"""The driver of a benchmark Ray Job: shard a benchmark over the replicas of a served model.

Run by ``vlmguard job submit bench ...`` as the job's entrypoint (``python -m vlmguard.workers.bench_job``);
``vlmguard job submit bench sweep CONFIG.yaml`` runs every benchmark of a sweep config this way, one after another.
It joins the cluster, finds the running vlmguard app's model deployment and runs
:func:`vlmguard.bench.runner.run_benchmark` once per shard, concurrently (shard ``k`` of ``n`` takes items
``k, k+n, ...``; ``n`` defaults to the deployment's replica count), each shard sending its batches through
the deployment handle, so Serve spreads them over the replicas.

Fault tolerance: a call that fails because a replica died (or is restarting, or the queue is full) is
retried with backoff and lands on a live replica; samples are written with ``INSERT OR IGNORE`` per sample
key, so nothing is lost and nothing is counted twice. Re-submitting the same job resumes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.results import GenerationResult, Request, StepDiagnostic, Timings
from vlmguard.workers.engine_worker import WorkItem

RETRYABLE = (
    "ActorDiedError", "ActorUnavailableError", "RayActorError", "BackPressureError", "DeploymentUnavailableError",
    "ReplicaUnavailableError", "RequestCancelledError", "GetTimeoutError", "TimeoutError", "WorkerCrashedError",
    "NodeDiedError", "ObjectLostError", "OwnerDiedError", "RaySystemError",
)


def result_from_dict(d: dict[str, Any]) -> GenerationResult:
    d = dict(d)
    d["timings"] = Timings(**d["timings"])
    d["steps"] = [StepDiagnostic(**s) for s in d.get("steps") or []]
    return GenerationResult(**d)


def _retryable(e: BaseException) -> bool:
    return any(base.__name__ in RETRYABLE for base in type(e).__mro__)


@dataclass(frozen=True)
class ReplicaPromptFormat:
    """What a benchmark's prompt presets read of a model's adapter (``PopePrompt.frame``), from a replica's info:
    a job frames an OPERA / HALC question as a run on the replica's model in this process would."""

    system: str | None
    image_placeholder: str | None

    def default_system(self) -> str | None:
        return self.system


class ServeEngine:
    """Looks like an Engine to ``run_benchmark``; ``generate`` goes to a Serve model deployment."""

    def __init__(self, handle: Any, info: dict[str, Any], *, call_timeout_s: float = 600.0,
                 max_wait_s: float = 600.0):
        self.handle = handle
        self.model_name = info.get("model") or info.get("name")
        self.family = info.get("family")
        self.context_length = info.get("context_length")
        self.revision = info.get("revision")  # run identity: the replicas' weights and precision
        self.dtype = info.get("dtype")
        self.quantization = info.get("quantization")
        self.adapter = ReplicaPromptFormat(info.get("default_system"), info.get("image_placeholder"))
        self.call_timeout_s = call_timeout_s
        self.max_wait_s = max_wait_s
        self.retries = 0

    def generate(self, requests: Sequence[Request], spec: Any) -> list[GenerationResult]:
        items = [WorkItem(prompt=r.prompt, spec=spec, images=list(r.images), system=r.system,
                          request_id=r.request_id, raw_prompt=r.raw_prompt) for r in requests]
        deadline = time.monotonic() + self.max_wait_s
        delay = 0.5
        while True:
            try:
                answers = self.handle.generate_batch.remote(items).result(timeout_s=self.call_timeout_s)
                break
            except Exception as e:  # noqa: BLE001 - retry what a replica failure causes, raise the rest
                if not _retryable(e) or time.monotonic() > deadline:
                    raise
                self.retries += 1
                print(f"[bench-job] replica call failed ({type(e).__name__}); retrying in {delay:.1f} s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        out = []
        for a in answers:
            if "error" in a:
                raise InvalidInput(a["error"]["message"])
            out.append(result_from_dict(a["result"]))
        return out


def find_model_deployment(app: str, model: str | None) -> tuple[Any, dict[str, Any], int]:
    """(handle, info, running replicas) of the app's deployment serving ``model`` (default: the first)."""
    from ray import serve

    status = serve.status()
    if app not in status.applications:
        known = ", ".join(status.applications) or "none"
        raise VlmguardError(f"no Serve application {app!r} on this cluster (running: {known}); "
                            "start the service first with `vlmguard serve`")
    deps = status.applications[app].deployments
    found = []
    for name in sorted(deps):
        if not name.startswith("ModelWorker"):
            continue
        handle = serve.get_deployment_handle(name, app_name=app)
        info = handle.info.remote().result(timeout_s=120)
        found.append((handle, info, int(deps[name].replica_states.get("RUNNING", 0)) or 1))
    if not found:
        raise VlmguardError(f"application {app!r} has no vlmguard model deployment")
    if model is None:
        return found[0]
    for handle, info, n in found:
        if model in (info.get("name"), info.get("model")):
            return handle, info, n
    raise VlmguardError(f"model {model!r} is not served by {app!r} (served: "
                        f"{', '.join(str(f[1].get('name')) for f in found)})")


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vlmguard.bench import cli as bench_cli
    from vlmguard.bench.pope_leading import ALL_TEMPLATES
    from vlmguard.bench.pope_parsers import PARSERS
    from vlmguard.bench.prompts import CHAIR_PRESETS, POPE_PROMPTS

    p = parser_class(prog="python -m vlmguard.workers.bench_job",
                     description="benchmark sweep sharded over a served model's replicas")
    p.add_argument("benchmark", choices=["pope", "pope-leading", "chair"])
    bench_cli._add_dataset_args(p)
    bench_cli._add_method_args(p)
    bench_cli._add_run_args(p)
    p.set_defaults(model=None)
    p.add_argument("--split", action="append",
                   help="POPE: random | popular | adversarial | all (repeatable); chair: its image split")
    p.add_argument("--prompt-preset", default="llava", choices=sorted(POPE_PROMPTS))
    p.add_argument("--parser", default="official", choices=PARSERS.names())
    p.add_argument("--template", action="append", choices=list(ALL_TEMPLATES))
    p.add_argument("--preset", dest="chair_preset", default="chair512", choices=sorted(CHAIR_PRESETS))
    p.add_argument("--prompt")
    p.add_argument("--app", default="vlmguard", help="Serve application name (default: %(default)s)")
    p.add_argument("--shards", type=bench_cli.positive_int, default=None,
                   help="default: the deployment's running replicas")
    p.add_argument("--ray-address", default="auto")
    return p


POPE_SPLIT_CHOICES = ("random", "popular", "adversarial", "all")


def parse_job_args(argv: Sequence[str], parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                   ) -> argparse.Namespace:
    """A benchmark job's arguments. ``--split`` is POPE's question split, or, for ``chair``, the image split (as
    ``vlmguard bench chair --split``)."""
    p = build_parser(parser_class)
    args = p.parse_args(list(argv))
    if args.benchmark == "chair" and args.split:
        if len(args.split) > 1:
            p.error("chair takes one --split (the image split of its captioned images)")
        args.image_split, args.split = args.split[0], None
    for split in args.split or []:
        if split not in POPE_SPLIT_CHOICES:
            p.error(f"argument --split: invalid choice: {split!r} (choose from "
                    f"{', '.join(repr(c) for c in POPE_SPLIT_CHOICES)})")
    return args


def build_sweep_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                       ) -> argparse.ArgumentParser:
    """``sweep CONFIG.yaml``: every run of a sweep config (``vlmguard bench sweep``), each sharded as one benchmark
    job is, on the served models the config names."""
    from vlmguard.bench import cli as bench_cli

    p = parser_class(prog="python -m vlmguard.workers.bench_job sweep",
                     description="a benchmark sweep (YAML) sharded over the replicas of the served models")
    p.add_argument("config", help="sweep config (YAML), as `vlmguard bench sweep` takes it")
    p.add_argument("--db", default=None, help="results database (default: the config's db)")
    p.add_argument("--limit", type=bench_cli.positive_int, default=None, help="samples per run (a quick look)")
    p.add_argument("--chdir", default=None, help="the directory the config's relative paths are read from")
    p.add_argument("--app", default="vlmguard", help="Serve application name (default: %(default)s)")
    p.add_argument("--shards", type=bench_cli.positive_int, default=None,
                   help="default: each model deployment's running replicas")
    p.add_argument("--ray-address", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["sweep"]:
            result = run_sweep_job(build_sweep_parser().parse_args(argv[1:]))
        else:
            result = run_job(parse_job_args(argv))
        print(json.dumps(result, default=str), flush=True)
        return 0
    except VlmguardError as e:
        print(f"vlmguard: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a file the job was given (a broken connection): keep its traceback
            raise
        print(f"vlmguard: error: {e.strerror or e}: {e.filename}", file=sys.stderr, flush=True)
        return 2


def _connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def sharded_run(engine: "ServeEngine", shards: int, benchmark: str, dataset: Any, spec: Any, db: Any, **kwargs: Any):
    """``run_benchmark`` as ``shards`` concurrent shards through the deployment (Serve spreads their batches over
    the replicas): the run's outcome, with the samples every shard added."""
    import dataclasses

    from vlmguard.bench.runner import run_benchmark

    kwargs = {**kwargs, "progress": False}
    with ThreadPoolExecutor(max_workers=shards) as pool:
        outcomes = list(pool.map(lambda k: run_benchmark(engine, benchmark, dataset, spec, db, shard_index=k,
                                                         num_shards=shards, **kwargs), range(shards)))
    final = max(outcomes, key=lambda o: (o.status == "finished", o.n_samples))
    final = dataclasses.replace(final, n_new=sum(o.n_new for o in outcomes))
    print(f"[bench-job] run {final.run_id}: {final.n_samples}/{final.n_expected} samples, "
          f"status {final.status}", file=sys.stderr, flush=True)
    return final


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    from vlmguard.bench.cli import _dataset_from_args, _spec_from_args, benchmark_runs

    spec = _spec_from_args(args)
    spec.resolve()
    dataset = _dataset_from_args(args)
    _connect(args.ray_address)
    handle, info, replicas = find_model_deployment(args.app, args.model)
    n = replicas if args.shards is None else args.shards
    engine = ServeEngine(handle, info)
    jobs = benchmark_runs(args)
    t0 = time.perf_counter()
    print(f"[bench-job] {args.benchmark} on {info.get('name')} ({info.get('model')}): {len(jobs)} run(s) x "
          f"{n} shard(s) over {replicas} replica(s)", file=sys.stderr, flush=True)
    runs = []
    for job in jobs:
        final = sharded_run(
            engine, n, args.benchmark, dataset, spec, args.db, prompt_preset=args.prompt_preset, parser=args.parser,
            chair_preset=args.chair_preset, prompt=args.prompt, image_ids_file=args.image_ids, limit=args.limit,
            batch_size=args.batch_size, model_name=engine.model_name, **job)
        runs.append(final.to_dict())
    return {"benchmark": args.benchmark, "model": engine.model_name, "shards": n, "replicas": replicas,
            "retries": engine.retries, "elapsed_s": round(time.perf_counter() - t0, 3), "db": str(args.db),
            "runs": runs}


def run_sweep_job(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of a sweep config on the served models it names (each must be served by ``--app``: by its served
    name or its model), each run sharded over its deployment's replicas. A resubmitted sweep resumes."""
    import os

    from vlmguard.bench.sweep import expand, load_config, run_sweep

    if args.chdir:
        try:
            os.chdir(args.chdir)
        except OSError as e:
            raise InvalidInput(f"--chdir {args.chdir}: {e.strerror}") from None
    models = list(dict.fromkeys(job["model"] for job in expand(load_config(args.config))))
    _connect(args.ray_address)
    served = {}
    for name in models:  # every model found before the first run
        handle, info, replicas = find_model_deployment(args.app, name)
        served[name] = (ServeEngine(handle, info), replicas if args.shards is None else args.shards)
    t0 = time.perf_counter()
    print(f"[bench-job] sweep {args.config} on {', '.join(models)} ({args.app})", file=sys.stderr, flush=True)

    def run(engine: ServeEngine, *a: Any, **kw: Any):
        return sharded_run(engine, next(n for e, n in served.values() if e is engine), *a, **kw)

    outcomes = run_sweep(args.config, db=args.db, limit=args.limit, load_engine=lambda name: served[name][0],
                         progress=False, run=run, echo=lambda line: print(f"[bench-job] {line}", file=sys.stderr,
                                                                           flush=True))
    return {"benchmark": "sweep", "config": str(args.config), "models": models,
            "shards": {name: n for name, (_, n) in served.items()},
            "retries": sum(e.retries for e, _ in served.values()),
            "elapsed_s": round(time.perf_counter() - t0, 3), "runs": [o.to_dict() for o in outcomes]}


if __name__ == "__main__":
    sys.exit(main())
