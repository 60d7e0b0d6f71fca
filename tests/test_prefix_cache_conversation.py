"""The prefix cache and conversations: a turn whose prompt goes on past its image prefix (the history: earlier
questions and answers) keeps its whole prompt, so the next turn takes the history too and computes only the last
answer and its new question; a row takes the longest run of tokens an entry shares with it (a conversation that
branches takes the common part). Short single questions (POPE's) keep the image prefix alone. Every turn answers
as a fresh prefill does."""
from __future__ import annotations

import pytest

from test_prefix_cache import assert_same, engine, image_prefix_length, images
from test_prefix_cache import cache_off_afterwards  # noqa: F401 (the fixture: every engine left without a cache)
from vlmguard.engine import Request
from vlmguard.prefix_cache import MIN_TAIL, PrefixCache
from vlmguard.spec import GenerationSpec

QUESTIONS = ["Describe the picture.", "And what colors are in it?", "Is there a dog on the left?"]


def conversation(eng, spec, image, questions=QUESTIONS, answers=None):
    """The turns of a chat about ``image``, each asked with the history before it (the earlier questions and the
    model's own answers, or ``answers`` where given); the results, one per turn."""
    messages, results = [], []
    for k, q in enumerate(questions):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        prompt = eng.adapter.format_messages(messages)
        (result,) = eng.generate([Request(prompt, [image], raw_prompt=True)], spec)
        results.append(result)
        answer = answers[k] if answers else result.text
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return results


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_each_turn_takes_the_whole_history_the_last_turn_computed(family):
    eng = engine(family)
    image = images(family)[0]
    spec = GenerationSpec(max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8, logprobs=2)
    fresh = conversation(eng, spec, image)
    cache = eng.enable_prefix_cache(64)
    cached = conversation(eng, spec, image, answers=[r.text for r in fresh])
    assert_same(fresh, cached)
    took = [r.timings.prompt_cached_tokens for r in cached]
    n = image_prefix_length(eng, Request(QUESTIONS[0], [image]))
    # turn 2 takes turn 1's image prefix (a single question keeps no more); turn 3 all of turn 2's prompt: only
    # turn 2's answer and its own question are computed
    assert took[0] == 0 and took[1] == n, (took, n)
    assert took[2] >= cached[1].prompt_tokens - 2, (took, cached[1].prompt_tokens)  # the template's seam
    # one entry holds the conversation: turn 3's prompt, which began with each earlier one
    assert cache.stats.entries == 1
    (entry,) = [e for bucket in cache._entries.values() for e in bucket if hasattr(e, "keys")]
    assert entry.length == cached[2].prompt_tokens


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_conversation_with_flowcut_takes_its_history_and_its_cut(family):
    """LLaVA-1.5: FlowCut's kept tokens sit at compact positions and the history after them is the same from turn
    to turn: the turns take it, and the image's cut. Qwen2-VL: stage L cuts inside the LLM, so no prefix is taken,
    but the tower's cut is."""
    eng = engine(family)
    image = images(family)[0]
    budget = {"llava": 14, "qwen2_vl": 0.25}[family]  # LLaVA: an image prefix of 17 tokens, enough for an entry
    spec = GenerationSpec(pruning="flowcut", budget=budget, max_new_tokens=MIN_TAIL + 8,
                          min_new_tokens=MIN_TAIL + 8, logprobs=2)
    fresh = conversation(eng, spec, image)
    cache = eng.enable_prefix_cache(64)
    cached = conversation(eng, spec, image, answers=[r.text for r in fresh])
    assert_same(fresh, cached)
    for a, c in zip(fresh, cached):
        assert c.pruning == a.pruning or family == "qwen2_vl"  # Qwen2-VL's stage L heatmap follows the question
    took = [r.timings.prompt_cached_tokens for r in cached]
    assert cache.stats.pruned_hits == 2
    if family == "qwen2_vl":
        assert took == [0, 0, 0] and cache.stats.entries == 0
        return
    assert 0 == took[0] < took[1] < took[2] and took[2] >= cached[1].prompt_tokens - 2, took
    assert cache.stats.entries == 1


def test_a_conversation_that_branches_takes_the_part_it_shares():
    """Turn 3 asked again with another answer in the history: it takes the history up to where the answers
    differ, and answers as a fresh prefill does."""
    eng = engine("llava")
    image = images("llava")[0]
    spec = GenerationSpec(max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8, logprobs=2)
    first = conversation(eng, spec, image)
    answers = [first[0].text, first[1].text[: len(first[1].text) // 2] + " and a cat", ""]
    fresh = conversation(eng, spec, image, answers=answers)
    eng.enable_prefix_cache(64)
    conversation(eng, spec, image, answers=[r.text for r in first])
    other = conversation(eng, spec, image, answers=answers)
    assert_same(fresh, other)
    took = [r.timings.prompt_cached_tokens for r in other]
    n = image_prefix_length(eng, Request(QUESTIONS[0], [image]))
    assert took[1] > n  # turn 2's prompt, kept by the first conversation's turn 3: all of it but its last token
    assert n < took[2] < other[2].prompt_tokens - 5  # up to the changed answer


def test_single_questions_keep_the_image_prefix_alone():
    """POPE's questions are short: each image keeps one entry, its image prefix, however many are asked."""
    eng = engine("llava")
    image = images("llava")[0]
    cache = eng.enable_prefix_cache(64)
    spec = GenerationSpec(max_new_tokens=2)
    for q in ("Is there a dog in the image?", "Is there a cat in the image?", "Is there a car in the image?"):
        eng.generate([Request(q, [image])], spec)
    n = image_prefix_length(eng, Request(QUESTIONS[0], [image]))
    lengths = [e.length for bucket in cache._entries.values() for e in bucket if hasattr(e, "keys")]
    assert lengths == [n] and cache.stats.hits == 2


def test_an_entry_shares_its_leading_tokens_and_a_head_is_a_view():
    import torch

    from vlmguard.prefix_cache import CachedPrefix
    from vlmguard.sequence import Seq

    hidden = torch.randn(10, 4)
    keys = [torch.randn(1, 2, 10, 3)]
    entry = CachedPrefix(hidden=hidden, positions=torch.arange(10), visual=torch.full((10,), -1), keys=keys,
                         values=[-keys[0]])
    seq = Seq(hidden=torch.cat([torch.zeros(1, 2, 4), hidden[None, :8]], dim=1), valid=torch.ones(1, 10).bool(),
              positions=torch.cat([torch.zeros(2), torch.arange(8)]).long()[None],
              visual=torch.full((1, 10), -1))
    seq.hidden[0, 2 + 6] += 1  # the row's 7th token differs
    assert entry.common(seq, 0, 2, limit=10) == 6 and entry.common(seq, 0, 2, limit=4) == 4
    head = entry.head(6)
    assert head.length == 6 and head.keys[0].data_ptr() == keys[0].data_ptr() and entry.head(10) is entry
    assert torch.equal(head.values[0], -keys[0][..., :6, :])
    assert PrefixCache(max_bytes=1).min_tail == MIN_TAIL
