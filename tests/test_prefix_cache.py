"""The prefix cache across prefills (vlmguard/prefix_cache.py, ``Engine.enable_prefix_cache``): a request whose
system text and image an earlier prefill computed takes their keys and values, and gets what a fresh prefill gives
(the same tokens, log-probabilities within float rounding), with every family and decoder, beside rows that share
a prefix within their batch, with a vision-side pruner, under eager attention and when it joins a running batch.
Entries are compared in full before use, evicted least recently used first within the budget, and never used
where a row's prefix depends on more than its tokens (an LLM-side cut, VISTA's per-request steering)."""
from __future__ import annotations

import pytest
import torch

from pruning_support import count_tower_images, run_joined
from vlmguard.engine import Request
from vlmguard.errors import InvalidInput
from vlmguard.prefix_cache import MIN_TOKENS, PrefixCache, image_prefixes
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

SIZE = {"llava": (64, 48), "llava_next": (64, 48), "qwen2_vl": (112, 112)}  # image prefixes of 16 tokens or more


@pytest.fixture(autouse=True)
def cache_off_afterwards():
    """The tiny engines are shared by the whole suite: each test leaves them without a cache."""
    used.clear()
    yield
    for eng in used:
        eng.prefix_cache = None


used: list = []


def engine(family: str, attn: str = "sdpa"):
    eng = tiny_engine(family, attn=attn)
    eng.prefix_cache = None
    used.append(eng)
    return eng


def images(family: str):
    w, h = SIZE[family]
    return random_image(1, (w, h)), random_image(2, (h, w)), random_image(3, (w, w))


def first_turn(family: str) -> list[Request]:
    a, b, _ = images(family)
    return [Request("Is there a dog in the image?", [a]), Request("describe this picture", [b])]


def second_turn(family: str) -> list[Request]:
    """Questions about the first turn's images (one of them twice), a new image and a text-only request."""
    a, b, c = images(family)
    return [Request("Is there a cat in the image?", [a]), Request("what color is the car?", [b]),
            Request("Is there a person in the image?", [a]), Request("Is there a cat in the image?", [c]),
            Request("Is there a bus in the image?", [c]), Request("a cat", [])]


def both_ways(eng, spec, turns):
    """Every turn answered without the cache, then with it (a fresh one)."""
    eng.prefix_cache = None
    fresh = [eng.generate(t, spec) for t in turns]
    eng.enable_prefix_cache(64)
    cached = [eng.generate(t, spec) for t in turns]
    return fresh, cached


def assert_same(fresh, cached):
    assert [r.token_ids for r in cached] == [r.token_ids for r in fresh]
    for a, c in zip(fresh, cached):
        assert [x.logprob for x in c.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4)
        assert (c.visual_tokens_kept, c.kept_indices, c.prompt_tokens, c.timings.prefill_tokens) == (
            a.visual_tokens_kept, a.kept_indices, a.prompt_tokens, a.timings.prefill_tokens)


def image_prefix_length(eng, req: Request) -> int:
    batch = eng.adapter.encode(eng._prompts([req]))
    seq = eng.adapter.build_sequence(batch, eng.adapter.image_features(batch), eng.model.dtype, eng.device)
    return image_prefixes(seq)[0][0]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("decoding", ["greedy", "lqcd", "vcd", "m3id", "iava", "vista"])
