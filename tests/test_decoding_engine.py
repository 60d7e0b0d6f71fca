"""The decoding methods inside the engine, on tiny random models (offline, CPU).

Invariants from the specs: strength 0 reproduces plain decoding token for token (greedy and seeded
sampling); identical branches are a no-op; batched == one by one; every branch decodes from its own cache
(its logits equal a cache-free recompute of that branch alone — the regression test for VCD's pre-c637c85
cache-sharing bug); VISTA's hooks leave the model untouched; diagnostics are filled.
"""
from __future__ import annotations

import pytest
import torch

from pruning_support import count_tower_images
from vlmguard.decoding import DECODERS, make_decoder
from vlmguard.decoding.base import DecodeContext
from vlmguard.decoding.views import image_free_prompt
from vlmguard.engine import Request
from vlmguard.models.base import Prompt
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

METHODS = ["vcd", "m3id", "vista", "iava", "lqcd"]
ZERO = {
    "vcd": {"alpha": 0.0, "beta": 0.0},
    "m3id": {"lam": 0.0},
    "vista": {"vsv_lambda": 0.0, "sla_alpha": 0.0},
    "iava": {"alpha": 0.0, "beta": 0.0, "fallback_rule": "avisc"},
    "lqcd": {"alpha": 0.0, "beta": 0.0},
}
# strong settings so that the methods visibly act on the tiny random models
STRONG = {
    "vcd": {"alpha": 2.0, "beta": 0.0},
    "m3id": {"lam": 0.5, "gate": False},
    "vista": {"vsv_lambda": 0.5, "sla_alpha": 0.5},
    "iava": {"alpha": 2.0, "beta": 0.0, "fallback_rule": "avisc", "lam": 0.5},
    "lqcd": {"alpha": 2.0, "beta": 0.0},
}


def reqs() -> list[Request]:
    return [
        Request("Is there a dog in the image?", [random_image(1, (40, 32))]),
        Request("describe the photo", [random_image(2, (64, 40))]),
        Request("what color is the car", [random_image(3, (32, 64))]),
    ]


def run(eng, requests, decoding, params=None, **kw):
    spec = GenerationSpec(decoding=decoding, decoding_params=params or {}, max_new_tokens=kw.pop("n", 6), **kw)
    return eng.generate(requests, spec)


def ids(results):
    return [r.token_ids for r in results]


@pytest.mark.parametrize("method", METHODS)
def test_strength_zero_reproduces_plain_greedy(method):
    eng = tiny_engine("llava")
    r = reqs()
    assert ids(run(eng, r, method, ZERO[method])) == ids(run(eng, r, "greedy"))


@pytest.mark.parametrize("method", ["vcd", "m3id", "lqcd"])
def test_strength_zero_reproduces_plain_sampling(method):
    eng = tiny_engine("llava")
    r = reqs()[:2]
    kw = dict(do_sample=True, temperature=1.0, seed=123, n=8)
    assert ids(run(eng, r, method, ZERO[method], **kw)) == ids(run(eng, r, "sample", **kw))


@pytest.mark.parametrize("method", METHODS)
def test_methods_act_and_report_diagnostics(method):
    eng = tiny_engine("llava")
    r = reqs()
    res = run(eng, r, method, STRONG[method], n=8)
    assert ids(res) != ids(run(eng, r, "greedy", n=8))  # the method changes some choice
    for out in res:
        assert out.decoding["name"] == method and len(out.steps) == len(out.token_ids)
        assert all(0.0 <= s.main_prob <= 1.0 and s.contrast_prob is not None for s in out.steps)
        assert any(s.main_top_id != s.token_id for o in res for s in o.steps)
    # sampling works too
    out = run(eng, r[:1], method, STRONG[method], do_sample=True, seed=5, top_p=0.9)
    assert len(out[0].token_ids) > 0


@pytest.mark.parametrize("method", ["vcd", "m3id"])  # the others: test_batch_with_requests_leaving_early
def test_batched_equals_one_by_one(method):
    eng = tiny_engine("llava")
    r = reqs()
    batched = run(eng, r, method, STRONG[method])
    single = [run(eng, [x], method, STRONG[method])[0] for x in r]
    assert ids(batched) == ids(single)


