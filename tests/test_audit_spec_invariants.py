"""Audit of the method implementations against shared/methods/*.md: exact values from the specs' equations.

Audited: every spec's INVARIANTS section plus its equations, defaults and pitfalls, against the existing tests
(test_decoding_math/engine/compose, test_compose_families, test_pruning_*, test_attention_scores).

Already covered there (not repeated here): VCD 12.1-12.6, 12.8 (table to 2e-3), 12.9-12.12; M3ID 12.1-12.6,
12.9-12.12; VISTA 11.1-11.7, 11.9-11.10; IAVA 11.1, 11.4, 11.5 (R1 exact, monotonicity), 11.6, 11.7, 11.8;
LQCD 11.1-11.7 (one amateur), 11.9-11.12; FlowCut 6.1-6.7 (schedule extremes, score pieces, replay of the
running score, stage L with GQA); AdaptInfer/FastV 8.1-8.10 (lam = 1 and lam = 0 up to a factor).

Added here (weakly or not covered before):
- VCD: the APC's logit form equals its probability form at the cutoff (12.7); the noise table equals the
  spec's sigmoid schedule exactly (section 4), not to 2e-3; ``combine`` gives the contrast on image rows and
  plain decoding on a text-only row of the same batch, value for value.
- M3ID: w_t equals the section 3 table; the reimpl mode (gate off, beta = 0.1) is the APC-restricted score;
  the gate is decided per row; a token masked in l_u only (+inf PMI) falls back to l_c for that row only
  (section 11); ``combine`` uses t = t0 + n.
- VISTA: alpha = 1 gives the window mean exactly (11.5); gain 1 for x orthogonal to / along v, g in [1, 2]
  (11.4); the SLA window for 40 layers is 8 layers (section 4); v_l = h_l(P+) - h_l(P-) with the PCA quirk's
  +1 on v_0[0] only, and no vector for a text-only request (3.2).
- IAVA: R2, R3, R4 exactly (unbiased std; R4 non-strict), U = {} when g = query also for R2 (11.5); the
  masker keeps exactly the rows in U (11.9); layer selection against a brute-force minimal set (11.6).
- LQCD: a mixed batch (symmetric m = 2, leading m = 1 with sentiment scaling, off) gives each row the section
  3.3 score with its own coefficients (11.12's mixed batch, on the score level).
- FlowCut: P = round((N - K)/sqrt(L) (1 - rho^2)) for a general attention vector, not only rho = 0 / 1.
- FastV: the default K = 2, R = 50% and ratio budgets keep round(V (1 - R)) (adaptinfer.md section 5).
- AdaptInfer: the lam-mixed prior S~ = (1 - lam) mean(S) 1 + lam S, exactly, for 0 < lam < 1 (section 3.4);
  ties broken by the lower index (section 3, 8.10).

Defects found: none (every check below passes on the code as it stands).
Noted, not changed: AdaptInfer skips a stage whose k_s >= the tokens present (the spec's min(k_s, n - 1)
would drop one token); the existing tests assert the skip (test_official_schedule_and_accounting).
"""
from __future__ import annotations

import math
from itertools import combinations
from types import SimpleNamespace

import numpy as np
import torch

from vlmguard.decoding import make_decoder
from vlmguard.decoding.base import DecodeContext, StepInputs, plausibility_mask
from vlmguard.decoding.iava import irrelevant_tokens, select_layers
from vlmguard.decoding.m3id import amplification, m3id_scores
from vlmguard.decoding.views import noise_coefficients
from vlmguard.decoding.vista import sla_window, steer
from vlmguard.models.base import Prompt
from vlmguard.pruning.adaptinfer import text_prior_scores
from vlmguard.pruning.flowcut_vision import prune_count
from vlmguard.pruning.scores import top_sorted

NEG = float("-inf")


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def lsm(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.float(), dim=-1)


def apc(lp: torch.Tensor, beta: float) -> torch.Tensor:
    """K_t in the probability form: p(k) >= beta * max p (float64)."""
    p = lp.double().exp()
    return p >= beta * p.max(dim=-1, keepdim=True).values


# ---- VCD ---------------------------------------------------------------------------------------
def test_vcd_apc_logit_form_equals_probability_form():
    for seed in range(20):
        lp = lsm(rand(seed, 3, 40, scale=2.0))
        for beta in (0.05, 0.1, 0.2, 0.5, 1.0):
            assert torch.equal(plausibility_mask(lp, beta), apc(lp, beta)), (seed, beta)
    # a token exactly at the cutoff (p = beta * max p) belongs to K_t
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert plausibility_mask(lp, 0.5).tolist() == [[True, True, False, False]]
    assert plausibility_mask(lp, 0.0).all()  # beta = 0: no cutoff


