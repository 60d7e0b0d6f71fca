"""Score arithmetic shared by the contrastive decoders (VCD, IAVA, LQCD; M3ID's guards).

All arithmetic is float32 log-space. The contrast of an *expert* distribution against one or more
*amateur* distributions under the adaptive plausibility constraint (APC, vcd.md section 3):

    K_t = {k : p_E(k) >= beta * max_j p_E(j)}         (beta = 0: no cutoff)
    s_t = (1 + alpha) * l_E - alpha * mean_j l_A,j      on K_t, -inf elsewhere

Returned scores are renormalised with ``log_softmax`` so that the "final score" in per-token diagnostics
is the log-probability under the decoder's final distribution (argmax and sampling are unchanged by it).
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlmguard.decoding.base import plausibility_mask, values_on


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary."""
    return torch.log_softmax(logits.float(), dim=-1)


def mean_log_probs(branches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of several branches' log-probs (the amateur term of a multi-amateur contrast)."""
    return torch.stack([b for b in branches], dim=0).mean(dim=0)


def as_column(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-row (B,) tensor as a (B, 1) float32 column on ``like``'s device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, 1)


def contrast(expert: torch.Tensor, amateur: torch.Tensor, alpha: float | torch.Tensor, beta: float,
             one_sided: bool = False) -> torch.Tensor:
    """APC-masked contrast of log-prob tensors (B, V); alpha may be per row. Returns normalised scores.

    ``one_sided``: s = l_E - alpha * max(l_A - l_E, 0) (only suppress tokens the amateur favours).
    Rows whose amateur is not finite on the plausible set fall back to the APC-truncated expert (the
    NaN/inf guard of AvisC / IAVA).
    """
    a = as_column(alpha, expert)
    keep = plausibility_mask(expert, beta)
    if one_sided:
        s = expert - a * (amateur - expert).clamp(min=0)
    else:
        s = (1.0 + a) * expert - a * amateur
    bad = ~torch.isfinite(torch.where(keep, s, torch.zeros_like(s))).all(dim=-1, keepdim=True)
    s = torch.where(bad, expert, s)
    s = s.masked_fill(~keep, float("-inf"))
    return finalize(s, expert)


def finalize(scores: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf rows -> fallback, every row keeps a finite maximum; then log-softmax."""
    s = scores.masked_fill(torch.isnan(scores), float("-inf"))
    broken = torch.isposinf(s).any(dim=-1, keepdim=True) | ~torch.isfinite(s).any(dim=-1, keepdim=True)
    s = torch.where(broken, fallback, s)
    return torch.log_softmax(s, dim=-1)


def select_rows(applied: torch.Tensor, method_scores: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Per row: the method's scores where ``applied`` (B,) is True, plain decoding otherwise."""
    return torch.where(applied.reshape(-1, 1).to(method_scores.device), method_scores, plain)


def active_rows(values: Sequence, active: Sequence[int], device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-request values gathered for the current rows (``DecodeContext.active``), as a tensor on ``device``.
    Read-only: the same values give the same cached tensor, so a decode step does not copy a list to the GPU
    (a host sync) while the set of rows stays the same."""
    return values_on(tuple(values[i] for i in active), dtype, device)
