"""FlowCut's stage V inside Qwen2-VL's ViT (merge blocks, global-query score, per-image schedules)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids

from vlmguard.attention import ScoreRequest, score_probe
from vlmguard.engine import Engine, Request
from vlmguard.errors import InvalidInput
from vlmguard.flops import result_flops
from vlmguard.pruning.flowcut_qwen_vision import global_query_scores, run_stage_v_qwen
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine, tiny_qwen2_vl

DEEP = 8  # tower layers; with every = 2 the cuts come after layers 1, 3, 5 and the forced one after 7


@lru_cache(maxsize=1)
def deep_qwen_engine() -> Engine:
    """A tiny Qwen2-VL with an 8-layer tower, images up to 12 x 12 patches (36 merged tokens), and sharpened
    random attention: larger q/k weights and a large query bias give the mean ("global") query a direction,
    so its entropy ratio falls below 1 and the schedule cuts before the forced last cut (random inits give
    uniform attention)."""
    model, proc = tiny_qwen2_vl(vision_depth=DEEP, max_side=96)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in model.model.visual.blocks:
            d = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * d].mul_(6.0)
            blk.attn.qkv.bias[:d] = 3.0 * torch.randn(d, generator=gen)
    return Engine(model, proc, name="deep-qwen")


def vision_inputs(eng: Engine, images):
    batch = eng.adapter.encode(eng._prompts([Request("x", [im]) for im in images]))
    return batch.vision_inputs["pixel_values"], batch.vision_inputs["image_grid_thw"]


def merged_counts(grid: torch.Tensor) -> list[int]:
    return [int(t * h * w) // 4 for t, h, w in grid.tolist()]


def test_unpruned_run_is_the_towers_own_forward_bit_for_bit():
    eng = deep_qwen_engine()
    visual = eng.adapter.vision_tower
    pv, grid = vision_inputs(eng, [random_image(1, (96, 80)), random_image(2, (48, 96))])
    res = run_stage_v_qwen(visual, pv, grid, merged_counts(grid), [0, 1])
    with torch.no_grad():
        ref = visual(pv, grid_thw=grid).pooler_output
    assert torch.equal(torch.cat(res.features), ref)
    assert all(not ev for ev in res.events)
    assert [k.tolist() for k in res.kept] == [list(range(n)) for n in merged_counts(grid)]


def manual_scores(blk, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]):
    """Per image (a, S) recomputed from the block's own modules: qkv of norm1(h), transformers' vision RoPE,
    the mean query per head, a = head mean of softmax(q_g k / sqrt(d)), S = a * ||head-mean v||_1."""
    with torch.no_grad():
        qkv = blk.attn.qkv(blk.norm1(h)).view(h.shape[0], 3, blk.attn.num_heads, -1)
        q, k = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)
        out = []
        for s0, s1 in zip(bounds, bounds[1:]):
            qi, ki, vi = q[s0:s1], k[s0:s1], qkv[s0:s1, 2]
            heads = [torch.softmax(ki[:, j] @ qi[:, j].mean(dim=0) * blk.attn.scaling, dim=0)
                     for j in range(qi.shape[1])]
            a = torch.stack(heads).mean(dim=0)
            out.append((a, a * vi.mean(dim=1).abs().sum(dim=-1)))
    return out


@pytest.mark.parametrize("attn", ["vlmguard_sdpa", "vlmguard_eager"])
def test_the_facilitys_mean_query_scores_equal_a_recomputation(attn):
    eng = deep_qwen_engine()
    visual = eng.adapter.vision_tower
    pv, grid = vision_inputs(eng, [random_image(1, (96, 80)), random_image(2, (48, 96))])
    eng.model.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            h = visual.patch_embed(pv)
            cos, sin = visual.rotary_pos_emb(h, get_vision_position_ids(grid, 2))
            counts = [int(t * hh * w) for t, hh, w in grid.tolist()]
            bounds = [0, counts[0], sum(counts)]
            cu = torch.tensor(bounds, dtype=torch.int32)
            blk = visual.blocks[0]
            req = ScoreRequest(query_index=None, query_mean=True, want_values=True)
            with score_probe(blk.attn, req):
                blk(h, cu_seqlens=cu, position_embeddings=(cos, sin), max_seqlen=max(counts))
    finally:
        eng.model.set_attn_implementation("vlmguard_sdpa")
    assert len(req.parts) == 2 and req.calls >= 1
    for (probs, values), (a_ref, s_ref), n in zip(req.parts, manual_scores(blk, h, cos, sin, bounds), counts):
        assert probs.shape == (1, blk.attn.num_heads, 1, n)
        a, s = global_query_scores(probs, values)
        assert torch.allclose(a, a_ref, atol=1e-6) and abs(float(a.sum()) - 1) < 1e-5
        assert torch.allclose(s, s_ref, atol=1e-5)


def test_mean_query_records_split_a_packed_varlen_call():
    """FlashAttention's path: one call over the packed images with cu_seq_lens; one record per segment."""
    from vlmguard.attention import record_mean_query

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    req = ScoreRequest(query_index=None, query_mean=True, want_values=True)
    record_mean_query(q, k, v, 0.5, req, torch.tensor([0, 6, 10], dtype=torch.int32))
    assert [p.shape[-1] for p, _ in req.parts] == [6, 4]
    ref = torch.softmax(q[:, :, 6:].mean(dim=2, keepdim=True) @ k[:, :, 6:].transpose(-1, -2) * 0.5, dim=-1)
    assert torch.allclose(req.parts[1][0], ref) and torch.equal(req.parts[1][1], v[:, :, 6:])