@pytest.mark.parametrize("method", ["vista", "lqcd", "iava"])
def test_batch_with_requests_leaving_early(method):
    """Finished requests leave the batch: per-request state (hooks, coefficients) must follow the rows."""
    eng = tiny_engine("llava")
    r = reqs()
    texts = [o.text for o in run(eng, r, method, STRONG[method], n=8)]
    stop, early = None, None
    for i, t in enumerate(texts):  # a short prefix of one request's text that no other text contains
        for k in range(2, len(t) + 1):
            cand = t[:k].strip()
            if cand and all(cand not in u for j, u in enumerate(texts) if j != i):
                stop, early = cand, i
                break
        if stop:
            break
    assert stop is not None, texts
    batched = run(eng, r, method, STRONG[method], n=8, stop=[stop])
    single = [run(eng, [x], method, STRONG[method], n=8, stop=[stop])[0] for x in r]
    assert ids(batched) == ids(single)
    assert len(batched[early].token_ids) < max(len(b.token_ids) for b in batched)


def test_identical_branches_are_a_no_op(monkeypatch, caplog):
    import vlmguard.decoding.iava as iava

    eng = tiny_engine("llava")
    r = reqs()
    plain = ids(run(eng, r, "greedy"))
    # LQCD with the oracle neutral text equal to the user's text: expert == amateur
    same = run(eng, r, "lqcd", {"alpha": 3.0, "beta": 0.0, "neutral_text": [x.prompt for x in r]})
    assert ids(same) == plain and [x.decoding["modes"] for x in same] == [["leading"]] * 3
    # IAVA whose "irrelevant" set U is every image token: the negative view equals the original, so a strong
    # contrast decodes as greedy does
    monkeypatch.setattr(iava, "irrelevant_tokens", lambda a_q, *_: torch.ones_like(a_q, dtype=torch.bool))
    with caplog.at_level("WARNING", logger="vlmguard.decoding.iava"):
        res = run(eng, r, "iava", {"alpha": 3.0, "beta": 0.0})
    assert [x.decoding["applied"] for x in res] == [[True]] * 3 and ids(res) == plain
    assert sum("every image token is irrelevant" in m for m in caplog.messages) == 3  # iava.md 10: a warning
    dec = make_decoder("iava", {})
    dec.keep_sets = [torch.ones(4, dtype=torch.bool)]
    f = torch.randn(4, 8)
    assert torch.equal(dec._masker(0)(f), f)


