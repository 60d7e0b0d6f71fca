"""VCD — Visual Contrastive Decoding (Leng et al., CVPR 2024; ``shared/methods/vcd.md``).

One extra branch, ``distorted``: the same prompt on a copy of the processed image (the processor's output)
corrupted by forward-diffusion noise (step ``noise_step`` of a 1000-step sigmoid schedule, seeded per image).
Per step::

    s = (1 + alpha) * l_clean - alpha * l_distorted   on the plausible set of the clean branch (beta)

The distorted rows have their own KV-cache rows (the engine batches branches as extra rows), so the
pre-fix cache-sharing bug of the official code cannot happen here. Requests without an image decode
plainly (``applied`` false in the report).
"""
from __future__ import annotations

import torch
from pydantic import Field

from vlmguard.decoding.base import Branch, Combined, DecodeContext, Decoder, StepInputs
from vlmguard.decoding.contrast import active_rows, contrast, log_probs, select_rows
from vlmguard.decoding.registry import DECODERS
from vlmguard.decoding.views import diffusion_noise, image_seed, noise_coefficients
from vlmguard.models.base import Prompt
from vlmguard.spec import MethodParams


class VCDParams(MethodParams):
    alpha: float = Field(1.0, ge=0.0, le=10.0, description="contrast strength (0 = no contrast)")
    beta: float = Field(0.1, ge=0.0, le=1.0, description="plausibility cutoff relative to the top clean token")
    noise_step: int = Field(500, ge=0, le=999, description="diffusion step of the distortion (of 1000)")
    noise_seed: int = Field(0, ge=0, description="seed mixed with each image's pixels for its noise draw")


@DECODERS.register("vcd")
class VCD(Decoder):
    name = "vcd"
    joinable = True  # per-request state read through ctx.active in combine
    Params = VCDParams

    def setup(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.applied = [bool(p.images) for p in ctx.prompts]
        a, b = noise_coefficients(self.params.noise_step)
        ctx.add_report({"noise_signal": round(a, 4), "noise_sigma": round(b, 4), "noise_space": "tensor"},
                       applied=list(self.applied))

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        if not any(self.applied):  # no request has an image: plain decoding, no extra rows to run
            return []
        p = self.params
        seeds = [image_seed(img, p.noise_seed, j) for j, img in enumerate(prompt.images)]

        # on the processor's output, every crop and patch elementwise, in float32 without clamping (vcd.md
        # section 4), before any vision work, so vision-side pruners see the noisy pixels too
        def noise(pixels: torch.Tensor, j: int) -> torch.Tensor:
            g = torch.Generator(device="cpu")
            g.manual_seed(seeds[j])
            return diffusion_noise(pixels.cpu(), p.noise_step, g).to(pixels.device, pixels.dtype)

        # the noise is seeded by the image: a chat's next turn about it has the same distorted rows, kept in the
        # prefix cache like the request's own
        return [Branch(name="distorted", prompt=prompt, pixel_transform=noise, cache=True)]

    def combine(self, step: StepInputs) -> Combined:
        main = log_probs(step.logits["main"])
        if "distorted" not in step.logits:  # a group of text-only requests
            return Combined(scores=main, main_logprobs=main)
        neg = log_probs(step.logits["distorted"])
        scores = contrast(main, neg, self.params.alpha, self.params.beta)
        applied = active_rows(self.applied, self.ctx.active, main.device, dtype=torch.bool)
        return Combined(scores=select_rows(applied, scores, main), main_logprobs=main, contrast_logprobs=neg)