def test_the_towers_positions_are_block_major():
    """Stage V gathers rows of the tower's token order in whole merge blocks: that order is block-major."""
    pos = get_vision_position_ids(torch.tensor([[1, 4, 6]]), 2)
    assert pos[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # the first 2 x 2 block
    assert pos[4:8].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]  # the next block to its right
    assert sorted(map(tuple, pos.tolist())) == [(r, c) for r in range(4) for c in range(6)]


def test_selection_equals_an_independent_replay_of_the_blocks():
    """Two-layer tower (the shipped tiny shape): layer 0 starts the running score, layer 1 is the forced cut.
    Recompute q, k, v from each block's own modules and check the kept blocks are the top blocks of C."""
    eng = tiny_engine("qwen2_vl")
    visual = eng.adapter.vision_tower
    pv, grid = vision_inputs(eng, [random_image(5, (64, 64))])
    n = merged_counts(grid)[0]
    res = run_stage_v_qwen(visual, pv, grid, [3], [0])
    with torch.no_grad():
        h = visual.patch_embed(pv)
        cos, sin = visual.rotary_pos_emb(h, get_vision_position_ids(grid, 2))
        cu = torch.tensor([0, h.shape[0]], dtype=torch.int32)
        scores = []
        for blk in visual.blocks:
            scores.append(manual_scores(blk, h, cos, sin, [0, h.shape[0]])[0][1])
            h = blk(h, cu_seqlens=cu, position_embeddings=(cos, sin))
    c = 0.5 * scores[0] + 0.5 * scores[1]
    top = sorted(torch.argsort(-c.view(n, 4).mean(dim=1), stable=True)[:3].tolist())
    assert res.kept[0].tolist() == top and res.events == [[(1, 12)]]  # 3 blocks = 12 raw patches
    assert res.tokens_per_layer == [[4 * n, 4 * n]]


