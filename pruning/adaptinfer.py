"""AdaptInfer (arXiv 2508.06084): LLM-side pruning guided by a dynamic text prior, at inflection layers.

At each stage layer l (prefill only) the layer's own attention rows for the text queries T (the non-visual
tokens after the first visual token: question + answer prefix) are taken from the engine's cheap score
facility, per head, normalised over all keys. Per head h:

    M = A[T, T]                               (text-to-text block, lower triangular)
    w_j = sum_i M_ij + sum_k M_jk - M_jj      (= row sums of S = M + M^T - diag M: the text prior)
    w~ = (1 - lam) * mean(S) * |T| + lam * w  (optional mixing; mean over this sample's heads/entries)
    s_v = sum_h sum_j w~^h_j * A^h[j, v]      (vision score, all heads of the single layer)

The top-k_s visual tokens survive (ascending original order, ties to the lower index); the output of
layer l is cut, so layers > l and their KV cache see only the survivors, at their original RoPE positions
(``position_mode="preserve"``, the default, shared with FastV and the official Qwen port). Later stages
rescore the survivors with their own attention. ``position_mode="renumber"`` reproduces the official LLaVA
code (SparseVLM lineage): after each cut the survivors are renumbered contiguously, and at decode each layer
takes the position equal to its own cache length (1-D RoPE families only; Qwen2-VL's M-RoPE is refused).

Schedules (layers, keep counts): see :mod:`vlmguard.pruning.adaptinfer_schedule` — the official
LLaVA-1.5-7B table, a schedule file written by ``vlmguard prune analyze``, layers found by that analysis
for bundled models, or the relative-depth rule; keep counts solved for the budget label under the
official accounting. With ``lam=0``, ``text_query="last"`` and a single stage at layer K-1 with keep k it
selects exactly what FastV(K, k, query="last") selects.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PrivateAttr, model_validator

from vlmguard.attention import ScoreRequest
from vlmguard.errors import InvalidInput
from vlmguard.pruning.adaptinfer_schedule import Schedule, make_schedule, schedule_data, validate
from vlmguard.pruning.base import RENUMBER_FAMILIES, PruneContext, Pruner
from vlmguard.pruning.registry import PRUNERS
from vlmguard.pruning.scores import (keep_mask_from_positions, pad_rows, record_stage, report_position_scores,
                                     text_after_vision, top_sorted)
from vlmguard.sequence import Seq
from vlmguard.spec import MethodParams


class AdaptInferParams(MethodParams):
    layers: list[int] | None = Field(None, description="stage layers (0-based); default: see schedules")
    keeps: list[int] | None = Field(None, description="visual tokens left after each stage (needs layers)")
    schedule: str | dict | None = Field(None, description="schedule JSON written by `vlmguard prune analyze`: its "
                                                          "path (local use), or the object itself (the HTTP API)")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="text-prior mixing; 0 = uniform prior (ablation)")
    text_query: Literal["all", "last"] = "all"
    position_mode: Literal["preserve", "renumber"] = Field(
        "preserve", description="preserve: survivors keep their original RoPE positions; renumber: contiguous "
                                "positions after each cut, each layer decodes at its own cache length (the official "
                                "LLaVA code; llava and llava_next only)")

    # the schedule read and checked once, when the parameters are validated (a missing, unreadable or malformed
    # one fails here, before any model work); every row's schedule is made from this copy: (data, source label)
    _schedule: tuple[dict, str] | None = PrivateAttr(None)


    @model_validator(mode="after")
    def _load_schedule(self) -> "AdaptInferParams":
        # explicit layers / keeps: what can be checked without the model, here (their range at the model's depth
        # when the schedule is made)
        if self.keeps is not None and self.layers is None:
            raise InvalidInput("adaptinfer: 'keeps' needs explicit 'layers'")
        if self.layers is not None:
            validate(self.layers, self.keeps, None)
        self._schedule = None if self.schedule is None else schedule_data(self.schedule)
        return self


def text_prior_scores(probs: torch.Tensor, text_pos: torch.Tensor, vis_pos: torch.Tensor,
                      lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaptInfer's scores for one sample.

    probs (H, T, L): post-softmax attention rows of the text queries over all current keys (fp32).
    Returns (s (n_v,), w (H, T)): the vision scores and the per-head text prior.
    """
    a = probs.float()
    m = a[:, :, text_pos]  # (H, T, T): rows = text queries, columns = text keys
    diag = m.diagonal(dim1=1, dim2=2)
    w = m.sum(dim=1) + m.sum(dim=2) - diag  # received + paid - self
    if lam < 1.0:
        s_full = m + m.transpose(1, 2) - torch.diag_embed(diag)
        w = (1.0 - lam) * s_full.mean() * m.shape[-1] + lam * w
    s = torch.einsum("ht,htv->v", w, a[:, :, vis_pos])
    return s, w


