"""Penalties on repeated tokens, per request, on the model's logits: every row of the request (the main row and a
contrastive decoder's branch rows), before the decoder combines them (``DecodeBatch._penalised_logits``), as
transformers and vLLM apply them to a model's logits. (The multiplicative penalty is not shift-invariant: on
log-probabilities, all <= 0, it would multiply every seen token and hardly touch a confident repeat.)

* ``presence_penalty`` / ``frequency_penalty`` (OpenAI's): ``score[t] -= presence * (count[t] > 0) +
  frequency * count[t]``, where ``count[t]`` is how often the request has generated ``t`` so far;
* ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``, vLLM's): a generated token's score
  is divided by it where positive and multiplied by it where negative (> 1 discourages repeats).

Only the tokens a request generated count, not its prompt (vLLM applies its repetition penalty to the prompt too;
a question's words, "Is there a dog", are not repeats of an answer). The decoder combines the penalised logits,
so token selection, log-probabilities and diagnostics all see the penalties. Under plain greedy decoding the
repetition penalty gives the tokens of transformers' ``RepetitionPenaltyLogitsProcessor`` applied to the
generated tokens (tested).

``min_new_tokens`` (:func:`hold_eos`) keeps a request's end-of-sequence tokens from being chosen until it has
generated that many tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlmguard.spec import GenerationSpec


# each penalty's neutral value (no effect)
NEUTRAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def set_penalties(spec: GenerationSpec) -> dict[str, float]:
    """The penalties ``spec`` sets (those not at their neutral value)."""
    return {k: getattr(spec, k) for k, neutral in NEUTRAL.items() if getattr(spec, k) != neutral}


def penalised(spec: GenerationSpec) -> bool:
    return bool(set_penalties(spec))


def apply_penalties(scores: torch.Tensor, generated: Sequence[Sequence[int]],
                    specs: Sequence[GenerationSpec]) -> torch.Tensor:
    """scores (B, V) -> penalised scores (a new tensor; rows whose spec has no penalty are unchanged)."""
    out = scores
    for j, (ids, spec) in enumerate(zip(generated, specs)):
        if not ids or not penalised(spec):
            continue
        if out is scores:
            out = scores.clone()
        counts = torch.bincount(torch.tensor(ids, device=scores.device), minlength=scores.shape[-1])[: scores.shape[-1]]
        seen = counts > 0
        row = out[j]
        if spec.repetition_penalty != 1.0:
            p = spec.repetition_penalty
            row = torch.where(seen, torch.where(row > 0, row / p, row * p), row)
        row = row - spec.presence_penalty * seen.to(row.dtype) - spec.frequency_penalty * counts.to(row.dtype)
        out[j] = row
    return out


def hold_eos(scores: torch.Tensor, generated: Sequence[Sequence[int]], specs: Sequence[GenerationSpec],
             eos: set[int], fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Final scores (B, V) with the end-of-sequence tokens at -inf in the rows whose request has generated fewer
    than its ``min_new_tokens`` (transformers' ``MinNewTokensLengthLogitsProcessor``), renormalised (log-space
    scores stay log-probabilities of what can be chosen). Applied to what the decoder combined, not to each
    branch's logits: a contrast of two -inf scores would be NaN. A held row that keeps no finite score (a
    contrastive decoder's plausible set held only end-of-sequence tokens) takes ``fallback``'s row instead (the
    main branch's log-probabilities: plain decoding), its end-of-sequence tokens held too."""
    rows = [j for j, (ids, spec) in enumerate(zip(generated, specs)) if len(ids) < spec.min_new_tokens]
    if not rows or not eos:
        return scores
    out = scores.clone()
    ids = torch.tensor(sorted(t for t in eos if t < scores.shape[-1]), device=scores.device, dtype=torch.long)
    at = torch.tensor(rows, device=scores.device)
    held = out[at]
    held[:, ids] = float("-inf")
    if fallback is not None:
        plain = fallback[at].float()
        plain[:, ids] = float("-inf")
        # (a row with NaN scores stays as it is: the decode loop ends that request with an error)
        dead = ~torch.isfinite(held).any(dim=-1, keepdim=True) & ~torch.isnan(held).any(dim=-1, keepdim=True)
        held = torch.where(dead, plain.to(held.dtype), held)
    out[at] = torch.log_softmax(held.float(), dim=-1).to(out.dtype)
    return out
