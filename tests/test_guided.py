"""Structured output (``GenerationSpec.guided``: a JSON schema, any JSON object, a regex, a Lark grammar;
``vlmguard/guided.py``): answers that parse and follow their schema under every decoder, greedy equal to
transformers' ``generate`` with the same format as a brute-force ``prefix_allowed_tokens_fn``, per-request formats in
a batch and in a running batch, word-level vocabularies (the bundled model), dead ends, and bad input."""
from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

from vlmguard.bench.runner import run_benchmark
from vlmguard.decoding.registry import DECODERS
from vlmguard.engine import Engine
from vlmguard.errors import InvalidInput
from vlmguard.guided import allowed_mask, new_matcher, restrict_to_guides
from vlmguard.models.base import Prompt
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec, GuidedOutput
from vlmguard.testing import random_image, tiny_engine
from vlmguard.token_text import token_pieces

from pruning_support import run_joined

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "count", "tags"],
          "properties": {"color": {"enum": ["red", "blue", "green"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}}}}


def _guided(**fields) -> GenerationSpec:
    return GenerationSpec(max_new_tokens=64, guided=fields)


def test_a_spec_takes_exactly_one_format_and_not_with_choices_or_a_minimum_length():
    assert GenerationSpec(guided={"regex": "(yes|no)"}).guided.kind == "regex"
    assert GuidedOutput(json_object=True).kind == "json_object"
    for kwargs, needle in ((dict(guided={}), r"exactly one of .* \(got none\)"),
                           (dict(guided={"regex": "a", "grammar": "start: 'a'"}), r"\(got regex, grammar\)"),
                           (dict(guided={"regex": "a"}, choices=["a"]), "guided and choices cannot go together"),
                           (dict(guided={"regex": "a"}, min_new_tokens=2), "guided and min_new_tokens cannot"),
                           (dict(guided={"json_object": 1}), "valid boolean"),
                           (dict(guided={"regex": ""}), "at least 1 character"),
                           (dict(guided={"json_schema": {"enum": ["x" * 70000]}}), "over 65536 characters"),
                           (dict(guided={"regex": "a", "whitespace": "tabs"}), "'flexible' or 'compact'")):
        with pytest.raises(InvalidInput, match=needle) as e:
            GenerationSpec(**kwargs)
        assert e.value.param.startswith("guided"), kwargs


def _brute_force(pieces: list[str], special: set[int], answer: str, language: set[str]) -> list[int]:
    """The tokens whose text keeps ``answer`` a prefix of the language, one space allowed before it (as
    vlmguard/guided.py allows): what a format's mask must hold, the end of sequence aside."""
    full = language | {" " + s for s in language}
    prefixes = {s[:k] for s in full for k in range(1, len(s) + 1)}
    return [t for t, p in enumerate(pieces) if t not in special and p and answer + p in prefixes]


def test_the_mask_keeps_what_the_format_allows_renormalised_and_ends_a_complete_answer():
    eng = tiny_engine("qwen2_vl")
    tok, width, eos = eng.adapter.tokenizer, eng.adapter.logits_width, sorted(eng.adapter.eos_token_ids)
    pieces = [token_pieces(tok).text(t) for t in range(width)]
    m = new_matcher(tok, width, eos, GuidedOutput(regex="(yes|no)"))
    first = allowed_mask(m, width).nonzero().flatten().tolist()
    assert first == _brute_force(pieces, set(tok.all_special_ids), "", {"yes", "no"})
    assert {pieces[t] for t in first} >= {"yes", " yes", "y", " "}
    scores = torch.log_softmax(torch.randn(2, width), dim=-1)
    out, stuck = restrict_to_guides(scores, [m, None], eos)
    assert not stuck and torch.equal(out[1], scores[1])
    assert torch.isinf(out[0, [t for t in range(width) if t not in first]]).all()
    assert out[0, first].exp().sum().item() == pytest.approx(1.0)
    assert m.consume_token(tok.convert_tokens_to_ids("yes"))
    assert allowed_mask(m, width).nonzero().flatten().tolist() == eos  # whole: only the end of sequence


