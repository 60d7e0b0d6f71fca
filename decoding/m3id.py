"""M3ID — Multi-Modal Mutual-Information Decoding (Favero et al., CVPR 2024; ``shared/methods/m3id.md``).

One extra branch, ``uncond``: the same templated prompt with the image removed (``uncond_mode="drop"``,
default) or with its projected visual tokens zeroed (``"mask"``). At generated token n, with t = t0 + n::

    w_t = min(exp(lambda * t) - 1, max_weight)
    g_t = 1 if max_k p_c(k) < alpha else 0            (confidence gate; gate=False: always on)
    s_t = l_c + g_t * w_t * (l_c - l_u)               (optionally restricted to the APC set, beta > 0)

``gate=False, beta=0.1`` is the re-implementation mode of RITUAL/AvisC (m3id.md section 4).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from vlmguard.decoding.base import Branch, Combined, DecodeContext, Decoder, StepInputs, plausibility_mask
from vlmguard.decoding.contrast import active_rows, finalize, log_probs, select_rows
from vlmguard.decoding.registry import DECODERS
from vlmguard.decoding.views import image_free_prompt
from vlmguard.models.base import Prompt
from vlmguard.spec import MethodParams


class M3IDParams(MethodParams):
    model_config = ConfigDict(populate_by_name=True)

    lam: float = Field(0.02, ge=0.0, le=1.0, alias="lambda", description="forgetting rate lambda")
    alpha: float = Field(0.3, ge=0.0, le=1.0, description="confidence gate: correct when top-1 prob < alpha")
    gate: bool = Field(True, description="use the confidence gate (False: correct at every step)")
    t0: int = Field(0, ge=0, le=4096, description="step offset of the schedule")
    beta: float = Field(0.0, ge=0.0, le=1.0, description="optional plausibility cutoff (0 = none, paper)")
    max_weight: float = Field(1e4, gt=0.0, le=1e4, description="cap on the amplification weight w_t")
    uncond_mode: Literal["drop", "mask"] = Field("drop", description="remove the image, or zero its tokens")


def amplification(lam: float, t: int, cap: float) -> float:
    """w_t = expm1(lambda * t), capped (the cap also guards float overflow for long outputs)."""
    x = lam * t
    return cap if x > math.log1p(cap) else min(math.expm1(x), cap)


def m3id_scores(cond: torch.Tensor, uncond: torch.Tensor, weight: float, alpha: float, gate: bool,
                beta: float = 0.0) -> torch.Tensor:
    """s = l_c + g * w * (l_c - l_u) from log-probs (B, V); the gate always uses normalised l_c."""
    if gate:
        on = cond.max(dim=-1, keepdim=True).values < math.log(alpha) if alpha > 0 else torch.zeros_like(
            cond[:, :1], dtype=torch.bool)
    else:
        on = torch.ones_like(cond[:, :1], dtype=torch.bool)
    s = cond + on.float() * weight * (cond - uncond)
    if beta > 0:
        s = s.masked_fill(~plausibility_mask(cond, beta), float("-inf"))
    return finalize(s, cond)


@DECODERS.register("m3id")
class M3ID(Decoder):
    name = "m3id"
    joinable = True  # per-request state read through ctx.active in combine
    Params = M3IDParams

    def setup(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.applied = [bool(p.images) for p in ctx.prompts]
        self.gate_fired: list[int] = [0] * len(ctx.prompts)
        ctx.add_report({"uncond_mode": self.params.uncond_mode}, applied=list(self.applied),
                       gate_fired_steps=self.gate_fired)

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        if not any(self.applied):  # no request has an image: plain decoding, no extra rows to run (m3id.md)
            return []
        # either view is the same for every request about the image (zeros, or no image): kept in the prefix cache
        if self.params.uncond_mode == "mask" or not prompt.images:
            return [Branch(name="uncond", prompt=prompt, visual_transform=torch.zeros_like, cache=True)]
        return [Branch(name="uncond", prompt=image_free_prompt(ctx.adapter, prompt), cache=True)]

    def combine(self, step: StepInputs) -> Combined:
        p = self.params
        cond = log_probs(step.logits["main"])
        if "uncond" not in step.logits:  # a group of text-only requests
            return Combined(scores=cond, main_logprobs=cond)
        uncond = log_probs(step.logits["uncond"])
        w = amplification(p.lam, p.t0 + step.step, p.max_weight)
        scores = m3id_scores(cond, uncond, w, p.alpha, p.gate, p.beta)
        applied = active_rows(self.applied, self.ctx.active, cond.device, dtype=torch.bool)
        if w > 0:
            fired = (cond.max(dim=-1).values < math.log(p.alpha)) if (p.gate and p.alpha > 0) else (
                torch.full((cond.shape[0],), p.gate is False, device=cond.device))
            for req, f in zip(self.ctx.active, fired.tolist()):
                self.gate_fired[req] += int(f and self.applied[req])
        return Combined(scores=select_rows(applied, scores, cond), main_logprobs=cond, contrast_logprobs=uncond)
