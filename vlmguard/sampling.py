"""Token selection, kept separate from the engine (as vLLM separates its sampler).

Greedy: argmax of the decoder's final scores (ties -> lowest id, like torch.argmax). Sampling: the
decoder's scores go through transformers' public logits warpers (temperature, top-k, top-p) and are
sampled with one seeded ``torch.Generator`` per request, so a request draws the same tokens whether it
runs alone or in a batch.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlmguard.spec import GenerationSpec


class Sampler:
    def __init__(self, spec: GenerationSpec, batch_size: int, device: torch.device):
        self.greedy = not spec.sampling
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            if spec.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(spec.temperature))
            if spec.top_k > 0:
                self.warpers.append(TopKLogitsWarper(spec.top_k))
            if spec.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(spec.top_p))
        self.generators: list[torch.Generator] = []
        if not self.greedy:
            base = spec.seed if spec.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            for _ in range(batch_size):
                g = torch.Generator(device="cpu")
                g.manual_seed(base)
                self.generators.append(g)

    def select(self, scores: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """scores (B, V) -> token ids (B,). ``rows`` maps each score row to its request's generator."""
        if self.greedy:
            return scores.argmax(dim=-1)
        warped = self.warpers(None, scores.float())
        # a temperature so small that scores / T leaves no finite entry in a row (-inf, or NaN for a score of 0
        # once T rounds to 0 in float32), or overflows a positive score (a contrastive decoder's) to +inf, would
        # make softmax NaN and multinomial raise: T -> 0 is greedy, so such a row samples its argmax (rows whose
        # scores are NaN, a model that overflowed, are left as they were)
        dead = ((~torch.isfinite(warped).any(dim=-1, keepdim=True) | torch.isposinf(warped).any(dim=-1, keepdim=True))
                & ~torch.isnan(scores).any(dim=-1, keepdim=True))
        point = torch.full_like(warped, float("-inf")).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 0.0)
        warped = torch.where(dead, point, warped)
        probs = torch.softmax(warped, dim=-1).cpu()
        rows = rows if rows is not None else list(range(scores.shape[0]))
        out = [torch.multinomial(probs[i], 1, generator=self.generators[r]) for i, r in enumerate(rows)]
        return torch.cat(out).to(scores.device)
