"""Regression tests from an audit of the decoders under unusual but legitimate requests through the engine's Python
API: mixed batches, ``n`` copies, stop strings / end of sequence on the first token, ``min_new_tokens``,
``max_new_tokens`` 1, seeded sampling alone / batched / twice, penalties with contrast branches, log-probabilities,
in-flight joins, prompts with no image or two images, and parameters at their documented edges.

Defects found (each test failed on the code as audited):

* ``min_new_tokens`` with a contrastive decoder (VCD, IAVA, LQCD at their default ``beta``): where the model is sure
  the answer has ended, the plausible set holds only the end-of-sequence token; holding it left every score at
  -inf and the argmax picked token 0 (``<pad>``) with log-probability -9999, at every such step.
* The scores of a held request were not renormalised once its end-of-sequence tokens were removed, so a token's
  ``steps[i].score`` (documented as its log-probability under the final distribution) disagreed with its
  ``logprobs[i].logprob``.
* LQCD's ``neutral_text`` as a one-entry list (one request) failed as soon as the request ran with copies of itself
  (``n`` > 1 choices, or identical requests batched by a server): "neutral_text has 1 entries for 2 requests".
* LQCD's oracle ``neutral_text`` for a raw prompt without the image placeholder(s) (or with a placeholder for a
  templated prompt) failed with the processor's "total number of <image> tokens ..." message, not naming it.
* A result's ``decoding`` report held every request of its batch: each decoder's per-request lists (``applied``,
  M3ID's ``gate_fired_steps``, VISTA's ``vsv_norms``, IAVA's ``selection``, LQCD's ``modes``, ``neutral_text`` and
  ``amateur_texts``, the latter built from the *other requests' prompts*), which ``/v1/generate`` returns to each
  client. A result now shows its own entries, as alone (``DecodeContext.per_request`` / ``request_report``).
"""
from __future__ import annotations

import pytest

from vlmguard.engine import Request, load_engine
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

POLAR = "Is there a dog in the image?"  # the bundled model answers "No" and is then sure the answer has ended


@pytest.fixture(scope="module")
def tiny():
    return load_engine("tiny")


@pytest.mark.parametrize("decoding", ["vcd", "iava", "lqcd"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_min_new_tokens_never_emits_padding_when_the_plausible_set_holds_only_the_end(tiny, decoding, do_sample):
    req = Request(POLAR, [random_image(0, (96, 96))])
    spec = GenerationSpec(decoding=decoding, max_new_tokens=5, min_new_tokens=3, logprobs=1, do_sample=do_sample,
                          seed=1)
    res = tiny.generate([req], spec)[0]
    pad = tiny.adapter.tokenizer.pad_token_id
    assert pad not in res.token_ids and len(res.token_ids) >= 3
    assert all(lp.logprob > -9999.0 for lp in res.logprobs)
    assert all(s.score > float("-inf") for s in res.steps)
    if not do_sample:  # the held step falls back to the main branch (plain decoding with the end held)
        plain = tiny.generate([req], GenerationSpec(max_new_tokens=5, min_new_tokens=3))[0]
        assert res.token_ids[:2] == plain.token_ids[:2]


def test_held_scores_are_the_log_probabilities_reported(tiny):
    req = Request(POLAR, [random_image(0, (96, 96))])
    res = tiny.generate([req], GenerationSpec(max_new_tokens=4, min_new_tokens=4, logprobs=0))[0]
    assert len(res.steps) == len(res.logprobs) == 4
    assert [s.score for s in res.steps] == pytest.approx([lp.logprob for lp in res.logprobs], abs=1e-4)


def test_lqcd_one_entry_neutral_text_serves_copies_of_the_request():
    eng = tiny_engine("llava")
    req = Request("Is there a dog in the image? I think the answer is yes.", [random_image(1, (40, 32))])
    neutral = "Is there a dog in the image?"
    as_list = GenerationSpec(decoding="lqcd", decoding_params={"neutral_text": [neutral]}, max_new_tokens=4)
    as_text = GenerationSpec(decoding="lqcd", decoding_params={"neutral_text": neutral}, max_new_tokens=4)
    copies = eng.generate([req, req], as_list)
    assert [r.token_ids for r in copies] == [r.token_ids for r in eng.generate([req, req], as_text)]
    assert [r.decoding["neutral_text"] for r in copies] == [[neutral]] * 2  # each its own entry, as alone


def test_lqcd_oracle_text_that_cannot_stand_for_the_prompt_is_named():
    eng = tiny_engine("llava")
    img = random_image(2, (40, 32))
    raw = Request(eng.adapter.format_prompt(Prompt("Is there a cat? Surely yes.", [img])), [img], raw_prompt=True)
    spec = GenerationSpec(decoding="lqcd", decoding_params={"neutral_text": "Is there a cat?"}, max_new_tokens=3)
    with pytest.raises(InvalidInput, match=r"request 0 is a raw prompt with 1 image.*neutral_text must be a whole raw"):
        eng.generate([raw], spec)
    templated = Request("Is there a cat? Surely yes.", [img])
    spec = GenerationSpec(decoding="lqcd", decoding_params={"neutral_text": "<image>\nIs there a cat?"},
                          max_new_tokens=3)
    with pytest.raises(InvalidInput, match=r"neutral_text of request 0 contains the model's image placeholder"):
        eng.generate([templated], spec)
    # a whole raw prompt as the neutral text still runs
    whole = eng.adapter.format_prompt(Prompt("Is there a cat?", [img]))
    res = eng.generate([raw], GenerationSpec(decoding="lqcd", decoding_params={"neutral_text": whole},
                                             max_new_tokens=3))[0]
    assert res.decoding["modes"] == ["leading"] and len(res.token_ids) == 3


@pytest.mark.parametrize("decoding", ["vcd", "m3id", "vista", "iava", "lqcd"])
def test_a_results_decoding_report_is_its_own_as_alone(decoding):
    eng = tiny_engine("llava")
    reqs = [Request("Is there a dog in the image? I think so.", [random_image(1, (40, 32))]),
            Request("a secret prompt of another client: is there a cat?", [random_image(2, (32, 40))]),
            Request("no image here", [])]
    spec = GenerationSpec(decoding=decoding, max_new_tokens=4)
    batched = eng.generate(reqs, spec)
    for req, got in zip(reqs, batched):
        alone = eng.generate([req], spec)[0]
        assert got.token_ids == alone.token_ids
        extra = set(got.decoding) - set(alone.decoding)
        if extra:  # VISTA computes no steering vectors for a text-only request alone; in a batch, its norms are 0
            assert extra == {"vsv_norms"} and not req.images and not any(got.decoding["vsv_norms"][0])
        assert set(alone.decoding) <= set(got.decoding)
        for key, value in alone.decoding.items():
            if key == "vsv_norms":  # rounded floats of a batched pre-pass
                assert got.decoding[key][0] == pytest.approx(value[0], abs=1e-3) and len(got.decoding[key]) == 1
            else:
                assert got.decoding[key] == value, key
    assert "secret" not in repr([r.decoding for r in (batched[0], batched[2])])
