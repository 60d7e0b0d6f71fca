"""PNG figures of perf reports (matplotlib, Agg backend; no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmguard.errors import InvalidInput


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prefill(result: dict[str, Any], path: str | Path) -> None:
    """Achieved vs ideal speed-up per method (bars) at each budget."""
    plt = _plt()
    rows = [r for r in result["rows"] if r["method"] != "none"]
    budgets = sorted({r["budget"] for r in rows}, key=lambda b: -float(b))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(budgets) or 1, figsize=(4.2 * max(1, len(budgets)), 3.6), sharey=True,
                             squeeze=False)
    for ax, b in zip(axes[0], budgets):
        sel = {r["method"]: r for r in rows if r["budget"] == b}
        xs = range(len(methods))
        ach = [sel[m]["speedup"] or 0 if m in sel else 0 for m in methods]
        ideal = [sel[m]["ideal_speedup"] or 0 if m in sel else 0 for m in methods]
        ax.bar([x - 0.2 for x in xs], ach, width=0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], ideal, width=0.4, label="ideal (FLOPs)", alpha=0.6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_title(f"budget {b}")
    axes[0][0].set_ylabel("prefill speed-up over none")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"prefill, {result['shape']} ({result['environment'].get('device')}, "
                 f"{result['environment'].get('dtype')}, batch {result['batch']})", fontsize=10)
    _save(plt, fig, path)


def plot_decode(result: dict[str, Any], path: str | Path) -> None:
    """Per-token time relative to greedy per decoder, one bar group per batch size."""
    plt = _plt()
    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.1 * len(decoders) * max(1, len(batches)) + 2, 3.6))
    width = 0.8 / max(1, len(batches))
    for k, b in enumerate(batches):
        sel = {r["decoder"]: r for r in rows if r["batch"] == b}
        vals = [(sel[d]["relative_to_greedy"] or 0) if d in sel else 0 for d in decoders]
        ax.bar([i + (k - (len(batches) - 1) / 2) * width for i in range(len(decoders))], vals, width=width,
               label=f"batch {b}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(decoders)))
    ax.set_xticklabels(decoders)
    ax.set_ylabel("time per token / greedy")
    ax.legend(fontsize=8)
    ax.set_title(f"decode, {result['shape']} (pruning {result['pruning']}@{result['budget']})", fontsize=10)
    _save(plt, fig, path)


def plot_serve(result: dict[str, Any], path: str | Path) -> None:
    """Throughput (requests/s) against concurrent clients for each serving path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    paths = list(dict.fromkeys(r["path"] for r in result["rows"]))
    for p in paths:
        pts = sorted((r["clients"], r["requests_per_s"]) for r in result["rows"] if r["path"] == p)
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.legend(fontsize=8)
    ax.set_title(f"serving, {result['shape']}", fontsize=10)
    _save(plt, fig, path)


