"""``vlmguard perf routing``: multi-turn chats against a service of several replicas, each with its own prefix
cache, routed by image (``workers/routing.py``) and by load alone (Serve's power of two choices), in one run.

Both apps are up together on one private local Ray cluster, each with ``--replicas`` replicas behind a separate
ingress; only the router differs. Each round holds ``--conversations`` new conversations, each about an image of
its own (so nothing cached in an earlier round helps), ``--clients`` at a time. A conversation asks ``--turns``
questions, each prompt the conversation so far, as a chat client sends it. The two apps take turns going first.
Reported per app and turn: the share of requests that took prompt tokens from a cache, the mean of those tokens,
and the median and p90 latency; for the turns after the first, power of two's median latency over image
affinity's.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable

from vlmguard.perf.timing import median, ratio

ROUTINGS = ("power_of_two", "image_affinity")
QUESTIONS = ("Describe the image.", "What colours are in it?", "Is there a dog?", "How many objects are there?")
IMAGE_SIZE = (336, 336)


def _service_config(args: Any, routing: str, threads: int) -> Any:
    from vlmguard.perf.serve import checked_config
    from vlmguard.workers.config import ModelConfig, ServiceConfig, local_gpus

    name = f"perf-{routing.replace('_', '-')}"
    cuda = ModelConfig(device=args.device).runs_on_cuda(local_gpus())

    def build() -> Any:
        return ServiceConfig(
            models=[ModelConfig(model=args.shape, device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                                num_replicas=args.replicas, num_cpus=0,
                                num_gpus=1 / (2 * args.replicas) if cuda else None,  # both apps on one GPU
                                torch_threads=threads, routing=routing, prefix_cache_mb=args.prefix_cache_mb,
                                routing_spill_queue=args.spill_queue,
                                max_new_tokens_limit=args.new_tokens, max_queued_requests=-1)],
            api_keys=[], api_key_env=None, host="127.0.0.1", request_timeout_s=600.0, app_name=name,
            route_prefix=f"/{name}", ingress="separate")

    return checked_config(build, {"num_replicas": f"--replicas {args.replicas}",
                                  "prefix_cache_mb": f"--prefix-cache-mb {args.prefix_cache_mb}",
                                  "routing_spill_queue": f"--spill-queue {args.spill_queue}",
                                  "max_new_tokens_limit": f"--new-tokens {args.new_tokens}"})


def conversation_caller(url: str, model: str, turns: int, new_tokens: int,
                        think_s: float = 0.0) -> Callable[[str], list[dict[str, Any]]]:
    """A function that holds one conversation about an image (a data URL), ``think_s`` between an answer and the
    next question, and returns each turn's figures; a turn that fails (an HTTP error, a connection lost) is
    recorded with its ``error`` and ends the conversation, so one failure does not lose the run."""
    import httpx

    local = threading.local()

    def converse(image_url: str) -> list[dict[str, Any]]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=600.0)
        messages: list[dict[str, Any]] = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTIONS[0]}]}]
        out = []
        for turn in range(1, turns + 1):
            if turn > 1 and think_s:
                time.sleep(think_s)
            t0 = time.perf_counter()
            try:
                r = client.post(url + "/v1/chat/completions",
                                json={"model": model, "messages": messages, "max_tokens": new_tokens,
                                      "temperature": 0})
            except httpx.HTTPError as e:
                out.append({"turn": turn, "error": f"{type(e).__name__}: {e}"[:200]})
                break
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                out.append({"turn": turn, "error": f"HTTP {r.status_code}: {r.text[:200]}"})
                break
            body = r.json()
            usage = body["usage"]
            out.append({"turn": turn, "latency_s": latency, "prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)})
            messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                         {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
        return out

    return converse


def _row(routing: str, turn: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One router's figures for one turn; failed requests are counted in ``errors`` and left out of the rest."""
    ok = [s for s in samples if "error" not in s]
    lat = sorted(s["latency_s"] for s in ok)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"routing": routing, "turn": turn, "requests": len(samples), "errors": len(samples) - len(ok),
            "cached_share": mean([float(s["cached_tokens"] > 0) for s in ok]),
            "mean_cached_tokens": mean([s["cached_tokens"] for s in ok]),
            "mean_prompt_tokens": mean([s["prompt_tokens"] for s in ok]),
            "latency_median_s": median(lat),
            "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))] if lat else None,
            "first_error": next((s["error"] for s in samples if "error" in s), None)}