def test_stage_v_invariants_on_a_deep_tower():
    eng = deep_qwen_engine()
    visual = eng.adapter.vision_tower
    images = [random_image(s, (96, 96)) for s in range(3)]
    pv, grid = vision_inputs(eng, images)
    n = merged_counts(grid)
    assert n == [36] * 3
    for t in (1, 4, 12, 30):
        res = run_stage_v_qwen(visual, pv, grid, [t] * 3, [0, 1, 2])
        for i in range(3):
            counts = res.tokens_per_layer[i]
            assert len(counts) == DEEP and counts[0] == 144 and all(c % 4 == 0 for c in counts)
            assert all(b <= a for a, b in zip(counts, counts[1:]))
            drops = [li for li in range(1, DEEP) if counts[li] < counts[li - 1]]
            assert all(li - 1 in (1, 3, 5) for li in drops)  # cuts only after layers with L even
            assert min(counts) >= 4 * t
            assert res.features[i].shape == (t, eng.model.config.get_text_config().hidden_size)
            kept = res.kept[i].tolist()
            assert kept == sorted(set(kept)) and len(kept) == t and all(0 <= j < 36 for j in kept)
            assert all(float(res.scores[i][j]) > 0 for j in kept)
        if t <= 4:  # the sharpened attention prunes before the forced cut
            assert any(ev[0] in (1, 3, 5) for evs in res.events for ev in evs)


def test_batched_images_of_different_sizes_equal_each_alone_and_coupling_shares_counts():
    eng = deep_qwen_engine()
    visual = eng.adapter.vision_tower
    images = [random_image(7, (96, 96)), random_image(8, (48, 96)), random_image(9, (80, 64))]
    pv, grid = vision_inputs(eng, images)
    batched = run_stage_v_qwen(visual, pv, grid, [5, 5, 5], [0, 1, 2])
    for i, im in enumerate(images):
        pv1, grid1 = vision_inputs(eng, [im])
        alone = run_stage_v_qwen(visual, pv1, grid1, [5], [0])
        assert torch.equal(alone.kept[0], batched.kept[i])
        assert alone.tokens_per_layer[0] == batched.tokens_per_layer[i]
        assert (alone.features[0] - batched.features[i]).abs().max().item() < 1e-5
    same = [random_image(s, (96, 96)) for s in (20, 21)]
    pv, grid = vision_inputs(eng, same)
    coupled = run_stage_v_qwen(visual, pv, grid, [4, 4], [0, 0])
    assert coupled.tokens_per_layer[0] == coupled.tokens_per_layer[1]


def test_engine_request_through_both_stages():
    eng = deep_qwen_engine()
    reqs = [Request("Is there a dog in the image?", [random_image(s, (96, 96))]) for s in (1, 2)]
    spec = GenerationSpec(pruning="flowcut", budget=5, max_new_tokens=3)
    res = eng.generate(reqs, spec)
    single = [eng.generate([r], spec)[0] for r in reqs]
    n_layers = eng.adapter.num_layers
    for b, s in zip(res, single):
        assert b.visual_tokens == 36
        assert b.visual_tokens_kept == [10, 10] + [5] * (n_layers - 2)  # ViT keeps 2K, layer 1 cuts to K
        assert len(b.kept_indices) == 5 and b.kept_indices == s.kept_indices and b.token_ids == s.token_ids
        vit = b.pruning["flowcut_vit_tokens_per_layer"]
        assert vit[0][0] == 144 and vit[0][-1] >= 40
    # qwen_vit_keep = 0: stage L only, the tower untouched
    off = eng.generate(reqs[:1], GenerationSpec(pruning="flowcut", budget=5, max_new_tokens=3,
                                                pruning_params={"qwen_vit_keep": 0}))[0]
    assert off.visual_tokens_kept == [36, 36] + [5] * (n_layers - 2)
    assert "flowcut_vit_tokens_per_layer" not in off.pruning
    wide = eng.generate(reqs[:1], GenerationSpec(pruning="flowcut", budget=5, max_new_tokens=3,
                                                 pruning_params={"qwen_vit_keep": 3.0}))[0]
    assert wide.visual_tokens_kept[:2] == [15, 15]