def test_vcd_noise_table_is_the_specs_sigmoid_schedule():
    u = np.linspace(-6.0, 6.0, 1000)
    betas = 1e-5 + (5e-3 - 1e-5) / (1.0 + np.exp(-u))
    ab = np.cumprod(1.0 - betas)
    for step in (0, 1, 250, 400, 500, 700, 999):
        a, b = noise_coefficients(step)
        assert abs(a - math.sqrt(ab[step])) < 1e-12 and abs(b - math.sqrt(1 - ab[step])) < 1e-12


def test_vcd_combine_contrasts_image_rows_and_leaves_a_text_only_row_plain():
    alpha, beta = 1.5, 0.1
    dec = make_decoder("vcd", {"alpha": alpha, "beta": beta})
    dec.ctx, dec.applied = SimpleNamespace(active=[0, 1, 2]), [True, False, True]
    zp, zn = rand(1, 3, 30, scale=2.0), rand(2, 3, 30, scale=2.0)
    out = dec.combine(StepInputs(logits={"main": zp, "distorted": zn}, hidden={}, step=0))
    lp, ln = lsm(zp), lsm(zn)
    raw = ((1 + alpha) * lp.double() - alpha * ln.double()).masked_fill(~apc(lp, beta), NEG)
    expect = torch.log_softmax(raw, -1)
    for r in (0, 2):
        fin = torch.isfinite(expect[r])
        assert torch.equal(torch.isfinite(out.scores[r]), fin)
        assert torch.allclose(out.scores[r][fin].double(), expect[r][fin], atol=1e-5)
    assert torch.allclose(out.scores[1], lp[1], atol=1e-6)  # no image: plain decoding
    # the rows follow ctx.active: after request 1 left, rows are requests 0 and 2
    dec.ctx.active = [0, 2]
    out2 = dec.combine(StepInputs(logits={"main": zp[[0, 2]], "distorted": zn[[0, 2]]}, hidden={}, step=3))
    assert torch.allclose(out2.scores, out.scores[[0, 2]], atol=1e-6)


# ---- M3ID --------------------------------------------------------------------------------------
def test_m3id_weight_table_of_section_3():
    table = {0: 0.0, 10: 0.22, 25: 0.65, 50: 1.72, 100: 6.39, 150: 19.1, 200: 53.6, 300: 402}
    for t, w in table.items():
        got = amplification(0.02, t, 1e4)
        assert abs(got - w) <= 0.005 + 0.003 * w, (t, got, w)  # the table has 3 significant digits
        assert got == math.expm1(0.02 * t)
    assert abs(math.expm1(0.02 * 512) / 2.8e4 - 1) < 0.02  # the table's 2.8e4 ...
    assert amplification(0.02, 512, 1e4) == 1e4  # ... is capped at w_max = 1e4
    assert amplification(0.02, 512, 5.0) == 5.0
    gam = [math.exp(-0.02 * t) for t in range(50)]
    assert all(a > b for a, b in zip(gam, gam[1:]))  # gamma_t strictly decreasing


def test_m3id_reimpl_mode_is_the_apc_restricted_score():
    lc, lu = lsm(rand(3, 4, 30, scale=2.0)), lsm(rand(4, 4, 30, scale=2.0))
    w = amplification(0.02, 40, 1e4)
    s = m3id_scores(lc, lu, w, 0.3, gate=False, beta=0.1)
    raw = (lc.double() + w * (lc.double() - lu.double())).masked_fill(~apc(lc, 0.1), NEG)
    expect = torch.log_softmax(raw, -1)
    fin = torch.isfinite(expect)
    assert torch.equal(torch.isfinite(s), fin)
    assert torch.allclose(s[fin].double(), expect[fin], atol=1e-5)


