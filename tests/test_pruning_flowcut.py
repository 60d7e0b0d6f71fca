"""FlowCut: schedule arithmetic, score pieces, cheap scores == eager CLIP / LLM attention, stage-V
invariants on a deep tiny CLIP, per-image schedules in batches, LLaVA-NeXT layout and stage L."""
from __future__ import annotations

import math

import pytest
import torch

from pruning_support import deep_llava, deep_llava_engine, requests
from vlmguard.attention import ScoreRequest, score_probe
from vlmguard.engine import Engine, Request
from vlmguard.pruning import flowcut_vision, make_pruner
from vlmguard.pruning.base import PruneContext
from vlmguard.pruning.flowcut import stage_l_scores
from vlmguard.pruning.flowcut_vision import layer_scores, prune_count, run_stage_v, selected_layer
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine, tiny_llava_next, tiny_qwen2_vl


def test_prune_count_schedule():
    n, k = 576, 64
    uniform = torch.full((n,), 1.0 / n)
    for rem in (20, 10, 2):
        assert prune_count(uniform, n, k, rem) == 0  # rho = 1: no pruning
    onehot = torch.zeros(n)
    onehot[3] = 1.0
    for rem, p in ((20, 114), (16, 128), (10, 162), (6, 209), (2, 362)):
        assert prune_count(onehot, n, k, rem) == p == round((n - k) / math.sqrt(rem))
    assert prune_count(uniform, n, k, 0) == n - k  # forced final cut
    assert prune_count(uniform, 40, 64, 4) == 0  # already at/below target
    a = torch.softmax(torch.randn(n) * 3, 0)
    for rem in (20, 8, 2):
        assert 0 <= prune_count(a, n, k, rem) <= n - k


def test_score_pieces():
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 9, 8
    probs = torch.softmax(torch.randn(b, h, 1, n + 1), -1)
    values = torch.randn(b, h, n + 1, d)
    valid = torch.ones(b, n + 1, dtype=torch.bool)
    valid[1, 7:] = False  # a padded image
    probs[1, :, :, 7:] = 0
    a, s = layer_scores(probs, values, valid)
    assert torch.allclose(a.sum(1), torch.ones(2))
    assert (s >= 0).all() and (s[1, 6:] == 0).all() and (a[1, 6:] == 0).all()
    # the semantic term: raw v_cls . v_j softmax over current tokens incl. CLS, head mean, drop CLS, renorm
    sem = torch.softmax(torch.einsum("hd,hkd->hk", values[0, :, 0], values[0]), -1).mean(0)[1:]
    sem = sem / sem.sum()
    dens = values[0].mean(0)[1:].abs().sum(-1)
    assert torch.allclose(s[0], (a[0] + sem) * dens, atol=1e-6)


def _layer_scores_stepwise(probs, values, valid):
    """FlowCut's layer scores one term at a time (layer_scores stacks a and s to save small ops)."""
    def on_patches(x):
        return x if valid is None else x * valid[:, 1:]

    a = on_patches(probs[:, :, 0].mean(dim=1)[:, 1:])
    a = a / a.sum(dim=1, keepdim=True).clamp(min=1e-30)
    logits = torch.einsum("bhd,bhkd->bhk", values[:, :, 0], values)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    s = on_patches(torch.softmax(logits, dim=-1).mean(dim=1)[:, 1:])
    s = s / s.sum(dim=1, keepdim=True).clamp(min=1e-30)
    dens = on_patches(values.mean(dim=1)[:, 1:].abs().sum(dim=-1))
    return a, (a + s) * dens