def test_multi_image_rows_and_budget_errors():
    eng = deep_qwen_engine()
    two = Request("compare", [random_image(3, (96, 96)), random_image(4, (48, 96))])
    r = eng.generate([two], GenerationSpec(pruning="flowcut", budget=7, max_new_tokens=2))[0]
    assert r.visual_tokens == 36 + 18
    # the row's 7 are split 4 + 3; the ViT keeps 8 + 6 merged tokens, layer 1 cuts the row to 7
    assert r.visual_tokens_kept[:3] == [14, 14, 7]
    with pytest.raises(InvalidInput, match="below one token per image"):
        eng.generate([two], GenerationSpec(pruning="flowcut", budget=1, max_new_tokens=2))
    with pytest.raises(InvalidInput, match="qwen_vit_keep"):
        GenerationSpec.build(pruning="flowcut", budget=4, pruning_params={"qwen_vit_keep": -1}).resolve()


def test_flops_count_the_pruned_tower_and_the_merger_on_kept_blocks():
    eng = deep_qwen_engine()
    req = [Request("Is there a dog in the image?", [random_image(1, (96, 96))])]
    cfg = eng.model.config
    base = result_flops(cfg, eng.generate(req, GenerationSpec(max_new_tokens=1))[0])
    r = eng.generate(req, GenerationSpec(pruning="flowcut", budget=3, max_new_tokens=1))[0]
    flow = result_flops(cfg, r)
    assert flow.vision < base.vision and flow.llm < base.llm
    assert flow.projector == pytest.approx(base.projector * 6 / 36)  # the merger ran on 2K = 6 of 36 blocks


def test_reference_patch_unit_merges_consecutive_survivors_at_the_first_positions():
    """qwen_vit_unit="patch" (the reference): raw patches cut one by one, the last cut to 4 x target, the merger
    over consecutive survivors, and indices 0..t-1 (the first grid cells' positions in the LLM)."""
    eng = deep_qwen_engine()
    visual = eng.adapter.vision_tower
    pv, grid = vision_inputs(eng, [random_image(s, (96, 96)) for s in range(2)])
    res = run_stage_v_qwen(visual, pv, grid, [4, 4], [0, 1], whole_blocks=False)
    for i in range(2):
        counts = res.tokens_per_layer[i]
        assert counts[0] == 144 and counts[-1] >= 16 and res.events[i][-1] == (DEEP - 1, 16)
        assert any(c % 4 for c in counts)  # intermediate cuts are not whole blocks
        assert res.kept[i].tolist() == [0, 1, 2, 3] and res.features[i].shape[0] == 4
    blocks = run_stage_v_qwen(visual, pv, grid, [4, 4], [0, 1])
    assert all(c % 4 == 0 for c in blocks.tokens_per_layer[0])
    r = eng.generate([Request("Is there a dog?", [random_image(0, (96, 96))])],
                     GenerationSpec(pruning="flowcut", budget=2, max_new_tokens=2,
                                    pruning_params={"qwen_vit_unit": "patch"}))[0]
    assert r.visual_tokens_kept[:3] == [4, 4, 2] and all(i < 4 for i in r.kept_indices)


