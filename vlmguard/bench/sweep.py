"""``vlmguard bench sweep CONFIG.yaml``: methods x budgets x benchmarks, every run resumable.

Config (YAML)::

    model: tiny                 # or a list of models
    dataset: synthcoco          # or a SynthCOCO directory, or "coco" with the coco_* keys below
    db: runs/vlmguard.sqlite    # optional (the CLI's --db wins)
    limit: 300                  # optional, items per run
    batch_size: 16              # optional
    # coco_images: ..., coco_annotations: ..., pope_dir: ..., pope_set: head, gt: ..., image_ids: ...
    # device: auto, quantization: none (bnb-int8 | bnb-nf4: every model's language-model weights, as they load)
    benchmarks:
      - pope: {splits: [random, popular, adversarial], prompt_preset: llava, parser: official}
      - pope-leading: {splits: [random], templates: [W-misleading]}
      - chair: {preset: chair64, limit: 100}   # a per-benchmark limit overrides the top-level one
    methods:
      - {name: base}
      - {name: flowcut, pruning: flowcut, pruning_params: {}}
      - {name: vcd, decoding: vcd, decoding_params: {alpha: 1.0}}
    budgets: [48, 16]           # applied to every method that prunes; others run once

Generation knobs (max_new_tokens, min_new_tokens, seed, do_sample, temperature, top_p, top_k, presence_penalty,
frequency_penalty, repetition_penalty, image_aspect) may be set per method or at the top level; benchmark presets
fill in the rest (image_aspect: reference). The whole config is checked before the first run: keys, value types,
benchmark options, and every method's pruning and decoding names with their parameters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmguard.bench.datasets import resolve_dataset
from vlmguard.bench.pope_data import SPLITS
from vlmguard.bench.runner import RunOutcome, oracle_neutral, default_spec, run_benchmark
from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES
from vlmguard.spec import ImageAspect

Job = dict[str, Any]  # one run of the sweep, as expand() lists it
GEN_KEYS = ("max_new_tokens", "min_new_tokens", "seed", "do_sample", "temperature", "top_p", "top_k",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "image_aspect")


# The config's schema: the types of every key (values are range-checked where they are used: budgets and
# generation knobs by GenerationSpec, names by the registries). ``strict``: YAML's 5 is no string, "abc" no
# number. A key given as null is an error unless its type says Optional.
class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _GenKnobs(_Schema):
    max_new_tokens: int = None  # type: ignore[assignment]
    min_new_tokens: int = None  # type: ignore[assignment]
    seed: int = None  # type: ignore[assignment]
    do_sample: bool = None  # type: ignore[assignment]
    temperature: float = None  # type: ignore[assignment]
    top_p: float = None  # type: ignore[assignment]
    top_k: int = None  # type: ignore[assignment]
    presence_penalty: float = None  # type: ignore[assignment]
    frequency_penalty: float = None  # type: ignore[assignment]
    repetition_penalty: float = None  # type: ignore[assignment]
    image_aspect: ImageAspect = None  # type: ignore[assignment]


class _MethodSchema(_GenKnobs):
    name: str = None  # type: ignore[assignment]
    pruning: str = None  # type: ignore[assignment]
    pruning_params: Optional[dict[str, Any]] = None
    budget: float = None  # type: ignore[assignment]  # int or float; GenerationSpec checks the value
    budgets: list[float] = Field(None, min_length=1)  # type: ignore[assignment]
    decoding: str = None  # type: ignore[assignment]
    decoding_params: Optional[dict[str, Any]] = None


class _SweepSchema(_GenKnobs):
    model: str | list[str] = Field(None, min_length=1)  # type: ignore[assignment]
    models: str | list[str] = Field(None, min_length=1)  # type: ignore[assignment]
    dataset: str = None  # type: ignore[assignment]
    db: str = None  # type: ignore[assignment]
    limit: int = Field(None, ge=1)  # type: ignore[assignment]
    batch_size: int = Field(None, ge=1)  # type: ignore[assignment]
    benchmarks: list[Any] = Field(None, min_length=1)  # type: ignore[assignment]  # entries: _benchmarks
    methods: Optional[list[Any]] = None  # entries: _MethodSchema
    budgets: list[float] = Field(None, min_length=1)  # type: ignore[assignment]
    image_split: str = None  # type: ignore[assignment]
    coco_images: str = None  # type: ignore[assignment]
    coco_annotations: str = None  # type: ignore[assignment]
    pope_dir: str = None  # type: ignore[assignment]
    pope_set: str = None  # type: ignore[assignment]
    gt: str = None  # type: ignore[assignment]
    image_ids: str = None  # type: ignore[assignment]
    device: str = None  # type: ignore[assignment]
    quantization: Literal[QUANT_CHOICES] = None  # type: ignore[assignment,valid-type]  # Engine.load's


_Split = Literal[SPLITS]  # the POPE split names


class _PopeOptions(_Schema):
    splits: list[_Split] = Field(None, min_length=1)  # type: ignore[assignment]
    prompt_preset: str = None  # type: ignore[assignment]
    parser: str = None  # type: ignore[assignment]
    limit: int = Field(None, ge=1)  # type: ignore[assignment]


class _LeadingOptions(_PopeOptions):
    templates: list[str] = Field(None, min_length=1)  # type: ignore[assignment]


class _ChairOptions(_Schema):
    preset: str = None  # type: ignore[assignment]
    prompt: str = None  # type: ignore[assignment]
    limit: int = Field(None, ge=1)  # type: ignore[assignment]


BENCHMARK_OPTIONS: dict[str, type[_Schema]] = {"pope": _PopeOptions, "pope-leading": _LeadingOptions,
                                               "chair": _ChairOptions}
METHOD_KEYS = set(_MethodSchema.model_fields)
TOP_KEYS = set(_SweepSchema.model_fields)


def _check(schema: type[_Schema], data: dict[str, Any], what: str) -> None:
    try:
        schema(**data)
    except ValidationError as e:
        from vlmguard.spec import format_validation_error

        raise InvalidInput(format_validation_error(e, what)) from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and check the whole sweep config (keys, types, benchmark options, every method's pruning and
    decoding with its parameters) so that a mistake fails before the first run, with one line naming the
    file and the key."""
    from vlmguard.files import read_yaml

    p = Path(path)
    cfg = read_yaml(p, "sweep config")
    if not isinstance(cfg, dict):
        raise InvalidInput(f"{p}: expected a mapping at the top level")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise InvalidInput(f"{p}: unknown keys {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
    if not cfg.get("benchmarks"):
        raise InvalidInput(f"{p}: 'benchmarks' is required")
    if "model" in cfg and "models" in cfg:  # expand() would run 'models' and drop 'model' without a word
        raise InvalidInput(f"{p}: give 'model' or 'models', not both")
    _check(_SweepSchema, cfg, f"sweep config {p}")
    for i, m in enumerate(cfg.get("methods") or [{}]):
        if not isinstance(m, dict):
            raise InvalidInput(f"{p}: methods[{i}]: every method must be a mapping, got {m!r}")
        bad = set(m) - METHOD_KEYS
        if bad:
            raise InvalidInput(f"{p}: method {m.get('name', m)!r}: unknown keys {sorted(bad)} "
                               f"(known: {sorted(METHOD_KEYS)})")
        _check(_MethodSchema, m, f"method {m.get('name', i)!r} in sweep config {p}")
        budget_keys = [k for k in ("budget", "budgets") if k in m]
        if budget_keys and m.get("pruning") in (None, "none"):  # expand() would drop them: the method runs unpruned
            raise InvalidInput(f"{p}: method {m.get('name', i)!r}: {budget_keys[0]!r} needs a pruning method "
                               f"(pruning is {m.get('pruning', 'none')!r})")
    benchmarks = _benchmarks(cfg, p)
    for name, opts in benchmarks:
        _check_benchmark_options(name, opts, p)
    _check_specs(cfg, p)
    return cfg


def _check_benchmark_options(name: str, opts: dict[str, Any], p: Path) -> None:
    """Types and names in one benchmark's options (unknown keys too: a typo must not be ignored)."""
    from vlmguard.bench.pope_leading import normalize_template_id
    from vlmguard.bench.pope_parsers import PARSERS
    from vlmguard.bench.prompts import get_chair_preset, get_pope_prompt

    schema = BENCHMARK_OPTIONS[name]
    unknown = set(opts) - set(schema.model_fields)
    if unknown:
        raise InvalidInput(f"{p}: benchmark {name!r}: unknown options {sorted(unknown)} "
                           f"(known: {sorted(schema.model_fields)})")
    _check(schema, opts, f"options of benchmark {name!r} in sweep config {p}")
    try:
        if opts.get("prompt_preset") is not None:
            get_pope_prompt(opts["prompt_preset"])
        if opts.get("parser") is not None and opts["parser"] not in PARSERS:
            PARSERS.get(opts["parser"])  # raises, listing the known parsers
        if opts.get("preset") is not None:
            get_chair_preset(opts["preset"])
        for t in opts.get("templates") or []:
            normalize_template_id(t)
    except InvalidInput as e:
        raise InvalidInput(f"{p}: benchmark {name!r}: {e}") from None


def job_spec(job: dict[str, Any]):
    """The GenerationSpec of one expanded sweep job (benchmark preset, then the method's knobs)."""
    return default_spec(
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


def _check_specs(cfg: dict[str, Any], p: Path) -> None:
    """Build and resolve every job's GenerationSpec (as ``vlmguard bench`` does before its model loads):
    an unknown method or a bad parameter of the last method fails now, not after the first method's runs."""
    seen: set[str] = set()
    for job in expand(cfg):
        key = json.dumps({k: v for k, v in job.items() if k not in ("model", "split", "template", "limit")},
                         sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            spec = job_spec(job)
            spec.resolve()
            oracle_neutral(spec, job["benchmark"])  # neutral_text=oracle on a pope or chair run
        except InvalidInput as e:
            at = f" budget {job['budget']}" if job["budget"] is not None else ""
            raise InvalidInput(f"{p}: method {job['method']!r}{at} ({job['benchmark']}): {e}") from None


def _benchmarks(cfg: dict[str, Any], source: str | Path = "sweep config") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, entry in enumerate(cfg["benchmarks"]):
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, opts), = entry.items()
            if opts is not None and not isinstance(opts, dict):
                raise InvalidInput(f"{source}: benchmarks[{i}] {name!r}: options must be a mapping, got {opts!r} "
                                   f"(e.g. {{{name}: {{limit: 100}}}})")
            out.append((name, dict(opts or {})))
        else:
            raise InvalidInput(f"{source}: bad benchmark entry {entry!r} (use 'pope' or {{pope: {{...}}}})")
    for name, _ in out:
        if name not in BENCHMARK_OPTIONS:
            raise InvalidInput(f"{source}: unknown benchmark {name!r} in sweep (known: pope, pope-leading, chair)")
    return out


def expand(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (model, method, budget, benchmark, split/template) job of the sweep, in order."""
    models = cfg.get("models") or cfg.get("model") or "tiny"
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
                    splits = (opts.get("splits") or list(SPLITS)) if bench != "chair" else [None]
                    templates = (opts.get("templates") or [None]) if bench == "pope-leading" else [None]
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


def distinct_jobs(jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, Job]]]:
    """``jobs`` with each run once, and the ``(dropped, kept)`` pairs of the jobs that repeat an earlier one (a
    benchmark, split or budget listed twice, two methods with the same settings): the database stores such a run
    once, so the sweep runs and reports it once."""
    kept: dict[str, Job] = {}
    dropped = []
    for job in jobs:
        key = _run_key(job)
        if key in kept:
            dropped.append((job, kept[key]))
        else:
            kept[key] = job
    return list(kept.values()), dropped


def _run_key(job: Job) -> str:
    """Everything that makes the run but the method's name, a label the stored run does not record."""
    return json.dumps({k: v for k, v in job.items() if k != "method"}, sort_keys=True, default=str)


def _job_label(job: Job) -> str:
    parts = (job["model"], job["method"], f"budget={job['budget']}", job["benchmark"], job["split"], job["template"])
    return " ".join(str(part) for part in parts if part)


def _duplicate_line(dropped: Job, kept: Job) -> str:
    same = "" if _job_label(dropped) == _job_label(kept) else f" (the same run as {_job_label(kept)})"
    return f"dropped a duplicate run: {_job_label(dropped)}{same}"


def config_db(cfg: dict[str, Any], db: str | Path | None = None) -> str | Path:
    """The results database a sweep writes: ``db`` (the command line's), else the config's, else the default."""
    from vlmguard.bench.db import DEFAULT_DB

    return db or cfg.get("db") or DEFAULT_DB


def run_sweep(
    config_path: str | Path,
    *,
    db: str | Path | None = None,
    limit: int | None = None,
    load_engine: Callable[[str], Any] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    run: Callable[..., RunOutcome] | None = None,
) -> list[RunOutcome]:
    """Run every benchmark the config at ``config_path`` names, each a resumable run in the results database.
    ``load_engine`` (model name -> engine) and ``run`` (called as ``run_benchmark`` is: a Ray Job passes one that
    shards each run over a served model's replicas) replace the local defaults."""
    from vlmguard.bench.db import check_db

    cfg = load_config(config_path)  # the whole config is checked here, before any run
    jobs, duplicates = distinct_jobs(expand(cfg))
    run = run or run_benchmark
    db_path = config_db(cfg, db)
    try:  # paths are relative to the working directory, as on the command line
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
    except VlmguardError as e:
        raise InvalidInput(f"{config_path}: {e}") from None
    if load_engine is None:  # every model (and the device) found before the first run, not after a model's runs
        from vlmguard.engine import pick_device
        from vlmguard.models.resolve import resolve_model_path
        from vlmguard.testing import random_family

        try:
            pick_device(cfg.get("device", "auto"))
            for name in dict.fromkeys(job["model"] for job in jobs):
                if name.startswith("random:"):
                    random_family(name)
                else:
                    resolve_model_path(name)
        except VlmguardError as e:
            raise InvalidInput(f"{config_path}: {e}") from None
    check_db(db_path, "--db" if db else f"{config_path}: db")
    if load_engine is None:
        from vlmguard.engine import Engine

        device, quantization = cfg.get("device", "auto"), cfg.get("quantization", "none")
        load_engine = lambda name: Engine.load(name, device=device, quantization=quantization)  # noqa: E731
    if echo is not None:
        for dropped, kept in duplicates:
            echo(_duplicate_line(dropped, kept))
    engines: dict[str, Any] = {}
    outcomes = []
    for i, job in enumerate(jobs, 1):
        engine = engines.get(job["model"])
        if engine is None:
            engines.clear()  # one model in memory at a time
            engine = engines[job["model"]] = load_engine(job["model"])
        spec = job_spec(job)
        out = run(
            engine, job["benchmark"], dataset, spec, db_path, split=job["split"], template=job["template"],
            prompt_preset=job["prompt_preset"], parser=job["parser"], chair_preset=job["chair_preset"],
            prompt=job["prompt"], limit=limit if limit is not None else (job["limit"] or cfg.get("limit")),
            batch_size=int(cfg.get("batch_size", 8)), model_name=job["model"],
            progress=progress,
        )
        outcomes.append(out)
        if echo is not None:
            echo(f"[{i}/{len(jobs)}] {_job_label(job)} -> {out.run_id} ({out.status}, {out.n_new} new, "
                 f"{out.elapsed_s:.1f}s)")
    return outcomes


def _path(v: Any) -> Path | None:
    return None if v in (None, "") else Path(v)
