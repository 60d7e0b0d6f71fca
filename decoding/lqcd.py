"""LQCD — Leading Query Contrastive Decoding (Zhao et al., arXiv 2408.11261; ``shared/methods/lqcd.md``).

Expert = the neutral query x_n, amateur(s) = leading query/queries, same image and generated prefix::

    s = (1 + alpha_eff) * l_E - alpha_eff * mean_j l_A,j     on the expert's plausible set (beta)
    alpha_eff = alpha * (1 + sentiment_gamma * sigma)        (sigma = strength of the stripped cue; with an
                                                             oracle neutral_text, of the cue the rules find)

Per request, one of these plans (``report["modes"]``):
- ``leading``: the user's text carries a cue. x_n comes from ``neutral_text`` (oracle, e.g. the
  POPE-leading file's field) or from the rule-based neutralizer; the main row (the user's text as sent)
  is the amateur and branch ``lq0`` (x_n) the expert.
- ``symmetric`` (neutral polar question): the main row is the expert, ``lq0``/``lq1`` add a yes-cue and a
  no-cue (two amateurs, m = 2), so the answer polarity cancels and only asymmetric cue-susceptibility
  is corrected.
- ``expectation`` (neutral open-ended request): one amateur with the "typical scene" cue.
- ``off``: APC-truncated plain decoding (``applied`` false).
Every request of a batch gets the same branch names; unused slots carry a copy of the main prompt with
coefficient 0 (lqcd.md section 6, mixed batches).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from vlmguard.decoding.base import Branch, Combined, DecodeContext, Decoder, StepInputs, values_on
from vlmguard.decoding.contrast import contrast, log_probs
from vlmguard.decoding.neutralizer import EXPECTATION_CUE, leading_variants, neutralize
from vlmguard.decoding.registry import DECODERS
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.spec import MethodParams, text_not_blank


class LQCDParams(MethodParams):
    alpha: float = Field(1.0, ge=0.0, le=10.0, description="contrast strength")
    beta: float = Field(0.1, ge=0.0, le=1.0, description="plausibility cutoff on the neutral (expert) branch")
    one_sided: bool = Field(False, description="only suppress tokens the leading query raises")
    sentiment_gamma: float = Field(0.0, ge=0.0, le=10.0, description="scale alpha by cue strength (0 = off)")
    neutral_text: str | list[str | None] | None = Field(
        None, description="oracle neutral query (one for all requests, or one per request)")
    neutralizer: Literal["rules", "none"] = Field("rules", description="strip cues from leading queries")
    neutral_mode: Literal["auto", "symmetric", "expectation", "off"] = Field(
        "auto", description="amateurs for neutral queries: auto = symmetric (polar) / expectation (open)")
    expectation_cue: str = Field(EXPECTATION_CUE, min_length=1,
                                 description="appended to an open-ended query for its amateur (lqcd.md 4.3)")

    _text_not_blank = field_validator("neutral_text", "expectation_cue")(text_not_blank)


@DECODERS.register("lqcd")
class LQCD(Decoder):
    name = "lqcd"
    # its branch count is the most leading-query variants of any request it was set up with; a joined group
    # keeps its own (the decode batch holds one block of rows per group)
    joinable = True
    Params = LQCDParams

    def _oracle(self, n: int) -> list[str | None]:
        nt = self.params.neutral_text
        if nt is None:
            return [None] * n
        if isinstance(nt, str) or len(nt) == 1:  # one text for all (a request run n times, or batched with copies)
            return [nt if isinstance(nt, str) else nt[0]] * n
        if len(nt) != n:
            raise InvalidInput(f"lqcd: neutral_text has {len(nt)} entries for {n} requests")
        return list(nt)

    def setup(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        p = self.params
        n = len(ctx.prompts)
        oracle = self._oracle(n)
        placeholder = ctx.adapter.image_placeholder
        plans: list[dict] = []
        for i, pr in enumerate(ctx.prompts):
            if oracle[i] is not None and placeholder:
                self._check_oracle(i, pr, oracle[i], placeholder)
            plan = {"mode": "off", "expert": 0, "amateurs": [], "slots": [], "strength": 0.0}
            if oracle[i] is not None:
                # sigma: the strength of the cue the rules find in the user's text (0 when they find none)
                plan.update(mode="leading", expert=1, amateurs=[0], slots=[oracle[i]], neutral=oracle[i],
                            source="oracle", strength=0.0 if pr.raw else neutralize(pr.text).strength)
            elif pr.raw:
                plan["note"] = "raw prompt: no neutralizer or cue synthesis"
            else:
                neu = neutralize(pr.text) if p.neutralizer == "rules" else None
                if neu is not None and neu.changed and neu.text.strip():
                    plan.update(mode="leading", expert=1, amateurs=[0], slots=[neu.text], neutral=neu.text,
                                strength=neu.strength, source="rules", removed=neu.removed)
                else:
                    mode, texts = leading_variants(pr.text, p.neutral_mode, p.expectation_cue)
                    plan.update(mode=mode, amateurs=list(range(1, len(texts) + 1)), slots=texts)
                    if neu is not None and neu.changed:
                        plan["note"] = "nothing left after stripping cues: treated as neutral"
            plans.append(plan)
        self.n_slots = max((len(pl["slots"]) for pl in plans), default=0)
        nb = 1 + self.n_slots
        expert = torch.zeros(n, nb)
        amateur = torch.zeros(n, nb)
        alpha = torch.zeros(n)
        for i, pl in enumerate(plans):
            expert[i, pl["expert"]] = 1.0
            if pl["amateurs"]:
                for a in pl["amateurs"]:
                    amateur[i, a] = 1.0 / len(pl["amateurs"])
                alpha[i] = p.alpha * (1.0 + p.sentiment_gamma * pl["strength"])
            else:
                amateur[i, pl["expert"]] = 1.0  # no amateur: contrast of the expert with itself
        self.plans, self.expert_w, self.amateur_w, self.alpha = plans, expert, amateur, alpha
        self.main_is_expert = torch.tensor([pl["expert"] == 0 for pl in plans])
        ctx.add_report(
            applied=[pl["mode"] != "off" for pl in plans],
            modes=[pl["mode"] for pl in plans],
            neutral_text=[pl.get("neutral") for pl in plans],
            amateur_texts=[[pl["slots"][a - 1] if a > 0 else pr.text for a in pl["amateurs"]]
                           for pl, pr in zip(plans, ctx.prompts)],
            notes=[pl.get("note") for pl in plans],
            cue_strength=[pl["strength"] for pl in plans],
            image=[bool(pr.images) for pr in ctx.prompts],  # a text-only request runs too, flagged (lqcd.md 10)
        )

    @staticmethod
    def _check_oracle(i: int, prompt: Prompt, text: str, placeholder: str) -> None:
        """The neutral text replaces the prompt's text beside its images: a raw prompt's must be a whole raw prompt
        with one placeholder per image, a templated prompt's none (the processor would miscount the images)."""
        found, want = text.count(placeholder), len(prompt.images) if prompt.raw else 0
        if found == want:
            return
        if prompt.raw:
            raise InvalidInput(f"lqcd: request {i} is a raw prompt with {want} image(s), so its neutral_text must be "
                               f"a whole raw prompt with {want} {placeholder!r} placeholder(s); it has {found}")
        raise InvalidInput(f"lqcd: the neutral_text of request {i} contains the model's image placeholder "
                           f"{placeholder!r}: give the question only (the chat template places the images)")

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        slots = self.plans[index]["slots"]
        out = []
        for k in range(self.n_slots):
            text = slots[k] if k < len(slots) else prompt.text
            out.append(Branch(name=f"lq{k}", prompt=Prompt(text=text, images=prompt.images, system=prompt.system,
                                                           raw=prompt.raw)))
        return out

    def combine(self, step: StepInputs) -> Combined:
        names = ["main", *[f"lq{k}" for k in range(self.n_slots)]]
        lp = torch.stack([log_probs(step.logits[nm]) for nm in names], dim=1)  # (B, nb, V)
        # the per-request weights live on the logits' device (moved once); the rows index them there, from a
        # cached index tensor: no list or weight copy to the GPU (a host sync) at every step
        if self.expert_w.device != lp.device:
            self.expert_w, self.amateur_w, self.alpha, self.main_is_expert = (
                t.to(lp.device) for t in (self.expert_w, self.amateur_w, self.alpha, self.main_is_expert))
        rows = values_on(tuple(self.ctx.active), torch.long, lp.device)
        expert = torch.einsum("bn,bnv->bv", self.expert_w[rows], lp)
        amateur = torch.einsum("bn,bnv->bv", self.amateur_w[rows], lp)
        scores = contrast(expert, amateur, self.alpha[rows], self.params.beta, self.params.one_sided)
        main = lp[:, 0]
        other = torch.where(self.main_is_expert[rows][:, None], torch.log_softmax(amateur, dim=-1), expert)
        return Combined(scores=scores, main_logprobs=main, contrast_logprobs=other, fallback_logprobs=expert)
