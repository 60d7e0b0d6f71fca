"""Guided choice (``GenerationSpec.choices``, vLLM's ``guided_choice``): the restriction's arithmetic, answers that
are one of the choices under every decoder, the greedy choice against a logit bias that allows only the choices,
per-request choices in a batch and in a running batch, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from vlmguard.bench.runner import run_benchmark
from vlmguard.choices import allowed_tokens, choice_paths, restrict_to_choices
from vlmguard.decoding.registry import DECODERS
from vlmguard.errors import InvalidInput
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

from pruning_support import run_joined

CHOICES = ["a red car", "a red cup", "two dogs"]


def test_the_tokens_allowed_continue_a_choice_and_end_one():
    paths = [(5, 6, 7), (5, 6, 9), (8,)]
    assert allowed_tokens(paths, []) == ({5, 8}, False)
    assert allowed_tokens(paths, [5, 6]) == ({7, 9}, False)
    assert allowed_tokens(paths, [8]) == (set(), True)


class _Tok:
    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.table[text]}


def test_scores_keep_the_allowed_tokens_renormalised_or_fall_back_to_the_main_branch():
    tok = _Tok({"ab": [1, 2], "c": [3]})
    spec, free = GenerationSpec(choices=["ab", "c"]), GenerationSpec()
    scores = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]] * 3), dim=-1)
    scores[2] = torch.tensor([0.0, float("-inf"), float("-inf"), float("-inf"), 0.0])  # a plausible set without them
    fallback = torch.log_softmax(torch.zeros(3, 5), dim=-1)
    out = restrict_to_choices(scores, [[], [], [1]], [spec, free, spec], tok, eos={0}, fallback=fallback)
    assert out[0, [0, 2, 4]].tolist() == [float("-inf")] * 3
    assert out[0, [1, 3]].exp().tolist() == pytest.approx([1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2)])
    assert torch.equal(out[1], scores[1])  # no choices: untouched
    assert out[2].exp().tolist() == pytest.approx([0, 0, 1, 0, 0])  # "ab" goes on with 2: the main branch's scores
    whole = restrict_to_choices(scores[:1], [[3]], [spec], tok, eos={0})
    assert whole[0].exp().tolist() == pytest.approx([1, 0, 0, 0, 0])  # "c" is whole: only the end of sequence


@pytest.mark.parametrize("decoding", sorted(DECODERS.names()))
def test_every_decoder_answers_with_one_of_the_choices(decoding):
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(2, (40, 32))])
    res = eng.generate([req], GenerationSpec(max_new_tokens=12, decoding=decoding, seed=0, choices=CHOICES,
                                             logprobs=1))[0]
    assert res.text in CHOICES and res.finish_reason == "stop", (res.text, res.finish_reason)
    assert all(e.logprob > -math.inf for e in res.logprobs)


def test_the_greedy_choice_is_the_one_a_bias_against_every_other_token_picks():
    """Single-token choices: greedy picks the allowed token the decoder scores highest, as it does when every
    other token is biased by -100; with choices the answer then ends."""
    eng = tiny_engine("qwen2_vl")
    tok = eng.adapter.tokenizer
    words = ["cat", "dog", "car"]
    ids = [choice_paths(tok, (w,))[0] for w in words]
    assert all(len(i) == 1 for i in ids)
    allowed = {i[0] for i in ids}
    others = {t: -100.0 for t in range(eng.adapter.logits_width) if t not in allowed}
    for k in range(3):
        req = Request("what is in the picture?", [random_image(10 + k, (48, 40))])
        for decoding in ("greedy", "vcd"):
            chosen = eng.generate([req], GenerationSpec(max_new_tokens=4, decoding=decoding, choices=words))[0]
            biased = eng.generate([req], GenerationSpec(max_new_tokens=1, decoding=decoding, logit_bias=others))[0]
            assert chosen.token_ids[:1] == biased.token_ids and chosen.text in words


def test_each_request_keeps_its_own_choices_in_a_batch_and_when_it_joins_one():
    eng = tiny_engine("llava_next")
    reqs = [Request("describe the photo", [random_image(i + 1, (40, 32))]) for i in range(3)]
    specs = [GenerationSpec(max_new_tokens=8), GenerationSpec(max_new_tokens=8, choices=CHOICES),
             GenerationSpec(max_new_tokens=8, choices=["yes", "no"], do_sample=True, seed=4)]
    alone = [eng.generate([r], s)[0] for r, s in zip(reqs, specs)]
    assert [r.token_ids for r in eng.generate(reqs, specs)] == [r.token_ids for r in alone]
    assert alone[1].text in CHOICES and alone[2].text in ("yes", "no")
    joined = run_joined(eng, specs[:1], reqs[:1], reqs[1:], join_after=2, later_spec=specs[1:])
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]


def test_bad_choices_are_refused():
    for kwargs, needle in ((dict(choices=[""]), "at least 1 character"), (dict(choices=["x"] * 65), "at most 64"),
                           (dict(choices=["Yes"], min_new_tokens=1), "cannot go together"),
                           (dict(choices=["x" * 513]), "at most 512 characters")):
        with pytest.raises(InvalidInput, match=needle):
            GenerationSpec(**kwargs)
    with pytest.raises(InvalidInput, match="choice '' has no tokens") as e:
        choice_paths(_Tok({"": []}), ("",))
    assert e.value.param == "choices"
    with pytest.raises(InvalidInput, match="benchmarks do not take choices"):
        run_benchmark(None, "chair", None, GenerationSpec(choices=["Yes"]), db=":memory:")