def test_iava_runs_no_rows_it_does_not_use(monkeypatch):
    """No contrast rows for a group where no request has an irrelevant set (text-only requests here), and no
    generic-instruction probe rows for rule R4, which reads the query's attention only."""
    eng = tiny_engine("llava")
    text_only = [Request("what color is the car", []), Request("describe the photo", [])]
    widths = []
    forward = type(eng.runner).decode_step

    def spy(self, *args, **kw):
        widths.append(args[0].shape[0])  # the step's rows: one per request and branch
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(eng.runner), "decode_step", spy)
    res = run(eng, text_only, "iava", STRONG["iava"])
    assert ids(res) == ids(run(eng, text_only, "greedy")) and set(widths) == {2}
    widths.clear()
    run(eng, reqs()[:2], "iava", STRONG["iava"])
    assert set(widths) == {4}  # with images: the main rows and their contrast rows
    probed = []
    probe = eng.probe_forward
    monkeypatch.setattr(eng, "probe_forward", lambda prompts, **kw: probed.append(len(prompts)) or probe(prompts, **kw))
    for rule, rows in (("R1", 4), ("R4", 2)):
        probed.clear()
        run(eng, reqs()[:2], "iava", {"selection_rule": rule})
        assert probed == [rows], rule


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_iava_decodes_its_query_rows_from_the_pre_pass_cache(family, monkeypatch):
    """iava.md step 1: the query prefill's cache is the one decoding continues from. Without pruning, the
    request's own prefill runs only the irrelevant-token rows (one per request), and the answers, log-probabilities
    and figures equal those of prefilling the query rows again (``Engine.reuse_probe_prefill = False``): greedy and
    seeded sampling, a text-only request beside them, the prefix-shared pre-pass and the row-by-row one."""
    eng = tiny_engine(family)
    img = random_image(5, (48, 40))
    batch = [Request("Is there a dog in the image?", [img]), Request("what color is the car", []),
             Request("describe the photo", [random_image(6, (40, 56))]), Request("Is there a cat in the image?", [img])]
    prefilled = []
    prefill = type(eng.runner).prefill

    def spy(self, seq, *args, **kw):
        prefilled.append(seq.batch_size)
        return prefill(self, seq, *args, **kw)

    monkeypatch.setattr(type(eng.runner), "prefill", spy)
    params = {**STRONG["iava"], "lam": 0.3}
    for share in (True, False):
        eng.share_prefixes = share
        for sampling in ({}, {"do_sample": True, "seed": 3}):
            out = {}
            for reuse in (True, False):
                eng.reuse_probe_prefill = reuse
                prefilled.clear()
                out[reuse] = run(eng, batch, "iava", params, n=6, logprobs=2, **sampling)
                # the pre-pass (4 query rows, 3 generic ones) runs unshared through prefill; then the request's own
                assert prefilled[-1] == (4 if reuse else 8), (share, reuse, prefilled)
            reused, again = out[True], out[False]
            assert [r.decoding["applied"] for r in reused] == [[True], [False], [True], [True]]
            assert ids(reused) == ids(again), (share, sampling)
            for a, b in zip(reused, again):
                assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-5)
                assert (a.timings.prefill_tokens, a.prompt_tokens, a.visual_tokens_kept, a.kept_indices,
                        a.prefill_flops) == (b.timings.prefill_tokens, b.prompt_tokens, b.visual_tokens_kept,
                                             b.kept_indices, b.prefill_flops)
    eng.share_prefixes = eng.reuse_probe_prefill = True
    pruned = run(eng, batch[:1], "iava", params, pruning="random", budget=4)  # a pruned main row: prefilled anew
    assert pruned[0].decoding["applied"] == [True] and prefilled[-1] == 2


def test_lqcd_leading_query_decodes_from_neutral_expert():
    eng = tiny_engine("llava")
    img = random_image(4, (40, 32))
    leading = Request("Is there a dog in the image? It seems like there isn't.", [img])
    neutral = Request("Is there a dog in the image?", [img])
    out = run(eng, [leading], "lqcd", ZERO["lqcd"])[0]
    assert out.decoding["modes"] == ["leading"] and out.decoding["neutral_text"] == [neutral.prompt]
    assert out.token_ids == run(eng, [neutral], "greedy")[0].token_ids  # alpha 0: plain on x_n
    mixed = run(eng, [leading, neutral, Request("describe the photo", [img])], "lqcd", STRONG["lqcd"])
    assert [x.decoding["modes"] for x in mixed] == [["leading"], ["symmetric"], ["expectation"]]
    text_only = run(eng, [Request("Is there a dog in the image?", [])], "lqcd", STRONG["lqcd"])[0]
    assert [x.decoding["image"] for x in mixed] == [[True]] * 3 and text_only.decoding["image"] == [False]
    assert text_only.decoding["modes"] == ["symmetric"]  # a text-only request runs too, flagged (lqcd.md 10)
    single = [run(eng, [x], "lqcd", STRONG["lqcd"])[0] for x in (leading, neutral)]
    assert ids(mixed[:2]) == ids(single)