def test_layer_scores_equal_the_stepwise_formula_bit_for_bit():
    torch.manual_seed(1)
    for b, h, n, d, padded in ((1, 1, 576, 64, False), (3, 4, 50, 16, False), (3, 4, 50, 16, True),
                               (2, 1, 30, 8, True)):
        probs = torch.softmax(torch.randn(b, h, 1, n + 1) * 2, -1)
        values = torch.randn(b, h, n + 1, d)
        valid = None
        if padded:
            valid = torch.ones(b, n + 1, dtype=torch.bool)
            valid[-1, n // 2:] = False
            probs = probs * valid[:, None, None, :]
        a, s = layer_scores(probs, values, valid)
        a_ref, s_ref = _layer_scores_stepwise(probs, values, valid)
        assert torch.equal(a, a_ref) and torch.equal(s, s_ref), (b, h, n, d, padded)


def test_cheap_vit_scores_equal_eager_clip_attention():
    model, proc = deep_llava(attn="eager")
    Engine(model, proc, attn_implementation="vlmguard_sdpa")  # registers the vlmguard attention functions
    model.set_attn_implementation("vlmguard_sdpa")
    tower = model.model.vision_tower
    imgs = [random_image(5, (48, 48)), random_image(6, (60, 40))]
    pv = proc.image_processor(imgs, return_tensors="pt")["pixel_values"]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tower(pv, output_attentions=True, output_hidden_states=True)
    model.set_attn_implementation("vlmguard_sdpa")
    valid = torch.ones(2, ref.hidden_states[0].shape[1], dtype=torch.bool)
    for i, layer in enumerate(tower.encoder.layers[:7]):
        h_in = ref.hidden_states[i]
        req = ScoreRequest(query_index=torch.zeros(2, 1, dtype=torch.long), key_mask=valid, query_pos=None,
                           per_head=True, want_values=True)
        with torch.no_grad(), score_probe(layer.self_attn, req):
            layer(h_in, None)
        eager_probs = ref.attentions[i][:, :, :1].float()
        assert (req.probs - eager_probs).abs().max().item() < 1e-5
        with torch.no_grad():
            v = layer.self_attn.v_proj(layer.layer_norm1(h_in)).view(2, -1, 4, 8).transpose(1, 2)
        a, s = layer_scores(req.probs, req.values, valid)
        a_ref, s_ref = layer_scores(eager_probs, v, valid)
        assert (a - a_ref).abs().max().item() < 1e-5 and (s - s_ref).abs().max().item() < 1e-5


def test_stage_v_invariants_on_a_deep_tower():
    eng = deep_llava_engine()
    tower = eng.model.model.vision_tower
    last = selected_layer(tower, -2)
    assert last == 6  # 8 layers, hidden_states[-2] = output of encoder layer 6; prune after 1, 3, 5
    imgs = [random_image(s, (48, 48)) for s in range(4)]
    pv = eng.processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
    for k in (1, 5, 12, 35):
        res = run_stage_v(tower, pv, [k] * 4, list(range(4)), last)
        for i in range(4):
            counts = res.tokens_per_layer[i]
            assert counts[0] == 37 and all(b <= a for a, b in zip(counts, counts[1:]))
            drops = [li for li in range(1, len(counts)) if counts[li] < counts[li - 1]]
            assert all(li - 1 in (1, 3, 5) for li in drops)  # cuts only after odd layers l <= f
            assert counts[-1] == k + 1 and min(counts) >= k + 1  # CLS + K after the forced cut at l = 5
            assert res.features[i].shape[0] == k + 1
            kept = res.kept[i].tolist()
            assert kept == sorted(set(kept)) and len(kept) == k and all(0 <= j < 36 for j in kept)
        # at least one progressive (non-forced) event happened somewhere for small budgets
        if k <= 5:
            assert any(ev[0] in (1, 3) for evs in res.events for ev in evs)


def test_stage_v_batch_invariance_and_reference_coupling():
    eng = deep_llava_engine()
    tower = eng.model.model.vision_tower
    imgs = [random_image(s, (48, 48)) for s in range(10, 14)]
    pv = eng.processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
    batched = run_stage_v(tower, pv, [6] * 4, list(range(4)), 6)
    for i in range(4):
        alone = run_stage_v(tower, pv[i:i + 1], [6], [0], 6)
        assert torch.equal(alone.kept[0], batched.kept[i])
        assert alone.tokens_per_layer[0] == batched.tokens_per_layer[i]
        assert (alone.features[0] - batched.features[i]).abs().max().item() < 1e-5
    coupled = run_stage_v(tower, pv, [6] * 4, [0] * 4, 6)
    # shared (max) prune count: every image follows the same token-count trajectory
    assert len({tuple(c) for c in coupled.tokens_per_layer}) == 1
    assert all(len(k) == 6 for k in coupled.kept)


def test_end_to_end_llava_budget_and_positions():
    eng = deep_llava_engine()
    reqs = [Request("Is there a dog in the image?", [random_image(s, (48, 48))]) for s in (1, 2)]
    res = eng.generate(reqs, GenerationSpec(pruning="flowcut", budget=7, max_new_tokens=3))
    for r in res:
        assert r.visual_tokens == 36 and r.visual_tokens_kept == [7] * 4 and len(r.kept_indices) == 7
        assert r.pruning["flowcut_vit_tokens_per_layer"]
    single = [eng.generate([q], GenerationSpec(pruning="flowcut", budget=7, max_new_tokens=3))[0] for q in reqs]
    assert [r.kept_indices for r in res] == [r.kept_indices for r in single]
    assert [r.token_ids for r in res] == [r.token_ids for r in single]


def test_next_layout_and_final_count():
    eng = tiny_engine("llava_next")
    reqs = requests()
    base = eng.generate(reqs, GenerationSpec(max_new_tokens=1))
    for k in (4, 10, 30):
        res = eng.generate(reqs, GenerationSpec(pruning="flowcut", budget=k, max_new_tokens=1))
        for b, r in zip(base, res):
            span = r.visual_tokens_kept[0]  # after stage V: floor(K/2) per crop, mapped to the layout
            assert r.visual_tokens_kept[-1] == min(k, span)
            assert r.prompt_tokens == b.prompt_tokens and r.visual_tokens == b.visual_tokens
    # the stage-V features land on the packed anyres slots of the same patches: compare with the vanilla
    # packed features at those slots when nothing is pruned inside the ViT (K/2 >= 16 patches per crop)
    res = eng.generate(reqs[:1], GenerationSpec(pruning="flowcut", budget=40, max_new_tokens=1))[0]
    n_crops = eng.adapter.encode([eng._prompts(reqs[:1])[0]]).vision_inputs["pixel_values"].shape[1]
    assert res.visual_tokens_kept[0] <= n_crops * 16
    batch = eng.adapter.encode(eng._prompts(reqs[:1]))
    full = eng.adapter.image_features(batch)[0]
    for k in (34, 40):  # floor(K/2) >= 16: stage V keeps every patch, so its features sit on the vanilla slots
        ctx = PruneContext(adapter=eng.adapter, batch=batch, main_rows=[0], n_visual=[full.shape[0]])
        with torch.no_grad():
            feats, kept = make_pruner("flowcut", k, {}).prune_images(ctx)
        assert kept[0].tolist() == sorted(set(kept[0].tolist())) and len(kept[0]) < full.shape[0]  # no newlines
        assert torch.equal(feats[0], full[kept[0]])
    # newline slots (multi-crop) are never kept
    newline = eng.model.model.image_newline
    is_newline = torch.isclose(full, newline[None].to(full.dtype), atol=1e-6).all(-1)
    assert not any(bool(is_newline[i]) for i in res.kept_indices)


def test_stage_l_cheap_equals_eager():
    for builder in (tiny_llava_next, tiny_qwen2_vl):
        model, proc = builder(attn="eager")
        eng = Engine(model, proc, attn_implementation="vlmguard_sdpa")
        model.set_attn_implementation("vlmguard_sdpa")
        prompts = eng._prompts(requests()[:2])

        def rows(seq):
            return torch.full((seq.batch_size, 1), seq.length - 1)

        got = eng.probe_forward(prompts, score_layers=[1], query_rows=rows, per_head=True, hidden_layers=())
        batch = eng.adapter.encode(prompts)
        # values of layer 1 from its own v_proj on the eager hidden states
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                        output_attentions=True, output_hidden_states=True, **batch.vision_inputs)
            layer = eng.adapter.layers[1]
            x = layer.input_layernorm(out.hidden_states[1])
            v = layer.self_attn.v_proj(x).view(x.shape[0], x.shape[1], -1, layer.self_attn.head_dim).transpose(1, 2)
        model.set_attn_implementation("vlmguard_sdpa")
        # the cheap path's values through a real probe
        seq = got["seq"]
        req = ScoreRequest(query_index=rows(seq), key_mask=seq.valid, query_pos=rows(seq), per_head=True,
                           want_values=True)
        with torch.no_grad(), score_probe(eng.adapter.attention_module(1), req):
            eng.runner.prefill(seq)
        for r in range(2):
            pos = batch.image_token_mask[r].nonzero().squeeze(1)
            ours = stage_l_scores(req.probs[r, :, 0], req.values[r], pos, seq.length - 1)
            ref = stage_l_scores(out.attentions[1][r, :, -1].float(), v[r], pos, seq.length - 1)
            assert (ours - ref).abs().max().item() < 1e-5
            assert (got["scores"][1][r] - out.attentions[1][r, :, -1:].float()).abs().max().item() < 1e-5


