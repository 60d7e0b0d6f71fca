"""Token selection, kept separate from the engine (as vLLM separates its sampler).

Every request of a batch selects its tokens by its own spec, with its own :class:`RowSampler` (kept with the
request, so it leaves a running batch with it). Greedy: argmax of the decoder's final scores
(ties -> lowest id, like torch.argmax). Sampling: the request's scores go through transformers' public logits
warpers (its temperature, top-k, top-p, min-p, in the order of transformers' ``generate``) and are sampled with
the request's own seeded ``torch.Generator``, so a request draws the same tokens whether it runs alone or in a
batch, next to requests with other settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from vlmguard.spec import GenerationSpec


@dataclass
class RowSampler:
    """One request's token selection: greedy (``generator`` None) or its warpers and seeded generator."""

    warpers: LogitsProcessorList
    generator: torch.Generator | None

    @classmethod
    def for_spec(cls, spec: GenerationSpec) -> "RowSampler":
        if not spec.sampling:
            return cls(LogitsProcessorList(), None)
        warpers = LogitsProcessorList()
        if spec.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(spec.temperature))
        if spec.top_k > 0:
            warpers.append(TopKLogitsWarper(spec.top_k))
        if spec.top_p < 1.0:
            warpers.append(TopPLogitsWarper(spec.top_p))
        if spec.min_p > 0.0:
            warpers.append(MinPLogitsWarper(spec.min_p))
        seed = spec.seed if spec.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        return cls(warpers, torch.Generator(device="cpu").manual_seed(seed))

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def distribution(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (V,) -> the warped distribution (1, V) in float32, on the scores' device (no host sync). A row
        with a NaN score puts all its mass on its argmax (nothing can be drawn from it; the decode loop ends that
        request with an error)."""
        warped = self.warpers(None, scores[None].float())
        # a temperature so small that scores / T leaves no finite entry in a row (-inf, or NaN for a score of 0
        # once T rounds to 0 in float32), or overflows a positive score (a contrastive decoder's) to +inf, would
        # make softmax NaN and multinomial raise: T -> 0 is greedy, so such a row samples its argmax
        dead = (~torch.isfinite(warped).any(dim=-1, keepdim=True) | torch.isposinf(warped).any(dim=-1, keepdim=True)
                | torch.isnan(scores).any())
        point = torch.full_like(warped, float("-inf")).scatter_(-1, scores.argmax()[None, None], 0.0)
        return torch.softmax(torch.where(dead, point, warped), dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (V,) on the CPU -> one token id (1,), drawn with this request's generator."""
        return torch.multinomial(probs, 1, generator=self.generator)


def select_tokens(scores: torch.Tensor, samplers: Sequence[RowSampler]) -> torch.Tensor:
    """scores (B, V) -> token ids (B,): row i by ``samplers[i]`` (greedy rows take the argmax, all at once).

    The sampling rows' distributions are made on the scores' device and copied to the host together, once per
    step however many rows sample (on a GPU, a copy is a host sync): each request then draws on the CPU with
    its own seeded generator, so it draws the same tokens alone, in a batch and on any device."""
    chosen = scores.argmax(dim=-1)
    sampling = [i for i, s in enumerate(samplers) if not s.greedy]
    if not sampling:
        return chosen
    probs = torch.cat([samplers[i].distribution(scores[i]) for i in sampling]).cpu()
    drawn = torch.cat([samplers[i].draw(probs[j]) for j, i in enumerate(sampling)]).to(scores.device)
    return chosen.index_copy(0, torch.tensor(sampling, device=scores.device), drawn)
