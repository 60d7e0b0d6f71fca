"""Penalties on repeated tokens and logit biases, per request, on the model's logits: every row of the request (the
main row and a contrastive decoder's branch rows), before the decoder combines them
(``DecodeBatch._penalised_logits``), as transformers and vLLM apply them to a model's logits. (The multiplicative
penalty is not shift-invariant: on log-probabilities, all <= 0, it would multiply every seen token and hardly touch
a confident repeat.)

* ``presence_penalty`` / ``frequency_penalty`` (OpenAI's): ``score[t] -= presence * (count[t] > 0) +
  frequency * count[t]``, where ``count[t]`` is how often the request has generated ``t`` so far;
* ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``, vLLM's): a generated token's score
  is divided by it where positive and multiplied by it where negative (> 1 discourages repeats).

Only the tokens a request generated count, not its prompt (vLLM applies its repetition penalty to the prompt too;
a question's words, "Is there a dog", are not repeats of an answer). The decoder combines the penalised logits,
so token selection, log-probabilities and diagnostics all see the penalties. Under plain greedy decoding the
repetition penalty gives the tokens of transformers' ``RepetitionPenaltyLogitsProcessor`` applied to the
generated tokens (tested).

``logit_bias`` (OpenAI's, vLLM's): ``score[t] += bias[t]`` for the tokens it names, at every step, on every row of
the request as the penalties are. A contrastive decoder's combination of two rows, ``(1 + a) * l - a * l'``,
keeps the bias once, so -100 bans a token under every decoder as under plain decoding.

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
    """``spec`` changes the model's logits before the decoder combines them: a penalty or a logit bias."""
    return bool(spec.logit_bias) or bool(set_penalties(spec))


def apply_penalties(scores: torch.Tensor, generated: Sequence[Sequence[int]],
                    specs: Sequence[GenerationSpec]) -> torch.Tensor:
    """scores (B, V) -> penalised scores (a new tensor; rows whose spec changes nothing are unchanged): each row's
    penalties on the tokens it generated, then its ``logit_bias`` added."""
    out = scores
    for j, (ids, spec) in enumerate(zip(generated, specs)):
        repeats = bool(ids) and bool(set_penalties(spec))
        if not repeats and not spec.logit_bias:
            continue
        if out is scores:
            out = scores.clone()
        row = out[j]
        if repeats:
            row = _repeat_penalties(row, ids, spec)
        if spec.logit_bias:
            at = torch.tensor(list(spec.logit_bias), device=scores.device)
            row = row.index_add(0, at, torch.tensor(list(spec.logit_bias.values()), dtype=row.dtype,
                                                    device=scores.device))
        out[j] = row
    return out


def _repeat_penalties(row: torch.Tensor, ids: Sequence[int], spec: GenerationSpec) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(ids, device=row.device), minlength=row.shape[-1])[: row.shape[-1]]
    seen = counts > 0
    if spec.repetition_penalty != 1.0:
        p = spec.repetition_penalty
        row = torch.where(seen, torch.where(row > 0, row / p, row * p), row)
    return row - spec.presence_penalty * seen.to(row.dtype) - spec.frequency_penalty * counts.to(row.dtype)


def hold_eos(scores: torch.Tensor, generated: Sequence[Sequence[int]], specs: Sequence[GenerationSpec],
             eos: set[int], fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Final scores (B, V) with the end-of-sequence tokens (and the request's ``stop_token_ids``) at -inf in the rows
    whose request has generated fewer than its ``min_new_tokens`` (transformers' ``MinNewTokensLengthLogitsProcessor``;
    only the end of sequence, at every step, in those whose request ignores it: ``ignore_eos``), renormalised
    (log-space scores stay log-probabilities of what can be chosen). Applied to what the decoder combined, not to each
    branch's logits: a contrast of two -inf scores would be NaN. A held row that keeps no finite score (a
    contrastive decoder's plausible set held only end-of-sequence tokens) takes ``fallback``'s row instead (the
    main branch's log-probabilities: plain decoding), its end-of-sequence tokens held too."""
    held = {j: eos.union(spec.stop_token_ids) if len(ids) < spec.min_new_tokens else eos if spec.ignore_eos else ()
            for j, (ids, spec) in enumerate(zip(generated, specs))}
    rows = [j for j, ids in held.items() if ids]
    if not rows:
        return scores
    allowed = torch.ones(len(rows), scores.shape[-1], dtype=torch.bool, device=scores.device)
    for i, j in enumerate(rows):
        allowed[i, sorted(t for t in held[j] if t < scores.shape[-1])] = False
    return keep_only(scores, rows, allowed, fallback)


def keep_only(scores: torch.Tensor, rows: Sequence[int], allowed: torch.Tensor,
              fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Final scores (B, V) with row ``rows[i]`` keeping only the tokens ``allowed[i]`` ((R, V) bool) marks, the
    others at -inf, renormalised (log-space scores stay log-probabilities of what can be chosen). A row that keeps
    no finite score takes ``fallback``'s row instead (the main branch's log-probabilities), restricted alike; a row
    with NaN scores stays NaN (the decode loop ends that request with an error). What :func:`hold_eos`, guided
    choice (``vlmguard/choices.py``) and structured output (``vlmguard/guided.py``) restrict with."""
    at = torch.tensor(list(rows), device=scores.device)
    neg = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    kept = torch.where(allowed, scores[at], neg)
    if fallback is not None and fallback is not scores:  # (scores' own row, restricted alike, is no fallback)
        # (a NaN row's maximum is NaN: it stays NaN)
        dead = kept.amax(dim=-1, keepdim=True) == float("-inf")
        kept = torch.where(dead, torch.where(allowed, fallback[at].to(kept.dtype), neg), kept)
    out = scores.clone()
    out[at] = torch.log_softmax(kept.float(), dim=-1).to(out.dtype)
    return out
