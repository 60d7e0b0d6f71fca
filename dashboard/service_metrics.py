"""The Service page's data: the service's ``GET /metrics?format=json`` snapshot (``workers/metrics.py``) as the
figures, tables and charts the page shows. Plain functions, testable without Streamlit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class Figure:
    """One headline number: its label, its value as shown, and what it means."""

    label: str
    value: str
    help: str


def _num(v: Any, fmt: str = "{:,.0f}", none: str = "–") -> str:
    return none if v is None else fmt.format(v)


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return (f"{days} d {hours} h" if days else f"{hours} h {minutes} min" if hours
            else f"{minutes} min {s} s" if minutes else f"{s} s")


def traffic(m: dict[str, Any]) -> list[Figure]:
    """Requests and speed."""
    lat = m.get("latency_s") or {}
    errors = sum(n for status, n in (m.get("requests_by_status") or {}).items() if int(status) >= 500)
    return [
        Figure("up for", _duration(m.get("uptime_s") or 0), "since this process of the API started"),
        Figure("requests", _num(m.get("requests_total")), "HTTP requests answered, every status"),
        Figure("in flight", _num(m.get("in_flight")), "requests being answered now"),
        Figure("server errors", _num(errors), "answers with a 5xx status (503: overloaded or a replica lost)"),
        Figure("mean latency", _num(lat.get("mean"), "{:.3f} s"), "successful requests, from arrival to the end "
               "of the answer (a stream's too)"),
        Figure("tokens/s (last minute)", _num(m.get("tokens_per_s_recent"), "{:,.1f}"),
               "tokens generated per second over the last 60 s, every request together"),
    ]


def engine(m: dict[str, Any]) -> list[Figure]:
    """What the model replicas did with the requests: batching, tokens, pruning."""
    kept, seen = m.get("visual_tokens_kept_mean"), m.get("visual_tokens_mean")
    return [
        Figure("answers", _num(m.get("results")), "generations finished (a request with n choices makes n)"),
        Figure("mean batch", _num(m.get("mean_batch_size"), "{:.2f}"),
               "requests decoded together, averaged over answers"),
        Figure("largest batch", _num(m.get("max_batch_size_observed")), "the most requests decoded together"),
        Figure("decode tokens/s", _num(m.get("decode_tokens_per_s"), "{:,.1f}"),
               "generated tokens over the time spent decoding them, per answer"),
        Figure("prompt tokens", _num(m.get("prompt_tokens_total")), "prompt tokens processed, image tokens included"),
        Figure("visual tokens kept", "–" if kept is None or not seen else f"{kept:.1f} of {seen:.1f}",
               "mean over answers of the visual tokens each LLM layer read, of those the image gave"),
    ]


def reliability(m: dict[str, Any]) -> list[Figure]:
    """Failures and what the service did about them."""
    return [
        Figure("failed answers", _num(m.get("results_failed")), "generations that ended with an error mid-answer"),
        Figure("replica resends", _num(m.get("replica_resends", 0)),
               "calls sent again because the model replica answering them was lost (separate ingress)"),
        Figure("background now", _num(m.get("background_in_flight")), "background responses being answered"),
        Figure("background taken over", _num(m.get("background_taken_over")),
               "lost background responses this process answered again"),
    ]


def requests_table(m: dict[str, Any]) -> pd.DataFrame:
    """Requests by route and status, the busiest first."""
    rows = []
    for key, n in (m.get("requests_by_endpoint") or {}).items():
        route, _, status = key.rpartition(" ")
        rows.append({"route": route, "status": int(status), "requests": int(n)})
    frame = pd.DataFrame(rows, columns=["route", "status", "requests"])
    return frame.sort_values(["requests", "route", "status"], ascending=[False, True, True], ignore_index=True)


def latency_histogram(m: dict[str, Any]) -> pd.DataFrame:
    """Successful requests per latency bucket (the snapshot's buckets are cumulative, as Prometheus's are), in
    bucket order: a ``bucket`` label ("≤ 0.25 s", "> 120 s") and its ``requests``."""
    buckets = list(((m.get("latency_s") or {}).get("buckets") or {}).items())
    rows, below, last = [], 0, None
    for le, cumulative in buckets:
        label = f"> {_num(last, '{:g}')} s" if le == "+Inf" else f"≤ {float(le):g} s"
        rows.append({"bucket": label, "requests": int(cumulative) - below})
        below, last = int(cumulative), (None if le == "+Inf" else float(le))
    return pd.DataFrame(rows, columns=["bucket", "requests"])


def batch_table(m: dict[str, Any]) -> pd.DataFrame:
    """Answers by the number of requests decoded with them (``batch``) and prefilled with them (``prefill``)."""
    sizes = sorted({int(k) for k in (m.get("batch_sizes") or {})} | {int(k) for k in (m.get("prefill_batches") or {})})
    return pd.DataFrame([{"requests together": k, "decoded": int((m.get("batch_sizes") or {}).get(str(k), 0)),
                          "prefilled": int((m.get("prefill_batches") or {}).get(str(k), 0))} for k in sizes],
                        columns=["requests together", "decoded", "prefilled"])
