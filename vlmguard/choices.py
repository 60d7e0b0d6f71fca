"""Guided choice (vLLM's ``guided_choice``): a request whose answer must be one of ``GenerationSpec.choices``.

Each choice is tokenized on its own (no special tokens), as the model would write it after the prompt, and the
choices' token sequences form a prefix tree. At every step the request's final scores (what the decoder combined,
after the penalties and ``min_new_tokens``) keep only the tokens that continue a choice the answer so far begins,
and the end-of-sequence tokens once the answer is a whole choice; the rest go to -inf and the row is renormalised,
so token selection, sampling and log-probabilities all read the restricted distribution. A greedy answer is the
choice whose tokens are, one after the other, the most likely among those allowed (not the most likely choice as a
whole: vLLM's guided decoding does the same). It composes with every decoder and pruner: a contrastive decoder's
plausible set may hold none of the allowed tokens, and that row then takes the main branch's scores, restricted
(as ``hold_eos`` does).

Only the tokenizer's own spelling of each choice is allowed (a model that would write "Yes" as "Y" + "es" is held to
the one token). An answer cut by ``max_new_tokens`` before a choice is complete ends as any other does ("length").
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import torch

from vlmguard.errors import InvalidInput
from vlmguard.penalties import keep_only
from vlmguard.spec import GenerationSpec


@lru_cache(maxsize=256)
def choice_paths(tokenizer: Any, choices: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Each choice's token ids under ``tokenizer`` (no special tokens); InvalidInput for one that has none."""
    out = []
    for text in choices:
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise InvalidInput(f"choice {text!r} has no tokens under this model's tokenizer", param="choices")
        out.append(ids)
    return tuple(out)


def allowed_tokens(paths: Sequence[tuple[int, ...]], generated: Sequence[int]) -> tuple[set[int], bool]:
    """The tokens that continue a choice beginning with ``generated``, and whether ``generated`` is a whole choice."""
    n, gen = len(generated), tuple(generated)
    nxt = {p[n] for p in paths if len(p) > n and p[:n] == gen}
    return nxt, gen in paths


def restrict_to_choices(scores: torch.Tensor, generated: Sequence[Sequence[int]], specs: Sequence[GenerationSpec],
                        tokenizer: Any, eos: set[int], fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Final scores (B, V) with each row whose request has ``choices`` restricted to the tokens that continue one
    (end-of-sequence where its answer is a whole choice), renormalised; a row that keeps no finite score takes
    ``fallback``'s row (the main branch's log-probabilities), restricted alike. Rows without choices are unchanged."""
    rows = [j for j, spec in enumerate(specs) if spec.choices]
    if not rows:
        return scores
    width = scores.shape[-1]
    allowed = torch.zeros(len(rows), width, dtype=torch.bool, device=scores.device)
    for i, j in enumerate(rows):
        nxt, whole = allowed_tokens(choice_paths(tokenizer, tuple(specs[j].choices)), generated[j])
        allowed[i, sorted(t for t in (nxt | (eos if whole else set())) if t < width)] = True
    return keep_only(scores, rows, allowed, fallback)
