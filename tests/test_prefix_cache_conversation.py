"""The prefix cache and conversations: a turn whose prompt goes on past its image prefix (the history: earlier
questions and answers) keeps its whole prompt, and a finished request its prompt and the answer tokens it fed, so
the next turn takes the history and computes only its new question (and what of the last answer its text does not
give back token for token); a row takes the longest run of tokens an entry shares with it (a conversation that
branches takes the common part). Short single questions (POPE's) keep the image prefix alone. Every turn answers
as a fresh prefill does.

The tiny models' answers are no text their tokenizers give back token for token ("photophoto..." is read as
letters), so here a turn takes the last prompt and not the last answer; `test_a_finished_request_keeps_its_prompt_
and_answer` checks the answer's entry against a fresh prefill of its tokens."""
from __future__ import annotations

import pytest
import torch

from test_prefix_cache import assert_same, engine, image_prefix_length, images
from test_prefix_cache_pruned import same_report
from test_prefix_cache import cache_off_afterwards  # noqa: F401 (the fixture: every engine left without a cache)
from vlmguard.engine import Request
from vlmguard.prefix_cache import MIN_TAIL, TEXT_ANCHOR, PrefixCache, image_prefixes
from vlmguard.spec import GenerationSpec

QUESTIONS = ["Describe the picture.", "And what colors are in it?", "Is there a dog on the left?"]
TEXT_QUESTIONS = ["Tell me a short story about a cat and a dog who live in a small house.", "And what happened next?",
                  "How did it end?"]