def test_m3id_gate_is_per_row_and_a_masked_uncond_token_falls_back_per_row():
    sharp = lsm(torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0]))  # top-1 p > 0.3: gate off
    flat = lsm(torch.tensor([0.3, 0.2, 0.1, 0.0, -0.1]))  # top-1 p < 0.3: gate on
    lc = torch.stack([sharp, flat, flat])
    lu = lsm(rand(5, 3, 5))
    w = 2.0
    s = m3id_scores(lc, lu, w, 0.3, gate=True)
    assert torch.allclose(s[0], lc[0], atol=1e-6)
    assert torch.allclose(s[1], lsm(lc[1] + w * (lc[1] - lu[1])), atol=1e-6)
    # row 2's uncond branch masked a token (-inf): l_c - l_u = +inf there -> that row falls back to l_c
    lu2 = lu.clone()
    lu2[2, 3] = NEG
    s2 = m3id_scores(lc, lu2, w, 0.3, gate=True)
    assert torch.isfinite(s2).all() and not torch.isnan(s2).any()
    assert torch.allclose(s2[2], lc[2], atol=1e-6)
    assert torch.allclose(s2[:2], s[:2], atol=0)


def test_m3id_combine_uses_t0_plus_the_generated_count():
    dec = make_decoder("m3id", {"lam": 0.1, "t0": 5, "gate": False})
    dec.ctx, dec.applied, dec.gate_fired = SimpleNamespace(active=[0, 1]), [True, True], [0, 0]
    zc, zu = rand(6, 2, 20, scale=2.0), rand(7, 2, 20, scale=2.0)
    out = dec.combine(StepInputs(logits={"main": zc, "uncond": zu}, hidden={}, step=3))
    lc, lu = lsm(zc), lsm(zu)
    w = math.expm1(0.1 * 8)
    assert torch.allclose(out.scores, lsm(lc + w * (lc - lu)), atol=1e-5)
    assert dec.gate_fired == [1, 1]


# ---- VISTA -------------------------------------------------------------------------------------
def test_vista_sla_alpha_one_is_the_window_mean_and_alpha_mixes_raw_logits():
    for a in (1.0, 0.3):
        dec = make_decoder("vista", {"sla_alpha": a})
        dec.hidden_layers = (1, 2)
        main, window = rand(8, 2, 25, scale=3.0), rand(9, 2, 25, scale=3.0)
        out = dec.combine(StepInputs(logits={"main": main}, hidden={}, step=2, head=window))
        assert torch.allclose(out.scores, lsm((1 - a) * main + a * window), atol=1e-6)
        if a == 1.0:
            assert torch.allclose(out.scores, lsm(window), atol=1e-6)
        assert torch.allclose(out.main_logprobs, lsm(main), atol=1e-6)


def test_vista_gain_is_one_orthogonal_or_along_v_and_within_one_and_two():
    v = torch.tensor([[1.0, 0.0, 0.0]])
    lam = 0.2
    ortho = torch.tensor([[[0.0, 3.0, 4.0]]])  # cos(x, -v) = 0 -> g = 1
    expect = 5.0 * torch.nn.functional.normalize(torch.tensor([0.2, 0.6, 0.8]), dim=0)
    assert torch.allclose(steer(ortho, v, lam)[0, 0], expect, atol=1e-6)
    along = torch.tensor([[[2.0, 0.0, 0.0]]])  # parallel to v: direction and norm unchanged
    assert torch.allclose(steer(along, v, lam), along, atol=1e-6)
    # general x: x' = |x| normalize(xhat + lam g v), g = 1 + max(0, cos(x, -v)) in [1, 2]
    x = rand(10, 2, 6, 8)
    vu = torch.nn.functional.normalize(rand(11, 2, 8), dim=-1)
    xhat = torch.nn.functional.normalize(x, dim=-1)
    g = 1 + (-(xhat * vu[:, None]).sum(-1, keepdim=True)).clamp(min=0)
    assert (g >= 1).all() and (g <= 2).all()
    ref = x.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(xhat + lam * g * vu[:, None], dim=-1)
    assert torch.allclose(steer(x, vu, lam), ref, atol=1e-5)
    simple = x.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(xhat + lam * vu[:, None], dim=-1)
    assert torch.allclose(steer(x, vu, lam, simple=True), simple, atol=1e-5)


def test_vista_sla_window_scales_with_depth():
    assert sla_window(32, None) == tuple(range(25, 31))
    assert sla_window(40, None) == tuple(range(31, 39))  # w = round(0.19 * 40) = 8
    assert sla_window(32, 3) == (28, 29, 30)


