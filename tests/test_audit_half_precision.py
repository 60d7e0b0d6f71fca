"""Half-precision (bfloat16 / float16) paths on the CPU: what GPU users run.

- every pruner x decoder, greedy and seeded sampling, on tiny LLaVA-1.5 and Qwen2-VL engines in bf16 and fp16: a
  batch of requests with different images gives each request what it gets alone (kept visual tokens; tokens,
  greedy ones up to a choice tied to within the dtype's rounding), with finite scores;
- LLaVA-NeXT in bf16: a padded batch row's prefill logits equal the row alone only to bf16 rounding (fp32: 1e-7),
  so near-tied greedy choices may differ there; the stated tolerance is checked instead of the tokens;
- the cheap attention-score facility agrees with eager attention's own half-precision weights (which round
  their probabilities to the dtype) and keeps the same top-k visual tokens where the ranking is not a near tie;
- pruner scores read half-precision value vectors in float32: inputs whose ranking a bf16 sum would tie;
- decoders stay finite and error-free in fp16 with logits in the thousands.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from vlmguard.engine import Engine, Request
from vlmguard.models.base import Prompt
from vlmguard.pruning.flowcut import stage_l_scores
from vlmguard.pruning.flowcut_qwen_vision import global_query_scores
from vlmguard.pruning.flowcut_vision import layer_scores
from vlmguard.pruning.scores import top_sorted
from vlmguard.spec import GenerationSpec
from vlmguard.testing import FAMILIES, random_image, tiny_llava

sys.path.insert(0, str(Path(__file__).parent))
from pruning_support import prefill  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = [torch.bfloat16, torch.float16]
PRUNERS = ["none", "random", "fastv", "adaptinfer", "flowcut"]
DECODERS = ["greedy", "vcd", "m3id", "vista", "iava", "lqcd"]
BUDGET = {"llava": 6, "llava_next": 8, "qwen2_vl": 3}


def half_engine(family: str, dtype: torch.dtype, **kw) -> Engine:
    """A fresh tiny engine in ``dtype`` (never the shared lru_cached fp32 one)."""
    model, proc = FAMILIES[family](seed=0, **kw)
    return Engine(model.to(dtype), proc, name=f"tiny-{family}-{dtype}")


def two_requests() -> list[Request]:
    return [Request("Is there a dog in the image?", [random_image(1, (40, 32))]),
            Request("describe the photo", [random_image(2, (64, 64))])]


# a logit's rounding in the dtype, in log-probability (the tiny random models' logits are of size ~1)
TIE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def same_tokens_up_to_a_tie(batched, alone, tol: float) -> bool:
    """The batch row's tokens equal the alone run's, or do until a step where the alone run's two candidates were
    tied to within ``tol`` (the batch's padded rows round differently in half precision, so a near-tied greedy
    choice may fall either way; the answers part there)."""
    for k, (b, a) in enumerate(zip(batched.token_ids, alone.token_ids)):
        if b != a:
            top = {t.token_id: t.logprob for t in alone.logprobs[k].top}
            return b in top and top[a] - top[b] <= tol
    return len(batched.token_ids) == len(alone.token_ids)


def finite_steps(result) -> bool:
    values = [v for s in result.steps for v in (s.main_prob, s.score, s.contrast_prob) if v is not None]
    return result.finish_reason != "error" and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_half_precision_batch_equals_alone_for_every_pruner_and_decoder(family, dtype):
    eng = half_engine(family, dtype)
    reqs = two_requests()
    for pruner in PRUNERS:
        for decoder in DECODERS:
            for sampled in (False, True) if decoder in ("greedy", "vcd") else (False,):
                spec = GenerationSpec(pruning=pruner, budget=None if pruner == "none" else BUDGET[family],
                                      decoding=decoder, max_new_tokens=3, do_sample=sampled,
                                      seed=7 if sampled else None, logprobs=5)
                what = f"{family} {dtype} {pruner} x {decoder} sampled={sampled}"
                batched = eng.generate(reqs, spec)
                for req, b in zip(reqs, batched):
                    alone = eng.generate([req], spec)[0]
                    assert finite_steps(b) and finite_steps(alone), what
                    if sampled:  # a seeded draw may land either side of a tie too: no tolerance to state
                        assert b.token_ids == alone.token_ids, what
                    else:
                        assert same_tokens_up_to_a_tie(b, alone, TIE[dtype]), what
                    assert b.kept_indices == alone.kept_indices, what


def test_llava_next_bf16_padded_row_matches_alone_to_bf16_rounding():
    """The smaller image's row is left-padded in the batch: its logits differ from alone by bf16 rounding of
    the padded attention only (stated tolerance: 1e-2 absolute on logits of size ~1; measured 3e-3). Its
    vision features are identical."""
    eng = half_engine("llava_next", torch.bfloat16)
    reqs = two_requests()
    batched, _, _ = prefill(eng, reqs, GenerationSpec(max_new_tokens=1))
    alone, _, _ = prefill(eng, reqs[:1], GenerationSpec(max_new_tokens=1))
    assert batched.dtype == torch.float32 and bool(torch.isfinite(batched).all())
    assert (batched[0] - alone[0]).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype,rel_tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=str)
def test_cheap_scores_match_half_precision_eager_attention(dtype, rel_tol):
    """Ours: fp32 softmax of the kernel's own half-precision q, k. Eager's: half-precision q k^T, probabilities
    rounded to the dtype: they agree to a few units of the dtype's rounding (bf16 2^-8, fp16 2^-11)."""
    model, proc = tiny_llava(attn="eager")
    model.to(dtype)
    eng = Engine(model, proc, attn_implementation="vlmguard_sdpa")
    prompts = [Prompt("Is there a dog in the image?", [random_image(1, (40, 32))]),
               Prompt("describe", [random_image(2, (64, 40))])]
    batch = eng.adapter.encode(prompts)
    probe = eng.probe_forward(prompts, score_layers=range(eng.adapter.num_layers), per_head=True)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True,
                    **batch.vision_inputs)
    model.set_attn_implementation("vlmguard_sdpa")
    vis = probe["seq"].visual_mask()
    compared = 0
    for layer, ours in probe["scores"].items():
        ref = out.attentions[layer][:, :, -1:, :].float()
        assert ours.dtype == torch.float32
        assert ((ours - ref).abs() <= rel_tol * ref + 1e-5).all(), layer
        for r in range(ours.shape[0]):
            pos = vis[r].nonzero().squeeze(1)
            ours_v, ref_v = ours[r, :, 0, pos].mean(0), ref[r, :, 0, pos].mean(0)
            k, gap, top = widest_gap(ref_v)
            if gap > 2 * rel_tol * top:  # no near tie at this cut: both must keep the same tokens
                assert top_sorted(ours_v, k).tolist() == top_sorted(ref_v, k).tolist(), (layer, r)
                compared += 1
    # the tiny model's attention is near uniform: bf16's rounding of eager's weights ties every cut there
    assert compared > 0 or dtype == torch.bfloat16


