"""Prefill passes by length (vlmguard/prefill_groups.py, ``LayerRunner._prefill_groups``): rows whose work differs
greatly are prefilled in separate passes and their states merged, in the batch's row order. Which rows go
together, and that every result is what one padded pass gives (tokens, log-probabilities to float rounding,
visual-token and cache figures), with M3ID's short image-free row, a batch of image and text-only requests whose
order the groups do not keep, and rows that take the prefix cache beside rows that do not."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import vlmguard.prefill_groups as prefill_groups
import vlmguard.runner as runner_mod
from test_prefix_cache import cache_off_afterwards  # noqa: F401 (the fixture: every engine left without a cache)
from test_prefix_cache import engine, images
from vlmguard.engine import Request
from vlmguard.prefill_groups import PASS_TOKENS, length_groups
from vlmguard.prefix_sharing import PrefixPlan
from vlmguard.spec import GenerationSpec


def test_rows_of_very_different_length_go_apart():
    assert length_groups([628, 52], None) == [[0], [1]]  # M3ID's image-free row beside its request's
    assert length_groups([600, 40, 610, 35], None) == [[0, 2], [1, 3]]  # the groups in the order of their first rows
    assert length_groups([40, 600], None) == [[0], [1]]
    assert length_groups([628], None) is None
    assert length_groups([300, 280, 260], None) is None  # alike: one pass
    # [100, 20]: 200 slots in one pass against 100 + 20 + PASS_TOKENS apart: too little saved for another pass
    assert 200 - (120 + PASS_TOKENS) < PASS_TOKENS and length_groups([100, 20], None) is None


def test_rows_that_share_a_prefix_stay_together_and_cached_tokens_are_no_work():
    # rows 0 and 1 share 500 tokens (computed once), whatever their remainders; row 2 is short: its own pass
    plan = PrefixPlan(leaders=[0], group=[0, 0, -1], length=[500])
    assert length_groups([520, 1500, 40], plan) == [[0, 1], [2]]
    # a chat turn that takes 840 of its 913 tokens from the prefix cache beside a row that takes nothing: the turn's
    # 73 new tokens no longer run padded to 913
    entry = SimpleNamespace(length=840)
    plan = PrefixPlan(leaders=[], group=[-1, -1], length=[], cached=[entry, None])
    assert length_groups([913, 913], plan) == [[0], [1]]
    plan = PrefixPlan(leaders=[], group=[-1, -1], length=[], cached=[entry, entry])
    assert length_groups([913, 913], plan) is None


@pytest.fixture
def cheap_passes(monkeypatch):
    """The tiny models' prompts are a few dozen tokens: an extra pass is taken to cost one token slot and any saving
    to be worth it, so their batches split as a real model's would at its lengths."""
    monkeypatch.setattr(prefill_groups, "PASS_TOKENS", 1)
    monkeypatch.setattr(prefill_groups, "MIN_SAVING", 0.0)


def spy_groups(m) -> list:
    """The groups of every grouped prefill from now on (``m``: a monkeypatch or its context)."""
    calls = []
    real = runner_mod.LayerRunner._prefill_groups

    def counting(self, seq, groups, *args, **kwargs):
        calls.append(groups)
        return real(self, seq, groups, *args, **kwargs)

    m.setattr(runner_mod.LayerRunner, "_prefill_groups", counting)
    return calls


def both(eng, requests, spec, monkeypatch):
    """The results with rows grouped by length, and with one padded pass; the groups of each grouped prefill."""
    with monkeypatch.context() as m:
        calls = spy_groups(m)
        grouped = eng.generate(requests, spec)
    with monkeypatch.context() as m:
        m.setattr(runner_mod, "length_groups", lambda counts, plan: None)
        one = eng.generate(requests, spec)
    return grouped, one, calls


def assert_alike(grouped, one):
    assert [r.token_ids for r in grouped] == [r.token_ids for r in one]
    for a, b in zip(grouped, one):
        assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-4)
        assert (a.visual_tokens_kept, a.kept_indices, a.prompt_tokens, a.timings.prefill_tokens,
                a.timings.prefill_shared_tokens, a.timings.prompt_cached_tokens) == (
            b.visual_tokens_kept, b.kept_indices, b.prompt_tokens, b.timings.prefill_tokens,
            b.timings.prefill_shared_tokens, b.timings.prompt_cached_tokens)


