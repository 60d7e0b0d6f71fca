"""The lm_head on a few rows, on a CPU: the product in the layout the CPU's BLAS runs fastest.

A decode step sends 1 to a few rows through the lm_head (one per request and branch; a contrastive decoder doubles
them). ``nn.Linear`` computes ``x @ W.T``, which a CPU's BLAS may run as one matrix-vector product per row, each
reading the whole weight (LLaVA-1.5: 32,064 x 4,096) from memory again. The same product as ``W @ x.T`` is one
matrix product that reads the weight once. Which layout is faster depends on the BLAS and the CPU (on an AMD EPYC
with PyTorch's CPU build, at width 256: 1.6 ms against 3.8 ms for one row, 7.2 ms for two), so :class:`HeadLayout`
times both on the model's own weight once, on the first call with few rows, and keeps the faster. One row is
padded to two: the matrix-vector product is the slow path. The logits agree with ``nn.Linear``'s to float
rounding (the products are summed in another order).
"""
from __future__ import annotations

import time

import torch
from torch import nn

SMALL_ROWS = 8  # up to this many rows the layout is chosen by timing; above, nn.Linear (its GEMM is as fast)
TRIALS = 5  # timed calls per layout (after one warm-up call each); the median decides
MIN_GAIN = 1.2  # the transposed layout must be this much faster to be used


def transposed_product(head: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """``head(rows)`` for ``rows`` (R, D) as ``W @ rows.T`` (a single row padded to two), (R, V), contiguous."""
    r = rows.shape[0]
    x = rows if r > 1 else torch.cat([rows, torch.zeros_like(rows)])
    out = torch.mm(head.weight, x.t())[:, :r].t()
    if head.bias is not None:
        out = out + head.bias
    return out.contiguous()


class HeadLayout:
    """Which product a CPU lm_head uses on few rows: decided on the first such call, by timing both."""

    def __init__(self) -> None:
        self.transposed: bool | None = None  # None: not decided yet
        self.timings_ms: dict[str, float] = {}

    def __call__(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        if (not isinstance(head, nn.Linear) or hidden.device.type != "cpu" or rows.shape[0] > SMALL_ROWS
                or torch.is_grad_enabled() and head.weight.requires_grad):
            return head(hidden)
        if self.transposed is None:
            self.transposed = self._decide(head, rows)
        out = transposed_product(head, rows) if self.transposed else head(rows)
        return out.reshape(*hidden.shape[:-1], out.shape[-1])

    def _decide(self, head: nn.Linear, rows: torch.Tensor) -> bool:
        two = torch.cat([rows[:1], rows[:1]]) if rows.shape[0] == 1 else rows[:2]
        self.timings_ms = {"linear": _median_ms(lambda: head(two)),
                           "transposed": _median_ms(lambda: transposed_product(head, two))}
        return self.timings_ms["linear"] > MIN_GAIN * self.timings_ms["transposed"]


def _median_ms(fn) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(TRIALS):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]
