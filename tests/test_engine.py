"""Foundation: the engine on tiny random models of every family."""
from __future__ import annotations

import pytest
import torch

from vlmguard.engine import Request
from vlmguard.errors import ContextTooLong, InvalidInput, UnknownMethod
from vlmguard.models.base import Prompt
from vlmguard.pruning.base import NoParams, Pruner, PruneContext
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
SIZES = [(40, 32), (64, 40), (32, 64)]


def requests():
    return [
        Request("Is there a dog in the image?", [random_image(1, SIZES[0])]),
        Request("describe the photo", [random_image(2, SIZES[1])]),
        Request("what color is the car", [random_image(3, SIZES[2])]),
    ]


def hf_greedy(engine, req: Request, n: int) -> list[int]:
    text = engine.adapter.format_prompt(Prompt(req.prompt, req.images))
    inputs = engine.processor(images=req.images, text=[text], return_tensors="pt")
    out = engine.model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_matches_transformers_generate(family):
    eng = tiny_engine(family)
    spec = GenerationSpec(max_new_tokens=8)
    # the tiny random models never emit EOS early with these prompts; force full length in HF too
    for req in requests()[:2]:
        ours = eng.generate([req], spec)[0]
        assert ours.token_ids == hf_greedy(eng, req, len(ours.token_ids))[: len(ours.token_ids)]
        assert len(ours.token_ids) == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(family):
    eng = tiny_engine(family)
    spec = GenerationSpec(max_new_tokens=6)
    reqs = requests()
    batched = eng.generate(reqs, spec)
    single = [eng.generate([r], spec)[0] for r in reqs]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert all(b.visual_tokens == s.visual_tokens for b, s in zip(batched, single))


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_yields_same_tokens(family):
    eng = tiny_engine(family)
    spec = GenerationSpec(max_new_tokens=6)
    reqs = requests()[:2]
    full = eng.generate(reqs, spec)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    text: dict[int, str] = {0: "", 1: ""}
    done = {}
    for ev in eng.stream(reqs, spec):
        if ev.done:
            done[ev.index] = ev.result
        elif ev.token_id is not None:
            streamed[ev.index].append(ev.token_id)
            text[ev.index] += ev.text
    for i in range(2):
        assert done[i].token_ids == full[i].token_ids
        assert text[i].strip() == full[i].text
        assert set(streamed[i]) <= set(full[i].token_ids)


def test_sampling_seeded_batched_equals_single():
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=6, decoding="sample", temperature=1.5, top_k=20, top_p=0.9, seed=7)
    reqs = requests()
    batched = eng.generate(reqs, spec)
    single = [eng.generate([r], spec)[0] for r in reqs]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    greedy = eng.generate(reqs, GenerationSpec(max_new_tokens=6))
    assert [r.token_ids for r in batched] != [r.token_ids for r in greedy]


