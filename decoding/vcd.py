"""VCD — Visual Contrastive Decoding (Leng et al., CVPR 2024; ``shared/methods/vcd.md``).

One extra branch, ``distorted``: the same prompt on a copy of the image corrupted by forward-diffusion
noise (step ``noise_step`` of a 1000-step sigmoid schedule, seeded per image). Per step::

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
from vlmguard.decoding.views import (diffusion_noise, image_seed, noise_coefficients, noised_image,
                                     processor_geometry)
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
        self.geometry = processor_geometry(ctx.adapter.processor)
        ctx.add_report({"noise_signal": round(a, 4), "noise_sigma": round(b, 4),
                        "noise_space": "pixel" if self.geometry[2] else "tensor"}, applied=list(self.applied))

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        if not any(self.applied):  # no request has an image: plain decoding, no extra rows to run
            return []
        mean, std, edge = self.geometry
        p = self.params
        seeds = [image_seed(img, p.noise_seed, j) for j, img in enumerate(prompt.images)]
        if edge is None:
            # anyres (LLaVA-NeXT) and native-resolution (Qwen2-VL) processors resize, tile or downscale in ways
            # that smooth pixel-space noise away (1/3 of its strength in LLaVA-NeXT's base view): the noise goes
            # onto the processor's output instead, every crop and patch elementwise, as the spec has it
            def noise(pixels: torch.Tensor, j: int) -> torch.Tensor:
                g = torch.Generator(device="cpu")
                g.manual_seed(seeds[j])
                return diffusion_noise(pixels.cpu(), p.noise_step, g).to(pixels.device, pixels.dtype)

            return [Branch(name="distorted", prompt=prompt, pixel_transform=noise)]
        # fixed-size processors: pixel space, after resizing to the processor's size (equal to the tensor-space
        # noise up to 8-bit rounding and clamping)
        images = [noised_image(img, p.noise_step, seed, mean, std, edge) for img, seed in zip(prompt.images, seeds)]
        distorted = Prompt(text=prompt.text, images=images, system=prompt.system, raw=prompt.raw)
        return [Branch(name="distorted", prompt=distorted)]

    def combine(self, step: StepInputs) -> Combined:
        main = log_probs(step.logits["main"])
        if "distorted" not in step.logits:  # a group of text-only requests
            return Combined(scores=main, main_logprobs=main)
        neg = log_probs(step.logits["distorted"])
        scores = contrast(main, neg, self.params.alpha, self.params.beta)
        applied = active_rows(self.applied, self.ctx.active, main.device, dtype=torch.bool)
        return Combined(scores=select_rows(applied, scores, main), main_logprobs=main, contrast_logprobs=neg)