@pytest.mark.parametrize("decoding", sorted(DECODERS.names()))
def test_every_decoder_answers_json_that_follows_the_schema(decoding):
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(2, (40, 32))])
    res = eng.generate([req], GenerationSpec(max_new_tokens=64, decoding=decoding, seed=0, logprobs=1,
                                             guided={"json_schema": SCHEMA, "whitespace": "compact"}))[0]
    assert res.finish_reason == "stop", res.text
    jsonschema.validate(json.loads(res.text), SCHEMA)
    assert all(e.logprob > -math.inf for e in res.logprobs)


def test_any_json_object_with_flexible_whitespace_and_a_pruner():
    eng = tiny_engine("qwen2_vl")
    req = Request("describe the photo", [random_image(3, (48, 40))])
    spec = GenerationSpec(max_new_tokens=200, pruning="flowcut", budget=4, decoding="vista", do_sample=True, seed=3,
                          guided={"json_schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                  "required": ["n"], "maxProperties": 1}})
    res = eng.generate([req], spec)[0]
    assert res.finish_reason == "stop" and res.visual_tokens_kept[-1] < res.visual_tokens
    assert set(json.loads(res.text)) == {"n"}


def test_greedy_equals_transformers_generate_with_the_formats_allowed_tokens():
    """A format held token by token: at every step greedy takes the allowed token the model scores highest, as
    transformers' generate does when ``prefix_allowed_tokens_fn`` allows the tokens whose text keeps the answer a
    prefix of the regex's language (worked out here by brute force over that finite language)."""
    eng = tiny_engine("qwen2_vl")
    tok, eos = eng.adapter.tokenizer, sorted(eng.adapter.eos_token_ids)
    language = {f"{w}, {a}{b}" for w in ("yes", "no", "cat") for a in "0123456789" for b in "0123456789"}
    pieces = [token_pieces(tok).text(t) for t in range(eng.adapter.logits_width)]
    special = set(tok.all_special_ids)
    for k in range(3):
        req = Request("what is in the picture?", [random_image(20 + k, (48, 40))])
        res = eng.generate([req], GenerationSpec(max_new_tokens=16, guided={"regex": "(yes|no|cat), [0-9]{2}"}))[0]
        assert res.text in language and res.finish_reason == "stop"
        inputs = eng.processor(images=req.images, text=[eng.adapter.format_prompt(Prompt(req.prompt, req.images))],
                               return_tensors="pt")
        n = inputs["input_ids"].shape[1]

        def allowed(_batch, ids, n=n):
            answer = "".join(pieces[t] for t in ids[n:].tolist())
            return _brute_force(pieces, special, answer, language) + (eos if answer.lstrip(" ") in language else [])

        out = eng.model.generate(**inputs, max_new_tokens=16, do_sample=False, prefix_allowed_tokens_fn=allowed,
                                 eos_token_id=eos)
        ref = out[0, n:].tolist()
        assert res.token_ids == ref[:ref.index(eos[0])] if eos[0] in ref else ref


def test_each_request_keeps_its_own_format_in_a_batch_and_when_it_joins_one():
    eng = tiny_engine("llava_next")
    reqs = [Request("describe the photo", [random_image(i + 1, (40, 32))]) for i in range(4)]
    specs = [GenerationSpec(max_new_tokens=10),
             GenerationSpec(max_new_tokens=40, guided={"json_schema": SCHEMA, "whitespace": "compact"}),
             GenerationSpec(max_new_tokens=10, guided={"regex": "(yes|no)[.!]"}, do_sample=True, seed=4),
             GenerationSpec(max_new_tokens=10, guided={"grammar": 'start: "a " COLOR " car"\nCOLOR: "red" | "blue"'})]
    alone = [eng.generate([r], s)[0] for r, s in zip(reqs, specs)]
    assert [r.token_ids for r in eng.generate(reqs, specs)] == [r.token_ids for r in alone]
    jsonschema.validate(json.loads(alone[1].text), SCHEMA)
    assert alone[2].text in {"yes.", "yes!", "no.", "no!"} and alone[3].text in {"a red car", "a blue car"}
    joined = run_joined(eng, specs[:1], reqs[:1], reqs[1:], join_after=2, later_spec=specs[1:])
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]


def test_an_answer_cut_by_max_new_tokens_ends_where_it_was_cut():
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(2, (40, 32))])
    res = eng.generate([req], GenerationSpec(max_new_tokens=4, guided={"json_schema": SCHEMA,
                                                                         "whitespace": "compact"}))[0]
    assert res.finish_reason == "length" and res.text.startswith("{") and len(res.token_ids) == 4