class KeepFirstHalfAtLayer1(Pruner):
    """Test-only LLM-side pruner: after layer 1 keep the first half of each row's visual tokens."""

    side = "llm"

    def after_layer(self, ctx: PruneContext, layer_idx, seq, scores):
        if layer_idx != 1:
            return None
        vis = seq.visual_mask()
        keep = ~vis & seq.valid
        for r in range(seq.batch_size):
            n = int(vis[r].sum())
            keep[r] |= vis[r] & (seq.visual[r] < n // 2)
        return keep


class KeepEvenVision(Pruner):
    """Test-only vision-side pruner: keep the even-indexed visual tokens, compact positions."""

    side = "vision"
    position_mode = "compact"

    def prune_images(self, ctx):
        feats = ctx.adapter.image_features(ctx.batch)
        kept = [None if f is None else torch.arange(0, f.shape[0], 2) for f in feats]
        return [None if f is None else f[k] for f, k in zip(feats, kept)], kept


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruner_cls", [KeepFirstHalfAtLayer1, KeepEvenVision])
def test_reduced_visual_set_prefill_and_decode(family, pruner_cls, monkeypatch):
    eng = tiny_engine(family)
    pruner = pruner_cls(NoParams(), None)
    spec = GenerationSpec(max_new_tokens=5)
    real_resolve = GenerationSpec.resolve
    monkeypatch.setattr(GenerationSpec, "resolve", lambda self: (pruner, real_resolve(self)[1]))
    reqs = requests()
    batched = eng.generate(reqs, spec)
    single = [eng.generate([r], spec)[0] for r in reqs]
    for b, s in zip(batched, single):
        assert len(b.token_ids) == 5
        n = b.visual_tokens
        if pruner_cls is KeepFirstHalfAtLayer1:
            assert b.visual_tokens_kept[:2] == [n, n]
            assert b.visual_tokens_kept[2:] == [n // 2] * (len(b.visual_tokens_kept) - 2)
            assert b.kept_indices == list(range(n // 2))
        else:
            assert b.kept_indices == list(range(0, n, 2))
            assert set(b.visual_tokens_kept) == {len(range(0, n, 2))}
        assert b.token_ids == s.token_ids


def test_stop_strings_and_eos():
    eng = tiny_engine("llava")
    req = requests()[0]
    full = eng.generate([req], GenerationSpec(max_new_tokens=8))[0]
    assert full.finish_reason == "length"
    stop = full.text[2:5]
    cut = eng.generate([req], GenerationSpec(max_new_tokens=8, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_streamed_pieces_add_up_to_the_result_text_when_a_stop_string_follows_a_space():
    """The result's text is stripped; the stream sent the space before a stop string as well, so an OpenAI
    client joining the deltas got "... street. " where the answer said "... street."."""
    from vlmguard.engine import Engine

    eng = Engine.load("tiny")
    req = Request("Please describe this image in detail.", [random_image(3, (96, 96))])
    full = eng.generate([req], GenerationSpec(max_new_tokens=20))[0].text
    stop = full.split(" ")[4]  # a word inside the answer: the text before it ends with a space
    for spec in (GenerationSpec(max_new_tokens=20, stop=[stop]), GenerationSpec(max_new_tokens=20)):
        result = eng.generate([req], spec)[0]
        events = list(eng.stream([req], spec))
        assert "".join(ev.text for ev in events) == result.text == events[-1].result.text
    assert result.text == full


def test_bad_inputs_raise_clear_errors():
    eng = tiny_engine("llava")
    req = requests()[0]
    with pytest.raises(UnknownMethod, match="unknown pruning method 'nope'"):
        eng.generate([req], GenerationSpec(pruning="nope", budget=4))
    with pytest.raises(InvalidInput, match="Extra inputs"):
        eng.generate([req], GenerationSpec(decoding_params={"alpha": 1}))
    with pytest.raises(ContextTooLong, match="exceeds the model's context"):
        eng.generate([Request("dog " * 600, req.images)], GenerationSpec(max_new_tokens=4))
    with pytest.raises(InvalidInput, match="PIL image"):
        eng.generate([Request("hi", ["not an image"])], GenerationSpec())
    with pytest.raises(InvalidInput, match="budget"):
        GenerationSpec.build(pruning="none", budget=0)
    with pytest.raises(InvalidInput, match="budget"):
        GenerationSpec.build(pruning="none", budget=-3)


@pytest.mark.parametrize("kwargs, needle", [
    ({"budget": True}, "budget: must be a number, not a boolean"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_spec_fields_fail_as_one_line_invalid_input_even_when_constructed_directly(kwargs, needle):
    with pytest.raises(InvalidInput, match=needle):
        GenerationSpec(**kwargs)


def test_misused_python_api_gets_invalid_input_not_a_deep_error():
    from vlmguard.engine import pick_device

    eng = tiny_engine("llava")
    img = random_image(0)
    cases = [(["hi"], "expected a Request, got str"), (Request("hi", [img]), "must be a list of Request objects"),
             ([Request("hi", img)], "images must be a list"), ([Request("hi", None)], "images must be a list"),
             ([Request("hi", [img], system=5)], "system must be a string")]
    for requests, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            eng.generate(requests, GenerationSpec(max_new_tokens=1))
    with pytest.raises(InvalidInput, match="must be a GenerationSpec"):
        eng.generate([Request("hi", [img])], {"max_new_tokens": 1})
    assert len(eng.generate(iter([Request("hi", [img])]), GenerationSpec(max_new_tokens=1))) == 1
    with pytest.raises(InvalidInput, match="unknown device 'banana'"):
        pick_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="CUDA is not available"):
            pick_device("cuda")