def test_a_second_turn_about_the_same_images_takes_their_prefill_from_the_cache(family, decoding):
    eng = engine(family)
    spec = GenerationSpec(decoding=decoding, max_new_tokens=6, logprobs=2)
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn(family), second_turn(family)])
    assert_same(fresh1 + fresh2, cached1 + cached2)
    assert all(r.timings.prefill_cached_tokens == 0 for r in fresh1 + fresh2 + cached1)
    took = [r.timings.prefill_cached_tokens for r in cached2]
    if decoding == "vista":  # its prefill's hooks steer each request: nothing is shared, nothing taken
        assert took == [0] * 6
        return
    # the rows about the first turn's images (the main rows; a decoder's rows with the same image too) take their
    # image prefix; the new image and the text-only request take nothing
    lengths = [image_prefix_length(eng, r) for r in second_turn(family)[:3]]
    assert min(lengths) >= MIN_TOKENS and took[3:] == [0, 0, 0]
    assert all(t >= n and t % n == 0 for t, n in zip(took, lengths)), (took, lengths)
    assert eng.prefix_cache.stats.hits >= 3 and len(eng.prefix_cache) >= 3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cache_hits_and_prefixes_shared_in_the_batch_under_eager_attention(family):
    """Rows about a cached image take it while the two rows about the new image share theirs in the batch: both
    sources in one prefill, with every mask explicit."""
    eng = engine(family, attn="eager")
    spec = GenerationSpec(decoding="lqcd", max_new_tokens=5, logprobs=2)
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn(family), second_turn(family)])
    assert_same(fresh1 + fresh2, cached1 + cached2)
    assert [r.timings.prefill_cached_tokens > 0 for r in cached2] == [True, True, True, False, False, False]
    assert cached2[4].timings.prefill_shared_tokens > 0  # the new image's second question shares it in the batch


def test_a_vision_side_pruner_takes_the_cache_an_llm_side_one_does_not():
    eng = engine("llava")
    for pruning, takes in (("flowcut", True), ("random", True), ("fastv", False), ("adaptinfer", False)):
        spec = GenerationSpec(pruning=pruning, budget=14, max_new_tokens=5, logprobs=2)  # of 16 visual tokens
        (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn("llava"), second_turn("llava")])
        assert_same(fresh1 + fresh2, cached1 + cached2)
        assert (sum(r.timings.prefill_cached_tokens for r in cached2) > 0) == takes, pruning


def test_seeded_sampling_and_a_request_joining_a_running_batch():
    eng = engine("llava")
    spec = GenerationSpec(do_sample=True, seed=5, max_new_tokens=6, min_new_tokens=6, logprobs=1)
    first, later = first_turn("llava"), second_turn("llava")[:3]
    fresh = run_joined(eng, spec, first, later, join_after=2)
    eng.enable_prefix_cache(64)
    cached = run_joined(eng, spec, first, later, join_after=2)
    assert_same(fresh, cached)
    assert [r.timings.prefill_cached_tokens > 0 for r in cached] == [False, False, True, True, True]


def test_an_entry_is_compared_in_full_before_it_is_taken(monkeypatch):
    """Two images whose prefixes hash alike (every prefix's and every token's hash made equal here): the second is
    not given the first's keys."""
    import vlmguard.prefix_cache as pc

    real = pc._prefix_hashes

    def one_hash(seq):
        lengths, hashes, tokens, text = real(seq)
        return (lengths, [None if h is None else (h[0], 1, 1) for h in hashes],
                None if tokens is None else torch.zeros_like(tokens), text)

    monkeypatch.setattr(pc, "_prefix_hashes", one_hash)
    eng = engine("llava")
    a, b, _ = images("llava")
    spec = GenerationSpec(max_new_tokens=5, logprobs=1)
    fresh = eng.generate([Request("Is there a dog?", [b])], spec)
    eng.enable_prefix_cache(64)
    eng.generate([Request("Is there a dog?", [a])], spec)
    other = eng.generate([Request("Is there a dog?", [b])], spec)
    assert other[0].timings.prefill_cached_tokens == 0 and eng.prefix_cache.stats.hits == 0
    assert_same(fresh, other)
    assert eng.generate([Request("Is there a cat?", [a])], spec)[0].timings.prefill_cached_tokens > 0