def test_a_word_level_vocabulary_follows_formats_its_words_can_write_and_refuses_the_rest():
    """The bundled model's tokens are whole words with the space before them (" dog"): a format that forces a
    space before a word works, JSON (no "{" among its tokens) is refused before any model work, and a format whose
    next text no token writes ends the request with an error naming it."""
    eng = Engine.load("tiny")
    req = Request("Is there a dog in the image?", [random_image(5, (96, 96))])
    res = eng.generate([req], GenerationSpec(max_new_tokens=4, guided={"regex": "(Yes|No)"}))[0]
    assert res.text in ("Yes", "No") and res.finish_reason == "stop"
    grammar = 'start: "A " NOUN "."\nNOUN: "dog" | "cat" | "person"'
    res = eng.generate([Request("Describe the image.", req.images)], GenerationSpec(guided={"grammar": grammar}))[0]
    assert res.text in ("A dog.", "A cat.", "A person.")
    with pytest.raises(InvalidInput, match="has no token that begins an answer in the requested json object") as e:
        eng.generate([req], GenerationSpec(guided={"json_object": True}))
    assert e.value.param == "guided.json_object"
    stuck = eng.generate([req], GenerationSpec(guided={"regex": "(Yes|No)s"}))[0]  # " Yes" then no "s" token
    assert stuck.finish_reason == "error" and stuck.error_code == "FormatDeadEnd"
    assert "no token of this model's vocabulary continues the answer" in stuck.error and stuck.text in ("Yes", "No")


def test_bad_formats_are_refused_naming_the_field():
    eng = tiny_engine("qwen2_vl")
    req = Request("describe the photo", [random_image(2, (40, 32))])
    for guided, needle, param in (({"regex": "[a-"}, "unclosed character class", "guided.regex"),
                                  ({"grammar": "start: foo"}, 'unknown name: "foo"', "guided.grammar"),
                                  ({"json_schema": {"type": "nope"}}, "Invalid type: nope", "guided.json_schema")):
        with pytest.raises(InvalidInput, match=needle) as e:
            eng.generate([req], GenerationSpec(guided=guided))
        assert e.value.param == param and "\n" not in str(e.value)
    unique = {"type": "array", "items": {"enum": ["cat", "dog"]}, "uniqueItems": True, "maxItems": 2}
    with pytest.raises(InvalidInput, match=r'Unimplemented keys: \["uniqueItems"\]') as e:
        eng.generate([req], GenerationSpec(guided={"json_schema": unique}))
    assert e.value.param == "guided.json_schema"
    lenient = eng.generate([req], GenerationSpec(max_new_tokens=40, guided={"json_schema": unique, "strict": False,
                                                                            "whitespace": "compact"}))[0]
    assert set(json.loads(lenient.text)) <= {"cat", "dog"}  # the rest of the schema still holds
    with pytest.raises(InvalidInput, match="benchmarks do not take guided"):
        run_benchmark(None, "chair", None, GenerationSpec(guided={"json_object": True}), db=":memory:")


@pytest.mark.parametrize("kind", ["byte-level-bpe", "sentencepiece-byte-fallback"])
def test_real_tokenizer_kinds_are_read_by_llguidance_and_masked_as_their_bytes_say(kind):
    """The vocabularies of the released checkpoints (Qwen2's byte-level BPE, Llama's SentencePiece with byte
    fallback, where "▁yes" is the first token of an answer) go to llguidance as they are: the first mask of a regex
    holds exactly the tokens whose bytes begin an answer, and the tokenizer's own spelling of an answer runs to
    its end."""
    from test_detokenize import TOKENIZERS

    tok = TOKENIZERS[kind]()
    width, eos = len(tok), [tok.eos_token_id]
    pieces = token_pieces(tok)
    special = set(tok.all_special_ids)
    texts = [bytes(pieces.bytes(t)).decode("utf-8", errors="replace") for t in range(width)]
    m = new_matcher(tok, width, eos, GuidedOutput(regex="(red|blue) car"))
    assert allowed_mask(m, width).nonzero().flatten().tolist() == _brute_force(texts, special, "",
                                                                               {"red car", "blue car"})
    for t in tok("blue car", add_special_tokens=False)["input_ids"]:  # SentencePiece: "▁blue", "▁car"
        assert allowed_mask(m, width)[t] and m.consume_token(t)
    assert allowed_mask(m, width).nonzero().flatten().tolist() == eos