def test_lqcd_cue_strength_scales_alpha_with_rules_and_with_an_oracle_neutral_text():
    """sigma scales alpha (alpha_eff = alpha (1 + gamma sigma)) on both paths of a leading query: the rules'
    stripped cue (here without its final period, the paper's example), and an oracle neutral_text, where sigma
    is the strength of the cue the rules find in the user's text (it used to be 0: gamma did nothing)."""
    eng = tiny_engine("llava")
    img = random_image(4, (40, 32))
    leading = Request("Is there a dog in the image? It seems like there isn't", [img])
    gamma = {"alpha": 1.0, "sentiment_gamma": 2.0}
    rules = run(eng, [leading], "lqcd", gamma)[0]
    oracle = run(eng, [leading], "lqcd", {**gamma, "neutral_text": "Is there a dog in the image?"})[0]
    for out in (rules, oracle):
        assert out.decoding["modes"] == ["leading"] and out.decoding["cue_strength"] == [0.5]
    # the same scores both ways, and they are alpha_eff = 2's, not the plain alpha 1's
    two, one = (run(eng, [leading], "lqcd", {"alpha": a, "neutral_text": "Is there a dog in the image?"})[0]
                for a in (2.0, 1.0))
    scores = lambda r: torch.tensor([st.score for st in r.steps])  # noqa: E731
    assert rules.token_ids == oracle.token_ids == two.token_ids
    assert torch.allclose(scores(rules), scores(two), atol=1e-5) and torch.allclose(scores(oracle), scores(two), atol=1e-5)
    assert not torch.allclose(scores(oracle), scores(one), atol=1e-3)
    assert one.decoding["cue_strength"] == [0.5]  # reported whether or not gamma uses it


def test_no_image_requests_decode_plainly():
    eng = tiny_engine("llava")
    r = [Request("what color is the car"), reqs()[0]]
    plain = run(eng, r[:1], "greedy")
    for method in ("vcd", "m3id", "iava", "vista"):
        out = run(eng, r, method, STRONG[method])
        assert out[0].decoding["applied"][0] is False
        if method != "vista":  # VISTA's SLA still applies to text-only requests (vista.md 10)
            assert out[0].token_ids == plain[0].token_ids
    # a batch of text-only requests runs no extra rows for VCD / M3ID (m3id.md: skip the second branch)
    rows = []
    real_encode = eng.adapter.encode
    eng.adapter.encode = lambda prompts: (rows.append(len(prompts)), real_encode(prompts))[1]
    try:
        for method in ("vcd", "m3id"):
            rows.clear()
            out = run(eng, r[:1] * 2, method, STRONG[method])
            assert rows == [2] and ids(out) == ids(plain) * 2, (method, rows)
    finally:
        del eng.adapter.encode  # the class's method again (the engine is shared with other tests)
    # VISTA's steering hooks skip the text-only row of a mixed batch: it decodes as it does alone (SLA only)
    alone = run(eng, r[:1], "vista", STRONG["vista"])
    mixed = run(eng, r, "vista", STRONG["vista"])
    assert mixed[0].token_ids == alone[0].token_ids


def test_vista_steers_the_image_rows_of_a_mixed_batch_and_leaves_text_only_rows_bit_for_bit():
    """The residual stream entering layer 1 in the prefill of a mixed batch: under VISTA the text-only row
    equals greedy's exactly (its MLP output is not rotated, not even by a zero vector), the image row differs."""
    eng = tiny_engine("llava")
    r = [Request("what color is the car"), reqs()[0]]
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] > 1:  # a prefill (VISTA's pre-pass comes first, the batch's own prefill last)
            seen.append(h.detach().clone())

    handle = eng.adapter.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(eng, r, "greedy", n=1)
        plain = seen[-1]
        run(eng, r, "vista", STRONG["vista"], n=1)
        steered = seen[-1]
    finally:
        handle.remove()
    assert plain.shape == steered.shape
    assert torch.equal(steered[0], plain[0]) and not torch.equal(steered[1], plain[1])


# ---- separate caches per branch -------------------------------------------------------------------
def recompute_last_logits(eng, prompt: Prompt, transform, tokens: list[int], pixel_transform=None) -> torch.Tensor:
    """Cache-free: one full forward of (branch prompt + generated tokens) through the HF model."""
    from vlmguard.engine import transform_pixels

    ad = eng.adapter
    batch = ad.encode([prompt])
    if pixel_transform is not None:
        transform_pixels(ad, batch, [pixel_transform])
    feats = ad.image_features(batch)
    if transform is not None:
        feats = [None if f is None else transform(f) for f in feats]
    seq = ad.build_sequence(batch, feats, eng.model.dtype, eng.device)
    emb = torch.cat([seq.hidden, ad.embed_tokens(torch.tensor([tokens], dtype=torch.long))], dim=1)
    with torch.no_grad():
        out = eng.model(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long))
    return out.logits[0, -1].float()