def test_stage_l_scores_follow_the_spec_with_gqa():
    """r = mean_h softmax_vis(q_t k / sqrt(d)), u = mean_h softmax_vis(v_t v / sqrt(d)), d = ||mean_h v||_1 with
    the repeated (GQA) heads, from the facility's softmax over all keys; values given per kv head or repeated."""
    torch.manual_seed(3)
    h, hkv, n, d, t = 8, 2, 30, 16, 29
    q, k, v = torch.randn(h, d), torch.randn(hkv, n, d), torch.randn(hkv, n, d)
    kr, vr = k.repeat_interleave(h // hkv, 0), v.repeat_interleave(h // hkv, 0)
    probs = torch.softmax(torch.einsum("hd,hkd->hk", q, kr) / math.sqrt(d), -1)  # over all keys (text too)
    vis = torch.arange(5, 25)
    r = torch.softmax(torch.einsum("hd,hkd->hk", q, kr[:, vis]) / math.sqrt(d), -1).mean(0)
    u = torch.softmax(torch.einsum("hd,hkd->hk", vr[:, t], vr[:, vis]) / math.sqrt(d), -1).mean(0)
    want = (r + u) * vr[:, vis].mean(0).abs().sum(-1)
    for values in (v, vr):
        assert torch.allclose(stage_l_scores(probs, values, vis, t), want, atol=1e-6)


def replay_clip_stage_v(tower, pv, k: int, last: int, history: float = 0.5, every: int = 2):
    """The spec's stage V (section 1.1) for one image, recomputed from each CLIP layer's own modules (eager
    q/k/v of layer_norm1(h), v with its bias): a, s, d, S, the running score at every layer while N > K, the
    cut after layer l when f - l is a multiple of ``every`` (f = last - 1; forced to K at l = f), top-M by C
    in raster order, CLS kept at slot 0. Returns (hidden states of layer ``last``, kept, tokens per layer,
    events)."""
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pv))
        orig, run, per_layer, events = torch.arange(h.shape[1] - 1), None, [], []
        for li in range(last + 1):
            layer = tower.encoder.layers[li]
            per_layer.append(h.shape[1])
            n = h.shape[1] - 1
            scored = n > k
            if scored:
                x, att = layer.layer_norm1(h), layer.self_attn
                heads, hd = att.num_heads, att.head_dim
                q, kk, v = (proj(x).view(1, -1, heads, hd).transpose(1, 2)[0]
                            for proj in (att.q_proj, att.k_proj, att.v_proj))
                a = torch.softmax(q[:, :1] @ kk.transpose(-1, -2) / math.sqrt(hd), -1)[:, 0].mean(0)[1:]
                a = a / a.sum()
                s = torch.softmax(v[:, :1] @ v.transpose(-1, -2), -1)[:, 0].mean(0)[1:]  # raw v_cls . v_j
                s = s / s.sum()
                score = (a + s) * v.mean(0)[1:].abs().sum(-1)
                run = score if run is None else history * run + (1 - history) * score
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            rem = last - 1 - li
            if not scored or rem < 0 or rem % every:
                continue
            if rem == 0:
                m = k
            else:
                rho = float(-(a * a.log()).sum()) / math.log(n)
                m = max(n - round((n - k) / math.sqrt(rem) * (1 - rho * rho)), k)
            if m == n:
                continue
            idx = torch.argsort(-run, stable=True)[:m].sort().values
            h, run, orig = torch.cat([h[:, :1], h[:, 1 + idx]], 1), run[idx], orig[idx]
            events.append((li, m))
    return h[0], orig, per_layer, events


