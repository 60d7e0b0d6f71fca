"""``vlmguard perf decode``: per-token decode time of each decoding method relative to greedy.

Per configuration (decoder x batch size, optionally with a pruner composed), ``warmup`` runs, then
``repeats`` round-robin rounds. The per-token time of one run is the wall time from the first token to the
last divided by the steps in between: it covers every branch's forward, the decoder's ``combine``, the
sampler and the engine's per-step bookkeeping, i.e. what a streaming client sees between tokens. Every run
generates ``new_tokens`` tokens (``min_new_tokens``: the bundled model would end most answers after a few). Set-up
pre-passes (VISTA's steering vector, IAVA's selection pass) and prefill are reported separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from vlmguard.perf.models import bench_requests, warm_threads
from vlmguard.perf.prefill import method_label, parse_method
from vlmguard.perf.timing import environment, median, ratio
from vlmguard.spec import GenerationSpec

# Issue-8 targets: per-token time relative to greedy at batch 1.
DECODE_TARGETS = {"vcd": 1.4, "m3id": 1.4, "lqcd": 1.4, "vista": 1.15, "iava": 1.5}


@dataclass
class DecodeSamples:
    per_token_s: list[float] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    rows: int = 0  # LLM rows per step (requests x branches)


def _spec(decoder: tuple[str, dict[str, Any]], pruning: str | None, budget: int | float | None,
          new_tokens: int) -> GenerationSpec:
    name, params = decoder
    # min_new_tokens: every run decodes all its steps, also where a trained model would end its answer early
    return GenerationSpec.build(decoding=name, decoding_params=params, pruning=pruning or "none",
                                budget=budget if pruning else None, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, diagnostics=False)


def per_token_time(results: Sequence[Any]) -> float | None:
    """(last token time - first token time) / steps in between, over the batch."""
    steps = max(len(r.timings.per_token_s) for r in results)
    if steps < 2:
        return None
    first = min(r.timings.ttft_s for r in results)
    last = max(r.timings.total_s for r in results)
    return (last - first) / (steps - 1)


def check_decoders(decoders: Sequence[str], pruning: str | None = None, budget: int | float | None = None,
                   new_tokens: int = 16) -> dict[str, tuple[str, dict[str, Any]]]:
    """Label -> (name, params) of greedy plus each decoder, every name, parameter, the pruner and budget and
    ``new_tokens`` checked (no model needed: the CLI calls this before the model loads)."""
    if new_tokens < 2:
        from vlmguard.errors import InvalidInput

        raise InvalidInput("--new-tokens must be at least 2 to time decode steps")
    # each decoder is NAME or NAME[KEY=VALUE;...] (its parameters), a row of its own under that label
    methods: dict[str, tuple[str, dict[str, Any]]] = {"greedy": ("greedy", {})}
    for text in decoders:
        name, params = parse_method(text)
        methods.setdefault(method_label(name, params), (name, params))
    for label in methods:
        _spec(methods[label], pruning, budget, new_tokens).resolve()
    return methods


def run_decode(engine: Any, decoders: Sequence[str], batches: Sequence[int] = (1, 8), pruning: str | None = None,
               budget: int | float | None = None, new_tokens: int = 16, repeats: int = 3, warmup: int = 1,
               seed: int = 0, progress=None) -> dict[str, Any]:
    methods = check_decoders(decoders, pruning, budget, new_tokens)  # validate before spending time
    names = list(methods)
    warm_threads()
    rows = []
    for b in dict.fromkeys(batches):  # a batch size given twice is measured (and listed) once
        requests = bench_requests(engine, b, seed)
        samples = {n: DecodeSamples() for n in names}
        for _ in range(warmup):
            for n in names:
                engine.generate(requests, _spec(methods[n], pruning, budget, new_tokens))
        for rep in range(repeats):
            for n in names:
                results = engine.generate(requests, _spec(methods[n], pruning, budget, new_tokens))
                s = samples[n]
                s.per_token_s.append(per_token_time(results))
                t = results[0].timings
                s.setup_s.append(t.setup_s)
                s.prefill_s.append(max(x.timings.vision_s + x.timings.prefill_s for x in results))
                s.ttft_s.append(max(x.timings.ttft_s for x in results))
                s.tokens.append(sum(len(x.timings.per_token_s) for x in results))
                if progress:
                    progress(f"batch {b} round {rep + 1}/{repeats} {n}: {s.per_token_s[-1] or 0:.4f}s/token")
        base = median(samples["greedy"].per_token_s)
        for n in names:
            s = samples[n]
            pt = median(s.per_token_s)
            rows.append({
                "decoder": n,
                "batch": b,
                "pruning": pruning or "none",
                "budget": budget if pruning else None,
                "per_token_s": pt,
                "relative_to_greedy": ratio(pt, base),
                "tokens_per_s": ratio(b, pt),
                "setup_s": median(s.setup_s),
                "prefill_s": median(s.prefill_s),
                "ttft_s": median(s.ttft_s),
                "tokens_generated": int(median(s.tokens) or 0),
                "samples": {"per_token_s": s.per_token_s},
            })
    return {
        "command": "perf decode",
        "shape": engine.model_name,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "pruning": pruning or "none",
        "budget": budget if pruning else None,
        "environment": environment(engine),
        "rows": rows,
        "targets": decode_targets(rows),
    }


def decode_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        limit = DECODE_TARGETS.get(row["decoder"])
        if limit is None or row["batch"] != 1:
            continue
        v = row["relative_to_greedy"]
        out.append({"decoder": row["decoder"], "batch": 1, "metric": "relative_to_greedy", "value": v,
                    "threshold": limit, "met": v is not None and v <= limit})
    return out


def decode_table(result: dict[str, Any]) -> str:
    from vlmguard.perf.report import table

    rows = [[r["decoder"], r["batch"], r["per_token_s"], r["relative_to_greedy"], r["tokens_per_s"], r["setup_s"],
             r["prefill_s"], r["ttft_s"], r["tokens_generated"]] for r in result["rows"]]
    env = result["environment"]
    head = (f"perf decode  shape={result['shape']}  pruning={result['pruning']}@{result['budget']}  "
            f"new_tokens={result['new_tokens']}  repeats={result['repeats']}  device={env.get('device')}  "
            f"dtype={env.get('dtype')}  threads={env.get('threads')}")
    return head + "\n" + table(["decoder", "batch", "s/token", "x greedy", "tok/s", "setup_s", "prefill_s",
                                "ttft_s", "tokens"], rows)