@pytest.mark.usefixtures("cheap_passes")
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_m3ids_image_free_rows_are_prefilled_apart(family, monkeypatch):
    eng = engine(family)
    a, b, _ = images(family)
    requests = [Request("Is there a dog in the image?", [a]), Request("Describe the picture.", [b])]
    spec = GenerationSpec(decoding="m3id", max_new_tokens=6, logprobs=2)
    grouped, one, calls = both(eng, requests, spec, monkeypatch)
    assert calls[0] == [[0, 1], [2, 3]]  # the requests' rows, then their image-free rows (branch-major)
    assert_alike(grouped, one)


@pytest.mark.usefixtures("cheap_passes")
def test_a_batch_whose_groups_interleave_keeps_its_row_order(monkeypatch):
    """Image requests around a text-only one: the groups are rows 0 and 2, then row 1; each request gets its own
    answer back, as one pass and one by one give it."""
    eng = engine("llava")
    a, b, _ = images("llava")
    requests = [Request("Is there a dog in the image?", [a]), Request("a cat", []),
                Request("Describe the picture.", [b])]
    spec = GenerationSpec(max_new_tokens=6, logprobs=2)
    grouped, one, calls = both(eng, requests, spec, monkeypatch)
    assert calls[0] == [[0, 2], [1]]
    assert_alike(grouped, one)
    assert_alike(grouped, [eng.generate([r], spec)[0] for r in requests])


@pytest.mark.usefixtures("cheap_passes")
def test_rows_that_take_the_cache_go_apart_from_rows_that_do_not(monkeypatch):
    """A request whose image prefix the cache holds, beside one about a new image: prefilled apart, both answer as
    one pass does, and each keeps its entry for the next prefill."""
    eng = engine("llava")
    a, b, _ = images("llava")
    spec = GenerationSpec(max_new_tokens=6, logprobs=2)
    question = "Is there a dog in the image? Answer with one word, and say nothing else than that word, please."
    cache = eng.enable_prefix_cache(64)
    eng.generate([Request(question, [a])], spec)
    calls = spy_groups(monkeypatch)
    grouped = eng.generate([Request(question + " Now!", [a]), Request(question, [b])], spec)
    assert calls[0] == [[0], [1]]
    assert grouped[0].timings.prompt_cached_tokens > 0 and grouped[1].timings.prompt_cached_tokens == 0
    eng.prefix_cache = None
    one = eng.generate([Request(question + " Now!", [a]), Request(question, [b])], spec)
    assert [r.token_ids for r in grouped] == [r.token_ids for r in one]
    eng.prefix_cache = cache
    again = eng.generate([Request(question + " Now!", [b])], spec)[0]
    assert again.timings.prompt_cached_tokens > 0  # the new image's row kept its prefix


@pytest.mark.usefixtures("cheap_passes")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_grouped_prefills_under_flash_attention_answer_as_sdpa(family, monkeypatch):
    """FlashAttention-2's path (a CPU stand-in for its kernels): the merged groups decode through its 2-D key mask
    and answer as SDPA does, plain and with M3ID."""
    import flash_emulation
    from vlmguard.engine import Engine
    from vlmguard.testing import FAMILIES

    kernels = flash_emulation.install(monkeypatch)
    model, proc = FAMILIES[family](seed=0)
    sdpa = Engine(model, proc, name="sdpa")
    model, proc = FAMILIES[family](seed=0)
    flash = Engine(model, proc, name="flash", attn_implementation="flash_attention_2")
    a, b, _ = images(family)
    requests = [Request("Is there a dog in the image?", [a]), Request("a cat", []), Request("Describe it.", [b])]
    for spec in (GenerationSpec(max_new_tokens=6), GenerationSpec(decoding="m3id", max_new_tokens=6)):
        want = sdpa.generate(requests, spec)
        kernels.clear()
        calls = spy_groups(monkeypatch)
        got = flash.generate(requests, spec)
        assert calls and kernels["varlen"] + kernels["func"] > 0, spec.decoding
        assert [r.token_ids for r in got] == [r.token_ids for r in want], spec.decoding