@pytest.mark.parametrize("method,params,branch", [
    ("vcd", {}, "distorted"),
    ("m3id", {"gate": False}, "uncond"),
    ("m3id", {"uncond_mode": "mask"}, "uncond"),
    ("iava", {"fallback_rule": "avisc"}, "irrelevant"),
    ("lqcd", {}, "lq1"),
])
def test_branch_logits_equal_cache_free_recompute(monkeypatch, method, params, branch):
    eng = tiny_engine("llava")
    cls = DECODERS.get(method)
    seen: list[dict[str, torch.Tensor]] = []
    original = cls.combine

    def spy(self, step):
        seen.append({k: v.clone() for k, v in step.logits.items()})
        return original(self, step)

    monkeypatch.setattr(cls, "combine", spy)
    req = reqs()[0]
    out = run(eng, [req], method, params, n=6)[0]
    prompt = Prompt(req.prompt, req.images)
    dec = make_decoder(method, params)
    ctx = DecodeContext(adapter=eng.adapter, prompts=[prompt], probe_forward=eng.probe_forward, sampling=False,
                        active=[0])
    dec.setup(ctx)
    try:
        br = {b.name: b for b in dec.branches(ctx, 0, prompt)}[branch]
    finally:
        dec.teardown(ctx)
    for k in (0, 3, 5):
        ref = recompute_last_logits(eng, br.prompt, br.visual_transform, out.token_ids[:k], br.pixel_transform)
        assert torch.allclose(seen[k][branch][0], ref, atol=1e-4), (method, k)
        main_ref = recompute_last_logits(eng, prompt, None, out.token_ids[:k])
        assert torch.allclose(seen[k]["main"][0], main_ref, atol=1e-4)
        # a branch that decoded from the main cache would have produced the main logits instead
        assert not torch.allclose(seen[k][branch][0], seen[k]["main"][0], atol=1e-3)


def unpadded(batch, row: int) -> list[int]:
    return batch.input_ids[row][batch.attention_mask[row]].tolist()


def minus_images(batch, row: int, adapter) -> list[int]:
    ids = batch.input_ids[row][batch.attention_mask[row]]
    return ids[~torch.isin(ids, torch.tensor(adapter.image_placeholder_ids))].tolist()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_image_free_prompt_is_the_prompt_minus_image_tokens(family):
    """m3id.md 5 / test 9, vista.md test 10: the image-free view's ids are the request's ids with the image span
    (Qwen2-VL: with its vision start / end markers) deleted, and it has no pixel values."""
    eng = tiny_engine(family)
    prompt = Prompt("Is there a dog in the image?", [random_image(1)])
    full = eng.adapter.encode([prompt])
    free = eng.adapter.encode([image_free_prompt(eng.adapter, prompt)])
    assert unpadded(free, 0) == minus_images(full, 0, eng.adapter)
    assert not bool(torch.isin(free.input_ids, torch.tensor(eng.adapter.image_placeholder_ids)).any())
    assert not free.vision_inputs and not free.rows_with_images and not bool(free.image_token_mask.any())


