"""FlowCut stage V for Qwen2-VL: progressive pruning inside the native-resolution ViT, in whole merge blocks.

Qwen2-VL's tower has no CLS token, attends within each image (one packed sequence cut by ``cu_seqlens``)
and ends in a merger that joins every m x m block of raw patches (m = ``spatial_merge_size``; a block's
patches are consecutive in the token order) into one LLM token. As in the reference's Qwen code, per image
and tower layer, from that layer's own post-RoPE q, k and v:

    q_g = mean of the image's queries (the "global token"), per head
    a   = mean_h softmax(q_g k^T / sqrt(d))        relation, over the image's raw patches
    d   = || mean_h v ||_1                          information density
    S   = a * d                                     (the Qwen code drops the semantic term)
    C   = S at the first scored layer, else h C + (1 - h) S      (h = 0.5)

The tower is pruned up to its last layer (Qwen reads the last one, no penultimate selection): at layer l
with L = depth - 1 - l and L % every == 0, the CLIP stage's count P = round((N - T)/sqrt(L) (1 - rho^2))
(``prune_count``; L = 0 cuts to T), rho = H(a) / log N. The tower keeps T = ``keep`` merged tokens per
image (FlowCut: 2K), the LLM's stage L cuts to K at decoder layer 1.

The scores come from the engine's cheap score facility (``score_probe(block.attn, ScoreRequest(
query_mean=True, want_values=True))``): the attention function the block calls (SDPA, FlashAttention or
eager, wrapped by vlmguard) computes them from the very post-RoPE q and k of its kernel, one sequence per
image, so nothing is projected or rotated twice and no attention matrix is formed.

Deviation (ours, the default; docs/pruning.md): the reference drops raw patches one by one, lets the merger
join any four consecutive survivors (a merged token can mix patches of different blocks) and gives the
image's merged tokens the M-RoPE positions of its first grid cells. By default whole merge blocks are dropped
instead: P raw patches become floor(P / m^2) blocks, a block scores the mean C of its patches, and every
merged token the LLM sees is a real block at its own M-RoPE position. ``whole_blocks=False`` (FlowCut's
``qwen_vit_unit="patch"``) is the reference's rule. Images are scheduled one by one (batched == alone);
``groups`` shares a count within a group (the reference's coupling), as for CLIP.
"""
from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_position_ids

from vlmguard.attention import ScoreRequest, score_probe
from vlmguard.errors import InvalidInput
from vlmguard.pruning.flowcut_vision import StageVResult, prune_count
from vlmguard.pruning.scores import top_sorted