def widest_gap(scores: torch.Tensor) -> tuple[int, float, float]:
    """The keep count k whose cut (between the k-th and (k+1)-th largest score) has the widest gap: the gap
    and the k-th score."""
    ranked = scores.sort(descending=True).values
    gaps = ranked[:-1] - ranked[1:]
    k = int(gaps.argmax()) + 1
    return k, float(gaps[k - 1]), float(ranked[k - 1])


def tied_in_bf16_values() -> torch.Tensor:
    """Two tokens whose L1 value norms are 256.5 and 257: in bf16 both round to 256 (a tie, the lower index
    would win); in fp32 the second token is larger. Every entry is exact in bf16."""
    return torch.tensor([[256.0, 0.5], [256.0, 1.0]], dtype=torch.bfloat16)


def test_flowcut_llm_scores_rank_bf16_values_in_float32():
    v = torch.cat([tied_in_bf16_values(), torch.zeros(1, 2, dtype=torch.bfloat16)])[None]  # (1, 3, 2), query 2
    probs = torch.tensor([[0.25, 0.25, 0.5]])  # uniform over the two visual keys
    s = stage_l_scores(probs, v, torch.tensor([0, 1]), query=2)
    assert s.dtype == torch.float32
    assert top_sorted(s, 1).tolist() == [1]


def test_flowcut_tower_scores_rank_bf16_values_in_float32():
    tokens = torch.cat([torch.zeros(1, 2, dtype=torch.bfloat16), tied_in_bf16_values()])  # CLS (zero) first
    probs = torch.full((1, 1, 1, 3), 1 / 3)
    _, s = layer_scores(probs, tokens[None, None], None)
    assert s.dtype == torch.float32 and top_sorted(s[0], 1).tolist() == [1]
    _, s_g = global_query_scores(torch.full((1, 1, 1, 2), 0.5), tied_in_bf16_values()[None, None])
    assert s_g.dtype == torch.float32 and top_sorted(s_g, 1).tolist() == [1]


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_stay_finite_in_float16_with_large_logits(decoder):
    """lm_head scaled so the fp16 logits reach the thousands: log-softmax, contrast, M3ID's weight and VISTA's
    window mix run in fp32 and stay finite (fp16 log-softmax of such logits would be -inf / NaN)."""
    model, proc = tiny_llava(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(3000.0)
    eng = Engine(model.to(torch.float16), proc, name="loud")
    spec = GenerationSpec(decoding=decoder, max_new_tokens=3, logprobs=2, repetition_penalty=1.3)
    for res in eng.generate(two_requests() + [Request("what color", [])], spec):
        assert finite_steps(res), decoder
        assert all(math.isfinite(t.logprob) for t in res.logprobs)