def test_image_free_view_is_cut_from_ids_not_retokenized():
    """With a tokenizer that has one token for a space and a newline, the text without its image placeholder
    ("USER: \nIs ...") tokenizes into other tokens than the request had on either side of the image; the image-free
    view keeps the request's own."""
    import copy

    from vlmguard.testing import WORDS, make_tokenizer

    eng = tiny_engine("llava")
    proc = copy.deepcopy(eng.processor)
    proc.tokenizer = make_tokenizer(["<image>"], words=(*WORDS, "\n"))
    adapter = type(eng.adapter)(eng.model, proc)
    prompt = Prompt("Is there a dog in the image?", [random_image(1)])
    full = adapter.encode([prompt])
    retokenized = adapter.encode([Prompt(adapter.format_prompt(prompt).replace("<image>", ""), raw=True)])
    assert unpadded(retokenized, 0) != minus_images(full, 0, adapter)  # the premise: the text route merges
    free = adapter.encode([image_free_prompt(adapter, prompt)])
    assert unpadded(free, 0) == minus_images(full, 0, adapter)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_image_free_rows_join_a_batch_in_place(family):
    """A batch mixing image-free views with requests (an image, text only) gives every row the ids, padding and
    per-token inputs it has alone, and the images stay with their rows."""
    eng = tiny_engine(family)
    ad = eng.adapter
    with_image = Prompt("Is there a dog in the image?", [random_image(1)])
    prompts = [image_free_prompt(ad, with_image), with_image, Prompt("a cat"),
               image_free_prompt(ad, Prompt("what color is the car?", [random_image(2)]))]
    batch = ad.encode(prompts)
    assert batch.rows_with_images == [1]
    for row, prompt in enumerate(prompts):
        alone = ad.encode([prompt])
        assert unpadded(batch, row) == unpadded(alone, 0), row
        assert not bool(batch.attention_mask[row][: batch.input_ids.shape[1] - len(unpadded(alone, 0))].any())
        assert int(batch.image_token_mask[row].sum()) == int(alone.image_token_mask.sum())
    if family == "qwen2_vl":
        mm = batch.vision_inputs["mm_token_type_ids"]
        alone = ad.encode([with_image])
        assert mm[1][batch.attention_mask[1]].tolist() == alone.vision_inputs["mm_token_type_ids"][0].tolist()
        assert not bool(mm[[0, 2, 3]].any())
        assert torch.equal(batch.vision_inputs["image_grid_thw"], alone.vision_inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="without images"):
        ad.encode([Prompt("x", [random_image(1)], raw=True, strip_image_tokens=True)])


# ---- VISTA hooks ----------------------------------------------------------------------------------
def test_vista_hooks_are_removed_and_model_unchanged():
    eng = tiny_engine("llava")
    r = reqs()[:1]
    probe = [Prompt(x.prompt, x.images) for x in r]
    before = eng.probe_forward(probe)["logits"].clone()
    run(eng, r, "vista", STRONG["vista"])
    assert all(not layer.mlp._forward_hooks for layer in eng.adapter.layers)
    assert torch.equal(eng.probe_forward(probe)["logits"], before)


def test_vista_sla_only_when_steering_off():
    eng = tiny_engine("llava")
    r = reqs()
    sla = run(eng, r, "vista", {"vsv_lambda": 0.0, "sla_alpha": 0.6})
    both = run(eng, r, "vista", {"vsv_lambda": 0.5, "sla_alpha": 0.6})
    assert ids(sla) != ids(both) and [x.decoding["applied"] for x in sla] == [[False]] * 3


def test_vista_decode_only_takes_p_plus_from_the_prefill_and_steers_generated_tokens():
    """vsv_decode_only (vista.md 6, not the reference): one pre-pass row per request (P-) instead of two; the
    steering vectors equal the reference mode's (the unsteered prefill is P+); the first token comes from the
    unsteered prefill, the later ones are steered; hooks are removed; batched equals one by one."""
    eng = tiny_engine("llava")
    r = reqs()
    ref_params = {"vsv_lambda": 0.5, "sla_alpha": 0.0}
    only = {**ref_params, "vsv_decode_only": True}
    rows = []
    probe = eng.probe_forward

    def counting(prompts, *a, **k):
        rows.append(len(prompts))
        return probe(prompts, *a, **k)

    eng.probe_forward = counting
    try:
        ref = run(eng, r, "vista", ref_params, n=8)
        dec = run(eng, r, "vista", only, n=8)
    finally:
        del eng.probe_forward  # the shared engine's own method again
    assert rows == [6, 3]  # P+ and P- per request, then P- only
    for a, b in zip(ref, dec):
        for na, nb in zip(a.decoding["vsv_norms"], b.decoding["vsv_norms"]):
            assert nb == pytest.approx(na, abs=1e-3)
    greedy = run(eng, r, "greedy", n=8)
    assert [x.token_ids[0] for x in dec] == [x.token_ids[0] for x in greedy]  # the prompt is not steered
    assert ids(dec) != ids(greedy) and ids(dec) != ids(ref)
    assert all(not layer.mlp._forward_hooks for layer in eng.adapter.layers)
    assert ids(dec) == [run(eng, [x], "vista", only, n=8)[0].token_ids for x in r]