def conversation(eng, spec, image, questions=QUESTIONS, answers=None, image_at=0):
    """The turns of a chat about ``image`` (None: a chat without one; it comes with question ``image_at``), each
    asked with the history before it (the earlier questions and the model's own answers, or ``answers`` where
    given); the results, one per turn."""
    messages, results = [], []
    for k, q in enumerate(questions):
        content = ([{"type": "image"}] if k == image_at and image is not None else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        prompt = eng.adapter.format_messages(messages)
        shown = [image] if image is not None and k >= image_at else []
        (result,) = eng.generate([Request(prompt, shown, raw_prompt=True)], spec)
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
    # turn 2 takes turn 1's prompt (kept with its answer), turn 3 all of turn 2's: only the last answer (as its
    # text reads back) and the new question are computed
    assert took[0] == 0 and took[1] >= cached[0].prompt_tokens > n, (took, n)
    assert took[2] >= cached[1].prompt_tokens, (took, cached[1].prompt_tokens)
    # the longest entry: turn 3's prompt and answer (every token but the last); turn 2's prompt, which it begins
    # with, was dropped
    lengths = sorted(e.length for e in answer_entries(cache))
    assert lengths[-1] == cached[2].prompt_tokens + len(cached[2].token_ids) - 1
    assert cached[1].prompt_tokens not in lengths


@pytest.mark.parametrize("family,budget", [("llava", 14), ("llava", 4), ("qwen2_vl", 0.25)])
def test_a_conversation_with_flowcut_takes_its_history_and_its_cut(family, budget):
    """LLaVA-1.5: FlowCut's kept tokens sit at compact positions and the history after them is the same from turn
    to turn: the turns take it, and the image's cut; at 14 kept tokens the image prefix (17 tokens) is worth an
    entry of its own, at 4 (7 tokens) it is not, but the history after it is. Qwen2-VL: stage L cuts inside the
    LLM, so no prefix is taken, but the tower's cut is."""
    eng = engine(family)
    image = images(family)[0]
    spec = GenerationSpec(pruning="flowcut", budget=budget, max_new_tokens=MIN_TAIL + 8,
                          min_new_tokens=MIN_TAIL + 8, logprobs=2)
    fresh = conversation(eng, spec, image)
    cache = eng.enable_prefix_cache(64)
    cached = conversation(eng, spec, image, answers=[r.text for r in fresh])
    assert_same(fresh, cached)
    for a, c in zip(fresh, cached):
        # Qwen2-VL's stage L heatmap follows the question
        assert same_report(a.pruning, c.pruning) or family == "qwen2_vl"
    took = [r.timings.prompt_cached_tokens for r in cached]
    assert cache.stats.pruned_hits == 2
    if family == "qwen2_vl":
        assert took == [0, 0, 0] and cache.stats.entries == 0
        return
    fed = [r.timings.prefill_tokens for r in cached]  # the prompt as the LLM got it: FlowCut's kept tokens
    assert took[0] == 0 and took[1] >= fed[0] and took[2] >= fed[1], (took, fed)


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


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_a_text_only_conversation_takes_its_history(family):
    """A chat without an image is anchored by its first tokens: each turn takes the last one's prompt and answer
    (as far as its text reads back), and answers as a fresh prefill does."""
    eng = engine(family)
    spec = GenerationSpec(max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8, logprobs=2)
    fresh = conversation(eng, spec, None, TEXT_QUESTIONS)
    cache = eng.enable_prefix_cache(64)
    cached = conversation(eng, spec, None, TEXT_QUESTIONS, answers=[r.text for r in fresh])
    assert_same(fresh, cached)
    took = [r.timings.prompt_cached_tokens for r in cached]
    assert took[0] == 0 and took[1] >= cached[0].prompt_tokens > TEXT_ANCHOR, took
    assert took[2] >= cached[1].prompt_tokens, took
    assert (cache.stats.hits, cache.stats.misses, cache.stats.image_entries) == (2, 1, 0)
    lengths = sorted(e.length for e in answer_entries(cache))
    assert lengths[-1] == cached[2].prompt_tokens + len(cached[2].token_ids) - 1


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_an_image_that_joins_a_chat_without_one_keeps_the_history_before_it(family):
    """A chat's image may come with a later question (the dashboard's Chat does this): that turn takes the
    text-only history before it (anchored by its first tokens), the next one the whole prompt with the image, and
    every turn answers as a fresh prefill does."""
    eng = engine(family)
    image = images(family)[0]
    spec = GenerationSpec(max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8, logprobs=2)
    questions = ["Tell me about cats and dogs.", "Which is here?", "Is it on the left?"]  # (LLaVA-NeXT's context)
    fresh = conversation(eng, spec, image, questions, image_at=1)
    cache = eng.enable_prefix_cache(64)
    cached = conversation(eng, spec, image, questions, answers=[r.text for r in fresh], image_at=1)
    assert_same(fresh, cached)
    assert fresh[0].visual_tokens == 0 and fresh[1].visual_tokens == fresh[2].visual_tokens > 0
    took = [r.timings.prompt_cached_tokens for r in cached]
    assert took[0] == 0 and took[1] >= cached[0].prompt_tokens > TEXT_ANCHOR, took
    assert took[2] >= cached[1].prompt_tokens, took
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_rows_that_share_an_image_prefix_share_it_rather_than_take_the_text_before_it():
    """A text-only prompt kept with a long system text: a lone request about an image with that system text takes
    it (the text before its image), but questions about one image in one batch share their image prefix among
    themselves instead (taking the system text alone would cost them the image); the same tokens either way.
    (Qwen2-VL: its template puts the system text before the image; the tiny LLaVA templates drop it.)"""
    eng = engine("qwen2_vl")
    image = images("qwen2_vl")[0]
    system = "You are a careful assistant. Answer briefly and only about what you are shown."
    spec = GenerationSpec(max_new_tokens=4, logprobs=1)
    batch = [Request(q, [image], system=system) for q in QUESTIONS]
    fresh = eng.generate(batch, spec) + eng.generate([batch[0]], spec)
    cache = eng.enable_prefix_cache(64)
    text = eng.generate([Request(TEXT_QUESTIONS[0], system=system)], GenerationSpec(max_new_tokens=MIN_TAIL + 8))[0]
    assert text.visual_tokens == 0 and len(cache) == 1  # the text-only prompt, kept whole
    shared = eng.generate(batch, spec)
    assert [r.timings.prompt_cached_tokens for r in shared] == [0, 0, 0]
    # the first row computes the shared prefix, the others take it: at least the image prefix
    assert [r.timings.prefill_shared_tokens >= image_prefix_length(eng, batch[0]) for r in shared] == [False, True,
                                                                                                        True]
    cache.clear()
    eng.generate([Request(TEXT_QUESTIONS[0], system=system)], GenerationSpec(max_new_tokens=MIN_TAIL + 8))
    (alone,) = eng.generate([batch[0]], spec)
    assert TEXT_ANCHOR <= alone.timings.prompt_cached_tokens < image_prefix_length(eng, batch[0])
    assert_same(fresh, shared + [alone])


def test_text_only_prompts_keep_no_anchor_of_their_own_but_share_one():
    """A short text-only question keeps nothing (its first tokens alone are no entry); a prompt of no more than
    ``TEXT_ANCHOR`` tokens is not looked up; two chats that begin with the same instructions share them."""
    eng = engine("llava")
    cache = eng.enable_prefix_cache(64)
    short = GenerationSpec(max_new_tokens=2)
    (one,) = eng.generate([Request("tell me about the cat on the red mat please", [])], short)
    assert TEXT_ANCHOR < one.prompt_tokens < TEXT_ANCHOR + MIN_TAIL
    assert cache.stats.entries == 0 and cache.stats.misses == 1
    (tiny,) = eng.generate([Request("hi", [], raw_prompt=True)], short)
    assert tiny.prompt_tokens <= TEXT_ANCHOR and (cache.stats.hits, cache.stats.misses) == (0, 1)
    rules = "You are a careful assistant. Answer in short sentences, and say so when you are not sure of a thing."
    first, second = [f"{rules} What is a cat?"], [f"{rules} What is a dog?"]
    spec = GenerationSpec(max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8, logprobs=2)
    conversation(eng, spec, None, questions=first)
    kept, eng.prefix_cache = eng.prefix_cache, None
    fresh = conversation(eng, spec, None, questions=second)
    eng.prefix_cache = kept
    cached = conversation(eng, spec, None, questions=second)
    assert_same(fresh, cached)
    ids = []
    for q in (first, second):
        prompt = eng.adapter.format_messages([{"role": "user", "content": [{"type": "text", "text": q[0]}]}])
        batch = eng.adapter.encode(eng._prompts([Request(prompt, [], raw_prompt=True)]))
        ids.append(batch.input_ids[0][batch.attention_mask[0]].tolist())
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)  # the template's opening and the rules
    assert TEXT_ANCHOR < shared == cached[0].timings.prompt_cached_tokens < cached[0].prompt_tokens