def test_least_recently_used_entries_go_first_within_the_budget():
    eng = engine("llava")
    spec = GenerationSpec(max_new_tokens=2)
    imgs = [random_image(10 + i, (64, 48)) for i in range(4)]
    cache = eng.enable_prefix_cache(64)
    eng.generate([Request("hi", [imgs[0]])], spec)
    one = cache.stats.bytes  # an image: its prefix's keys and values, and its visual tokens
    assert one > 0 and len(cache) == 2 and (cache.stats.entries, cache.stats.image_entries) == (1, 1)
    cache = eng.enable_prefix_cache(2.5 * one / 2**20)  # room for two images
    for i in (0, 1):
        eng.generate([Request("hi", [imgs[i]])], spec)
    eng.generate([Request("again", [imgs[0]])], spec)  # image 0 used again: image 1 is now the oldest
    assert (cache.stats.hits, cache.stats.image_hits) == (1, 1)
    eng.generate([Request("hi", [imgs[2]])], spec)
    assert (cache.stats.entries, cache.stats.image_entries, cache.stats.evicted) == (2, 2, 2)
    assert cache.stats.bytes <= cache.max_bytes
    took = [eng.generate([Request("q", [imgs[i]])], spec)[0].timings.prefill_cached_tokens > 0 for i in (0, 2)]
    assert took == [True, True]
    assert eng.generate([Request("q", [imgs[1]])], spec)[0].timings.prefill_cached_tokens == 0
    tiny = eng.enable_prefix_cache(one / 4 / 2**20)  # an entry larger than the whole budget is not kept
    eng.generate([Request("hi", [imgs[3]])], spec)
    assert tiny.stats.entries == 0 and tiny.stats.bytes <= tiny.max_bytes


def test_the_cache_is_off_by_default_and_its_size_is_checked():
    eng = engine("llava")
    assert eng.prefix_cache is None
    for bad in (-1, "64", True, float("nan")):
        with pytest.raises(InvalidInput, match="prefix cache size"):
            eng.enable_prefix_cache(bad)
    assert eng.enable_prefix_cache(0) is None and eng.prefix_cache is None
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=-5)


def test_image_prefixes_end_at_the_last_visual_token_and_skip_short_or_text_only_rows():
    eng = engine("llava")
    a, _, _ = images("llava")
    batch = eng.adapter.encode(eng._prompts([Request("Is there a dog?", [a]), Request("a cat", [])]))
    seq = eng.adapter.build_sequence(batch, eng.adapter.image_features(batch), eng.model.dtype, eng.device)
    lengths, hashes = image_prefixes(seq)
    start = seq.length - int(seq.valid[0].sum())
    last = int((seq.visual[0] >= 0).nonzero().max())
    assert lengths == [last - start + 1, 0] and hashes[0] is not None and hashes[1] is None
    again = image_prefixes(seq)
    assert again == (lengths, hashes)  # the same tokens hash alike in every prefill
    seq.hidden[0, last] += 1  # the last image token's embedding
    assert image_prefixes(seq)[1][0] != hashes[0]
    seq.hidden[0, last] -= 1
    seq.positions[0, start:] += 1  # the same tokens at other positions
    assert image_prefixes(seq)[1][0] != hashes[0]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_the_vision_tower_does_not_run_again_on_a_cached_image(family, monkeypatch):
    eng = engine(family)
    seen = count_tower_images(eng, monkeypatch)
    spec = GenerationSpec(decoding="lqcd", max_new_tokens=4, logprobs=1)
    (fresh1, fresh2), (cached1, cached2) = both_ways(eng, spec, [first_turn(family), second_turn(family)])
    assert_same(fresh1 + fresh2, cached1 + cached2)
    # per turn: the distinct images of the batch; with the cache, the second turn's new image only
    assert seen == [2, 3, 2, 1], seen
    assert eng.prefix_cache.stats.image_hits == 2  # the first turn's two images (one asked about twice)
    seen.clear()
    eng.generate([Request("Is there a dog?", [images(family)[1]])], spec)  # no tower, no prefix computed
    assert seen == []