def test_vista_window_logits_come_from_the_steps_own_lm_head_call(monkeypatch):
    """SLA's window runs through the lm_head with the main rows (one read of its weights): every decode step
    after the first hands combine the window's logits, and they equal the separate call's (up to the GEMM's
    rounding); the tokens and probabilities equal those of the unfused path."""
    from vlmguard.decoding.vista import VISTA
    from vlmguard.runner import LayerRunner

    eng = tiny_engine("llava")
    r = reqs()
    seen = []
    combine = VISTA.combine

    def checking(self, step):
        seen.append(step.head is not None)
        if step.head is not None:
            torch.testing.assert_close(step.head, self.window_logits(step.hidden), rtol=1e-5, atol=1e-5)
        return combine(self, step)

    monkeypatch.setattr(VISTA, "combine", checking)
    fused = run(eng, r, "vista", STRONG["vista"], n=6)
    assert seen[0] is False and all(seen[1:]) and len(seen) == 6  # the first step's window: prefill's states
    step = LayerRunner.decode_step
    monkeypatch.setattr(LayerRunner, "decode_step", lambda self, *a, head_input=None, **kw: step(self, *a, **kw))
    seen.clear()
    apart = run(eng, r, "vista", STRONG["vista"], n=6)
    assert not any(seen)
    assert ids(fused) == ids(apart)
    for f, a in zip(fused, apart):
        for sf, sa in zip(f.steps, a.steps):
            assert sf.main_prob == pytest.approx(sa.main_prob, abs=1e-5)
            assert sf.contrast_prob == pytest.approx(sa.contrast_prob, abs=1e-5)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_other_families_batched_equals_single(family):
    eng = tiny_engine(family)
    r = reqs()[:2]
    for method in METHODS:
        batched = run(eng, r, method, STRONG[method], n=4)
        assert batched[0].decoding["applied"][0] or method == "iava", method
        for b, x in zip(batched, r):  # every row, the unpadded one and the left-padded one
            s = run(eng, [x], method, STRONG[method], n=4)[0]
            assert b.token_ids == s.token_ids, method
            assert [st.main_prob for st in b.steps] == pytest.approx([st.main_prob for st in s.steps], abs=1e-5), method


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_vcd_noise_is_on_the_processor_output_at_full_strength(family, monkeypatch):
    """The noise goes onto the processor's output (every crop / patch) in float32, unclamped (vcd.md 4), so
    (noisy - sqrt(ab) clean) / sqrt(1 - ab) is unit noise; the clean rows are untouched; the same request twice
    gets the same noise. (Drawn on the image, LLaVA-NeXT's and Qwen2-VL's resizing, tiling and downscaling left a
    third to four fifths of it, and LLaVA-1.5's 8-bit pixels clamped it.)"""
    import vlmguard.engine as engine_mod
    from vlmguard.decoding.views import noise_coefficients

    seen = []
    real = engine_mod.transform_pixels

    def spy(adapter, batch, fns):
        before = [v.clone() for v in adapter.image_pixels(batch)]
        real(adapter, batch, fns)
        seen.append([(b, a.clone(), r) for b, a, r in zip(before, adapter.image_pixels(batch), batch.rows_with_images)])

    monkeypatch.setattr(engine_mod, "transform_pixels", spy)
    eng = tiny_engine(family)
    req = Request("Is there a dog in the image?", [random_image(1, (200, 160))])
    outs = [eng.generate([req], GenerationSpec(decoding="vcd", max_new_tokens=3))[0] for _ in range(2)]
    assert outs[0].decoding["noise_space"] == "tensor" and outs[0].token_ids == outs[1].token_ids
    a, b = noise_coefficients(500)
    (clean_b, clean_a, clean_row), (dist_b, dist_a, dist_row) = seen[0]
    assert (clean_row, dist_row) == (0, 1) and torch.equal(clean_b, clean_a)
    eps = (dist_a - a * dist_b) / b
    assert abs(eps.std().item() - 1.0) < 0.05 and abs(eps.mean().item()) < 0.05
    assert torch.equal(seen[0][1][1], seen[1][1][1])  # seeded per image: reproducible


