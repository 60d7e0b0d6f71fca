"""A bounded closed-loop load generator: N concurrent clients posting chat completions for D seconds.

Used to compare throughput with and without dynamic batching (and by ``vlmguard perf serve``)::

    svc = start_service(config, port=0, batching=False)
    report = run_load(svc.url, concurrency=16, duration_s=60, api_key=None)

Only for loopback / your own service: it sends as fast as the service answers.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import httpx

from vlmguard.images import image_to_data_url


def default_body(model: str | None = None, max_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    from vlmguard.testing import random_image

    url = image_to_data_url(random_image(seed, (64, 64)))
    body: dict[str, Any] = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Is there a dog in the image?"}, {"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": max_tokens}
    if model:
        body["model"] = model
    return body


async def _run(url: str, body: dict[str, Any], concurrency: int, duration_s: float,
               api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    tokens = 0
    errors: Counter[str] = Counter()
    stop_at = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300.0, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    errors[type(e).__name__] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    tokens += r.json()["usage"]["completion_tokens"]
                elif r.status_code in (429, 503):
                    await asyncio.sleep(0.2)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
        metrics = (await client.get("/metrics", params={"format": "json"})).json()

    lat = sorted(latencies)
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "requests_ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "transport_errors": dict(errors),
        "requests_per_s": round(ok / elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "server_5xx_other_than_503": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "mean_batch_size": metrics.get("mean_batch_size"),
        "max_batch_size_observed": metrics.get("max_batch_size_observed"),
    }


def run_load(url: str, *, concurrency: int = 16, duration_s: float = 60.0, api_key: str | None = None,
             body: dict[str, Any] | None = None, model: str | None = None, max_tokens: int = 16) -> dict[str, Any]:
    """Closed-loop load for ``duration_s``; returns throughput, latency percentiles and status counts."""
    return asyncio.run(_run(url, body or default_body(model, max_tokens), concurrency, duration_s, api_key))