def test_cached_visual_tokens_need_every_per_image_input_to_match():
    """The pixel values and the other inputs of each image (LLaVA-NeXT's image size, Qwen2-VL's grid) decide."""
    from vlmguard.prefix_cache import _same_images

    pixels = torch.arange(12.0).reshape(3, 2, 2)
    one = [(pixels, {"image_sizes": torch.tensor([40, 64])})]
    assert _same_images(one, [(pixels.clone(), {"image_sizes": torch.tensor([40, 64])})])
    assert not _same_images(one, [(pixels.clone(), {"image_sizes": torch.tensor([64, 40])})])
    assert not _same_images(one, [(pixels + 1e-6, {"image_sizes": torch.tensor([40, 64])})])
    assert not _same_images(one, one + one)  # a row with one more image


def test_a_chat_turn_about_a_seen_image_reports_its_cached_prompt_tokens_as_openai_does():
    """``usage.prompt_tokens_details.cached_tokens`` (OpenAI's field for prompt caching): 0 for the first turn, the
    image prefix for the next turn about the same image (the request's own prompt, not its decoder's rows, which
    ``timings.prefill_cached_tokens`` adds)."""
    from fastapi.testclient import TestClient

    from vlmguard.images import image_to_data_url
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    eng = engine("llava")
    worker = EngineWorker("random:llava", name="tiny", engine=eng, prefix_cache_mb=16)
    cfg = ServiceConfig(models=[ModelConfig(name="tiny", model="random:llava")], api_key_env=None)
    url = image_to_data_url(images("llava")[0])
    # the text first, as OpenAI's own examples send it: every turn is laid out image first, alone or as history
    turn = [{"role": "user", "content": [{"type": "text", "text": "Is there a dog?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    with TestClient(create_api(LocalBackend({"tiny": worker}), cfg)) as client:
        first = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": turn}).json()
        turn += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And a cat?"}]
        second = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": turn,
                                                            "vlmguard": {"decoding": "lqcd"}}).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]
    timings = second["vlmguard"]["timings"]
    assert timings["prompt_cached_tokens"] == cached and timings["prefill_cached_tokens"] >= cached  # + LQCD's rows


def test_an_entry_holds_the_rows_first_valid_slots_where_they_are_one_run_or_not():
    """A plain prefill keeps a row's tokens in one run of slots; a shared one puts its prefix's slots, then masked
    ones, then its own: the entry holds the first n valid slots in order either way."""
    from types import SimpleNamespace

    from vlmguard.prefix_cache import CacheLookup, _first_slots
    from vlmguard.sequence import Seq

    assert _first_slots(torch.tensor([False, True, True, True, False]), 3) == slice(1, 4)
    assert _first_slots(torch.tensor([True, False, True, True]), 2).tolist() == [0, 2]
    n, length = 20, 24
    seq = Seq(hidden=torch.randn(2, length, 8), valid=torch.ones(2, length, dtype=torch.bool),
              positions=torch.arange(length).expand(2, -1), visual=torch.arange(length).expand(2, -1) - 4)
    seq.visual[:, n:] = -1  # the image prefix: tokens 0..19 (visual from 4 to 19)
    keys = torch.randn(2, 1, 30, 4)
    valid = torch.zeros(2, 30, dtype=torch.bool)
    valid[0, 6:30] = True  # row 0: one run
    valid[1, :10] = True  # row 1: 10 prefix slots, a gap, then its own 14
    valid[1, 16:30] = True
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=keys, values=-keys)])
    store = PrefixCache(max_bytes=1 << 20)
    look = CacheLookup(found=[None, None], lengths=[n, n], hashes=[(n, 1, 1), (n, 2, 2)])
    store.store(seq, look, cache, [valid])
    by_hash = {h: bucket[0] for h, bucket in store._entries.items()}
    assert torch.equal(by_hash[(n, 1, 1)].keys[0], keys[0:1, :, 6:26])
    assert torch.equal(by_hash[(n, 2, 2)].keys[0], torch.cat([keys[1:2, :, :10], keys[1:2, :, 16:26]], dim=2))
    assert torch.equal(by_hash[(n, 2, 2)].values[0], -by_hash[(n, 2, 2)].keys[0])
