"""``vlmguard bench sweep CONFIG.yaml``: methods x budgets x benchmarks, every run resumable.

Config (YAML)::

    model: tiny                 # or a list of models
    dataset: synthcoco          # or a SynthCOCO directory, or "coco" with the coco_* keys below
    db: runs/vlmguard.sqlite    # optional (the CLI's --db wins)
    limit: 300                  # optional, items per run
    batch_size: 16              # optional
    # coco_images: ..., coco_annotations: ..., pope_dir: ..., pope_set: head, gt: ..., image_ids: ...
    benchmarks:
      - pope: {splits: [random, popular, adversarial], prompt_preset: llava, parser: official}
      - pope-leading: {splits: [random], templates: [W-misleading]}
      - chair: {preset: chair64, limit: 100}   # a per-benchmark limit overrides the top-level one
    methods:
      - {name: base}
      - {name: flowcut, pruning: flowcut, pruning_params: {}}
      - {name: vcd, decoding: vcd, decoding_params: {alpha: 1.0}}
    budgets: [48, 16]           # applied to every method that prunes; others run once

Generation knobs (max_new_tokens, seed, do_sample, temperature, top_p, top_k) may be set per method or
at the top level; benchmark presets fill in the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlmguard.bench.datasets import resolve_dataset
from vlmguard.bench.pope_data import SPLITS
from vlmguard.bench.runner import RunOutcome, default_spec, run_benchmark
from vlmguard.errors import InvalidInput

GEN_KEYS = ("max_new_tokens", "seed", "do_sample", "temperature", "top_p", "top_k")
METHOD_KEYS = {"name", "pruning", "pruning_params", "budget", "budgets", "decoding", "decoding_params", *GEN_KEYS}
TOP_KEYS = {
    "model", "models", "dataset", "db", "limit", "batch_size", "benchmarks", "methods", "budgets", "image_split",
    "coco_images", "coco_annotations", "pope_dir", "pope_set", "gt", "image_ids", "device", *GEN_KEYS,
}


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"{p}: sweep config not found")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InvalidInput(f"{p}{where}: bad YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(cfg, dict):
        raise InvalidInput(f"{p}: expected a mapping at the top level")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise InvalidInput(f"{p}: unknown keys {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
    if not cfg.get("benchmarks"):
        raise InvalidInput(f"{p}: 'benchmarks' is required")
    for m in cfg.get("methods") or [{}]:
        if not isinstance(m, dict):
            raise InvalidInput(f"{p}: every method must be a mapping, got {m!r}")
        bad = set(m) - METHOD_KEYS
        if bad:
            raise InvalidInput(f"{p}: method {m.get('name', m)!r}: unknown keys {sorted(bad)}")
    return cfg


def _benchmarks(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for entry in cfg["benchmarks"]:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, opts), = entry.items()
            out.append((name, dict(opts or {})))
        else:
            raise InvalidInput(f"bad benchmark entry {entry!r} (use 'pope' or {{pope: {{...}}}})")
    for name, _ in out:
        if name not in ("pope", "pope-leading", "chair"):
            raise InvalidInput(f"unknown benchmark {name!r} in sweep (known: pope, pope-leading, chair)")
    return out


def expand(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (model, method, budget, benchmark, split/template) job of the sweep, in order."""
    models = cfg.get("models") or [cfg.get("model", "tiny")]
    if isinstance(models, str):
        models = [models]
    methods = cfg.get("methods") or [{"name": "base"}]
    jobs = []
    for model in models:
        for m in methods:
            prunes = m.get("pruning") not in (None, "none")
            budgets = m.get("budgets", [m["budget"]] if "budget" in m else cfg.get("budgets")) if prunes else None
            for budget in budgets or [None]:
                for bench, opts in _benchmarks(cfg):
                    splits = opts.get("splits", list(SPLITS)) if bench != "chair" else [None]
                    templates = opts.get("templates", [None]) if bench == "pope-leading" else [None]
                    for split in splits:
                        for tmpl in templates:
                            gen = {k: m.get(k, cfg.get(k)) for k in GEN_KEYS}
                            jobs.append(
                                {
                                    "model": model,
                                    "method": m.get("name") or m.get("pruning") or m.get("decoding") or "base",
                                    "benchmark": bench,
                                    "split": split,
                                    "template": tmpl,
                                    "prompt_preset": opts.get("prompt_preset"),
                                    "parser": opts.get("parser"),
                                    "chair_preset": opts.get("preset"),
                                    "prompt": opts.get("prompt"),
                                    "limit": opts.get("limit"),
                                    "pruning": m.get("pruning", "none"),
                                    "pruning_params": m.get("pruning_params") or {},
                                    "budget": budget,
                                    "decoding": m.get("decoding", "greedy"),
                                    "decoding_params": m.get("decoding_params") or {},
                                    **gen,
                                }
                            )
    return jobs


def run_sweep(
    config_path: str | Path,
    *,
    db: str | Path | None = None,
    limit: int | None = None,
    load_engine: Callable[[str], Any] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[RunOutcome]:
    cfg = load_config(config_path)
    jobs = expand(cfg)
    dataset = resolve_dataset(
        str(cfg.get("dataset", "synthcoco")),
        image_split=cfg.get("image_split", "test"),
        coco_images=_path(cfg.get("coco_images")),
        pope_dir=_path(cfg.get("pope_dir")),
        pope_set=cfg.get("pope_set", "head"),
        coco_annotations=_path(cfg.get("coco_annotations")),
        gt=_path(cfg.get("gt")),
        image_ids=_path(cfg.get("image_ids")),
    )
    if load_engine is None:
        from vlmguard.engine import Engine

        device = cfg.get("device", "auto")
        load_engine = lambda name: Engine.load(name, device=device)  # noqa: E731
    db_path = db or cfg.get("db") or "runs/vlmguard.sqlite"
    engines: dict[str, Any] = {}
    outcomes = []
    for i, job in enumerate(jobs, 1):
        engine = engines.get(job["model"])
        if engine is None:
            engines.clear()  # one model in memory at a time
            engine = engines[job["model"]] = load_engine(job["model"])
        spec = default_spec(
            job["benchmark"],
            prompt_preset=job["prompt_preset"],
            chair_preset=job["chair_preset"],
            pruning=job["pruning"],
            budget=job["budget"],
            pruning_params=job["pruning_params"],
            decoding=job["decoding"],
            decoding_params=job["decoding_params"],
            **{k: job[k] for k in GEN_KEYS},
        )
        out = run_benchmark(
            engine, job["benchmark"], dataset, spec, db_path, split=job["split"], template=job["template"],
            prompt_preset=job["prompt_preset"], parser=job["parser"], chair_preset=job["chair_preset"],
            prompt=job["prompt"], limit=limit if limit is not None else (job["limit"] or cfg.get("limit")), batch_size=int(cfg.get("batch_size", 8)), model_name=job["model"],
            progress=progress,
        )
        outcomes.append(out)
        if echo is not None:
            echo(f"[{i}/{len(jobs)}] {job['model']} {job['method']} budget={job['budget']} {job['benchmark']} "
                 f"{job['split'] or ''} {job['template'] or ''} -> {out.run_id} ({out.status}, {out.n_new} new, "
                 f"{out.elapsed_s:.1f}s)")
    return outcomes


def _path(v: Any) -> Path | None:
    return None if v in (None, "") else Path(v)
