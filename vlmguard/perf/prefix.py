"""``vlmguard perf prefix``: prefill time of batches whose requests ask about the same images (POPE asks six
questions about each), with shared prefixes (``Engine.share_prefixes``, the default) against without; with
``cache``, also from a warm prefix cache (``Engine.enable_prefix_cache``: an earlier batch asked other questions
about the same images, as a chat's next turn does).

Per decoder, ``warmup`` runs, then ``repeats`` rounds in which the two settings take turns. The batch holds
``batch`` requests, ``questions`` consecutive ones about each image, each with its own question (the bundled
POPE template: "Is there a/an X in the image?"). Prefill = vision tower + projector + LLM prefill, as in
``perf prefill``. The ideal is the token count: the prompt tokens of every row (decoder branches included)
over those the shared prefill computes (``Timings.prefill_tokens`` and ``prefill_shared_tokens``, and
``prefill_cached_tokens`` for the cached setting); attention grows with the context, so a shared prefill can only
approach it. The cached setting's cache is new in every round and warmed (untimed) by a batch of other questions
about the same images, which leaves the images' visual tokens there too (the tower's output, or what a vision-side
pruner such as FlowCut kept of them). ``pruning`` and ``budget`` compose a pruner with every decoder.
"""
from __future__ import annotations

from typing import Any, Sequence

from vlmguard.perf.models import bench_image, warm_threads
from vlmguard.perf.prefill import method_label, parse_method
from vlmguard.perf.timing import environment, median, ratio
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec

OBJECTS = ("dog", "cat", "car", "person", "chair", "cup", "knife", "bus", "apple", "clock", "book", "bird")
FORMAT = "Answer the question using a single word or phrase."