def replay_stage_v(visual, pv, grid, target: int, whole_blocks: bool):
    """FlowCut's stage V on one image, replayed from the spec with scores recomputed from each block's own
    modules (``manual_scores``): the running score, the cut at every layer with depth-1-l even (the count
    from ``prune_count``, whole blocks or raw patches), the top units by C in raster order, then the merger
    over the survivors. Returns (merged tokens, kept units, raw tokens per layer, events)."""
    from vlmguard.pruning.flowcut_vision import prune_count

    unit = 4 if whole_blocks else 1
    with torch.no_grad():
        h = visual.patch_embed(pv)
        cos, sin = visual.rotary_pos_emb(h, get_vision_position_ids(grid, 2))
        n, t_raw, depth = h.shape[0], 4 * target, len(visual.blocks)
        orig, run, per_layer, events = torch.arange(n), None, [], []
        for li, blk in enumerate(visual.blocks):
            per_layer.append(n)
            scored = n > t_raw
            if scored:
                a, s = manual_scores(blk, h, cos, sin, [0, n])[0]
                run = s if run is None else 0.5 * run + 0.5 * s
            h = blk(h, cu_seqlens=torch.tensor([0, n], dtype=torch.int32), position_embeddings=(cos, sin))
            remaining = depth - 1 - li
            if not scored or remaining % 2:
                continue
            keep = max(n // unit - prune_count(a, n, t_raw, remaining) // unit, t_raw // unit)
            if keep == n // unit:
                continue
            unit_scores = run.view(-1, unit).mean(dim=1)
            chosen = torch.argsort(-unit_scores, stable=True)[:keep].sort().values
            slots = (chosen[:, None] * unit + torch.arange(unit)).flatten()
            h, cos, sin, run, orig, n = h[slots], cos[slots], sin[slots], run[slots], orig[slots], keep * unit
            events.append((li, n))
        merged = visual.merger(h)
    kept = orig.view(-1, 4)[:, 0] // 4 if whole_blocks else torch.arange(target)
    return merged, kept, per_layer, events


@pytest.mark.parametrize("whole_blocks", [True, False])
@pytest.mark.parametrize("target", [1, 3, 8])
def test_deep_tower_cuts_equal_an_independent_replay(whole_blocks, target):
    """Cuts in the middle of the tower (the sharpened 8-layer tower prunes after layers 1, 3 or 5, not only at
    the forced last cut): kept units, schedule and merged tokens equal the replay, in both units; in patch
    mode this checks that the merger joins the right consecutive survivors."""
    eng = deep_qwen_engine()
    visual = eng.adapter.vision_tower
    for seed in (0, 1):
        pv, grid = vision_inputs(eng, [random_image(seed, (96, 96))])
        res = run_stage_v_qwen(visual, pv, grid, [target], [0], whole_blocks=whole_blocks)
        merged, kept, per_layer, events = replay_stage_v(visual, pv, grid, target, whole_blocks)
        assert res.tokens_per_layer[0] == per_layer and res.events[0] == events
        assert any(li < DEEP - 1 for li, _ in events)  # a cut before the forced one
        assert torch.equal(res.kept[0], kept)
        assert (res.features[0] - merged).abs().max().item() < 1e-5


def test_capped_split_gives_what_small_images_cannot_hold_to_the_others():
    from vlmguard.pruning.flowcut import capped_split, split_budget

    assert capped_split(30, [36, 4, 4]) == [22, 4, 4]
    assert capped_split(7, [1, 10, 2]) == [1, 4, 2]
    assert capped_split(50, [36, 4]) == [36, 4]  # more than the images hold: all of them
    assert all(capped_split(k, [9] * 3) == split_budget(k, 3) for k in range(28))


@pytest.mark.parametrize("keep", [1.0, 2.0])
def test_a_row_of_uneven_images_ends_at_its_budget(keep):
    """A row's images of 36, 4 and 4 merged tokens at K = 30: the small images cannot hold an even share, so
    the big one takes the rest and the row still reaches exactly K (not 23 or 28)."""
    eng = deep_qwen_engine()
    row = Request("compare", [random_image(3, (96, 96)), random_image(4, (32, 32)), random_image(5, (32, 32))])
    r = eng.generate([row], GenerationSpec(pruning="flowcut", budget=30, max_new_tokens=2,
                                           pruning_params={"qwen_vit_keep": keep}))[0]
    assert r.visual_tokens == 44
    assert r.visual_tokens_kept[-1] == 30 and len(r.kept_indices) == 30
    assert len(r.pruning["visual_scores"]) == 44  # a heatmap whether or not stage L cut the row


def test_each_request_counts_its_own_tower_passes_in_a_batch():
    """Images of different sizes in one batch: a request's FLOPs and schedule are its own image's, as alone."""
    eng = deep_qwen_engine()
    cfg = eng.model.config
    reqs = [Request("Is there a dog?", [random_image(1, (96, 96))]), Request("Is there a dog?", [random_image(2, (32, 32))])]
    spec = GenerationSpec(pruning="flowcut", budget=1, max_new_tokens=1)
    batched = eng.generate(reqs, spec)
    for b, req in zip(batched, reqs):
        alone = eng.generate([req], spec)[0]
        assert b.pruning["flowcut_vit_tokens_per_layer"] == alone.pruning["flowcut_vit_tokens_per_layer"]
        assert len(b.pruning["flowcut_vit_tokens_per_layer"]) == 1
        assert result_flops(cfg, b).vision == pytest.approx(result_flops(cfg, alone).vision)


@pytest.mark.parametrize("unit", ["block", "patch"])
def test_the_llm_sees_the_kept_tokens_at_their_m_rope_positions(unit):
    """After a ViT-only cut (qwen_vit_keep=1: stage L has nothing left to cut), the rotary embedding the first
    decoder layer receives is the unpruned sequence's 3-D M-RoPE at the text and the kept visual positions:
    each kept block at its own grid cell (block), or the image's first cells (patch, the reference's rule)."""
    eng = deep_qwen_engine()
    ad = eng.adapter
    req = Request("Is there a dog?", [random_image(6, (96, 96))])
    seen: dict = {}

    def grab(module, args, kwargs):
        seen.setdefault("rope", kwargs["position_embeddings"])  # the prefill's call comes first

    handle = ad.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        r = eng.generate([req], GenerationSpec(pruning="flowcut", budget=4, max_new_tokens=1,
                                               pruning_params={"qwen_vit_keep": 1, "qwen_vit_unit": unit}))[0]
    finally:
        handle.remove()
    assert r.visual_tokens_kept[0] == 4 and len(r.kept_indices) == 4
    if unit == "patch":
        assert r.kept_indices == [0, 1, 2, 3]
    else:  # the blocks stage V chose by score, not the first cells
        pv, grid = vision_inputs(eng, req.images)
        chosen = run_stage_v_qwen(ad.vision_tower, pv, grid, [4], [0]).kept[0].tolist()
        assert r.kept_indices == chosen and chosen != [0, 1, 2, 3]
    with torch.no_grad():
        batch = ad.encode(eng._prompts([req]))
        full = ad.build_sequence(batch, ad.image_features(batch), eng.model.dtype, eng.device)
        keep = full.valid[0] & ((full.visual[0] < 0) | torch.isin(full.visual[0], torch.tensor(r.kept_indices)))
        want = ad.rotary(full.hidden[:, keep], full.positions[..., keep])
    assert len(seen["rope"]) == 2 and all(torch.equal(g, w) for g, w in zip(seen["rope"], want))


def test_an_infinite_or_huge_vit_keep_keeps_whole_images():
    """qwen_vit_keep is a float >= 1 with no upper bound: inf (JSON 1e400) or 1e308 x share overflowed
    math.ceil (OverflowError, a stack trace); any multiple at or above the image keeps the whole image."""
    eng = tiny_engine("qwen2_vl")
    req = [Request("Is there a dog in the image?", [random_image(1, (64, 64))])]
    outs = [eng.generate(req, GenerationSpec(pruning="flowcut", budget=2, max_new_tokens=2,
                                             pruning_params={"qwen_vit_keep": keep}))[0]
            for keep in (float("inf"), 1e308, 1000.0)]
    n = outs[0].visual_tokens
    for r in outs:
        assert r.visual_tokens_kept[:3] == [n, n, 2] and len(r.kept_indices) == 2
        assert r.kept_indices == outs[-1].kept_indices and r.token_ids == outs[-1].token_ids
