"""IAVA — Instruction-Aligned Visual Attention (Li et al., arXiv 2503.18556; ``shared/methods/iava.md``).

No official code exists; this is AvisC's verified machinery plus the spec's reconstructed IAVA selection
rule (every reconstructed choice is a parameter):

1. ``setup``: one pre-pass (``ctx.probe_forward``) over the query prompts and the same prompts with the
   user text replaced by a generic instruction records, in every layer, the head-averaged attention of
   the last prompt position to each image token (the engine's cheap score facility: no eager attention).
   Without pruning, the engine decodes the main branch from this pass's cache of the query rows
   (``DecodeContext.main_prefill``): the query is prefilled once.
2. Layers S: the fewest layers whose share of image attention (query prompt) reaches ``gamma``.
3. Irrelevant tokens U from a_q, a_g (attention averaged over S), per sample, rule R1..R4 (R1 default:
   outsized under the generic instruction and lower under the query).
4. Branch ``irrelevant``: the same prompt whose projected visual tokens outside U are replaced by
   ``mask_value`` (``Branch.visual_transform``); decoding contrasts it VCD-style under the APC.
U = {} (e.g. when the query is itself a generic description request) means plain decoding for that
request, or AvisC's single-instruction rule R4 when ``fallback_rule="avisc"``.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, field_validator

from vlmguard.decoding.base import Branch, Combined, DecodeContext, Decoder, StepInputs
from vlmguard.decoding.contrast import active_rows, contrast, log_probs, select_rows
from vlmguard.decoding.registry import DECODERS
from vlmguard.models.base import Prompt
from vlmguard.spec import GeneratorSeed, MethodParams, text_not_blank

log = logging.getLogger(__name__)
Rule = Literal["R1", "R2", "R3", "R4"]


class IAVAParams(MethodParams):
    alpha: float = Field(1.0, ge=0.0, le=10.0, description="contrast strength")
    beta: float = Field(0.1, ge=0.0, le=1.0, description="plausibility cutoff")
    lam: float = Field(1.0, ge=0.0, le=10.0, description="std multiplier of the selection threshold")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="image-attention share of the selected layers")
    generic_instruction: str = Field("Describe the content of the image.", min_length=1)
    selection_rule: Rule = "R1"
    fallback_rule: Literal["plain", "avisc"] = Field("plain", description="when U is empty: plain or R4")
    mask_value: Literal["zeros", "ones", "noise"] = "zeros"
    fixed_layers: list[int] | None = Field(None, min_length=1, description="use these layers instead of S")
    noise_seed: GeneratorSeed = 0

    _text_not_blank = field_validator("generic_instruction")(text_not_blank)

    @field_validator("fixed_layers")
    @classmethod
    def _layers_once(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):  # a repeated layer would count twice in the average
            raise ValueError(f"names a layer twice: {v}")
        return v


def select_layers(mass: torch.Tensor, gamma: float) -> list[int]:
    """Smallest set of layers (by descending image-attention mass, (L,)) whose share reaches gamma."""
    total = float(mass.sum())
    if total <= 0:
        return list(range(mass.numel()))
    share = mass.double() / total
    order = torch.argsort(share, descending=True, stable=True)
    cum = torch.cumsum(share[order], dim=0)
    k = 1 + int((cum < gamma - 1e-12).sum())
    k = min(k, max(1, int((share > 0).sum())))
    return sorted(order[:k].tolist())


def _above(x: torch.Tensor, lam: float, strict: bool = True) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x, dtype=torch.bool)
    thr = x.mean() + lam * x.std()
    return x > thr if strict else x >= thr


def irrelevant_tokens(a_q: torch.Tensor, a_g: torch.Tensor | None, rule: str, lam: float) -> torch.Tensor:
    """Boolean mask over image tokens (V,) of the irrelevant set U under ``rule``."""
    if rule == "R4" or a_g is None:
        return _above(a_q, lam, strict=False)
    if rule == "R1":
        return _above(a_g, lam) & (a_q < a_g)
    if rule == "R2":
        return _above(a_g - a_q, lam)
    if rule == "R3":
        return _above(a_q, lam) & (a_q <= a_g)
    raise ValueError(f"unknown selection rule {rule!r}")


@DECODERS.register("iava")
class IAVA(Decoder):
    name = "iava"
    joinable = True  # per-request state read through ctx.active in combine
    Params = IAVAParams

    def setup(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        p = self.params
        ad = ctx.adapter
        n = len(ctx.prompts)
        n_layers = ad.num_layers
        if p.fixed_layers is not None and any(not 0 <= i < n_layers for i in p.fixed_layers):
            from vlmguard.errors import InvalidInput

            raise InvalidInput(f"iava: fixed_layers must be in [0, {n_layers - 1}], got {p.fixed_layers}")
        self.keep_sets: list[torch.Tensor | None] = [None] * n
        info: list[dict] = [{"applied": False, "rule": None, "irrelevant": 0, "layers": []} for _ in range(n)]
        with_img = [i for i in range(n) if ctx.prompts[i].images]
        if with_img:
            # the generic-instruction rows only for the rules that read them (R4, AvisC's, does not)
            generic_ok = [] if p.selection_rule == "R4" else [
                i for i in with_img
                if not ctx.prompts[i].raw and ctx.prompts[i].text.strip() != p.generic_instruction.strip()]
            # the query rows: every request's own prompt where the engine decodes from this pre-pass's cache
            # (iava.md step 1: the query prefill's cache is the main branch's), else those with an image
            query_rows = list(range(n)) if ctx.reuse_main_prefill else with_img
            probe_prompts = [ctx.prompts[i] for i in query_rows]
            probe_prompts += [Prompt(text=p.generic_instruction, images=ctx.prompts[i].images,
                                     system=ctx.prompts[i].system) for i in generic_ok]
            layers = range(n_layers)
            probe = ctx.probe_forward(probe_prompts, score_layers=tuple(layers), per_head=False,
                                      keep_prefill=ctx.reuse_main_prefill)
            if ctx.reuse_main_prefill:
                ctx.main_prefill = probe["prefill"]
            seq = probe["seq"]
            scores = probe["scores"]
            vis = seq.visual_mask()

            def attn(row: int) -> torch.Tensor:  # (L, V) last-position attention to image tokens
                pos = vis[row].nonzero().squeeze(1)
                return torch.stack([scores[i][row, 0, pos].float() for i in layers], dim=0)

            for i in with_img:
                a_q_all = attn(query_rows.index(i))
                chosen = p.fixed_layers or select_layers(a_q_all.sum(dim=1), p.gamma)
                a_q = a_q_all[chosen].mean(dim=0)
                a_g = None
                rule = p.selection_rule
                if i in generic_ok:
                    a_g = attn(len(query_rows) + generic_ok.index(i))[chosen].mean(dim=0)
                u = irrelevant_tokens(a_q, a_g, rule, p.lam) if (a_g is not None or rule == "R4") else None
                if (u is None or not bool(u.any())) and p.fallback_rule == "avisc":
                    rule = "R4"
                    u = irrelevant_tokens(a_q, None, rule, p.lam)
                if u is not None and bool(u.any()):
                    if bool(u.all()):  # the negative is the image itself: the contrast changes nothing (iava.md 10)
                        log.warning("iava: request %d: every image token is irrelevant (rule %s), so its contrast "
                                    "branch equals the main branch", i, rule)
                    self.keep_sets[i] = u.cpu()
                    info[i] = {"applied": True, "rule": rule, "irrelevant": int(u.sum()), "layers": list(chosen)}
                else:
                    info[i]["layers"] = list(chosen)
        self.applied = [x["applied"] for x in info]
        ctx.add_report(applied=list(self.applied), selection=info)

    def _masker(self, index: int):
        u = self.keep_sets[index]
        mode, seed = self.params.mask_value, self.params.noise_seed

        def transform(features: torch.Tensor) -> torch.Tensor:
            if u is None:
                return features
            if features.shape[0] != u.numel():
                raise RuntimeError(f"iava: {features.shape[0]} visual features but {u.numel()} selection slots")
            keep = u.to(features.device)[:, None]
            if mode == "zeros":
                fill = torch.zeros_like(features)
            elif mode == "ones":
                fill = torch.ones_like(features)
            else:
                g = torch.Generator(device="cpu")
                g.manual_seed(seed)
                fill = torch.randn(features.shape, generator=g).to(features.device, features.dtype)
            return torch.where(keep, features, fill)

        return transform

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        if not any(self.applied):  # no request of the group has an irrelevant set: plain decoding, no extra rows
            return []
        return [Branch(name="irrelevant", prompt=prompt, visual_transform=self._masker(index))]

    def combine(self, step: StepInputs) -> Combined:
        main = log_probs(step.logits["main"])
        if "irrelevant" not in step.logits:
            return Combined(scores=main, main_logprobs=main)
        neg = log_probs(step.logits["irrelevant"])
        scores = contrast(main, neg, self.params.alpha, self.params.beta)
        applied = active_rows(self.applied, self.ctx.active, main.device, dtype=torch.bool)
        return Combined(scores=select_rows(applied, scores, main), main_logprobs=main, contrast_logprobs=neg)