@pytest.mark.parametrize("history,every", [(0.5, 2), (0.8, 2), (0.2, 3)])
def test_stage_v_equals_an_independent_replay_of_the_spec(history, every):
    """Kept patches, token counts, cut events and the selected layer's hidden states (CLS first) equal the
    spec's recipe replayed with eager attention from the layers' own modules, for several budgets, the running
    score's weight and the prune frequency (both parameters)."""
    model, proc = deep_llava(attn="eager")
    Engine(model, proc, attn_implementation="vlmguard_sdpa")  # registers the vlmguard attention functions
    tower = model.model.vision_tower
    progressive = 0
    for seed in range(3):
        pv = proc.image_processor([random_image(seed, (48, 48))], return_tensors="pt")["pixel_values"]
        for k in (1, 6, 30):
            model.set_attn_implementation("vlmguard_sdpa")
            res = run_stage_v(tower, pv, [k], [0], 6, history=history, every=every)
            model.set_attn_implementation("eager")
            feats, kept, per_layer, events = replay_clip_stage_v(tower, pv, k, 6, history, every)
            assert res.kept[0].tolist() == kept.tolist()
            assert res.tokens_per_layer[0] == per_layer and res.events[0] == events
            assert (res.features[0] - feats).abs().max().item() < 1e-4
            progressive += sum(li < 5 for li, _ in events)
    assert progressive  # cuts before the forced one were checked too


