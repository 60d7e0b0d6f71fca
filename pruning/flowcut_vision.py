"""FlowCut stage V: progressive, entropy-scheduled pruning inside a CLIP vision tower (CLS token).

Drives the tower's own modules layer by layer (``embeddings`` -> ``pre_layrnorm`` -> ``encoder.layers``
up to the layer LLaVA selects). At every layer, while an image still holds more patches than its target
K, the CLS row of that layer's attention and the value vectors come from the engine's cheap score
facility (``score_probe(layer.self_attn, ScoreRequest(query_index=CLS, query_pos=None, per_head=True,
want_values=True))``), and per image (N = patches present, CLS excluded):

    a = renorm(drop_cls(mean_h softmax_all(q_cls k^T / sqrt(d))))       attention strength
    s = renorm(drop_cls(mean_h softmax_all(v_cls v^T)))                 semantic relevance (no scale)
    d = || mean_h v ||_1                                                information density
    S = (a + s) * d ;  C = S (first scored layer), else C = h C + (1 - h) S  (h = 0.5)

Pruning layers: l with (f - l) % 2 == 0, f = selected layer - 1 (the reference's "remaining prune layers"
L = f - l; CLIP-L/336 with layer -2: l = 1, 3, ..., 21). There, rho = H(a) / log N,
P = round((N - K) / sqrt(L) * (1 - rho^2)) (L = 0: cut to exactly K), M = max(N - P, K); keep the top-M
patches by C, sorted ascending (ties: lower index). The cut applies to the layer's output.

Schedules are per group of tensors: an image (LLaVA-1.5) or all crops of one image (LLaVA-NeXT, whose
reference shares the count across the crops it sees at batch size 1). The reference's max-over-batch
coupling is one group for the whole batch (FlowCut's ``reference_batch_coupling``). Images in a batch are kept rectangular with a key-padding
mask, so a batch selects exactly what each image selects alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmguard.attention import ScoreRequest, score_probe
from vlmguard.errors import InvalidInput
from vlmguard.models.vision_tower import layers_needed
from vlmguard.sequence import additive_mask


@dataclass
class StageVResult:
    # per image (or crop): (kept, D_vision) hidden states of the selected layer (Qwen2-VL: the merger's tokens)
    features: list[torch.Tensor]
    kept: list[torch.Tensor]  # per image: kept token indices into the image's own token set, ascending
    tokens_per_layer: list[list[int]]  # per image: tokens (incl. CLS) fed to each vision layer run
    events: list[list[tuple[int, int]]] = field(default_factory=list)  # per image: (layer, patches after)
    # per image: every patch's running score when it was last scored (dropped or kept; 0 = never scored)
    scores: list[torch.Tensor] = field(default_factory=list)


def selected_layer(tower, vision_feature_layer) -> int:
    """Index of the encoder layer whose output LLaVA feeds the LLM (hidden_states[vfl])."""
    if not isinstance(vision_feature_layer, int):
        raise InvalidInput("flowcut supports a single vision_feature_layer (this model concatenates several)")
    n = len(tower.encoder.layers)
    idx = layers_needed(n, vision_feature_layer)
    if not 1 <= idx <= n:
        raise InvalidInput(f"flowcut: vision_feature_layer {vision_feature_layer} selects no encoder layer")
    return idx - 1


def prune_count(a: torch.Tensor, n: int, target: int, remaining: int) -> int:
    """Patches to prune at a pruning layer: round((N - K)/sqrt(L) * (1 - rho^2)); L = 0 forces N - K.

    a: (N,) attention strength over the present patches (sums to 1). Result in [0, N - K].
    """
    if n <= target:
        return 0
    if remaining <= 0:
        return n - target
    a = a.double()
    entropy = float(-torch.xlogy(a, a).sum())
    rho = entropy / math.log(n) if n > 1 else 1.0
    p = round((n - target) / math.sqrt(remaining) * (1.0 - rho * rho))  # half to even, as torch.round
    return int(min(max(p, 0), n - target))


def layer_scores(probs: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (a, S) over patch slots 1.. of a padded batch.

    probs (B, H, 1, 1+N) CLS row over all keys (fp32, padding already excluded);
    values (B, H, 1+N, d); valid (B, 1+N), None when no slot is padding. Returns a (B, N) and S (B, N),
    zero on padding. a and s go through their head mean and renormalisation as one stacked tensor: this runs
    at every layer of stage V, where each extra small op costs more than its arithmetic (a kernel launch on a
    GPU, a dispatch on a CPU); the results equal the step-by-step computation bit for bit (tested).
    """
    v = values.float()
    logits = torch.matmul(v[:, :, :1], v.transpose(-1, -2))  # (B, H, 1, 1+N): raw v_cls . v_j, no scale
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    b, h, _, n1 = probs.shape
    both = torch.cat((probs, torch.softmax(logits, dim=-1)), dim=1).view(b, 2, h, n1).mean(dim=2)[..., 1:]
    v_mean = v[:, 0] if v.shape[1] == 1 else v.mean(dim=1)  # one head: the mean is the head (and 30x cheaper on a CPU)
    dens = v_mean[:, 1:].abs().sum(dim=-1)
    if valid is not None:  # zero on padded slots
        both = both * valid[:, None, 1:]
        dens = dens * valid[:, 1:]
    both = both / both.sum(dim=-1, keepdim=True).clamp(min=1e-30)  # (B, 2, N): a and s, each summing to 1
    return both[:, 0], both.sum(dim=1) * dens


