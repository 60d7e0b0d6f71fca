"""FlowCut (Tong et al., NeurIPS 2025): information-flow-guided visual-token pruning.

Stage V (LLaVA-1.5; each LLaVA-NeXT crop): progressive pruning inside the CLIP vision tower, see
:mod:`vlmguard.pruning.flowcut_vision`. LLaVA-1.5 keeps K patches per image (a row's budget is split over
its images); LLaVA-NeXT keeps floor(K/2) per crop, then scatters the survivors into the packed anyres
layout (base crop first, then the unpadded high-res grid read row-major; no newline tokens when there
are several crops, as in the reference).

Stage L (LLaVA-NeXT, Qwen2-VL): at decoder layer 1, from that layer's own post-RoPE q/k and v (the
engine's cheap score facility, last prompt token as the query), per row over the visual positions:

    r = mean_h softmax_vis(q_t k^T / sqrt(d)),  u = mean_h softmax_vis(v_t v^T / sqrt(d)),
    d = || mean_h v ||_1,  S = (r + u) * d  -> keep the top K (ascending order)

and layer 1's output is cut. Rows with <= K visual tokens are left alone.

Positions, ``position_mode = "compact"`` (default, the reference: "as if physically shorter"): after stage V
the kept tokens sit where ``<image>`` was and get contiguous positions, text after them moves down (the
reference builds a physically shorter input). LLaVA-NeXT's stage-L cut renumbers too (the runner's
``renumber``): layers >= 2 see the survivors at contiguous positions, and in decoding layers 0-1 (full cache)
continue from the stage-V numbering while layers >= 2 (pruned cache) continue N_vis - K lower, as the
reference. Qwen2-VL keeps the M-RoPE positions layers 0-1 saw at stage L (the runner renumbers 1-D positions
only). ``position_mode = "original"``: every token keeps its unpruned position, at both stages.

Qwen2-VL: stage V inside its native-resolution ViT keeps ``qwen_vit_keep`` x its share of K merged tokens per
image (one image: the reference's 2K; whole merge blocks, :mod:`vlmguard.pruning.flowcut_qwen_vision`), then
stage L cuts to K; ``qwen_vit_keep = 0`` leaves the tower alone (stage L only). A row's images share K by
``capped_split`` (an image smaller than its share keeps all it has, the others take the rest).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from vlmguard.attention import ScoreRequest
from vlmguard.errors import InvalidInput
from vlmguard.pruning.base import RENUMBER_FAMILIES, PruneContext, Pruner
from vlmguard.pruning.flowcut_qwen_vision import run_stage_v_qwen
from vlmguard.pruning.flowcut_vision import run_stage_v, selected_layer
from vlmguard.pruning.registry import PRUNERS
from vlmguard.pruning.scores import (keep_mask_from_positions, last_query_rows, record_stage, report_position_scores,
                                     report_visual_scores, top_sorted)
from vlmguard.sequence import Seq
from vlmguard.spec import MethodParams

CLIP_FAMILIES = ("llava", "llava_next")


class FlowCutParams(MethodParams):
    history: float = Field(0.5, ge=0.0, le=1.0, description="running-score weight of the history")
    prune_every: int = Field(2, ge=1, description="prune when (f - l) % prune_every == 0")
    llm_layer: int = Field(1, ge=0, description="stage-L decoder layer (LLaVA-NeXT / Qwen2-VL)")
    reference_batch_coupling: bool = Field(False, description="share the prune count over the whole batch "
                                                              "(the reference's max-over-batch)")
    position_mode: Literal["compact", "original"] = Field(
        "compact", description="positions of the kept tokens: contiguous after each cut, as if the input were "
                               "physically shorter (reference; LLaVA-NeXT's stage L too, not Qwen2-VL's M-RoPE), "
                               "or their original ones")
    qwen_vit_keep: float = Field(2.0, ge=0.0, description="Qwen2-VL: merged tokens the ViT keeps per image, as a "
                                                           "multiple (>= 1) of its share of K (0: no ViT stage)")
    qwen_vit_unit: Literal["block", "patch"] = Field(
        "block", description="Qwen2-VL ViT cuts: whole merge blocks at their own positions (ours), or raw patches "
                             "merged four consecutive survivors at a time at the first grid positions (reference)")


    @field_validator("qwen_vit_keep")
    @classmethod
    def _keep_at_least_the_share(cls, v: float) -> float:
        if 0 < v < 1:  # the ViT would keep fewer than the row's K and stage L could not give them back
            raise ValueError(f"must be 0 (no ViT stage) or >= 1 (a multiple of each image's share of K), got {v}")
        return v


def split_budget(total: int, parts: int) -> list[int]:
    """Split a row budget over its images: as even as possible, earlier images get the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def capped_split(total: int, caps: list[int]) -> list[int]:
    """``split_budget`` where part j can take at most ``caps[j]``: what a small image cannot hold goes to the
    others, so the shares add up to min(total, sum(caps)). Equal caps give ``split_budget`` exactly."""
    shares = [0] * len(caps)
    left, open_parts = min(total, sum(caps)), [j for j, c in enumerate(caps) if c > 0]
    while left > 0 and open_parts:
        for j, give in zip(list(open_parts), split_budget(left, len(open_parts))):
            take = min(give, caps[j] - shares[j])
            shares[j] += take
            left -= take
        open_parts = [j for j in open_parts if shares[j] < caps[j]]
    return shares