def test_a_constant_layer_score_is_the_running_score(monkeypatch):
    """Invariant 6.5: if every layer gives the same S, the running score C equals that S. Before the first cut
    a slot is a patch, so the schedule is held to the forced cut (P = 0 at L > 0) and every scored layer
    (l = 0..5) returns the same S per patch; C, reported per patch, must be S, and the kept set its top K."""
    eng = deep_llava_engine()
    tower = eng.model.model.vision_tower
    pv = eng.processor.image_processor([random_image(4, (48, 48))], return_tensors="pt")["pixel_values"]
    fixed = torch.rand(36, generator=torch.Generator().manual_seed(0)) + 0.1
    real = flowcut_vision.layer_scores
    calls = []

    def constant(probs, values, valid):
        a, s = real(probs, values, valid)
        calls.append(s.shape)
        return a, fixed[None, : s.shape[1]].expand_as(s).clone()

    monkeypatch.setattr(flowcut_vision, "layer_scores", constant)
    monkeypatch.setattr(flowcut_vision, "prune_count", lambda a, n, target, remaining: 0 if remaining else n - target)
    res = run_stage_v(tower, pv, [5], [0], 6)
    assert len(calls) == 6 and res.events == [[(5, 5)]]
    assert torch.allclose(res.scores[0], fixed, atol=1e-6)
    assert res.kept[0].tolist() == sorted(torch.argsort(-fixed, stable=True)[:5].tolist())


def test_uniform_cls_attention_only_makes_the_forced_cut():
    """Invariant 6.4 end to end: with q = 0 the CLS row is uniform (rho = 1), so P = 0 at every L > 0 and the
    only cut is the forced one after layer f = 5, straight to K."""
    model, proc = deep_llava()
    Engine(model, proc, attn_implementation="vlmguard_sdpa")
    model.set_attn_implementation("vlmguard_sdpa")
    tower = model.model.vision_tower
    with torch.no_grad():
        for layer in tower.encoder.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.q_proj.bias.zero_()
    pv = proc.image_processor([random_image(s, (48, 48)) for s in range(2)], return_tensors="pt")["pixel_values"]
    for k in (1, 9):
        res = run_stage_v(tower, pv, [k, k], [0, 1], 6)
        assert res.events == [[(5, k)], [(5, k)]]
        assert res.tokens_per_layer == [[37] * 6 + [k + 1]] * 2


def test_next_row_whose_budget_covers_its_span_is_untouched_in_a_batch():
    """A LLaVA-NeXT row whose budget K covers all its visual tokens takes the unpruned path alone; batched with
    a row that is cut, its crops must not go through stage V's floor(K/2) per crop (it kept 12 of 24)."""
    eng = tiny_engine("llava_next")
    small = Request("Is there a dog in the image?", [random_image(1, (10, 100))])
    n_small = int(eng.adapter.encode(eng._prompts([small])).image_token_mask.sum())
    assert n_small // 2 < 16  # floor(K/2) per crop would cut the 16-patch crops
    reqs = [small, Request("describe the photo", [random_image(2, (64, 40))])]
    spec = GenerationSpec(pruning="flowcut", budget=n_small, max_new_tokens=3)
    batched = eng.generate(reqs, spec)
    alone = [eng.generate([r], spec)[0] for r in reqs]
    assert alone[0].visual_tokens_kept[0] == n_small and alone[0].kept_indices == list(range(n_small))
    assert batched[1].visual_tokens_kept[-1] == n_small < batched[1].visual_tokens  # the other row is cut
    for b, a in zip(batched, alone):
        assert b.visual_tokens_kept == a.visual_tokens_kept and b.kept_indices == a.kept_indices
        assert b.token_ids == a.token_ids
        assert [s.main_prob for s in b.steps] == pytest.approx([s.main_prob for s in a.steps], abs=1e-6)
