"""FastV (Chen et al., ECCV 2024): after decoder layer K-1, keep the visual tokens that got the most attention.

Layers < K run on the full sequence; the output of layer K-1 is cut, so layers >= K (and their KV cache)
see only the kept visual tokens, at their original RoPE positions. Pruning happens once, at prefill.

Scores (``query``):
- ``"last"`` (official code): the last prompt token's attention row at layer K-1, mean over heads,
  restricted to the visual keys. One query row from the engine's cheap score facility.
- ``"all"`` (paper text): the mean attention each visual token receives from every (causal, non-pad)
  query, mean over heads. Computed in query chunks from layer K-1's own post-RoPE q and k, never as an
  L x L matrix.

Budget: an int keeps that many visual tokens per row (the keep count k); a ratio r keeps round(r * V),
i.e. FastV's R = 1 - r. Without a budget, the spec's default R = 50%: the ratio 0.5.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlmguard.attention import ScoreRequest
from vlmguard.errors import InvalidInput
from vlmguard.pruning.base import PruneContext, Pruner
from vlmguard.pruning.registry import PRUNERS
from vlmguard.pruning.scores import (column_mean_attention, keep_mask_from_positions, last_query_rows, layer_queries,
                                     record_stage, report_position_scores, top_sorted)
from vlmguard.sequence import Seq
from vlmguard.spec import MethodParams


class FastVParams(MethodParams):
    K: int = Field(2, ge=1, description="first layer that sees the pruned sequence (scores from layer K-1)")
    query: Literal["last", "all"] = "last"


@PRUNERS.register("fastv")
class FastVPruner(Pruner):
    name = "fastv"
    Params = FastVParams
    side = "llm"
    position_mode = "original"
    default_budget = 0.5  # R = 50% pruned (adaptinfer.md section 5)

    @property
    def score_layer(self) -> int:
        return self.params.K - 1

    def check_budget(self, ctx: PruneContext) -> None:
        super().check_budget(ctx)
        n_layers = ctx.adapter.num_layers
        if self.score_layer >= n_layers - 1:
            raise InvalidInput(f"fastv: K={self.params.K} must be below the model's {n_layers} decoder layers")

    def before_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq) -> ScoreRequest | None:
        if layer_idx != self.score_layer or not bool(seq.visual_mask().any()):
            return None
        rows = last_query_rows(seq)
        if self.params.query == "all":
            ctx.state["fastv_input"] = seq
            return ScoreRequest(query_index=rows, key_mask=seq.valid, query_pos=rows, per_head=False,
                                want_keys=True)
        return ScoreRequest(query_index=rows, key_mask=seq.valid, query_pos=rows, per_head=False)

    def visual_scores(self, ctx: PruneContext, seq: Seq, req: ScoreRequest) -> torch.Tensor:
        """(B, L) score of every current position (only visual ones are used)."""
        if self.params.query == "all":
            seq_in: Seq = ctx.state.pop("fastv_input")
            q = layer_queries(ctx.adapter, self.score_layer, seq_in)
            attn = ctx.adapter.attention_module(self.score_layer)
            return column_mean_attention(q, req.keys, seq_in.valid, float(attn.scaling))
        return req.probs[:, 0]

    def after_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq, req: ScoreRequest | None):
        if layer_idx != self.score_layer or req is None:
            return None
        scores = self.visual_scores(ctx, seq, req)
        vis = seq.visual_mask()
        kept: list[torch.Tensor | None] = []
        positions: list[torch.Tensor] = []
        for r in range(seq.batch_size):
            pos = vis[r].nonzero().squeeze(1)
            positions.append(pos)
            n = pos.numel()
            k = self.keep_count(n) if n else 0
            if n == 0 or k >= n:
                kept.append(None)
                continue
            kept.append(pos[top_sorted(scores[r, pos], k)])
        if all(k is None for k in kept):
            return None  # nothing to cut: identical to the unpruned path
        ctx.report["fastv"] = {"score_layer": self.score_layer, "query": self.params.query}
        # the dashboard's heatmap, for the rows cut here (a row left whole has none, in a batch as alone)
        report_position_scores(ctx, seq, {r: (positions[r], scores[r, positions[r]])
                                          for r in ctx.main_rows if kept[r] is not None})
        record_stage(ctx, "fastv_kept", layer_idx, seq, kept)
        return keep_mask_from_positions(seq, kept)
