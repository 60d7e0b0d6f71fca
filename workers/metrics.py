"""Service metrics kept by the ingress: request counts, latency, tokens/s, batch sizes, visual tokens kept.

Exposed as JSON (``GET /metrics?format=json``) and Prometheus text exposition (``GET /metrics``).
Counts are per ingress replica: with one model served (``ingress: model``) every model replica is its own
ingress, so with ``num_replicas`` > 1 each ``/metrics`` answer covers the replica the router picked for it.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from typing import Any

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
THROUGHPUT_WINDOW_S = 60.0


def _label(value: Any) -> str:
    """A label value escaped for the text exposition format: backslash, double quote and newline."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class ServiceMetrics:
    """Thread-safe counters; ``observe_*`` are called by the ingress for every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> n
        self.latency = Histogram(LATENCY_BUCKETS)
        self.in_flight = 0
        self.background = 0  # background responses this process answers now (workers/background_runs.py)
        self.taken_over = 0  # lost background responses this process took over from another
        self.resent = 0  # calls sent again because the model replica answering them was lost (workers/ingress.py)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_s = 0.0
        self.results = 0
        self.failed_results = 0  # generations that ended with an error mid-answer (NaN scores, a failed stream)
        self.visual_tokens = 0
        self.visual_tokens_kept = 0.0  # mean over LLM layers, summed over results
        self.batch_sizes: Counter[int] = Counter()
        self.prefill_batches: Counter[int] = Counter()  # requests prefilled together -> results
        self._recent: deque[tuple[float, int]] = deque()  # (time, generated tokens) for tokens/s

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def background_changed(self, by: int) -> None:
        """A background response's task started (+1) or ended (-1)."""
        with self._lock:
            self.background += by

    def background_taken_over(self) -> None:
        with self._lock:
            self.taken_over += 1

    def replica_resent(self) -> None:
        with self._lock:
            self.resent += 1

    def request_finished(self, endpoint: str, status: int, latency_s: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(endpoint, int(status))] += 1
            if status < 400:
                self.latency.observe(latency_s)

    def observe_result(self, result: dict[str, Any]) -> None:
        """Record one GenerationResult (as a dict)."""
        n_gen = len(result.get("token_ids") or [])
        kept = result.get("visual_tokens_kept") or []
        timings = result.get("timings") or {}
        now = time.time()
        with self._lock:
            self.results += 1
            self.prompt_tokens += int(result.get("prompt_tokens") or 0)
            self.generated_tokens += n_gen
            self.decode_s += float(timings.get("decode_s") or 0.0)
            self.visual_tokens += int(result.get("visual_tokens") or 0)
            self.visual_tokens_kept += (sum(kept) / len(kept)) if kept else 0.0
            self.batch_sizes[int(timings.get("batch_size") or 1)] += 1
            self.prefill_batches[int(timings.get("prefill_batch") or 1)] += 1
            self._recent.append((now, n_gen))
            self._trim(now)

    def observe_failure(self) -> None:
        """Record a generation that ended with an error mid-answer (its result's ``error``)."""
        with self._lock:
            self.failed_results += 1

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            self._trim(now)
            window = min(THROUGHPUT_WINDOW_S, max(now - self.started, 1e-9))
            total = sum(self.requests.values())
            by_status: Counter[str] = Counter()
            for (_, status), n in self.requests.items():
                by_status[str(status)] += n
            n_batches_weighted = sum(self.batch_sizes.values())
            return {
                "uptime_s": round(now - self.started, 3),
                "requests_total": total,
                "requests_by_status": dict(by_status),
                "requests_by_endpoint": {f"{e} {s}": n for (e, s), n in sorted(self.requests.items())},
                "in_flight": self.in_flight,
                "background_in_flight": self.background,
                "background_taken_over": self.taken_over,
                "replica_resends": self.resent,
                "latency_s": {
                    "count": self.latency.count,
                    "mean": self.latency.sum / self.latency.count if self.latency.count else None,
                    "buckets": dict(self.latency.cumulative()),
                },
                "results": self.results,
                "results_failed": self.failed_results,
                "prompt_tokens_total": self.prompt_tokens,
                "generated_tokens_total": self.generated_tokens,
                "decode_tokens_per_s": self.generated_tokens / self.decode_s if self.decode_s > 0 else None,
                "tokens_per_s_recent": sum(n for _, n in self._recent) / window,
                "visual_tokens_mean": self.visual_tokens / self.results if self.results else None,
                "visual_tokens_kept_mean": self.visual_tokens_kept / self.results if self.results else None,
                # results per engine batch size: {batch_size: number of results produced in such a batch}
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch_size_observed": max(self.batch_sizes) if self.batch_sizes else 0,
                "mean_batch_size": (sum(k * v for k, v in self.batch_sizes.items()) / n_batches_weighted
                                    if n_batches_weighted else None),
                # results per prefill size: {requests prefilled together: results}; in-flight joins show here
                "prefill_batches": {str(k): v for k, v in sorted(self.prefill_batches.items())},
                "mean_prefill_batch": (sum(k * v for k, v in self.prefill_batches.items()) / n_batches_weighted
                                       if n_batches_weighted else None),
            }

    def prometheus(self) -> str:
        s = self.snapshot()
        lines = [
            "# HELP vlmguard_requests_total HTTP requests by endpoint and status.",
            "# TYPE vlmguard_requests_total counter",
        ]
        with self._lock:
            reqs = sorted(self.requests.items())
            lat = self.latency.cumulative()
            lat_sum, lat_count = self.latency.sum, self.latency.count
            batches = sorted(self.batch_sizes.items())
            prefills = sorted(self.prefill_batches.items())
        for (endpoint, status), n in reqs:
            lines.append(f'vlmguard_requests_total{{endpoint="{_label(endpoint)}",status="{status}"}} {n}')
        lines += ["# HELP vlmguard_request_latency_seconds Latency of successful requests.",
                  "# TYPE vlmguard_request_latency_seconds histogram"]
        for le, c in lat:
            lines.append(f'vlmguard_request_latency_seconds_bucket{{le="{le}"}} {c}')
        lines += [f"vlmguard_request_latency_seconds_sum {lat_sum}",
                  f"vlmguard_request_latency_seconds_count {lat_count}"]

        def gauge(name: str, help_: str, value: Any, kind: str = "gauge") -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {0 if value is None else value}"])

        gauge("vlmguard_in_flight_requests", "Requests being served now.", s["in_flight"])
        gauge("vlmguard_background_responses", "Background responses being answered now (queued or in progress).",
              s["background_in_flight"])
        gauge("vlmguard_background_taken_over_total", "Lost background responses this process answered again.",
              s["background_taken_over"], "counter")
        gauge("vlmguard_replica_resends_total", "Calls sent to the model again because the replica answering them "
              "was lost.", s["replica_resends"], "counter")
        gauge("vlmguard_failed_results_total", "Generations that ended with an error mid-answer (NaN scores: a "
              "float16 model overflowing; a stream whose engine failed).", s["results_failed"], "counter")
        gauge("vlmguard_prompt_tokens_total", "Prompt tokens (incl. image tokens) processed.", s["prompt_tokens_total"],
              "counter")
        gauge("vlmguard_generated_tokens_total", "Tokens generated.", s["generated_tokens_total"], "counter")
        gauge("vlmguard_tokens_per_second", f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:.0f} s.",
              s["tokens_per_s_recent"])
        gauge("vlmguard_decode_tokens_per_second", "Generated tokens per second of decode time.",
              s["decode_tokens_per_s"])
        gauge("vlmguard_visual_tokens_mean", "Mean visual tokens in the input per request.", s["visual_tokens_mean"])
        gauge("vlmguard_visual_tokens_kept_mean", "Mean visual tokens fed to the LLM layers per request.",
              s["visual_tokens_kept_mean"])
        lines += ["# HELP vlmguard_batch_results_total Results produced by engine batches of each size.",
                  "# TYPE vlmguard_batch_results_total counter"]
        for k, v in batches:
            lines.append(f'vlmguard_batch_results_total{{batch_size="{k}"}} {v}')
        lines += ["# HELP vlmguard_prefill_results_total Results by the number of requests prefilled together.",
                  "# TYPE vlmguard_prefill_results_total counter"]
        for k, v in prefills:
            lines.append(f'vlmguard_prefill_results_total{{prefill_batch="{k}"}} {v}')
        return "\n".join(lines) + "\n"