@PRUNERS.register("adaptinfer")
class AdaptInferPruner(Pruner):
    name = "adaptinfer"
    Params = AdaptInferParams
    side = "llm"
    position_mode = "original"

    def __init__(self, params: AdaptInferParams, budget):
        super().__init__(params, budget)
        self.position_mode = "renumber" if params.position_mode == "renumber" else "original"

    def schedule_for(self, ctx: PruneContext, n_visual: int) -> Schedule:
        ad = ctx.adapter
        budget = self.keep_count(n_visual)
        return make_schedule(family=ad.family, n_layers=ad.num_layers, hidden=int(ad.text_config.hidden_size),
                             n_visual=n_visual, budget=budget, layers=self.params.layers, keeps=self.params.keeps,
                             schedule=self.params._schedule)

    def check_budget(self, ctx: PruneContext) -> None:
        if self.position_mode == "renumber" and ctx.adapter.family not in RENUMBER_FAMILIES:
            raise InvalidInput(f"adaptinfer position_mode='renumber' needs 1-D RoPE positions (llava, llava_next); "
                               f"{ctx.adapter.family} keeps its original (M-RoPE) positions: use 'preserve'")
        super().check_budget(ctx)
        scheds: list[Schedule | None] = [self.schedule_for(ctx, n) if n else None for n in ctx.n_visual]
        ctx.state["adaptinfer_schedules"] = scheds
        ctx.report["adaptinfer_schedule"] = [s.to_dict() if s else None for s in scheds]
        ctx.row_keyed["adaptinfer_schedule"] = "rows"

    def _stage(self, ctx: PruneContext, row: int, layer_idx: int) -> int | None:
        sched: Schedule | None = ctx.state["adaptinfer_schedules"][row]
        if sched is None or layer_idx not in sched.layers:
            return None
        return sched.keeps[sched.layers.index(layer_idx)]

    def _any_stage(self, ctx: PruneContext, layer_idx: int) -> bool:
        return any(self._stage(ctx, r, layer_idx) is not None for r in range(len(ctx.n_visual)))

    def before_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq) -> ScoreRequest | None:
        if not self._any_stage(ctx, layer_idx):
            return None
        rows: list[torch.Tensor] = []
        last = torch.tensor([seq.length - 1], device=seq.hidden.device)
        for r in range(seq.batch_size):
            t = text_after_vision(seq, r) if self.params.text_query == "all" else last
            rows.append(t if t.numel() else last)  # nothing after the image: the last token queries
        ctx.state["adaptinfer_text"] = rows
        qi = pad_rows(rows, seq.length - 1).to(seq.hidden.device)
        return ScoreRequest(query_index=qi, key_mask=seq.valid, query_pos=qi, per_head=True)

    def after_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq, req: ScoreRequest | None):
        if req is None:
            return None
        text_rows: list[torch.Tensor] = ctx.state.pop("adaptinfer_text")
        vis = seq.visual_mask()
        kept: list[torch.Tensor | None] = []
        scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for r in range(seq.batch_size):
            k = self._stage(ctx, r, layer_idx)
            pos = vis[r].nonzero().squeeze(1)
            if k is None or pos.numel() == 0 or k >= pos.numel():
                kept.append(None)  # no stage for this row here, or the stage is a no-op
                continue
            t = text_rows[r]
            s, _ = text_prior_scores(req.probs[r, :, : t.numel()], t, pos, self.params.lam)
            kept.append(pos[top_sorted(s, k)])
            scores[r] = (pos, s)
        if all(k is None for k in kept):
            return None
        if not ctx.state.get("adaptinfer_scores_reported"):  # the first stage's scores: the dashboard's heatmap
            report_position_scores(ctx, seq, scores)
            ctx.state["adaptinfer_scores_reported"] = True
        record_stage(ctx, "adaptinfer_kept", layer_idx, seq, kept)
        return keep_mask_from_positions(seq, kept)