# ---- IAVA --------------------------------------------------------------------------------------
def test_iava_rules_r2_r3_r4_exactly():
    a_q, a_g = torch.rand(64, generator=torch.Generator().manual_seed(12)), torch.rand(
        64, generator=torch.Generator().manual_seed(13))

    def above(x, lam):  # mu + lam * unbiased std, computed in float64
        xd = x.double().numpy()
        return torch.from_numpy(xd > xd.mean() + lam * xd.std(ddof=1))

    for lam in (0.0, 0.5, 1.0):
        delta = a_g - a_q
        assert torch.equal(irrelevant_tokens(a_q, a_g, "R2", lam), above(delta, lam))
        assert torch.equal(irrelevant_tokens(a_q, a_g, "R3", lam), above(a_q, lam) & (a_q <= a_g))
        xd = a_q.double().numpy()
        r4 = torch.from_numpy(xd >= xd.mean() + lam * xd.std(ddof=1))
        assert torch.equal(irrelevant_tokens(a_q, a_g, "R4", lam), r4)
        assert torch.equal(irrelevant_tokens(a_q, None, "R1", lam), r4)  # no second instruction: AvisC
    assert not irrelevant_tokens(a_q, a_q.clone(), "R2", 0.0).any()  # g == query: nothing dropped
    # R4 is non-strict: a token exactly at the threshold is in U (AvisC's >=)
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    thr = float(x.mean() + 0.0 * x.std())
    assert irrelevant_tokens(x, None, "R4", 0.0).tolist() == [v >= thr for v in x.tolist()]


def test_iava_layer_selection_is_the_minimal_top_set():
    g = torch.Generator().manual_seed(14)
    for trial in range(30):
        mass = torch.rand(6, generator=g)
        share = mass.double() / mass.double().sum()
        for gamma in (0.2, 0.5, 0.8, 0.95):
            got = select_layers(mass, gamma)
            # the smallest k such that the k largest shares reach gamma, and got is those layers
            order = sorted(range(6), key=lambda i: -float(share[i]))
            k = next(k for k in range(1, 7) if float(share[order[:k]].sum()) >= gamma - 1e-12)
            assert got == sorted(order[:k]), (trial, gamma)
            assert not any(float(share[list(c)].sum()) >= gamma - 1e-12 for c in combinations(range(6), k - 1))


def test_iava_masker_keeps_exactly_the_irrelevant_rows():
    dec = make_decoder("iava", {})
    u = torch.tensor([False, True, False, True, False])
    dec.keep_sets = [u, None]
    feats = rand(15, 5, 4) + 3.0
    out = dec._masker(0)(feats)
    assert torch.equal(out[u], feats[u]) and (out[~u] == 0).all()
    assert torch.equal(dec._masker(1)(feats), feats)  # U = {}: the branch is the original view
    ones = make_decoder("iava", {"mask_value": "ones"})
    ones.keep_sets = [u]
    out1 = ones._masker(0)(feats)
    assert torch.equal(out1[u], feats[u]) and (out1[~u] == 1).all()


# ---- LQCD --------------------------------------------------------------------------------------
def test_lqcd_mixed_batch_gives_each_row_its_own_coefficients():
    alpha, beta, gamma = 1.0, 0.1, 0.5
    prompts = [Prompt(text="Is there a dog in the image?", images=[]),  # symmetric: m = 2
               Prompt(text="Is there a dog in the image? I think there is.", images=[]),  # leading: m = 1
               Prompt(text="Is there a cat?", images=[])]
    dec = make_decoder("lqcd", {"alpha": alpha, "beta": beta, "sentiment_gamma": gamma,
                                "neutral_mode": "auto"})
    ctx = DecodeContext(adapter=SimpleNamespace(image_placeholder="<image>"), prompts=prompts,
                        probe_forward=None, sampling=False, active=[0, 1, 2])
    dec.setup(ctx)
    modes = ctx.report["modes"]
    assert modes[0] == "symmetric" and modes[1] == "leading" and dec.n_slots == 2
    sigma = ctx.report["cue_strength"][1]
    assert sigma > 0
    z = {nm: rand(16 + i, 3, 20, scale=2.0) for i, nm in enumerate(("main", "lq0", "lq1"))}
    out = dec.combine(StepInputs(logits=z, hidden={}, step=0))
    lp = {nm: lsm(v).double() for nm, v in z.items()}

    def expect(r, expert, amateur, a):
        raw = ((1 + a) * expert[r] - a * amateur[r]).masked_fill(~apc(expert[r:r + 1].float(), beta)[0], NEG)
        return torch.log_softmax(raw, -1)

    rows = {0: expect(0, lp["main"], (lp["lq0"] + lp["lq1"]) / 2, alpha),
            1: expect(1, lp["lq0"], lp["main"], alpha * (1 + gamma * sigma))}
    if modes[2] == "symmetric":
        rows[2] = expect(2, lp["main"], (lp["lq0"] + lp["lq1"]) / 2, alpha)
    for r, e in rows.items():
        fin = torch.isfinite(e)
        assert torch.equal(torch.isfinite(out.scores[r]), fin), r
        assert torch.allclose(out.scores[r][fin].double(), e[fin], atol=1e-5), r


