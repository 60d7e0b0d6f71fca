"""The benchmark runner: batched generation, every sample written to the results DB as it is produced.

:func:`run_benchmark` does one run (one benchmark x split / template / preset); it is what the CLI, the
sweep and Ray jobs call. A run is identified by the hash of its protocol knobs (see ``db``), so calling
it again with the same arguments resumes: samples already stored are skipped, new ones are inserted with
``INSERT OR IGNORE`` on ``(run_id, sample_key)`` (idempotent, so shards and restarts never double-count).

Sharding: items are the first ``limit`` items of the benchmark (file order); shard ``k`` of ``n`` takes
items ``k, k+n, k+2n, ...``. Every shard writes into the same run; the run is marked finished by whoever
sees all expected samples stored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from vlmguard.bench import db as dbm
from vlmguard.bench.chair_score import drop_incomplete_sentence, score_caption
from vlmguard.bench.datasets import BenchDataset
from vlmguard.bench.metrics import metrics_for_run
from vlmguard.bench.pope_leading import DEFAULT_TEMPLATE, derive_leading, normalize_template_id
from vlmguard.bench.pope_parsers import get_parser
from vlmguard.bench.prompts import get_chair_preset, get_pope_prompt
from vlmguard.errors import ContextTooLong, InvalidInput, NonFiniteLogits
from vlmguard.penalties import set_penalties

BENCHMARKS = ("pope", "pope-leading", "chair")


@dataclass
class Item:
    """One sample to generate."""

    key: str
    item_id: str
    image_path: Path
    image_name: str
    prompt: str
    label: str | None = None
    record: dict[str, Any] | None = None  # per-item data kept with the sample (POPE-leading cue)
    image_id: int | None = None  # CHAIR
    neutral_prompt: str | None = None  # POPE-leading: the neutral question in the same prompt format
    raw: bool = False  # ``prompt`` is the whole model prompt (a preset's own framing), not a chat template's text


@dataclass
class RunOutcome:
    run_id: str
    benchmark: str
    split: str | None
    variant: str | None
    metrics: dict[str, Any]
    n_new: int
    n_samples: int
    n_expected: int
    elapsed_s: float
    status: str
    neutral_run_id: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "benchmark": self.benchmark,
            "split": self.split,
            "variant": self.variant,
            "status": self.status,
            "n_new": self.n_new,
            "n_samples": self.n_samples,
            "n_expected": self.n_expected,
            "elapsed_s": round(self.elapsed_s, 3),
            "neutral_run_id": self.neutral_run_id,
            "metrics": self.metrics,
        }


def _package_version() -> str:
    from vlmguard import __version__

    return __version__


def spec_knobs(spec: Any) -> dict[str, Any]:
    budget = spec.budget
    return {
        "pruning": spec.pruning,
        "pruning_params": dict(spec.pruning_params),
        "budget": budget,
        "decoding": spec.decoding,
        "decoding_params": dict(spec.decoding_params),
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": bool(spec.sampling),
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "top_k": spec.top_k,
        "seed": spec.seed,
        # only when set: runs without penalties (or a minimum length) keep the ids that earlier versions gave them
        **set_penalties(spec),
        **({"min_new_tokens": spec.min_new_tokens} if spec.min_new_tokens else {}),
        # only when not the processor's own: runs made before the option (every image cropped by the processor)
        # keep their ids, and a padded run never resumes one of them
        **({"image_aspect": spec.image_aspect} if spec.image_aspect != "native" else {}),
    }


def _select(items: list[Item], limit: int | None, shard_index: int, num_shards: int) -> tuple[list[Item], int]:
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InvalidInput(f"bad shard {shard_index} of {num_shards}")
    if limit is not None:
        if limit < 1:
            raise InvalidInput(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    return items[shard_index::num_shards], len(items)


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path}: cannot read image ({e})") from None


def _layers_mean(kept: Sequence[int] | None) -> float | None:
    if not kept:
        return None
    return float(sum(kept)) / len(kept)


def _base_row(item: Item, res: Any) -> dict[str, Any]:
    t = getattr(res, "timings", None)
    timings = None
    if t is not None:
        timings = {k: getattr(t, k) for k in ("vision_s", "prefill_s", "decode_s", "ttft_s", "total_s", "setup_s", "batch_size") if hasattr(t, k)}
    kept = list(getattr(res, "visual_tokens_kept", None) or [])
    return {
        "sample_key": item.key,
        "item_id": item.item_id,
        "image": item.image_name,
        "prompt": item.prompt,
        "output_text": res.text,
        "finish_reason": getattr(res, "finish_reason", None),
        "prompt_tokens": getattr(res, "prompt_tokens", None),
        "generated_tokens": len(getattr(res, "token_ids", []) or []),
        "visual_tokens": getattr(res, "visual_tokens", None),
        "visual_tokens_kept": _layers_mean(kept),
        "visual_tokens_kept_layers": kept or None,
        "prefill_s": getattr(t, "prefill_s", None) if t is not None else None,
        "ttft_s": getattr(t, "ttft_s", None) if t is not None else None,
        "total_s": getattr(t, "total_s", None) if t is not None else None,
        "timings": timings,
        "prefill_flops": (getattr(res, "prefill_flops", None) or {}).get("total"),
    }


def _engine_knobs(engine: Any, model_name: str | None) -> dict[str, Any]:
    knobs = {
        "model": model_name or getattr(engine, "model_name", None) or "unknown",
        "model_family": getattr(engine, "family", None),
        "model_revision": getattr(engine, "revision", None),  # retrained weights under one name: new runs
    }
    # A run in another precision is another run (a bf16 GPU run never resumes into, or mixes with, an fp32 one).
    # float32 is left out of the knobs, so the run ids of fp32 runs are those earlier versions gave them.
    dtype = getattr(engine, "dtype", None) or getattr(getattr(engine, "model", None), "dtype", None)
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (torch.dtype, str)) else "float32"
    if name != "float32":
        knobs["dtype"] = name
    quantization = getattr(engine, "quantization", None)  # likewise: left out unless the weights are quantized
    if quantization and quantization != "none":
        knobs["quantization"] = quantization
    return knobs


def _dataset_knobs(dataset: BenchDataset) -> dict[str, Any]:
    return {"dataset": dataset.name, "dataset_version": dataset.version}


def _pope_items(dataset: BenchDataset, split: str, prompt_preset: str | None, template: str | None,
                adapter: Any = None) -> tuple[list[Item], dict[str, Any]]:
    pope = dataset.pope_file(split)
    preset = get_pope_prompt(prompt_preset)
    items = []
    framing, raw = preset.frame("{question}", adapter)  # the whole prompt of a preset with its own framing

    def prompt(question: str) -> str:
        return preset.frame(preset.render(question), adapter)[0]

    if template is None:
        for q in pope.questions:
            items.append(
                Item(f"q:{q.question_id}", str(q.question_id), dataset.image_path(q.image),  # type: ignore[arg-type]
                     q.image, prompt(q.text), q.label, raw=raw)
            )
        variant = None
    else:
        variant = normalize_template_id(template)
        for rec in derive_leading(pope, variant):
            items.append(
                Item(
                    f"q:{rec['question_id']}",
                    str(rec["question_id"]),
                    dataset.image_path(rec["image"]),  # type: ignore[arg-type]
                    rec["image"],
                    prompt(rec["text"]),
                    rec["label"],
                    {"cue": rec["cue"], "neutral_text": rec["neutral_text"]},
                    neutral_prompt=prompt(rec["neutral_text"]),
                    raw=raw,
                )
            )
    knobs = {
        "split": split,
        "variant": variant,
        "question_file": pope.path.name,
        "question_sha256": pope.sha256,
        "prompt_preset": preset.name,
        "prompt": preset.joiner + preset.suffix if preset.suffix else "",
    }
    if raw:  # the preset's own framing is part of the run (earlier runs of the preset had the model's template)
        knobs["prompt"] = framing
    return items, knobs


def _chair_items(
    dataset: BenchDataset, chair_preset: str | None, prompt: str | None, image_ids_file: Path | None
) -> tuple[list[Item], dict[str, Any], bool]:
    preset = get_chair_preset(chair_preset)
    ids, desc = dataset.chair_image_ids(image_ids_file)
    if not ids:
        raise InvalidInput(f"dataset {dataset.name}: empty CHAIR image list")
    text = prompt or preset.prompt
    items = []
    for i in ids:
        path = dataset.chair_image_path(i)
        items.append(Item(f"img:{i}", str(i), path, path.name, text, image_id=i))
    knobs = {
        "split": dataset.image_split,
        "variant": preset.name,
        "prompt_preset": preset.name,
        "prompt": text,
        "image_list": desc,
        "drop_incomplete": preset.drop_incomplete_sentence,
    }
    return items, knobs, preset.drop_incomplete_sentence


def run_benchmark(
    engine: Any,
    benchmark: str,
    dataset: BenchDataset,
    spec: Any,
    db: str | Path | Any = dbm.DEFAULT_DB,
    *,
    split: str | None = None,
    prompt_preset: str | None = None,
    parser: str | None = None,
    template: str | None = None,
    chair_preset: str | None = None,
    prompt: str | None = None,
    image_ids_file: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    shard_index: int = 0,
    num_shards: int = 1,
    model_name: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> RunOutcome:
    """Run (or resume) one benchmark run and return its outcome with metrics over all stored samples (over the
    first ``limit`` items only, with a flag, when the run holds more from an earlier, larger limit).

    ``engine``: anything with ``generate(requests, spec)`` (and optionally ``model_name``/``family``).
    ``spec``: a :class:`vlmguard.spec.GenerationSpec` (its protocol knobs are recorded; use
    :func:`default_spec` for the preset defaults). ``benchmark``: ``pope`` (``split`` required),
    ``pope-leading`` (``split`` + ``template``; the neutral ``pope`` run with the same knobs is run first
    and paired by question id) or ``chair`` (``chair_preset``, optional ``image_ids_file``/``prompt``).
    ``on_batch(n_done)`` is called after each stored batch (tests use it to simulate a kill).
    With ``decoding_params={"neutral_text": "oracle"}`` (pope-leading only) every request gets its own
    neutral question, rendered with the same prompt preset, as the decoder's ``neutral_text`` (LQCD's
    oracle-x_n row); the run records ``"oracle"``.
    """
    if benchmark not in BENCHMARKS:
        raise InvalidInput(f"unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARKS)})")
    if batch_size < 1:
        raise InvalidInput(f"--batch-size must be >= 1, got {batch_size}")
    # (not a run's knobs: such a run would resume the plain one)
    for name in ("logit_bias", "choices", "guided", "min_p", "stop_token_ids", "ignore_eos"):
        if getattr(spec, name, None):
            raise InvalidInput(f"benchmarks do not take {name}", param=name)
    t0 = time.perf_counter()
    conn = db if hasattr(db, "execute") else dbm.connect(db)
    try:
        spec = spec.model_copy(update={"diagnostics": False}) if hasattr(spec, "model_copy") else spec
        knobs: dict[str, Any] = {**_engine_knobs(engine, model_name), **_dataset_knobs(dataset), "benchmark": benchmark}
        knobs.update(spec_knobs(spec))
        neutral_run_id = None
        drop_incomplete = False
        par = None
        if benchmark in ("pope", "pope-leading"):
            if split is None:
                raise InvalidInput(f"{benchmark} needs a split (random, popular, adversarial)")
            par = get_parser(parser)
            tmpl = normalize_template_id(template or DEFAULT_TEMPLATE) if benchmark == "pope-leading" else None
            items, extra = _pope_items(dataset, split, prompt_preset, tmpl, getattr(engine, "adapter", None))
            knobs.update(extra)
            knobs["parser"] = par.name  # type: ignore[attr-defined]
            if benchmark == "pope-leading":
                neutral_spec = spec
                if oracle_neutral(spec, benchmark):  # on the neutral file the query is already neutral
                    params = {k: v for k, v in spec.decoding_params.items() if k != "neutral_text"}
                    neutral_spec = spec.model_copy(update={"decoding_params": params})
                neutral = run_benchmark(
                    engine, "pope", dataset, neutral_spec, conn, split=split, prompt_preset=prompt_preset, parser=parser,
                    limit=limit, batch_size=batch_size, shard_index=shard_index, num_shards=num_shards,
                    model_name=model_name, progress=progress,
                )
                neutral_run_id = neutral.run_id
                knobs["neutral_run_id"] = neutral_run_id
        else:
            items, extra, drop_incomplete = _chair_items(dataset, chair_preset, prompt, image_ids_file)
            knobs.update(extra)
            spec = _fit_context(engine, spec, items[0])
            knobs["max_new_tokens"] = spec.max_new_tokens
        oracle = oracle_neutral(spec, benchmark)
        mine, n_expected = _select(items, limit, shard_index, num_shards)
        run_id = dbm.ensure_run(conn, knobs, n_expected=n_expected, package_version=_package_version())

        gt = None
        if benchmark == "chair":
            from vlmguard.bench.chair_extract import default_extractor

            gt = dataset.chair_ground_truth([it.image_id for it in mine if it.image_id is not None])
            extractor = default_extractor()

        done = dbm.done_keys(conn, run_id)
        todo = [it for it in mine if it.key not in done]
        n_new = 0
        from vlmguard.results import Request

        bar = None
        if progress:
            from tqdm import tqdm

            label = f"{benchmark} {knobs.get('split') or ''} {knobs.get('variant') or ''}".strip()
            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=label, unit="q", leave=False, dynamic_ncols=True)
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                reqs = [Request(prompt=it.prompt, images=[_load_image(it.image_path)], request_id=it.key,
                                raw_prompt=it.raw) for it in batch]
                batch_spec = spec
                if oracle:  # LQCD oracle x_n: each request's neutral question, same prompt format
                    params = {**spec.decoding_params, "neutral_text": [it.neutral_prompt for it in batch]}
                    batch_spec = spec.model_copy(update={"decoding_params": params})
                try:
                    results = engine.generate(reqs, batch_spec)
                except ContextTooLong as e:
                    raise InvalidInput(f"{e}; lower --max-new-tokens for this model") from None
                if len(results) != len(batch):
                    raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} requests")
                rows = []
                for it, res in zip(batch, results):
                    if getattr(res, "error", None):  # nothing of this batch is recorded: the run resumes here
                        raise NonFiniteLogits(f"{it.key}: {res.error}")
                    row = _base_row(it, res)
                    if par is not None:
                        pred = par.parse(res.text, it.label)
                        row.update(label=it.label, prediction=pred, correct=pred == it.label, record=it.record)
                    else:
                        caption = res.text
                        if drop_incomplete and getattr(res, "finish_reason", None) == "length":
                            caption = drop_incomplete_sentence(caption)
                        row["record"] = score_caption(it.image_id, caption, gt[it.image_id], extractor)  # type: ignore[index]
                    rows.append(row)
                n_new += dbm.add_samples(conn, run_id, rows)
                if bar is not None:
                    bar.update(len(batch))
                if on_batch is not None:
                    on_batch(n_new)
        finally:
            if bar is not None:
                bar.close()

        run, metrics = dbm.finish_if_complete(conn, run_id)
        if limit is not None:
            metrics = _limited_metrics(conn, run, metrics, items[:limit], limit)
        status = run["status"]
        return RunOutcome(
            run_id=run_id,
            benchmark=benchmark,
            split=knobs.get("split"),
            variant=knobs.get("variant"),
            metrics=metrics,
            n_new=n_new,
            n_samples=run["n_samples"],
            n_expected=run["n_expected"] or n_expected,
            elapsed_s=time.perf_counter() - t0,
            status=status,
            neutral_run_id=neutral_run_id,
            knobs=knobs,
        )
    finally:
        if conn is not db:
            conn.close()


def _limited_metrics(conn: Any, run: dict[str, Any], metrics: dict[str, Any], selected: list[Item],
                     limit: int) -> dict[str, Any]:
    """The metrics of the items ``limit`` selected, when the run holds more (it was run before with a larger
    limit, which is the same run): the user asked for the first ``limit`` items, so the metrics cover exactly
    those, with a note saying the run holds more."""
    keys = {it.key for it in selected}
    if not dbm.done_keys(conn, run["run_id"]) - keys:
        return metrics
    out = metrics_for_run(conn, run, keys)
    out["flags"].append(f"metrics over the first {len(keys)} items (limit {limit}); "
                        f"the run holds {run['n_samples']} samples")
    return out


def _fit_context(engine: Any, spec: Any, item: Item) -> Any:
    """Cap a caption run's max_new_tokens to what the model's context leaves after the prompt.

    CHAIR's 512-token preset means "never truncate" (LLaVA-1.5's captions average ~112 tokens); on a
    model with a shorter context (the bundled tiny model has 512 positions) it becomes the largest
    length that fits. One 1-token probe measures the prompt (all CHAIR prompts are the same text + one
    image); the run records the effective value.
    """
    ctx = getattr(engine, "context_length", None)
    if not isinstance(ctx, int) or not hasattr(spec, "model_copy"):
        return spec
    from vlmguard.results import Request

    probe = engine.generate([Request(prompt=item.prompt, images=[_load_image(item.image_path)], raw_prompt=item.raw)],
                            spec.model_copy(update={"max_new_tokens": 1}))[0]
    room = ctx - int(getattr(probe, "prompt_tokens", 0) or 0)
    if room < 1:
        raise InvalidInput(f"the CHAIR prompt alone ({probe.prompt_tokens} tokens) fills the model's context of {ctx}")
    if spec.max_new_tokens > room:
        return spec.model_copy(update={"max_new_tokens": room})
    return spec


ORACLE = "oracle"


def oracle_neutral(spec: Any, benchmark: str) -> bool:
    """``--decoding-param neutral_text=oracle``: feed each POPE-leading item's neutral question (lqcd.md 8.4)."""
    params = getattr(spec, "decoding_params", None) or {}
    if params.get("neutral_text") != ORACLE:
        return False
    if benchmark != "pope-leading":
        raise InvalidInput("decoding parameter neutral_text=oracle only applies to the pope-leading benchmark")
    return True


def default_spec(benchmark: str, *, prompt_preset: str | None = None, chair_preset: str | None = None, **overrides: Any):
    """A GenerationSpec with the preset's defaults (max tokens, sampling, seed), then ``overrides``.

    ``overrides`` values that are ``None`` are ignored, so CLI flags can be passed through unchanged.
    """
    from vlmguard.spec import GenerationSpec

    base: dict[str, Any] = {"image_aspect": "reference"}  # the reference evaluation's images (benchmarks.md 1.3)
    if benchmark == "chair":
        cp = get_chair_preset(chair_preset)
        base.update(max_new_tokens=cp.max_new_tokens, do_sample=False)
    else:
        pp = get_pope_prompt(prompt_preset)
        base.update(max_new_tokens=pp.max_new_tokens, do_sample=pp.do_sample, temperature=pp.temperature,
                    top_p=pp.top_p, seed=pp.seed)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationSpec.build(**base)