def run_routing(args: Any, progress=None) -> dict[str, Any]:
    from vlmguard.images import image_to_data_url
    from vlmguard.perf.models import servable_model
    from vlmguard.perf.serve import _private_ray, _start, served, tear_down
    from vlmguard.perf.timing import environment, set_threads
    from vlmguard.testing import random_image

    threads = set_threads(args.threads or 1)
    configs = {routing: _service_config(args, routing, threads) for routing in ROUTINGS}
    services: dict[str, Any] = {}
    samples: dict[str, list[dict[str, Any]]] = {routing: [] for routing in ROUTINGS}
    saved = ExitStack()
    started_ray = False
    try:
        model = saved.enter_context(servable_model(args.shape, device=args.device, dtype=args.dtype, seed=args.seed))
        started_ray = _private_ray()
        for routing in ROUTINGS:
            services[routing] = _start(served(configs[routing], model), True, progress)
        callers = {routing: conversation_caller(services[routing].url, args.shape, args.turns, args.new_tokens,
                                                args.think_s) for routing in ROUTINGS}
        n = args.conversations
        with cf.ThreadPoolExecutor(args.clients) as pool:
            for rnd in range(args.warmup + args.repeats):
                images = [image_to_data_url(random_image(args.seed + rnd * n + i, IMAGE_SIZE)) for i in range(n)]
                order = ROUTINGS if rnd % 2 == 0 else ROUTINGS[::-1]
                for routing in order:
                    if progress:
                        progress(f"round {rnd + 1}/{args.warmup + args.repeats}: {n} conversations, {routing}")
                    turns = list(pool.map(callers[routing], images))
                    if rnd >= args.warmup:
                        samples[routing] += [t for conv in turns for t in conv]
    finally:
        tear_down(list(services.values()), started_ray, saved)
    rows = [_row(routing, turn, [s for s in samples[routing] if s["turn"] == turn])
            for routing in ROUTINGS for turn in range(1, args.turns + 1)]
    later_ok = {routing: [s for s in samples[routing] if s["turn"] > 1 and "error" not in s] for routing in ROUTINGS}
    later = {routing: median([s["latency_s"] for s in ok]) for routing, ok in later_ok.items()}
    later_cached = {routing: [s["cached_tokens"] > 0 for s in ok] for routing, ok in later_ok.items()}
    return {
        "command": "perf routing", "shape": args.shape, "replicas": args.replicas, "clients": args.clients,
        "conversations": args.conversations, "turns": args.turns, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "prefix_cache_mb": args.prefix_cache_mb, "spill_queue": args.spill_queue,
        "think_s": args.think_s, "environment": environment(),
        "rows": rows,
        "summary": {"later_turns_cached_share": {r: (sum(v) / len(v) if v else None) for r, v in later_cached.items()},
                    "later_turns_latency_median_s": later,
                    "later_turns_latency_power_of_two_over_image_affinity": ratio(later["power_of_two"],
                                                                                  later["image_affinity"])},
    }


ROUTING_HEAD = ["routing", "turn", "requests", "errors", "share with cached tokens", "cached tokens", "prompt tokens",
                "p50 latency s", "p90 latency s"]


def routing_rows(result: dict[str, Any]) -> list[list[Any]]:
    """The report's table rows (ROUTING_HEAD's columns), for the printed table and ``perf plot --markdown``."""
    return [[r["routing"], r["turn"], r["requests"], r.get("errors", 0), r["cached_share"], r["mean_cached_tokens"],
             r["mean_prompt_tokens"], r["latency_median_s"], r["latency_p90_s"]] for r in result["rows"]]


def routing_table(result: dict[str, Any]) -> str:
    from vlmguard.perf.report import fmt, table

    s = result["summary"]
    share = s["later_turns_cached_share"]
    errors = [f"{r['routing']} turn {r['turn']}: {r['first_error']}" for r in result["rows"] if r.get("first_error")]
    return "\n".join([
        f"perf routing  shape={result['shape']}  replicas={result['replicas']}  clients={result['clients']}  "
        f"conversations={result['conversations']} x {result['turns']} turns  new_tokens={result['new_tokens']}  "
        f"think_s={result['think_s']}  spill_queue={result['spill_queue']}  rounds={result['repeats']}",
        table(ROUTING_HEAD, routing_rows(result)),
        *(f"first error, {e}" for e in errors),
        "turns after the first, share that took tokens from a cache: "
        + ", ".join(f"{r} {fmt(v)}" for r, v in share.items()),
        "turns after the first, median latency power_of_two / image_affinity: "
        f"{fmt(s['later_turns_latency_power_of_two_over_image_affinity'])}x"])


__all__ = ["ROUTINGS", "ROUTING_HEAD", "conversation_caller", "routing_rows", "routing_table", "run_routing"]