@pytest.mark.parametrize("family,decoding,params", [
    ("llava", "vcd", {}), ("qwen2_vl", "vcd", {}), ("llava", "m3id", {}), ("qwen2_vl", "m3id", {}),
    ("qwen2_vl", "m3id", {"uncond_mode": "mask"})])
def test_a_contrastive_chat_keeps_its_branch_rows(family, decoding, params):
    """VCD's noised view (its noise seeded by the image) and M3ID's image-free or masked view are the same from turn
    to turn (``Branch.cache``): their rows are kept as the request's are, so each turn's branch rows take the last
    turn's branch prompt and answer too, not only the request's own rows; every turn answers as a fresh one."""
    eng = engine(family)
    image = images(family)[0]
    spec = GenerationSpec(decoding=decoding, decoding_params=params, max_new_tokens=MIN_TAIL + 8,
                          min_new_tokens=MIN_TAIL + 8, logprobs=2)
    fresh = conversation(eng, spec, image)
    eng.enable_prefix_cache(64)
    cached = conversation(eng, spec, image, answers=[r.text for r in fresh])
    assert_same(fresh, cached)
    own = [r.timings.prompt_cached_tokens for r in cached]
    branch = [r.timings.prefill_cached_tokens - r.timings.prompt_cached_tokens for r in cached]
    n_visual = cached[0].visual_tokens
    assert own[0] == branch[0] == 0 and own[1] >= cached[0].prompt_tokens, (own, branch)
    # the branch's prompt is the request's (M3ID's image-free view: less its image, delimiters included)
    fewer = n_visual + 4 if decoding == "m3id" and not params else 0
    for k in (1, 2):
        assert branch[k] >= cached[k - 1].prompt_tokens - fewer > 0, (k, own, branch)