# ---- FlowCut -----------------------------------------------------------------------------------
def test_flowcut_prune_count_for_a_general_attention_vector():
    n, k = 576, 64
    for seed in range(12):
        a = torch.softmax(rand(20 + seed, n, scale=0.5 + seed), 0)
        ad = a.double().numpy()
        rho = float(-(ad * np.log(ad)).sum() / math.log(n))
        for rem in (20, 12, 6, 2):
            p = round((n - k) / math.sqrt(rem) * (1 - rho ** 2))
            assert prune_count(a, n, k, rem) == min(max(p, 0), n - k), (seed, rem)
            assert max(n - prune_count(a, n, k, rem), k) >= k


# ---- AdaptInfer --------------------------------------------------------------------------------
def test_adaptinfer_lambda_mixed_prior_exactly():
    h, n = 3, 14
    text = torch.arange(8, 14)
    vis = torch.arange(2, 8)
    causal = torch.arange(n)[None, :] <= text[:, None]
    a = torch.softmax(rand(30, h, text.numel(), n).masked_fill(~causal[None], NEG), dim=-1)
    m = a[:, :, text].double()
    s_mat = m + m.transpose(1, 2) - torch.diag_embed(m.diagonal(dim1=1, dim2=2))
    for lam in (0.0, 0.3, 0.7, 1.0):
        mixed = (1 - lam) * s_mat.mean() * torch.ones_like(s_mat) + lam * s_mat
        w_ref = mixed.sum(dim=1)  # w_j = sum_i S~_ij
        s_ref = torch.einsum("ht,htv->v", w_ref, a[:, :, vis].double())
        s, w = text_prior_scores(a, text, vis, lam)
        assert torch.allclose(w.double(), w_ref, atol=1e-6), lam
        assert torch.allclose(s.double(), s_ref, atol=1e-6), lam


def test_top_sorted_breaks_ties_by_lower_index():
    s = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert top_sorted(s, 1).tolist() == [1]
    assert top_sorted(s, 3).tolist() == [0, 1, 3]
    assert top_sorted(s, 4).tolist() == [0, 1, 2, 3]
    assert top_sorted(s, 0).tolist() == [] and top_sorted(s, 10).tolist() == list(range(6))


def test_vista_vectors_are_the_last_position_difference_with_the_pca_quirk():
    n_layers, d = 3, 5
    pos = {layer: rand(40 + layer, 1, d) for layer in range(n_layers)}
    neg = {layer: rand(50 + layer, 1, d) for layer in range(n_layers)}
    for quirk in (True, False):
        dec = make_decoder("vista", {"reference_pca_quirk": quirk})
        ctx = DecodeContext(adapter=SimpleNamespace(num_layers=n_layers, layers=[]), prompts=[], probe_forward=None,
                            sampling=False)
        dec.ctx, dec.has_image, dec.steered = ctx, [False, True], []  # request 0 has no image
        ctx.prompts = [Prompt(text="a", images=[]), Prompt(text="b", images=[])]
        dec._steer_with(pos, neg)
        v = torch.stack([pos[layer][0] - neg[layer][0] for layer in range(n_layers)])
        if quirk:
            v[0, 0] += 1.0  # the reference's rank-1 PCA artefact: +1 on coordinate 0 of layer 0 only
        assert torch.allclose(dec.v_unit[1], torch.nn.functional.normalize(v, dim=-1), atol=1e-6)
        assert (dec.v_unit[0] == 0).all()  # no image: no steering vector
        assert ctx.report["vsv_norms"][1] == [round(float(x), 4) for x in v.norm(dim=-1)]


def test_fastv_default_and_ratio_budgets_keep_round_v_times_one_minus_r():
    from vlmguard.pruning import make_pruner

    fast = make_pruner("fastv", None, {})
    assert fast.params.K == 2 and fast.keep_count(576) == 288  # K = 2, R = 50%
    for r_pruned, v in ((0.75, 576), (0.3, 576), (0.9, 100)):
        assert make_pruner("fastv", 1 - r_pruned, {}).keep_count(v) == round(v * (1 - r_pruned))
    assert make_pruner("fastv", 64, {}).keep_count(576) == 64
