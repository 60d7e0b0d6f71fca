"""Pure-function invariants of the decoding methods (synthetic logits; the specs' unit-test sections)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from vlmguard.decoding import make_decoder
from vlmguard.decoding.contrast import contrast, log_probs
from vlmguard.decoding.iava import irrelevant_tokens, select_layers
from vlmguard.decoding.m3id import amplification, m3id_scores
from vlmguard.decoding.neutralizer import EXPECTATION_CUE, leading_variants, neutralize
from vlmguard.decoding.views import diffusion_noise, noise_coefficients
from vlmguard.decoding.vista import sla_window, steer
from vlmguard.errors import InvalidInput
from vlmguard.spec import GenerationSpec

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLMGUARD_SHARED", ROOT / ".." / "shared"))


def logits(seed: int, b: int = 4, v: int = 50, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def softmax_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(torch.softmax(a, -1), torch.softmax(b, -1), atol=tol)


# ---- VCD / generic contrast (vcd.md 12.1-12.7) -------------------------------------------------
def test_contrast_zero_strength_is_plain():
    zp, zn = logits(0), logits(1)
    s = contrast(log_probs(zp), log_probs(zn), alpha=0.0, beta=0.0)
    assert softmax_close(s, zp) and torch.equal(s.argmax(-1), zp.argmax(-1))


def test_contrast_alpha0_beta_restricts_to_plausible_set():
    zp, zn = logits(2), logits(3)
    lp = log_probs(zp)
    s = contrast(lp, log_probs(zn), alpha=0.0, beta=0.2)
    keep = lp >= lp.max(-1, keepdim=True).values + math.log(0.2)
    expect = torch.softmax(zp.masked_fill(~keep, float("-inf")), -1)
    assert torch.allclose(torch.softmax(s, -1), expect, atol=1e-6)
    # identical branches: the same for any alpha (no-op apart from the APC)
    s2 = contrast(lp, lp.clone(), alpha=3.0, beta=0.2)
    assert torch.allclose(torch.softmax(s2, -1), expect, atol=1e-5)


def test_contrast_shift_invariance_linearity_and_finiteness():
    zp, zn = logits(4), logits(5)
    a, b = 1.5, 0.05
    s = contrast(log_probs(zp), log_probs(zn), a, b)
    s_shift = contrast(zp + 7.0, zn - 3.0, a, b)  # raw logits with per-row shifts
    assert softmax_close(s, s_shift)
    keep = torch.isfinite(s)
    assert keep.gather(1, zp.argmax(-1, keepdim=True)).all()  # argmax of the clean branch survives
    assert not torch.isnan(s).any() and not torch.isposinf(s).any()
    r = 0
    ks = keep[r].nonzero().squeeze(1)[:2]
    assert ks.numel() == 2  # two surviving tokens, so the linearity check below is not skipped
    k, j = ks.tolist()
    lhs = s[r, k] - s[r, j]
    rhs = (1 + a) * (zp[r, k] - zp[r, j]) - a * (zn[r, k] - zn[r, j])
    assert torch.isclose(lhs, rhs, atol=1e-4)


def test_contrast_beta_one_is_greedy_and_nan_guard():
    zp, zn = logits(6), logits(7)
    s = contrast(log_probs(zp), log_probs(zn), alpha=5.0, beta=1.0)
    assert torch.equal(s.argmax(-1), zp.argmax(-1))
    bad = log_probs(zn)
    bad[0, :] = float("nan")
    s = contrast(log_probs(zp), bad, alpha=1.0, beta=0.1)
    assert torch.isfinite(s[0]).any() and not torch.isnan(s).any()
    assert s[0].argmax() == zp[0].argmax()


def test_diffusion_noise_schedule_and_statistics():
    table = {500: (0.863, 0.505), 400: (0.945, 0.328), 700: (0.593, 0.805), 999: (0.285, 0.959)}
    for step, (a, b) in table.items():
        ca, cb = noise_coefficients(step)
        assert abs(ca - a) < 2e-3 and abs(cb - b) < 2e-3
    a0, b0 = noise_coefficients(0)
    assert abs(a0 - 0.99999) < 1e-5 and abs(b0 - 0.0047) < 5e-4
    v = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    out1 = diffusion_noise(v, 500, torch.Generator().manual_seed(11))
    out2 = diffusion_noise(v, 500, torch.Generator().manual_seed(11))
    assert torch.equal(out1, out2)
    a, b = noise_coefficients(500)
    eps = (out1 - a * v) / b
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05


# ---- M3ID (m3id.md 12) -------------------------------------------------------------------------
def test_m3id_schedule_and_identities():
    assert amplification(0.0, 100, 1e4) == 0.0
    assert amplification(0.02, 0, 1e4) == 0.0
    assert abs(amplification(0.02, 50, 1e4) - math.expm1(1.0)) < 1e-12
    assert amplification(0.02, 10_000, 1e4) == 1e4  # numeric guard
    lc, lu = log_probs(logits(8, scale=0.5)), log_probs(logits(9))
    assert torch.allclose(m3id_scores(lc, lu, 0.0, 0.3, True), lc, atol=1e-6)  # w = 0
    assert torch.allclose(m3id_scores(lc, lc, 5.0, 1.0, True), lc, atol=1e-5)  # l_u = l_c
    sharp = log_probs(logits(10, scale=30.0))
    assert (sharp.max(-1).values > math.log(0.3)).all()
    assert torch.allclose(m3id_scores(sharp, lu, 5.0, 0.3, True), sharp, atol=1e-6)  # gate off
    assert torch.allclose(m3id_scores(lc, lu, 5.0, 0.0, True), lc, atol=1e-6)  # alpha 0 never fires
    # gate on == classifier-free guidance with scale e^{lambda t}: l_u + e^{lt}(l_c - l_u)
    w = amplification(0.02, 60, 1e4)
    s = m3id_scores(lc, lu, w, 1.0, True)
    cfg = lu + (1 + w) * (lc - lu)
    assert softmax_close(s, cfg)
    s_raw = m3id_scores(lc, lu, w, 1.0, False)
    assert softmax_close(s_raw, lc + w * (lc - lu)) and not torch.isnan(s_raw).any()


# ---- VISTA (vista.md 11) -----------------------------------------------------------------------
def test_vista_steer_norm_direction_gain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    v = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    y = steer(x, v, 0.17)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    cos = lambda a: torch.nn.functional.cosine_similarity(a, v[:, None, :].expand_as(a), dim=-1)  # noqa: E731
    assert (cos(y) >= cos(x) - 1e-6).all()
    assert torch.equal(steer(x, v, 0.0), x) or torch.allclose(steer(x, v, 0.0), x, atol=1e-6)
    assert torch.allclose(steer(x, torch.zeros_like(v), 0.5), x, atol=1e-6)  # v = 0: no-op
    z = torch.zeros(1, 1, 16)
    assert torch.equal(steer(z, v[:1], 0.5), z)  # |x| = 0 stays
    # anti-parallel input gets gain 2: x' = |x| normalize(xhat + 2 lambda v)
    anti = -v[:1, None, :] * 3.0
    out = steer(anti, v[:1], 0.1)
    expect = 3.0 * torch.nn.functional.normalize(-v[:1] + 0.2 * v[:1], dim=-1)
    assert torch.allclose(out[0, 0], expect[0], atol=1e-5)


def test_vista_sla_window_and_one_gemv_algebra():
    assert sla_window(32, None) == tuple(range(25, 31))
    assert sla_window(4, None) == (2,)
    g = torch.Generator().manual_seed(1)
    W = torch.nn.Linear(16, 30, bias=False)
    final = torch.randn(3, 16, generator=g)
    win = [torch.randn(3, 16, generator=g) for _ in range(4)]
    a = 0.3
    ref = (1 - a) * W(final) + a * torch.stack([W(h) for h in win]).mean(0)
    one = W((1 - a) * final + a * torch.stack(win).mean(0))
    assert torch.allclose(ref, one, atol=1e-4)


# ---- IAVA (iava.md 11.5-11.6) ------------------------------------------------------------------
def test_iava_layer_selection():
    mass = torch.tensor([0.1, 0.5, 0.3, 0.1, 0.0])
    assert select_layers(mass, 1e-6) == [1]
    assert select_layers(mass, 0.5) == [1]
    assert select_layers(mass, 0.6) == [1, 2]
    assert select_layers(mass, 1.0) == [0, 1, 2, 3]  # every layer with non-zero mass


def test_iava_selection_rules():
    g = torch.Generator().manual_seed(2)
    a_q = torch.rand(64, generator=g)
    a_g = torch.rand(64, generator=g)
    for rule in ("R1", "R2", "R3", "R4"):
        u1 = irrelevant_tokens(a_q, a_g, rule, 0.5)
        u2 = irrelevant_tokens(a_q, a_g, rule, 1.5)
        assert u1.shape == (64,) and bool((u2 & ~u1).sum() == 0)  # monotone in lambda
    assert not irrelevant_tokens(a_q, a_q.clone(), "R1", 0.0).any()  # g == query -> U empty
    r1 = irrelevant_tokens(a_q, a_g, "R1", 1.0)
    thr = a_g.mean() + a_g.std()
    assert torch.equal(r1, (a_g > thr) & (a_q < a_g))


# ---- LQCD (lqcd.md 11) -------------------------------------------------------------------------
def yes_no(p_yes: float) -> torch.Tensor:
    return torch.log(torch.tensor([[p_yes, 1 - p_yes]]))


def test_lqcd_worked_example_and_symmetric_mode():
    s = contrast(yes_no(0.7), yes_no(0.9), 1.0, 0.0)  # expert neutral, amateur leading (affirm cue)
    assert s.argmax(-1).item() == 1  # "no"
    amateur = torch.stack([yes_no(0.9), yes_no(0.4)]).mean(0)
    s2 = contrast(yes_no(0.7), amateur, 1.0, 0.0)
    assert s2.argmax(-1).item() == 0  # keeps "yes"


def test_lqcd_monotonic_and_one_sided():
    ln = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, 0.0]]), -1)
    ll = ln.clone()
    ll[0, 1] += 1.0  # the cue raises token 1 only ...
    ll = torch.log_softmax(ll, -1)
    delta = ll - ln
    assert delta[0, 1] > 0 and (delta[0, [0, 2, 3]] <= 0).all()
    probs = [torch.softmax(contrast(ln, ll, a, 0.0), -1)[0, 1].item() for a in (0.0, 0.5, 1.0, 2.0)]
    assert all(x > y for x, y in zip(probs, probs[1:]))
    one = contrast(ln, ll, 1.0, 0.0, one_sided=True)
    raw = ln - 1.0 * (ll - ln).clamp(min=0)
    assert softmax_close(one, raw)
    assert (raw <= ln + 1e-7).all()


def test_neutralizer_round_trip_on_pope_files():
    from vlmguard.bench.pope_data import load_pope_file
    from vlmguard.bench.pope_leading import TEMPLATES, derive_leading

    files = sorted((SHARED / "refdata" / "pope").glob("*pope*.json"))
    assert len(files) >= 9  # COCO, A-OKVQA and GQA x random / popular / adversarial
    for path in files:  # every record of every file, every template (~1e5 texts, a few seconds)
        pope = load_pope_file(path)
        for tid in TEMPLATES:
            for k, rec in enumerate(derive_leading(pope, tid)):
                for suffix in ("", "\nAnswer the question using a single word or phrase.")[: 2 if k < 200 else 1]:
                    n = neutralize(rec["text"] + suffix)
                    assert n.changed and n.text == rec["neutral_text"] + suffix, (path.name, tid, rec["text"])
                    assert n.strength in (0.5, 1.0)
    plain = neutralize("Is there a dog in the image?\nAnswer the question using a single word or phrase.")
    assert not plain.changed
    assert not neutralize("There is a dog in the image. Describe it.").changed  # no question: untouched
    assert neutralize("Is there a dog in the image, right?").text == "Is there a dog in the image?"
    assert neutralize("I think there is a cat. Is there a cat in the image?").text == "Is there a cat in the image?"
    # a cue statement without its final period: the paper's own example, and a short one
    for text in ("Is there a dog in the image? It seems like there isn't", "Is there a dog in the image? I think so"):
        n = neutralize(text)
        assert n.text == "Is there a dog in the image?" and n.strength == 0.5, text
    assert not neutralize("It seems fine").changed and not neutralize("It seems odd? Is it?").changed


def test_leading_variants():
    mode, texts = leading_variants("Is there a dog in the image?\nAnswer briefly.", "auto")
    assert mode == "symmetric" and texts == ["Is there a dog in the image? It seems like there is.\nAnswer briefly.",
                                             "Is there a dog in the image? It seems like there isn't.\nAnswer briefly."]
    # the question's line goes on with a format instruction (the space-joined POPE presets): still a polar
    # question, its cues right after it, before the instruction
    for suffix in ("Answer the question using a single word or phrase.", "Please answer this question with one word."):
        mode, texts = leading_variants(f"Is there a dog in the image? {suffix}", "auto")
        assert mode == "symmetric" and texts == [f"Is there a dog in the image? It seems like there is. {suffix}",
                                                 f"Is there a dog in the image? It seems like there isn't. {suffix}"]
    mode, texts = leading_variants("Look closely. Is it red? Be brief.", "auto")
    assert texts == ["Look closely. Is it red? I think the answer is yes. Be brief.",
                     "Look closely. Is it red? I think the answer is no. Be brief."]
    mode, texts = leading_variants("Are the lights on?", "auto")
    assert mode == "symmetric" and texts[0].endswith("I think the answer is yes.")
    mode, texts = leading_variants("Please describe this image in detail.", "auto")
    assert mode == "expectation" and texts == [f"Please describe this image in detail. {EXPECTATION_CUE}"]
    assert leading_variants("Describe it.", "auto", "There are objects.") == ("expectation",
                                                                              ["Describe it. There are objects."])
    assert leading_variants("Is it red?", "off") == ("off", [])
    assert leading_variants("Describe it.", "symmetric") == ("off", [])


# ---- parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,needle", [
    ("vcd", {"alpha": -1}, "alpha"),
    ("vcd", {"noise_step": 1000}, "noise_step"),
    ("vcd", {"gamma": 1}, "gamma"),
    ("m3id", {"lambda": -0.1}, "lambda"),
    ("m3id", {"uncond_mode": "blank"}, "uncond_mode"),
    ("vista", {"vsv_lambda": 2.0}, "vsv_lambda"),
    ("vista", {"vsv_layers": [3, 1]}, "vsv_layers"),
    ("iava", {"selection_rule": "R9"}, "selection_rule"),
    ("iava", {"gamma": 0}, "gamma"),
    ("lqcd", {"beta": 1.5}, "beta"),
    ("lqcd", {"expectation_cue": "  "}, "expectation_cue"),
    ("lqcd", {"neutral_mode": "always"}, "neutral_mode"),
])
def test_invalid_params_give_clear_errors(name, params, needle):
    with pytest.raises(InvalidInput) as ei:
        make_decoder(name, params)
    msg = str(ei.value)
    assert name in msg and needle in msg and "\n" not in msg
    with pytest.raises(InvalidInput):
        GenerationSpec(decoding=name, decoding_params=params).resolve()


def test_defaults_follow_the_specs():
    d = {n: make_decoder(n, {}).params for n in ("vcd", "m3id", "vista", "iava", "lqcd")}
    assert (d["vcd"].alpha, d["vcd"].beta, d["vcd"].noise_step) == (1.0, 0.1, 500)
    assert (d["m3id"].lam, d["m3id"].alpha, d["m3id"].t0, d["m3id"].gate) == (0.02, 0.3, 0, True)
    assert (d["vista"].vsv_lambda, d["vista"].sla_alpha, d["vista"].reference_pca_quirk) == (0.1, 0.3, True)
    assert (d["iava"].alpha, d["iava"].beta, d["iava"].lam, d["iava"].gamma) == (1.0, 0.1, 1.0, 0.5)
    assert (d["lqcd"].alpha, d["lqcd"].beta, d["lqcd"].neutral_mode) == (1.0, 0.1, "auto")
    assert make_decoder("m3id", {"lam": 0.05}).params.lam == 0.05  # field name or alias