@pytest.mark.parametrize("decoding", ["lqcd", "iava"])
def test_branches_that_change_with_the_question_keep_nothing(decoding):
    """LQCD's queries begin as the request's own rows do (they take its entries) and IAVA's masked image follows
    the question: only the request's own rows are kept (one prefix entry, one image's visual tokens)."""
    eng = engine("llava")
    cache = eng.enable_prefix_cache(64)
    spec = GenerationSpec(decoding=decoding, max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8)
    eng.generate([Request(QUESTIONS[0], [images("llava")[0]])], spec)
    assert len(answer_entries(cache)) == 1 and cache.stats.image_entries == 1


def test_a_short_image_prefix_keeps_no_entry_of_its_own():
    """FlowCut keeping 4 tokens leaves an image prefix of 7 (under ``MIN_TOKENS``): single questions keep nothing
    (only the image's cut), and take nothing."""
    eng = engine("llava")
    image = images("llava")[0]
    cache = eng.enable_prefix_cache(64)
    spec = GenerationSpec(pruning="flowcut", budget=4, max_new_tokens=2)
    results = [eng.generate([Request(q, [image])], spec)[0]
               for q in ("Is there a dog in the image?", "Is there a cat in the image?")]
    assert [r.timings.prompt_cached_tokens for r in results] == [0, 0]
    assert cache.stats.entries == 0 and cache.stats.pruned_entries == 1 and cache.stats.pruned_hits == 1


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


def test_a_request_holds_its_prompt_only_where_its_answer_could_make_an_entry():
    from vlmguard.sequence import Seq

    visual = torch.full((2, 33), -1)
    visual[0, 7:23] = torch.arange(16)  # row 0, after 3 pads: the image prefix of 20 tokens, then 10 of text
    valid = torch.ones(2, 33, dtype=torch.bool)
    valid[0, :3] = False
    seq = Seq(hidden=torch.zeros(2, 33, 4), valid=valid, positions=torch.arange(33).expand(2, -1), visual=visual)
    cache = PrefixCache(max_bytes=1 << 20)
    # 10 text tokens and all but the last of the answer must reach 32
    assert not cache.may_keep_answer(seq, 0, 22) and cache.may_keep_answer(seq, 0, 23)
    # row 1, text only: its 33 tokens past its first TEXT_ANCHOR (16) and all but the last of the answer
    assert not cache.may_keep_answer(seq, 1, 15) and cache.may_keep_answer(seq, 1, 16)


# ---- the answer: a finished request keeps its prompt and the answer tokens it fed ---------------------------

def answer_entries(cache) -> list:
    return [e for bucket in cache._entries.values() for e in bucket if hasattr(e, "keys")]