def key_padding_mask(tower, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask hiding padded tokens from every query: FlashAttention takes the (B, N) padding mask,
    SDPA / eager an additive (B, 1, N, N) mask."""
    if "flash" in str(getattr(tower.config, "_attn_implementation", "")):
        return valid.long()
    return additive_mask(valid[:, None, :].expand(-1, valid.shape[1], -1), dtype)


@torch.no_grad()
def run_stage_v(tower, pixel_values: torch.Tensor, targets: list[int], groups: list[int], last_layer: int,
                history: float = 0.5, every: int = 2) -> StageVResult:
    """Run the CLIP tower up to ``last_layer`` pruning each image to ``targets[i]`` patches.

    groups[i]: images with the same group id share the pruning count (the max over the group).
    Returns the selected layer's hidden states (CLS first, then the kept patches in raster order).
    """
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    b, n1, _ = h.shape
    dev = h.device
    n_patch = n1 - 1
    valid = torch.ones(b, n1, dtype=torch.bool, device=dev)
    orig = torch.arange(n_patch, device=dev)[None].repeat(b, 1)  # patch index held by each slot
    run_score = torch.zeros(b, n_patch, dtype=torch.float32, device=dev)
    last_score = torch.zeros(b, n_patch, dtype=torch.float32, device=dev)  # by original patch index
    # bookkeeping on the host (patches present, scored yet): the cuts are decided here, so no per-layer
    # device sync is needed to know them (a GPU keeps running ahead; only the prune counts read scores)
    counts = [n_patch] * b
    started = [False] * b
    forced = max(last_layer - 1, 0)
    tokens_per_layer: list[list[int]] = [[] for _ in range(b)]
    events: list[list[tuple[int, int]]] = [[] for _ in range(b)]
    cls_index = torch.zeros(b, 1, dtype=torch.long, device=dev)  # the CLS row is the query at every layer

    def record_scores() -> None:  # every present patch's running score, by original index
        for i in range(b):
            last_score[i, orig[i, : counts[i]]] = run_score[i, : counts[i]]

    for li in range(last_layer + 1):
        layer = tower.encoder.layers[li]
        for i in range(b):
            tokens_per_layer[i].append(counts[i] + 1)
        active = [counts[i] > targets[i] for i in range(b)]
        mask = None if min(counts) == max(counts) else key_padding_mask(tower, valid, h.dtype)
        if not any(active):
            h = layer(h, mask)
            continue
        padded = None if mask is None else valid  # None: every slot of every image is a patch (or CLS)
        req = ScoreRequest(query_index=cls_index, key_mask=padded,
                           query_pos=None, per_head=True, want_values=True)
        with score_probe(layer.self_attn, req):
            h = layer(h, mask)
        if req.calls == 0:
            raise RuntimeError("flowcut: the vision tower does not use a vlmguard attention function; "
                               "load the model through vlmguard.Engine")
        a, s_now = layer_scores(req.probs, req.values, padded)
        first = [act and not st for act, st in zip(active, started)]
        if all(first):
            run_score = s_now
        elif all(active) and not any(first):
            run_score = history * run_score + (1 - history) * s_now
        else:
            upd = torch.tensor(active, device=dev)[:, None]
            first_t = torch.tensor(first, device=dev)[:, None]
            run_score = torch.where(first_t, s_now, torch.where(upd, history * run_score + (1 - history) * s_now,
                                                                run_score))
        started = [st or act for st, act in zip(started, active)]
        remaining = forced - li
        if remaining < 0 or remaining % every != 0:
            continue
        # per-image prune counts, shared (max) within a group
        p_img = [prune_count(a[i, : counts[i]], counts[i], targets[i], remaining) if active[i] else 0
                 for i in range(b)]
        p_group: dict[int, int] = {}
        for i in range(b):
            if active[i]:
                p_group[groups[i]] = max(p_group.get(groups[i], 0), p_img[i])
        keep = [(max(counts[i] - p_group[groups[i]], targets[i]) if remaining > 0 else targets[i])
                if active[i] else counts[i] for i in range(b)]
        if keep == counts:
            continue
        record_scores()  # the dropped patches' final scores (the kept ones are written again later)
        keep_slots: list[torch.Tensor] = []
        for i in range(b):
            if keep[i] == counts[i]:
                keep_slots.append(torch.arange(counts[i], device=dev))
                continue
            order = torch.argsort(-run_score[i, : counts[i]], stable=True)[: keep[i]]
            keep_slots.append(order.sort().values)
            events[i].append((li, keep[i]))
        new_n = max(keep)
        new_h = h.new_zeros(b, new_n + 1, h.shape[-1])
        new_valid = torch.zeros(b, new_n + 1, dtype=torch.bool, device=dev)
        new_orig = torch.full((b, new_n), -1, dtype=torch.long, device=dev)
        new_score = torch.zeros(b, new_n, dtype=torch.float32, device=dev)
        for i, k in enumerate(keep_slots):
            m = keep[i]
            new_h[i, 0] = h[i, 0]
            new_h[i, 1:m + 1] = h[i, 1 + k]
            new_valid[i, : m + 1] = True
            new_orig[i, :m] = orig[i, k]
            new_score[i, :m] = run_score[i, k]
        h, valid, orig, run_score, counts = new_h, new_valid, new_orig, new_score, keep
    record_scores()
    feats = [h[i, : counts[i] + 1] for i in range(b)]
    kept = [orig[i, : counts[i]] for i in range(b)]
    return StageVResult(features=feats, kept=kept, tokens_per_layer=tokens_per_layer, events=events,
                        scores=list(last_score))
