"""Shared measurement helpers for ``vlmguard perf``: medians, peak memory, KV-cache size, run environment.

Timings on a shared machine are noisy, so the benchmarks interleave the configurations they compare
(round-robin over repeats) and report medians and ratios taken within one run.
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch


def median(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings cover it, on ``device``'s GPU (synchronize without a device
    waits for the current one, cuda:0 unless set, not for an engine on cuda:1)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_in_use_bytes() -> int | None:
    """Bytes currently allocated through glibc malloc (small blocks + mmapped large blocks), where glibc has
    ``mallinfo2``: unlike RSS, memory freed back to the allocator does not count, so peaks are per run."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class MemoryMeter:
    """Peak memory added while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, allocator level). CPU: the heap in use (glibc
    ``mallinfo2``; the process RSS where that is unavailable) above the level at entry, sampled every
    ``interval_s`` by a background thread (torch kernels run outside the GIL), so it is a lower bound on
    spikes shorter than the interval.
    """

    device: torch.device | str = "cpu"
    interval_s: float = 0.002
    peak_bytes: int = 0
    baseline_bytes: int = 0
    source: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _max_rss: int = 0
    _read: Any = None

    def __enter__(self) -> "MemoryMeter":
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.baseline_bytes = torch.cuda.memory_allocated(dev)
            self.source = "torch.cuda.max_memory_allocated"
        else:
            self._read = heap_in_use_bytes if _MALLINFO2 is not None else _rss_bytes
            self.source = "malloc_in_use_sampled" if _MALLINFO2 is not None else "rss_sampled"
            self.baseline_bytes = self._read()
            self._max_rss = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max_rss = max(self._max_rss, self._read())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(dev) - self.baseline_bytes)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._max_rss = max(self._max_rss, self._read())
            self.peak_bytes = max(0, self._max_rss - self.baseline_bytes)


def kv_cache_bytes(text_config: Any, tokens_per_layer: list[int], dtype: torch.dtype, rows: int = 1) -> int:
    """Bytes of K and V cached after prefill when layer i was fed ``tokens_per_layer[i]`` tokens per row."""
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    elt = torch.empty((), dtype=dtype).element_size()
    return int(rows * sum(tokens_per_layer) * 2 * kv_heads * head_dim * elt)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op thread count (None: leave as is). Returns the count in effect."""
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what ``platform`` knows): absolute times and
    even the ratios of the serving benchmark differ between CPU models."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(engine: Any | None = None) -> dict[str, Any]:
    """What the numbers were measured on (goes into every JSON report)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        dev = getattr(engine, "device", None)  # the engine's GPU (cuda:N), not always the first one
        info["gpu"] = torch.cuda.get_device_name(dev if dev is not None and dev.type == "cuda" else 0)
    if engine is not None:
        info.update(model=engine.model_name, family=engine.family, device=str(engine.device),
                    dtype=str(engine.model.dtype).replace("torch.", ""), attention=engine.attn_implementation,
                    malloc_tuned=engine.malloc_tuned, quantization=getattr(engine, "quantization", "none"))
        if hasattr(engine.model, "get_memory_footprint"):
            info["weights_mb"] = round(engine.model.get_memory_footprint() / 2**20, 1)
    return info


class Timer:
    """``with Timer(device) as t: ...; t.seconds`` (synchronises CUDA on both ends)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