def assert_entry_continues_as_a_fresh_prefill(eng, entry, next_id: int = 5):
    """The entry's tokens and one more, prefilled from the cache (the whole entry taken) and from nothing: the same
    last logits. So its keys and values are those of its tokens, the answer's included."""
    from vlmguard.sequence import Seq

    one = eng.adapter.embed_tokens(torch.tensor([next_id])).to(entry.hidden.dtype)
    last = entry.positions[..., -1:] + 1
    seq = Seq(hidden=torch.cat([entry.hidden, one])[None], valid=torch.ones(1, entry.length + 1, dtype=torch.bool),
              positions=torch.cat([entry.positions, last], dim=-1)[..., None, :],
              visual=torch.cat([entry.visual, torch.tensor([-1])])[None])
    fresh, _, _ = eng.runner.prefill(seq)
    cached, state, _ = eng.runner.prefill(seq, share_prefixes=True, prefix_cache=eng.prefix_cache, store_rows=[])
    assert state.cached_tokens == [entry.length]
    assert torch.allclose(cached, fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_a_finished_request_keeps_its_prompt_and_answer(family):
    eng = engine(family)
    cache = eng.enable_prefix_cache(64)
    spec = GenerationSpec(max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8)
    (result,) = eng.generate([Request(QUESTIONS[0], [images(family)[0]])], spec)
    (entry,) = answer_entries(cache)  # the prompt's image prefix, dropped for the longer entry
    # every answer token but the last, which stopped it at max_new_tokens and was never fed
    assert entry.length == result.prompt_tokens + len(result.token_ids) - 1
    assert_entry_continues_as_a_fresh_prefill(eng, entry)


def test_a_request_whose_rows_a_pre_pass_prefilled_keeps_its_answer():
    """IAVA's pre-pass prefills the request's own rows, and their cache goes on to decoding: the finished request
    still keeps its prompt and answer, and the entry continues as a fresh prefill of its tokens."""
    eng = engine("llava")
    assert eng.reuse_probe_prefill
    cache = eng.enable_prefix_cache(64)
    spec = GenerationSpec(decoding="iava", max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8)
    (result,) = eng.generate([Request(QUESTIONS[0], [images("llava")[0]])], spec)
    longest = max(answer_entries(cache), key=lambda e: e.length)
    assert longest.length == result.prompt_tokens + len(result.token_ids) - 1
    assert_entry_continues_as_a_fresh_prefill(eng, longest)


@pytest.mark.parametrize("decoding", ["greedy", "vcd"])
def test_requests_joining_and_leaving_a_batch_keep_their_own_answers(decoding):
    """Rows reordered as requests leave, one joining midway: each entry holds its own row's keys and values (with
    VCD, each request's noised rows too: two entries a request)."""
    from pruning_support import run_joined

    eng = engine("llava")
    cache = eng.enable_prefix_cache(64)
    a, b, c = images("llava")
    specs = [GenerationSpec(decoding=decoding, max_new_tokens=n, min_new_tokens=n)
             for n in (MIN_TAIL + 4, MIN_TAIL + 12)]
    results = run_joined(eng, specs, [Request(QUESTIONS[0], [a]), Request(QUESTIONS[1], [b])],
                         [Request(QUESTIONS[2], [c])], join_after=3,
                         later_spec=GenerationSpec(decoding=decoding, max_new_tokens=40, min_new_tokens=40))
    lengths = sorted(e.length for e in answer_entries(cache))
    rows = 2 if decoding == "vcd" else 1
    assert lengths == sorted(r.prompt_tokens + len(r.token_ids) - 1 for r in results for _ in range(rows))
    for entry in answer_entries(cache):
        assert_entry_continues_as_a_fresh_prefill(eng, entry)


@pytest.mark.parametrize("spec", [GenerationSpec(pruning="fastv", budget=8), GenerationSpec(decoding="vista"),
                                  GenerationSpec(max_new_tokens=MIN_TAIL // 2)])
def test_no_answer_is_kept_where_the_prefix_depends_on_more_or_is_short(spec):
    """An LLM-side cut and VISTA's steering change a row's keys (no entry at all); a short answer is not worth one
    beyond the image prefix."""
    eng = engine("llava")
    cache = eng.enable_prefix_cache(64)
    spec = spec.model_copy(update={"max_new_tokens": min(spec.max_new_tokens, MIN_TAIL + 8),
                                   "min_new_tokens": min(spec.max_new_tokens, MIN_TAIL + 8)})
    (result,) = eng.generate([Request(QUESTIONS[0], [images("llava")[0]])], spec)
    assert all(e.length <= result.prompt_tokens for e in answer_entries(cache))


def test_the_copies_of_a_request_with_n_choices_keep_their_own_answers():
    """``n`` choices prefill the request once and sample each copy on its own row: each keeps its own answer."""
    eng = engine("llava")
    cache = eng.enable_prefix_cache(64)
    request = Request(QUESTIONS[0], [images("llava")[0]])
    specs = [GenerationSpec(do_sample=True, seed=s, max_new_tokens=MIN_TAIL + 8, min_new_tokens=MIN_TAIL + 8)
             for s in (1, 2)]
    results = eng.generate([request, request], specs)
    assert results[0].token_ids != results[1].token_ids and results[0].timings.prefill_batch == 2
    entries = answer_entries(cache)
    assert sorted(e.length for e in entries) == [r.prompt_tokens + len(r.token_ids) - 1 for r in results]
    for entry in entries:
        assert_entry_continues_as_a_fresh_prefill(eng, entry)


# ---- many conversations about one image: the lookup chooses by token hashes ---------------------------------

def chats_about_one_image(k: int, length: int = 80, image_prefix: int = 30, dim: int = 16):
    """A cache holding ``k`` conversations that share an image prefix and then each go their own way (the i-th
    shares 40 + i tokens with the probe, a further turn of the last one), and that probe."""
    from types import SimpleNamespace

    from vlmguard.sequence import Seq

    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(length, dim, generator=gen)
    visual = torch.full((1, length), -1)
    visual[0, 4:image_prefix] = torch.arange(image_prefix - 4)

    def seq_of(hidden):
        return Seq(hidden=hidden[None], valid=torch.ones(1, length, dtype=torch.bool),
                   positions=torch.arange(length)[None], visual=visual.clone())

    kv = torch.randn(1, 1, length, 2, generator=gen)
    cache = PrefixCache(max_bytes=1 << 30, min_tail=8)
    for i in range(k):
        own = probe.clone()
        own[40 + i:] = torch.randn(length - 40 - i, dim, generator=gen)
        s = seq_of(own)
        cache.store(s, cache.lookup(s), SimpleNamespace(layers=[SimpleNamespace(keys=kv, values=-kv)]),
                    [torch.ones(1, length, dtype=torch.bool)])
    return cache, seq_of(probe)


def test_a_lookup_among_many_conversations_compares_one_entry_in_full(monkeypatch):
    """Twelve conversations about one image: a turn's lookup chooses the entry by token hashes and compares only
    that one value for value, and takes what comparing every entry takes (the longest shared run)."""
    from vlmguard.prefix_cache import CachedPrefix

    cache, probe = chats_about_one_image(12)
    assert len(cache) == 12
    compared = []
    real = CachedPrefix.common

    def counting(self, *args, **kwargs):
        compared.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CachedPrefix, "common", counting)
    (found,) = cache.lookup(probe).found
    assert found.length == 40 + 11 and len(compared) == 1
    compared.clear()
    (n,), (h,) = image_prefixes(probe)
    entry, most = cache._best(h, probe, 0, 0, n, probe.length - 1, None)  # every entry in full
    assert most == found.length and len(compared) == 12 and torch.equal(entry.hidden[:most], found.hidden)


def test_two_tokens_hashing_alike_fall_back_to_comparing_every_entry():
    """The longest run of hashes is checked: where its values differ (made here by changing an entry's values and
    not its hashes), the lookup compares every entry and takes the true longest run."""
    cache, probe = chats_about_one_image(6)
    entries = [e for bucket in cache._entries.values() for e in bucket]
    longest = max(entries, key=lambda e: e.common(probe, 0, 0, probe.length))
    longest.hidden[35] += 1.0  # its hashes still say 45 tokens are shared; its values, 35
    (found,) = cache.lookup(probe).found
    assert found.length == 44  # the next longest, which its values confirm
    assert torch.equal(found.hidden, probe.hidden[0, :44])