def plot_gemm(result: dict[str, Any], path: str | Path) -> None:
    """GFLOP/s of the decoder-layer matrix products against the token count, weights streamed and warm."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    rows = sorted(result["rows"], key=lambda r: r["tokens"])
    for mode in ("streamed", "warm"):
        ax.plot([r["tokens"] for r in rows], [r[f"{mode}_gflops"] for r in rows], marker="o", label=f"weights {mode}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens per layer")
    ax.set_ylabel("GFLOP/s")
    ax.legend(fontsize=8)
    ax.set_title(f"decoder-layer GEMMs, {result['shape']} ({result['environment'].get('dtype')})", fontsize=10)
    _save(plt, fig, path)


def plot_guided(result: dict[str, Any], path: str | Path) -> None:
    """Per format: the microseconds structured output adds to each generated token of a request, per batch size."""
    plt = _plt()
    formats = list(dict.fromkeys(r["format"] for r in result["rows"]))
    batches = sorted({r["batch"] for r in result["rows"]})
    fig, ax = plt.subplots(figsize=(1.6 * len(formats) + 2.5, 3.6))
    by = {(r["format"], r["batch"]): r for r in result["rows"]}
    rows = [{f"b{b}": (by[(f, b)]["per_request_token_s"] * 1e6 if (f, b) in by else 0) for b in batches}
            for f in formats]
    _grouped_bars(ax, list(range(len(formats))), rows, [(f"b{b}", f"batch {b}") for b in batches])
    ax.set_xticks(list(range(len(formats))), formats)
    ax.set_ylabel("µs per generated token and request")
    ax.legend(fontsize=8)
    ax.set_title(f"structured output's work per token, {result['vocab']}-id vocabulary", fontsize=10)
    _save(plt, fig, path)


def _grouped_bars(ax, xs: list[float], rows: list[dict[str, Any]], series: list[tuple[str, str]],
                  alphas: tuple[float, ...] = (1.0,)) -> None:
    """One group of bars per row at ``xs``, one bar per (key, label) of ``series`` (a missing value: 0); the bars
    take ``alphas`` in turn."""
    w = 0.8 / len(series)
    for k, (key, label) in enumerate(series):
        ax.bar([x - 0.4 + w * (k + 0.5) for x in xs], [r[key] or 0 for r in rows], width=w, label=label,
               alpha=alphas[k % len(alphas)])


def _with_pruner(result: dict[str, Any]) -> str:
    """", PRUNER @BUDGET" for a report with a pruner composed, else ""."""
    pruning = result.get("pruning", "none")
    return "" if pruning == "none" else f", {pruning} @{result.get('budget')}"


def plot_prefix(result: dict[str, Any], path: str | Path) -> None:
    """Prefill speed-up of shared prefixes per decoder (bars), measured and ideal (token count)."""
    plt = _plt()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2.5, 3.6))
    xs = range(len(rows))
    bars = [("speedup", "shared"), ("ideal_speedup", "shared, ideal (tokens)")]
    if result.get("cache"):
        bars += [("cached_speedup", "warm prefix cache"), ("cached_ideal_speedup", "warm prefix cache, ideal")]
    _grouped_bars(ax, list(xs), rows, bars, alphas=(1.0, 0.6))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["decoder"] for r in rows])
    ax.set_ylabel("prefill speed-up over unshared")
    ax.legend(fontsize=8)
    what = "shared prefixes and a warm prefix cache" if result.get("cache") else "shared prefixes"
    ax.set_title(f"{what}\n{result['shape']} (batch {result['batch']}, "
                 f"{result['questions_per_image']} questions per image{_with_pruner(result)})", fontsize=10)
    _save(plt, fig, path)


def plot_routing(result: dict[str, Any], path: str | Path) -> None:
    """Per turn of a conversation: the share of requests that took prompt tokens from a cache, and the median
    latency, for each router."""
    plt = _plt()
    fig, (share, latency) = plt.subplots(1, 2, figsize=(8.5, 3.4))
    turns = sorted({r["turn"] for r in result["rows"]})
    routings = list(dict.fromkeys(r["routing"] for r in result["rows"]))
    w = 0.8 / max(1, len(routings))
    for k, routing in enumerate(routings):
        sel = {r["turn"]: r for r in result["rows"] if r["routing"] == routing}
        xs = [t + (k - (len(routings) - 1) / 2) * w for t in turns]
        share.bar(xs, [(sel[t]["cached_share"] or 0) if t in sel else 0 for t in turns], width=w, label=routing)
        latency.bar(xs, [(sel[t]["latency_median_s"] or 0) if t in sel else 0 for t in turns], width=w,
                    label=routing)
    for ax, label in ((share, "requests with cached prompt tokens"), (latency, "median latency s")):
        ax.set_xticks(turns)
        ax.set_xlabel("turn")
        ax.set_ylabel(label)
    share.set_ylim(0, 1.05)
    share.legend(fontsize=8)
    fig.suptitle(f"routing, {result['shape']} ({result['replicas']} replicas, {result['clients']} conversations at "
                 f"once, {result.get('think_s', 0)} s between turns)", fontsize=10)
    _save(plt, fig, path)


def plot_chat(result: dict[str, Any], path: str | Path) -> None:
    """Per turn of the conversation: the prefill's median seconds with each cache setting."""
    plt = _plt()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.6))
    settings = [("none_prefill_s", "no prefix cache"), ("image_prefill_s", "image prefixes"),
                ("conversation_prefill_s", "conversation history")]
    _grouped_bars(ax, [r["turn"] for r in rows], rows, settings)
    ax.set_xticks([r["turn"] for r in rows])
    ax.set_xlabel("turn")
    ax.set_ylabel("prefill s (median)")
    ax.legend(fontsize=8)
    others = result.get("other_chats", 0)
    image_at = result.get("image_at") or 1
    about = ("without an image" if result.get("text_only") else "about an image" if image_at == 1
             else f"its image with question {image_at}")
    decoding = result.get("decoding", "greedy")
    ax.set_title(f"a conversation's turns ({about}), {result['shape']}\n(answers of {result['answer_tokens']} tokens"
                 f"{'' if decoding == 'greedy' else f', {decoding}'}"
                 f"{_with_pruner(result)}{f'; {others} other chats about the image cached' if others else ''})",
                 fontsize=10)
    _save(plt, fig, path)


PLOTTERS = {"perf prefill": plot_prefill, "perf chat": plot_chat, "perf decode": plot_decode, "perf prefix": plot_prefix,
            "perf serve": plot_serve, "perf gemm": plot_gemm, "perf routing": plot_routing, "perf guided": plot_guided}


def plot_report(result: dict[str, Any], path: str | Path) -> None:
    fn = PLOTTERS.get(result.get("command", ""))
    if fn is None:
        raise InvalidInput(f"not a perf report (command {result.get('command')!r})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fn(result, path)