def global_query_scores(probs: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (a, S) from the facility's mean-query record: probs (1, H, 1, N) = softmax(q_g k^T / sqrt(d))
    per head, values (1, H, N, d). a = head mean of probs, S = a * || mean_h v ||_1; both (N,), fp32."""
    p = probs[0, :, 0].float()
    a = p[0] if p.shape[0] == 1 else p.mean(dim=0)
    v = values[0].float()
    dens = (v[0] if v.shape[0] == 1 else v.mean(dim=0)).abs().sum(dim=-1)
    return a, a * dens


def _segments(counts: list[int], device) -> tuple[list[int], torch.Tensor]:
    """Each image's [start, end) in the packed sequence, and the same as the tower's ``cu_seqlens``."""
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return bounds, torch.tensor(bounds, dtype=torch.int32, device=device)


@torch.no_grad()
def run_stage_v_qwen(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, targets: list[int],
                     groups: list[int], history: float = 0.5, every: int = 2,
                     whole_blocks: bool = True) -> StageVResult:
    """Run Qwen2-VL's tower and merger, image i keeping ``targets[i]`` merged tokens (>= 1).

    Returns per image the merged (projected) tokens of the kept blocks, their block indices (ascending, in
    the image's merged-token order), the raw tokens fed to every tower layer, the cut events
    (layer, raw patches after) and each block's running score when it was last scored (the mean of its patches').

    ``whole_blocks=False`` is the reference's rule: raw patches are dropped one by one (the cut to the target
    still leaves whole multiples of m^2), the merger joins every m^2 consecutive survivors, and the returned
    indices are 0..target-1, so the LLM gives the merged tokens the M-RoPE positions of the image's first
    grid cells, as the reference does.
    """
    grid_thw = grid_thw.to(pixel_values.device)
    if bool((grid_thw[:, 0] != 1).any()):
        raise InvalidInput("flowcut: Qwen2-VL tower pruning takes still images, not videos")
    merge = int(visual.spatial_merge_size)
    m2 = merge * merge
    unit = m2 if whole_blocks else 1  # what a cut keeps or drops: a merge block, or a raw patch
    h = visual.patch_embed(pixel_values)
    # the (h, w) patch coordinates in the tower's block-major token order, as its own forward computes them
    cos, sin = visual.rotary_pos_emb(h, get_vision_position_ids(grid_thw, merge))
    n_img = grid_thw.shape[0]
    counts = (grid_thw[:, 1] * grid_thw[:, 2]).tolist()  # raw patches present, per image
    n_blocks = [c // m2 for c in counts]
    t_raw = [min(t, nb) * m2 for t, nb in zip(targets, n_blocks)]
    dev = h.device
    orig = [torch.arange(c, device=dev) for c in counts]  # raw index (in the image) held by each slot
    run = [torch.zeros(c, device=dev) for c in counts]
    last = [torch.zeros(c, device=dev) for c in counts]  # by raw index: running score when last scored
    started = [False] * n_img
    depth = len(visual.blocks)
    tokens_per_layer: list[list[int]] = [[] for _ in range(n_img)]
    events: list[list[tuple[int, int]]] = [[] for _ in range(n_img)]
    bounds, cu = _segments(counts, dev)
    for li, blk in enumerate(visual.blocks):
        for i in range(n_img):
            tokens_per_layer[i].append(counts[i])
        active = [counts[i] > t_raw[i] for i in range(n_img)]
        kwargs = dict(cu_seqlens=cu, position_embeddings=(cos, sin), max_seqlen=max(counts))
        if not any(active):
            h = blk(h, **kwargs)
            continue
        req = ScoreRequest(query_index=None, query_mean=True, want_values=True)
        with score_probe(blk.attn, req):
            h = blk(h, **kwargs)
        if len(req.parts) != n_img:
            raise RuntimeError("flowcut: the vision tower does not use a vlmguard attention function; "
                               "load the model through vlmguard.Engine")
        rel: list[torch.Tensor | None] = [None] * n_img
        for i in range(n_img):
            if not active[i]:
                continue
            rel[i], s_now = global_query_scores(*req.parts[i])
            run[i] = history * run[i] + (1 - history) * s_now if started[i] else s_now
            started[i] = True
        remaining = depth - 1 - li
        if remaining % every != 0:
            continue
        p_group: dict[int, int] = {}
        for i in range(n_img):
            if active[i]:  # raw patches the schedule would drop, in whole units, shared (max) within a group
                units = prune_count(rel[i], counts[i], t_raw[i], remaining) // unit
                p_group[groups[i]] = max(p_group.get(groups[i], 0), units)
        keep_u = [max(counts[i] // unit - p_group[groups[i]], t_raw[i] // unit) if active[i] else counts[i] // unit
                  for i in range(n_img)]
        if all(ku * unit == c for ku, c in zip(keep_u, counts)):
            continue
        picked = []
        for i in range(n_img):
            nu = counts[i] // unit
            if keep_u[i] == nu:
                picked.append(torch.arange(bounds[i], bounds[i + 1], device=dev))
                continue
            last[i][orig[i]] = run[i]
            chosen = top_sorted(run[i].view(nu, unit).mean(dim=1), keep_u[i])
            slots = (chosen[:, None] * unit + torch.arange(unit, device=dev)).flatten()
            orig[i], run[i], counts[i] = orig[i][slots], run[i][slots], keep_u[i] * unit
            events[i].append((li, keep_u[i] * unit))  # raw patches after the cut, as tokens_per_layer
            picked.append(slots + bounds[i])
        slots = torch.cat(picked)
        h, cos, sin = h[slots], cos[slots], sin[slots]
        bounds, cu = _segments(counts, dev)
    merged = visual.merger(h)
    feats, kept, scores = [], [], []
    start = 0
    for i in range(n_img):
        nb = counts[i] // m2
        feats.append(merged[start:start + nb])
        start += nb
        kept.append(orig[i].view(nb, m2)[:, 0] // m2 if whole_blocks else torch.arange(nb, device=dev))
        if started[i]:
            last[i][orig[i]] = run[i]
        scores.append(last[i].view(-1, m2).mean(dim=1))
    return StageVResult(features=feats, kept=kept, tokens_per_layer=tokens_per_layer, events=events, scores=scores)
