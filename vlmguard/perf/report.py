"""Printing benchmark results: a plain-text table for people, one JSON object (last line) for machines."""
from __future__ import annotations

import json
import math
from typing import Any, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 0.01 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def mib(n: int | float | None) -> float | None:
    return None if n is None else float(n) / 2**20


def emit(result: dict[str, Any], text: str, as_json: bool, out_path: str | None = None) -> None:
    """Print the human table (unless --json) or the JSON line, then write ``out_path`` (JSON) when given:
    printed first, the results survive a write that fails."""
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        print(text, flush=True)
    if out_path:
        from vlmguard.files import write_output_file

        write_output_file(out_path, json.dumps(result, indent=2) + "\n", "--out")


def markdown(result: dict[str, Any]) -> str:
    """The report's main table as GitHub markdown (what docs/performance.md shows)."""
    cmd = result.get("command")
    if cmd == "perf prefill":
        head = ["method", "budget", "visual tokens / layer", "prefill s", "vision s", "LLM s", "TTFT s", "speed-up",
                "ideal", "achieved / ideal", "LLM speed-up", "LLM ideal", "CPU-time speed-up", "CPU-time / ideal",
                "peak MiB", "KV MiB"]
        rows = [[r["method"], r["budget"], r["mean_visual_tokens_per_layer"], r["times"]["prefill_s"],
                 r["times"]["vision_s"], r["times"]["llm_prefill_s"], r["times"]["ttft_s"], r["speedup"],
                 r["ideal_speedup"], r["achieved_over_ideal"], r.get("llm_speedup"), r.get("llm_ideal_speedup"),
                 r.get("cpu_speedup"), r.get("cpu_achieved_over_ideal"), mib(r["memory"]["peak_bytes"]),
                 mib(r["memory"]["kv_cache_bytes"])] for r in result["rows"]]
    elif cmd == "perf decode":
        head = ["decoder", "batch", "pruning", "s / token", "x greedy", "tokens / s", "setup s", "prefill s", "TTFT s"]
        rows = [[r["decoder"], r["batch"], f"{r['pruning']}@{r['budget']}" if r["budget"] else r["pruning"],
                 r["per_token_s"], r["relative_to_greedy"], r["tokens_per_s"], r["setup_s"], r["prefill_s"],
                 r["ttft_s"]] for r in result["rows"]]
    elif cmd == "perf serve":
        head = ["path", "clients", "requests", "errors", "requests / s", "tokens / s", "p50 latency s",
                "p90 latency s", "added p50 s"]
        rows = [[r["path"], r["clients"], r["requests"], r["errors"], r["requests_per_s"], r["tokens_per_s"],
                 r["latency_median_s"], r["latency_p90_s"], r.get("added_latency_median_s")] for r in result["rows"]]
    elif cmd == "perf routing":
        from vlmguard.perf.routing import ROUTING_HEAD, routing_rows

        head, rows = ROUTING_HEAD, routing_rows(result)
    elif cmd == "perf prefix":
        from vlmguard.perf.prefix import prefix_head, prefix_rows

        head, rows = prefix_head(result), prefix_rows(result)
    elif cmd == "perf chat":
        from vlmguard.perf.chat import CHAT_HEAD, chat_rows

        head, rows = CHAT_HEAD, chat_rows(result)
    elif cmd == "perf gemm":
        from vlmguard.perf.gemm import GEMM_HEAD, gemm_rows

        head, rows = GEMM_HEAD, gemm_rows(result)
    elif cmd == "perf guided":
        from vlmguard.perf.guided import GUIDED_HEAD, guided_rows

        head, rows = GUIDED_HEAD, guided_rows(result)
    else:
        raise ValueError(f"not a perf report: {cmd!r}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