def stage_l_scores(probs: torch.Tensor, values: torch.Tensor, vis_pos: torch.Tensor, query: int) -> torch.Tensor:
    """FlowCut's LLM-side score for one row.

    probs (H, L) attention of the last prompt token over all keys (fp32); values (H_kv, L, d).
    """
    p = probs[:, vis_pos].float()
    r = (p / p.sum(dim=-1, keepdim=True).clamp(min=1e-30)).mean(dim=0)
    v = values.float()
    scale = v.shape[-1] ** -0.5
    u = torch.softmax(torch.einsum("hd,hkd->hk", v[:, query], v[:, vis_pos]) * scale, dim=-1).mean(dim=0)
    dens = v[:, vis_pos].mean(dim=0).abs().sum(dim=-1)
    return (r + u) * dens


@PRUNERS.register("flowcut")
class FlowCutPruner(Pruner):
    name = "flowcut"
    Params = FlowCutParams
    side = "both"
    position_mode = "compact"

    def __init__(self, params: FlowCutParams, budget):
        super().__init__(params, budget)
        self.position_mode = params.position_mode

    def renumbers_llm_cuts(self, family: str) -> bool:
        """``compact``: stage L renumbers the survivors for layers > ``llm_layer`` (the reference) on the 1-D
        RoPE families (LLaVA-1.5 has no stage L); Qwen2-VL's M-RoPE keeps its positions."""
        return self.position_mode == "compact" and family in RENUMBER_FAMILIES

    # ---- budgets ---------------------------------------------------------------------------
    def check_budget(self, ctx: PruneContext) -> None:
        super().check_budget(ctx)
        fam = ctx.adapter.family
        if fam in CLIP_FAMILIES or self._qwen_stage_v(ctx):
            n_imgs = self._images_per_row(ctx)
            for r, n in enumerate(ctx.n_visual):
                if n and self.keep_count(n) < n_imgs[r]:
                    raise InvalidInput(f"request {ctx.request_name(r)}: flowcut: budget {self.keep_count(n)} is below "
                                       f"one token per image ({n_imgs[r]} images)")
        if fam != "llava" and self.params.llm_layer >= ctx.adapter.num_layers - 1:
            raise InvalidInput(f"flowcut: llm_layer {self.params.llm_layer} must be below the model's "
                               f"{ctx.adapter.num_layers} decoder layers")

    @staticmethod
    def _images_per_row(ctx: PruneContext) -> list[int]:
        counts = [0] * len(ctx.n_visual)
        for r in ctx.batch.rows_with_images:
            counts[r] += 1
        return counts

    def _qwen_stage_v(self, ctx: PruneContext) -> bool:
        return ctx.adapter.family == "qwen2_vl" and self.params.qwen_vit_keep > 0

    # ---- stage V -----------------------------------------------------------------------------
    def vision_cache_key(self) -> tuple | None:
        """Stage V cuts each image in a tower pass of its own (a per-image schedule on the row's budget, split over
        the row's images) and reads no text, so the prefix cache may keep its output per row; not with the
        reference's batch-wide prune count (``reference_batch_coupling``), which couples the rows of a batch."""
        return None if self.params.reference_batch_coupling else self._settings_key()

    def prune_images(self, ctx: PruneContext):
        ad, batch = ctx.adapter, ctx.batch
        n_rows = batch.input_ids.shape[0]
        if ad.family not in CLIP_FAMILIES and not self._qwen_stage_v(ctx):  # stage L only
            return ctx.image_features(), [None] * n_rows
        budgets = [self.keep_count(n) if n else 0 for n in ctx.n_visual]
        if ad.family == "qwen2_vl":
            return self._stage_v_qwen(ctx, budgets)
        if all(not n or budgets[r] >= n for r, n in enumerate(ctx.n_visual)):
            return ctx.image_features(), [None] * n_rows  # nothing to cut: the exact unpruned path
        if ad.family == "llava":
            return self._stage_v_llava(ctx, budgets)
        return self._stage_v_next(ctx, budgets)

    def _image_shares(self, ctx: PruneContext, budgets: list[int], caps: list[int] | None = None) -> list[int]:
        """Each image's share of its row's budget: a row's images split it as evenly as possible; with ``caps``
        (tokens per image, when a row's images differ in size) no image gets more than it holds and the rest
        goes to the row's other images."""
        rows = ctx.batch.rows_with_images
        shares = [0] * len(rows)
        for r in set(rows):
            mine = [j for j, rr in enumerate(rows) if rr == r]
            split = (split_budget(budgets[r], len(mine)) if caps is None
                     else capped_split(budgets[r], [caps[j] for j in mine]))
            for j, share in zip(mine, split):
                shares[j] = share
        return shares

    @staticmethod
    def _report_vit_schedule(ctx: PruneContext, pass_rows: list[int], res) -> None:
        """Each request's own ViT schedule: tokens per layer and cut events of its images (NeXT: crops), in
        ``report["per_row"]`` so a request's FLOPs count its own passes, not the batch's."""
        per_row = ctx.report.setdefault("per_row", {})
        for p, r in enumerate(pass_rows):
            entry = per_row.setdefault(r, {})
            entry.setdefault("flowcut_vit_tokens_per_layer", []).append(res.tokens_per_layer[p])
            entry.setdefault("flowcut_vit_events", []).append(res.events[p])

    def _tower_setup(self, ctx: PruneContext):
        ad = ctx.adapter
        tower = ad.vision_tower
        last = selected_layer(tower, ad.vision_feature_layer)
        keep_cls = ad.vision_feature_select_strategy == "full"
        return tower, last, keep_cls

    def _stage_v_llava(self, ctx: PruneContext, budgets: list[int]):
        ad, batch = ctx.adapter, ctx.batch
        tower, last, keep_cls = self._tower_setup(ctx)
        pv = batch.vision_inputs["pixel_values"].to(ad.model.device, ad.model.dtype)
        rows = batch.rows_with_images
        n_imgs = self._images_per_row(ctx)
        per_img_tokens = [ctx.n_visual[r] // n_imgs[r] for r in rows]
        # a row whose budget covers its whole span takes the unpruned path, in a batch as alone (no stage V, no
        # ViT schedule or heatmap of its own), as on LLaVA-NeXT
        whole = [budgets[r] >= ctx.n_visual[r] for r in range(len(ctx.n_visual))]
        cut = [j for j, r in enumerate(rows) if not whole[r]]
        shares = self._image_shares(ctx, budgets)
        # "full": CLS takes one slot
        targets = [max(shares[j] - 1, 0) if keep_cls else shares[j] for j in cut]
        groups = [0] * len(cut) if self.params.reference_batch_coupling else list(range(len(cut)))
        res = run_stage_v(tower, pv[cut], targets, groups, last, self.params.history, self.params.prune_every)
        feats: list[list[torch.Tensor]] = [[] for _ in range(len(ctx.n_visual))]
        kept: list[list[torch.Tensor]] = [[] for _ in range(len(ctx.n_visual))]
        scores: list[list[torch.Tensor]] = [[] for _ in range(len(ctx.n_visual))]
        offset: dict[int, int] = {}
        pass_of = {j: p for p, j in enumerate(cut)}
        for j, r in enumerate(rows):
            if whole[r]:  # the unpruned features of this image (as the adapter encodes it)
                feats[r].append(ad.project(ad.selected_features(pv[j:j + 1]))[0])
                continue
            p = pass_of[j]  # its stage-V pass
            hs = res.features[p] if keep_cls else res.features[p][1:]
            idx = torch.cat([torch.zeros(1, dtype=torch.long, device=hs.device), res.kept[p] + 1]) if keep_cls \
                else res.kept[p]
            feats[r].append(ad.project(hs[None])[0])
            kept[r].append(idx + offset.get(r, 0))
            sc = torch.cat([res.scores[p].new_zeros(1), res.scores[p]]) if keep_cls else res.scores[p]  # CLS slot
            scores[r].append(sc)
            offset[r] = offset.get(r, 0) + per_img_tokens[j]
        for r in ctx.main_rows:  # the running scores as the dashboard's heatmap
            if scores[r]:
                allsc = torch.cat(scores[r])
                report_visual_scores(ctx, r, ctx.n_visual[r], torch.arange(allsc.numel()), allsc)
        self._report_vit_schedule(ctx, [rows[j] for j in cut], res)
        return ([torch.cat(f) if f else None for f in feats], [torch.cat(k) if k else None for k in kept])

    def _stage_v_next(self, ctx: PruneContext, budgets: list[int]):
        ad, batch = ctx.adapter, ctx.batch
        if ad.vision_feature_select_strategy != "default":
            raise InvalidInput("flowcut on LLaVA-NeXT needs vision_feature_select_strategy='default'")
        tower, last, _ = self._tower_setup(ctx)
        model = ad.model.model
        cfg = ad.config
        sizes = batch.vision_inputs["image_sizes"]
        pv, n_crops = ad.crops(batch)
        rows = batch.rows_with_images
        # a row whose budget covers its whole span is left alone, exactly as it is alone in a request (the
        # unpruned path); its images must not go through stage V's floor(K/2) per crop in a mixed batch
        whole = [budgets[r] >= ctx.n_visual[r] for r in range(len(ctx.n_visual))]
        first_crop = [sum(n_crops[:j]) for j in range(len(rows))]
        targets, groups, crop_img = [], [], []
        for j, share in enumerate(self._image_shares(ctx, budgets)):
            if whole[rows[j]]:
                continue
            for _ in range(n_crops[j]):
                targets.append(max(share // 2, 1))
                groups.append(0 if self.params.reference_batch_coupling else j)
                crop_img.append(j)
        cut_pv = torch.cat([pv[first_crop[j]:first_crop[j] + n_crops[j]] for j in sorted(set(crop_img))])
        res = run_stage_v(tower, cut_pv, targets, groups, last, self.params.history, self.params.prune_every)
        g2 = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        feats: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(len(ctx.n_visual))]
        offset: dict[int, int] = {}
        crop0 = 0
        for j, r in enumerate(rows):
            nc = n_crops[j]
            if whole[r]:  # the unpruned packed features of this image (as the adapter encodes it alone)
                crops = pv[first_crop[j]:first_crop[j] + nc]
                packed, _ = model.pack_image_features([ad.project(ad.selected_features(crops))], sizes[j:j + 1],
                                                      vision_feature_select_strategy="default",
                                                      image_newline=model.image_newline)
                feats[r].append((torch.cat(list(packed)), None))
                continue
            layout = self._next_layout(model, nc, g2, sizes[j])  # flat (crop*g2+patch) -> packed position
            pos_list, feat_list = [], []
            for c in range(nc):
                k = res.kept[crop0 + c]
                hs = res.features[crop0 + c][1:]
                pos = layout[c * g2 + k.cpu()]
                present = pos >= 0  # unpadding removes patches that fall in the letterbox
                pos_list.append(pos[present])
                feat_list.append(ad.project(hs[present.to(hs.device)][None])[0])
            if nc == 1:  # a single crop keeps its newline token (last position of the packed layout)
                n_tok = int((layout >= 0).sum()) + 1
                pos_list.append(torch.tensor([n_tok - 1]))
                feat_list.append(model.image_newline[None].to(feat_list[0].dtype))
            pos_all = torch.cat(pos_list)
            feat_all = torch.cat(feat_list)
            order = torch.argsort(pos_all)
            base = offset.get(r, 0)
            feats[r].append((feat_all[order.to(feat_all.device)], pos_all[order] + base))
            offset[r] = base + self._packed_len(model, nc, g2, sizes[j])
            crop0 += nc
        self._report_vit_schedule(ctx, [rows[j] for j in crop_img], res)
        out_f = [torch.cat([f for f, _ in fs]) if fs else None for fs in feats]
        out_k = [torch.cat([k for _, k in fs]) if fs and not whole[r] else None for r, fs in enumerate(feats)]
        return out_f, out_k

    def _stage_v_qwen(self, ctx: PruneContext, budgets: list[int]):
        ad, batch = ctx.adapter, ctx.batch
        grid = batch.vision_inputs["image_grid_thw"]
        m2 = int(ad.vision_tower.spatial_merge_size) ** 2
        merged = [int(t * h * w) // m2 for t, h, w in grid.tolist()]
        # keep x share, capped at the image (a product like 1.1 x 100 must not round up to 111; a huge or
        # infinite multiple is the whole image, not an overflow in ceil)
        targets = [min(n, max(1, math.ceil(round(min(self.params.qwen_vit_keep * share, n), 9))))
                   for n, share in zip(merged, self._image_shares(ctx, budgets, caps=merged))]
        if targets == merged:  # nothing to cut inside the tower: the exact unpruned path
            return ctx.image_features(), [None] * batch.input_ids.shape[0]
        rows = batch.rows_with_images
        # a row none of whose images the tower would cut takes the unpruned path, in a batch as alone (no ViT
        # schedule or heatmap of its own; stage L still cuts it to K)
        whole = {r for r in rows if all(targets[j] == merged[j] for j, rr in enumerate(rows) if rr == r)}
        cut = [j for j, r in enumerate(rows) if r not in whole]
        pixels = ad.image_pixels(batch)
        groups = [0] * len(cut) if self.params.reference_batch_coupling else list(range(len(cut)))
        pv = torch.cat([pixels[j] for j in cut]).to(ad.model.device)
        res = run_stage_v_qwen(ad.vision_tower, pv, grid[cut], [targets[j] for j in cut], groups,
                               self.params.history, self.params.prune_every,
                               whole_blocks=self.params.qwen_vit_unit == "block")
        unpruned: dict[int, torch.Tensor] = {}
        whole_imgs = [j for j, r in enumerate(rows) if r in whole]
        if whole_imgs:  # the tower's own output for these images (as the adapter encodes them)
            flat = ad.encode_pixels(torch.cat([pixels[j] for j in whole_imgs]), grid[whole_imgs])
            flat = torch.cat(list(flat)) if isinstance(flat, (list, tuple)) else flat
            unpruned = dict(zip(whole_imgs, torch.split(flat, [merged[j] for j in whole_imgs])))
        n_rows = len(ctx.n_visual)
        feats: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
        scores: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
        offset = [0] * n_rows
        pass_of = {j: p for p, j in enumerate(cut)}
        for j, r in enumerate(rows):
            if r in whole:
                feats[r].append(unpruned[j])
                continue
            p = pass_of[j]  # its stage-V pass
            feats[r].append(res.features[p])
            kept[r].append(res.kept[p] + offset[r])
            scores[r].append(res.scores[p])
            offset[r] += merged[j]
        for r in ctx.main_rows:  # the blocks' running scores as the heatmap (stage L's replace them if it cuts)
            if scores[r]:
                allsc = torch.cat(scores[r])
                report_visual_scores(ctx, r, ctx.n_visual[r], torch.arange(allsc.numel()), allsc)
        self._report_vit_schedule(ctx, [rows[j] for j in cut], res)
        return ([torch.cat(f) if f else None for f in feats], [torch.cat(k) if k else None for k in kept])

    @staticmethod
    def _pack_indices(model, n_crops: int, g2: int, size) -> torch.Tensor:
        ids = torch.arange(n_crops * g2, dtype=torch.float32).view(n_crops, g2, 1)
        packed, _ = model.pack_image_features([ids], torch.as_tensor(size)[None], "default",
                                              image_newline=torch.tensor([-1.0]))
        packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
        return packed[:, 0].round().long()

    def _next_layout(self, model, n_crops: int, g2: int, size) -> torch.Tensor:
        packed = self._pack_indices(model, n_crops, g2, size)
        layout = torch.full((n_crops * g2,), -1, dtype=torch.long)
        is_tok = packed >= 0
        layout[packed[is_tok]] = is_tok.nonzero().squeeze(1)
        return layout

    def _packed_len(self, model, n_crops: int, g2: int, size) -> int:
        return int(self._pack_indices(model, n_crops, g2, size).numel())

    # ---- stage L -----------------------------------------------------------------------------
    def _stage_l_rows(self, ctx: PruneContext, seq: Seq) -> list[int | None]:
        vis = seq.visual_counts().tolist()
        out: list[int | None] = []
        for r, n0 in enumerate(ctx.n_visual):
            k = self.keep_count(n0) if n0 else 0
            out.append(k if n0 and vis[r] > k else None)
        return out

    def llm_stage(self, family: str) -> bool:
        return family != "llava"  # LLaVA-1.5: stage V only (flowcut.md); LLaVA-NeXT and Qwen2-VL cut in the LLM too

    def before_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq) -> ScoreRequest | None:
        if ctx.adapter.family == "llava" or layer_idx != self.params.llm_layer:
            return None
        if all(k is None for k in self._stage_l_rows(ctx, seq)):
            return None
        rows = last_query_rows(seq)
        return ScoreRequest(query_index=rows, key_mask=seq.valid, query_pos=rows, per_head=True, want_values=True)

    def after_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq, req: ScoreRequest | None):
        if req is None or layer_idx != self.params.llm_layer:
            return None
        ks = self._stage_l_rows(ctx, seq)
        vis = seq.visual_mask()
        kept: list[torch.Tensor | None] = []
        scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for r, k in enumerate(ks):
            if k is None:
                kept.append(None)
                continue
            pos = vis[r].nonzero().squeeze(1)
            s = stage_l_scores(req.probs[r, :, 0], req.values[r], pos, seq.length - 1)
            kept.append(pos[top_sorted(s, k)])
            scores[r] = (pos, s)
        if all(k is None for k in kept):
            return None
        report_position_scores(ctx, seq, scores)  # the stage-L scores are the heatmap (0: cut by stage V)
        record_stage(ctx, "flowcut_llm_kept", layer_idx, seq, kept)
        return keep_mask_from_positions(seq, kept)