def test_m3id_first_generated_token_has_weight_zero():
    """w_t = exp(lambda t) - 1 with t = 0 at the first generated token (m3id.md): step 0 scores are the main
    branch's own log-probabilities (why M3ID's POPE answers equal greedy's), later steps are contrasted."""
    import math

    eng = tiny_engine("llava")
    out = run(eng, [Request("Is there a dog in the image?", [random_image(4, (40, 32))])], "m3id",
              {"lam": 0.5, "alpha": 1.0}, n=4)[0]
    first, *later = out.steps
    assert abs(first.score - math.log(first.main_prob)) < 1e-5
    assert any(abs(st.score - math.log(st.main_prob)) > 1e-3 for st in later)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_image_features_are_computed_once_per_distinct_image(family, monkeypatch):
    """Issue 4: image features are computed once and shared where the spec allows (lqcd.md 6): a decoder's
    branch rows that carry the request's own image (LQCD's cue variants, IAVA's probe and irrelevant rows, M3ID's
    mask view) and requests about the same image (POPE's six questions) take one tower pass per distinct image;
    VCD's noised copy is another image. IAVA's irrelevant rows take the features of its pre-pass, whose cache is
    the main rows' (one tower pass in all). The answers equal those of a tower pass per row."""
    import vlmguard.engine as engine_mod

    eng = tiny_engine(family)
    img = random_image(1, (64, 48))
    reqs = [Request("Is there a dog in the image?", [img]), Request("describe it", [random_image(2, (40, 40))]),
            Request("Is there a cat in the image?", [img])]
    images_seen = count_tower_images(eng, monkeypatch)
    cases = {"greedy": ({}, [2]), "lqcd": ({}, [2]), "m3id": ({"uncond_mode": "mask", "lam": 0.5}, [2]),
             "iava": ({"fallback_rule": "avisc"}, [2]), "vcd": ({}, [4])}
    for decoder, (params, tower_images) in cases.items():
        images_seen.clear()
        spec = GenerationSpec(decoding=decoder, decoding_params=params, max_new_tokens=4, logprobs=2)
        shared = eng.generate(reqs, spec)
        assert images_seen == tower_images, (decoder, images_seen)
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "same_images", lambda adapter, batch: {})
            apart = eng.generate(reqs, spec)
        assert ids(shared) == ids(apart), decoder
        # to float rounding: a tower pass over fewer images is another matrix shape (BLAS may block it otherwise)
        for a, b in zip(shared, apart):
            assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-5)


def test_shared_image_features_fall_back_on_vision_inputs_they_cannot_cut():
    """A processor output with an input that has no entry per image (here a made-up scalar) cannot be cut to the
    distinct images: every row then gets its own tower pass, with the same features."""
    eng = tiny_engine("llava")
    img = random_image(1, (64, 48))
    batch = eng.adapter.encode([Prompt("Is there a dog?", [img]), Prompt("Is there a cat?", [img])])
    alone = eng.adapter.image_features(batch)
    shared = eng.adapter.image_features(batch, {1: 0})  # one image through the tower: equal to float rounding
    assert torch.allclose(shared[1], alone[1], rtol=1e-5, atol=1e-6) and shared[1] is shared[0]
    batch.vision_inputs["made_up"] = torch.tensor(3.0)
    assert eng.adapter.vision_subset(batch, [0]) is None
    fallback = eng.adapter.image_features(batch, {1: 0})
    assert torch.equal(fallback[1], alone[1]) and fallback[1] is not fallback[0]