def prefix_requests(engine: Any, batch: int, questions: int, seed: int = 0, offset: int = 0) -> list[Request]:
    """``batch`` POPE-style requests, ``questions`` in a row about each image (``offset``: other objects)."""
    out = []
    for i in range(batch):
        obj = OBJECTS[(i + offset) % len(OBJECTS)]
        article = "an" if obj[0] in "aeiou" else "a"
        image = bench_image(engine, seed + i // questions)
        out.append(Request(f"Is there {article} {obj} in the image?\n{FORMAT}", [image]))
    return out


def _spec(decoder: tuple[str, dict[str, Any]], pruning: str | None = None,
          budget: int | float | None = None) -> GenerationSpec:
    name, params = decoder
    return GenerationSpec.build(decoding=name, decoding_params=params, pruning=pruning or "none",
                                budget=budget if pruning else None, max_new_tokens=1, diagnostics=False)


def check_prefix_decoders(decoders: Sequence[str], pruning: str | None = None,
                          budget: int | float | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Label -> (name, params) of each decoder, each checked with the pruner and budget (before the model loads)."""
    methods: dict[str, tuple[str, dict[str, Any]]] = {}
    for text in decoders:
        name, params = parse_method(text)
        methods.setdefault(method_label(name, params), (name, params))
    for label in methods:
        _spec(methods[label], pruning, budget).resolve()
    return methods


def _prefill(results: Sequence[Any]) -> float:
    return max(r.timings.vision_s + r.timings.prefill_s for r in results)


def run_prefix(engine: Any, decoders: Sequence[str], batch: int = 12, questions: int = 6, repeats: int = 5,
               warmup: int = 1, seed: int = 0, progress=None, cache: bool = False,
               cache_mb: float = 4096, pruning: str | None = None, budget: int | float | None = None) -> dict[str, Any]:
    methods = check_prefix_decoders(decoders, pruning, budget)
    requests = prefix_requests(engine, batch, questions, seed)
    earlier = prefix_requests(engine, batch, questions, seed, offset=batch)  # other questions, the same images
    settings = ["unshared", "shared"] + (["cached"] if cache else [])
    warm_threads()
    before = engine.share_prefixes, engine.prefix_cache
    rows = []
    try:
        for label, method in methods.items():
            spec = _spec(method, pruning, budget)
            times: dict[str, list[float]] = {k: [] for k in settings}
            setup: dict[str, list[float]] = {k: [] for k in settings}
            vision: dict[str, list[float]] = {k: [] for k in settings}
            last: dict[str, list[Any]] = {}
            for rep in range(warmup + repeats):
                for setting in settings:
                    engine.share_prefixes = setting != "unshared"
                    engine.prefix_cache = None
                    if setting == "cached":
                        engine.enable_prefix_cache(cache_mb)
                        engine.generate(earlier, spec)  # the earlier turn: untimed
                        warm_hits = (engine.prefix_cache.stats.image_hits, engine.prefix_cache.stats.pruned_hits)
                    last[setting] = engine.generate(requests, spec)
                    if setting == "cached":  # the images' visual tokens it took, counted for the timed batch
                        stats = engine.prefix_cache.stats
                        reused = (stats.image_hits - warm_hits[0], stats.pruned_hits - warm_hits[1])
                    engine.prefix_cache = None
                    if rep >= warmup:
                        times[setting].append(_prefill(last[setting]))
                        setup[setting].append(last[setting][0].timings.setup_s)
                        vision[setting].append(last[setting][0].timings.vision_s)
                if progress and rep >= warmup:
                    progress(f"round {rep + 1 - warmup}/{repeats} {label}: "
                             + ", ".join(f"{times[k][-1]:.3f}s {k}" for k in settings))
            fed = sum(r.timings.prefill_tokens for r in last["shared"])
            shared_tokens = sum(r.timings.prefill_shared_tokens for r in last["shared"])
            unshared, shared = median(times["unshared"]), median(times["shared"])
            cached_row = {}
            if cache:
                c = last["cached"]
                not_computed = sum(r.timings.prefill_shared_tokens + r.timings.prefill_cached_tokens for r in c)
                cached_row = {
                    "cached_prefill_s": median(times["cached"]),
                    "cached_speedup": ratio(unshared, median(times["cached"])),
                    "cached_tokens": sum(r.timings.prefill_cached_tokens for r in c),
                    "cached_shared_tokens": sum(r.timings.prefill_shared_tokens for r in c),
                    "cached_ideal_speedup": ratio(fed, fed - not_computed),
                    "cached_setup_s": median(setup["cached"]),
                    "cached_vision_s": median(vision["cached"]),
                    # rows that took their images' visual tokens from the cache: the tower's output, or what the
                    # vision-side pruner kept (neither the tower nor the pruner ran on them)
                    "cached_image_hits": reused[0],
                    "cached_pruned_hits": reused[1],
                    "cached_same_tokens": [r.token_ids for r in last["unshared"]] == [r.token_ids for r in c],
                }
            rows.append({
                "decoder": label,
                "unshared_prefill_s": unshared,
                "shared_prefill_s": shared,
                "speedup": ratio(unshared, shared),
                "prefill_tokens": fed,
                "shared_tokens": shared_tokens,
                "ideal_speedup": ratio(fed, fed - shared_tokens),
                # a decoder's pre-pass (IAVA's selection, VISTA's steering vectors) shares prefixes too
                "unshared_setup_s": median(setup["unshared"]),
                "shared_setup_s": median(setup["shared"]),
                # the vision tower and projector, or the vision-side pruner (one figure for the whole batch)
                "unshared_vision_s": median(vision["unshared"]),
                "same_tokens": [r.token_ids for r in last["unshared"]] == [r.token_ids for r in last["shared"]],
                **cached_row,
                "samples": {f"{k}_{what}": v for k in settings
                            for what, v in (("prefill_s", times[k]), ("setup_s", setup[k]), ("vision_s", vision[k]))},
            })
    finally:
        engine.share_prefixes, engine.prefix_cache = before
    return {
        "command": "perf prefix",
        "shape": engine.model_name,
        "batch": batch,
        "questions_per_image": questions,
        "pruning": pruning or "none",
        "budget": budget if pruning else None,
        "cache": cache,
        "repeats": repeats,
        "warmup": warmup,
        "environment": environment(engine),
        "rows": rows,
    }


def prefix_table(result: dict[str, Any]) -> str:
    from vlmguard.perf.report import table

    env = result["environment"]
    head = (f"perf prefix  shape={result['shape']}  batch={result['batch']}  "
            f"questions/image={result['questions_per_image']}  pruning={result.get('pruning', 'none')}@"
            f"{result.get('budget')}  repeats={result['repeats']}  "
            f"device={env.get('device')}  dtype={env.get('dtype')}  threads={env.get('threads')}")
    return head + "\n" + table(prefix_head(result), prefix_rows(result))


PREFIX_HEAD = ["decoder", "unshared prefill s", "shared prefill s", "speed-up", "ideal (tokens)", "prefill tokens",
               "shared tokens", "unshared pre-pass s", "shared pre-pass s", "same tokens"]
CACHED_HEAD = ["cached prefill s", "cached speed-up", "cached ideal", "cached tokens", "cached pre-pass s",
               "cached same tokens", "unshared vision s", "cached vision s"]


def prefix_head(result: dict[str, Any]) -> list[str]:
    return PREFIX_HEAD + (CACHED_HEAD if result.get("cache") else [])


def prefix_rows(result: dict[str, Any]) -> list[list[Any]]:
    cached = result.get("cache")
    return [[r["decoder"], r["unshared_prefill_s"], r["shared_prefill_s"], r["speedup"], r["ideal_speedup"],
             r["prefill_tokens"], r["shared_tokens"], r.get("unshared_setup_s"), r.get("shared_setup_s"),
             r["same_tokens"]]
            + ([r["cached_prefill_s"], r["cached_speedup"], r["cached_ideal_speedup"], r["cached_tokens"],
                r["cached_setup_s"], r["cached_same_tokens"], r.get("unshared_vision_s"), r.get("cached_vision_s")]
               if cached else [])
            for r in result["rows"]]
