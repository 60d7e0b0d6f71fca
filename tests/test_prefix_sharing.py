"""Shared prefixes in a prefill (vlmguard/prefix_sharing.py, LayerRunner.prefill(share_prefixes=True)): rows that
begin with the same tokens compute them once, and every request gets what it gets from a prefill row by row (the
same tokens, log-probabilities within float rounding), through decoding, with every family, with contrastive
branches (LQCD's query variants share their image: lqcd.md 11.10), with a vision-side pruner, seeded sampling and
requests that join the batch later. Where a row's prefix depends on more than its tokens (an LLM-side cut,
VISTA's per-request steering) nothing is shared."""
from __future__ import annotations

import pytest
import torch

from pruning_support import run_joined
from vlmguard.engine import Request
from vlmguard.prefix_sharing import plan_prefixes, split
from vlmguard.runner import LayerRunner
from vlmguard.sequence import Seq
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


# ---- the plan ---------------------------------------------------------------------------------------------
def make_seq(rows: list[list[int]], dim: int = 24) -> Seq:
    """Left-padded rows of token ids, each id embedded as a fixed random vector (1-D positions 0..n-1)."""
    table = torch.randn(200, dim, generator=torch.Generator().manual_seed(1))
    width = max(len(r) for r in rows)
    hidden = torch.zeros(len(rows), width, dim)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        hidden[i, width - len(r):] = table[torch.tensor(r)]
        valid[i, width - len(r):] = True
        positions[i, width - len(r):] = torch.arange(len(r))
    return Seq(hidden=hidden, valid=valid, positions=positions, visual=torch.full_like(positions, -1))


def test_rows_with_a_common_beginning_form_a_group_that_shares_it():
    common = list(range(10, 30))
    rows = [common + [1, 2], common + [3], [5, 6, 7], common[:12] + [9, 9, 9, 9], common + [1, 2]]
    plan = plan_prefixes(make_seq(rows))
    # the group shares what all its rows share; a lone row keeps its last token. Row 3 shares 12 tokens with the
    # group, but taking them would leave every row a remainder of 8: it runs alone (a first pass of 3 x 20 and a
    # second of 5 x 2 token slots, against 2 x 12 and 5 x 10)
    assert plan.leaders == [0, 2, 3] and plan.group == [0, 0, 1, 2, 0]
    assert plan.length == [20, 2, 15]
    assert plan.saved_tokens() == 20 * 2 and plan.shared_tokens() == [0, 20, 0, 0, 20]
    prefix, rest = split(make_seq(rows), plan)
    assert prefix.valid.sum(dim=1).tolist() == [20, 2, 15]
    assert rest.valid.sum(dim=1).tolist() == [len(r) - plan.length[g] for r, g in zip(rows, plan.group)]
    # an identical row keeps only its last token to itself
    plan = plan_prefixes(make_seq([common + [1], common + [1]]))
    assert plan.leaders == [0] and plan.length == [20]


def test_rows_group_by_their_longest_common_part_not_by_what_every_row_begins_with():
    """POPE's shape: every row begins with the same system text, three questions each about two images. Grouping by
    the system text would leave every row its image to compute: the rows group by image."""
    system, image_a, image_b = list(range(10, 22)), list(range(30, 60)), list(range(60, 90))
    rows = [system + image_a + [q, 1, 2] for q in (3, 4, 5)] + [system + image_b + [q, 1, 2] for q in (3, 4, 5)]
    plan = plan_prefixes(make_seq(rows))
    assert plan.group == [0, 0, 0, 1, 1, 1] and plan.length == [42, 42]
    # rows that share only the system text with a group run alone (all but their last token in the first pass)
    # rather than pad every row's remainder to the length of theirs
    rows = [system + image_a + [q, 1, 2] for q in (3, 4, 5)] + [system + list(range(v, v + 33)) for v in (100, 140)]
    plan = plan_prefixes(make_seq(rows))
    assert plan.group == [0, 0, 0, 1, 2] and plan.length == [42, 44, 44]


def test_no_plan_where_sharing_saves_too_little_or_rows_are_not_left_padded():
    assert plan_prefixes(make_seq([[1, 2, 3, 4, 5, 6, 7, 8, 9] + [50] * 40, [1, 2, 3, 4, 5, 6, 7, 8, 9] + [60] * 40],
                                  )) is None  # 9 of 98 tokens
    assert plan_prefixes(make_seq([[1] * 7 + [2], [1] * 7 + [3]])) is None  # below the 8 tokens worth a pass
    assert plan_prefixes(make_seq([list(range(30))])) is None
    seq = make_seq([list(range(30)), list(range(30))])
    seq.valid[0, 5] = False  # a hole: not a left-padded row
    assert plan_prefixes(seq) is None


def test_rows_that_differ_early_are_turned_away_before_any_plan_is_searched(monkeypatch):
    """A batch of requests about different images (a server's, CHAIR's) shares the system text only: one gather of
    each row's token a fifth into the batch's width tells, and no token ids are built."""
    import vlmguard.prefix_sharing as sharing

    system = list(range(10, 16))
    rows = [system + list(range(v, v + 30)) for v in (20, 60, 100, 140)]
    monkeypatch.setattr(sharing, "_token_ids", lambda seq: pytest.fail("searched for a plan"))
    assert plan_prefixes(make_seq(rows)) is None
    monkeypatch.undo()
    assert plan_prefixes(make_seq(rows + rows[:2])) is not None  # repeated rows pass the check


def test_a_proposed_match_is_confirmed_on_the_whole_embedding():
    """The plan proposes matches from a sample of each embedding's values; rows that agree there but not elsewhere
    are not shared (the batch then runs row by row)."""
    from vlmguard.prefix_sharing import FINGERPRINT_DIMS, _shares, _token_ids

    seq = make_seq([list(range(40))] * 3, dim=64)
    assert plan_prefixes(seq).group == [0, 0, 0]
    sampled = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:FINGERPRINT_DIMS]
    off = torch.ones(64, dtype=torch.bool)
    off[sampled] = False
    seq.hidden[1, 3, off] += 1.0  # row 1's token 3 differs off the sampled values only
    ids, _, counts = _token_ids(seq)
    assert int(_shares(ids, counts)[1, 0]) == 39  # the ids cannot tell
    assert plan_prefixes(seq) is None
    seq.hidden[1, 3, sampled] += 1.0  # now they can: rows 0 and 2 share, row 1 runs alone
    assert plan_prefixes(seq).group == [0, 1, 0]


# ---- through the engine ------------------------------------------------------------------------------------
@pytest.fixture()
def shared_calls(monkeypatch):
    calls = []
    original = LayerRunner.prefill_shared

    def spy(self, seq, plan, *args, **kwargs):
        calls.append(plan)
        return original(self, seq, plan, *args, **kwargs)

    monkeypatch.setattr(LayerRunner, "prefill_shared", spy)
    return calls


def pope_like(family: str) -> list[Request]:
    """Questions about two images, three and two of them, and a text-only request."""
    a, b = random_image(1, (64, 48)), random_image(2, (48, 64))
    return [Request("Is there a dog in the image?", [a]), Request("Is there a cat in the image?", [a]),
            Request("what color is the car?", [a]), Request("Is there a dog in the image?", [b]),
            Request("describe this picture", [b]), Request("a cat", [])]


def both_ways(eng, requests, spec):
    eng.share_prefixes = False
    try:
        alone = eng.generate(requests, spec)
    finally:
        eng.share_prefixes = True
    return alone, eng.generate(requests, spec)


def assert_same(alone, shared):
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    for a, s in zip(alone, shared):
        assert [x.logprob for x in s.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4)
        assert s.visual_tokens_kept == a.visual_tokens_kept and s.kept_indices == a.kept_indices


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("decoding", ["greedy", "lqcd", "vcd", "m3id", "iava", "vista"])
def test_shared_prefixes_give_every_request_what_a_row_by_row_prefill_gives(family, decoding, shared_calls):
    eng = tiny_engine(family)
    spec = GenerationSpec(decoding=decoding, max_new_tokens=6, logprobs=2)
    alone, shared = both_ways(eng, pope_like(family), spec)
    assert_same(alone, shared)
    assert shared_calls, "the questions about one image share it"
    assert all(p.saved_tokens() > 0 for p in shared_calls)


def test_lqcd_query_variants_share_their_image_in_one_request(shared_calls):
    """lqcd.md 6 / 11.10: the expert and its two amateurs differ only after the image: they compute it once."""
    eng = tiny_engine("llava")
    spec = GenerationSpec(decoding="lqcd", max_new_tokens=6, logprobs=2)
    alone, shared = both_ways(eng, pope_like("llava")[:1], spec)
    assert_same(alone, shared)
    (plan,) = shared_calls
    assert plan.leaders == [0] and plan.group == [0, 0, 0]
    assert plan.length[0] >= alone[0].visual_tokens  # the whole image, at least


def test_seeded_sampling_and_a_vision_side_pruner_with_shared_prefixes(shared_calls):
    eng = tiny_engine("llava")
    spec = GenerationSpec(decoding="sample", temperature=1.2, seed=5, max_new_tokens=6, logprobs=2,
                          pruning="flowcut", budget=8)
    alone, shared = both_ways(eng, pope_like("llava"), spec)
    assert_same(alone, shared)
    assert shared_calls


@pytest.mark.parametrize("spec", [GenerationSpec(max_new_tokens=4, pruning="fastv", budget=8),
                                  GenerationSpec(max_new_tokens=4, decoding="vista")])
def test_nothing_is_shared_where_a_prefix_depends_on_more_than_its_tokens(spec, shared_calls):
    """An LLM-side cut, VISTA's per-request steering: the request's prefill shares nothing (VISTA's pre-pass, which
    runs without its hooks, does: next test)."""
    eng = tiny_engine("llava")
    out = eng.generate(pope_like("llava"), spec)
    assert all(r.timings.prefill_shared_tokens == 0 for r in out)
    assert not shared_calls or spec.decoding == "vista"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_pre_pass_shares_prefixes_and_records_the_same_scores(family, shared_calls):
    """Engine.probe_forward (IAVA's selection pass, VISTA's steering vectors) shares prefixes like a prefill: the
    last position's hidden states and logits, and its attention to each image token in every layer, equal those of
    the rows run one by one; the scores are laid out on the returned sequence's key axis."""
    from vlmguard.models.base import Prompt

    eng = tiny_engine(family)
    prompts = [Prompt(r.prompt, r.images) for r in pope_like(family)]
    layers = range(eng.adapter.num_layers)
    eng.share_prefixes = False
    try:
        alone = eng.probe_forward(prompts, hidden_layers=layers, score_layers=layers, per_head=True)
    finally:
        eng.share_prefixes = True
    shared = eng.probe_forward(prompts, hidden_layers=layers, score_layers=layers, per_head=True)
    assert shared_calls and not torch.equal(shared["seq"].valid, alone["seq"].valid)  # the two-part layout
    assert torch.allclose(shared["logits"], alone["logits"], atol=1e-4)
    for i in layers:
        assert torch.allclose(shared["hidden"][i], alone["hidden"][i], atol=1e-4)
        for r in range(len(prompts)):
            mine = shared["scores"][i][r, :, 0, shared["seq"].visual_mask()[r]]
            theirs = alone["scores"][i][r, :, 0, alone["seq"].visual_mask()[r]]
            assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5), (i, r)
            # every key's share, text ones included, sums to one on both layouts
            assert torch.allclose(shared["scores"][i][r].sum(-1), torch.ones(1), atol=1e-5)


def test_a_shared_prefix_batch_takes_joiners_and_joins_others(shared_calls):
    """Decoding continues from the shared layout (prefix slots, then each row's own, masked slots between):
    requests that join it, and a shared batch that joins another, get the tokens they get alone."""
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=6)
    reqs = pope_like("llava")
    alone = [eng.generate([r], spec)[0] for r in reqs]
    joined = run_joined(eng, spec, reqs[:3], reqs[3:], join_after=2)
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]
    joined = run_joined(eng, spec, reqs[5:], reqs[:5], join_after=1)
    assert [r.token_ids for r in joined] == [alone[5].token_ids] + [r.token_ids for r in alone[:5]]
    assert len(shared_calls) == 3  # both groups of the first run, the joiners of the second


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_shared_prefixes_under_eager_attention(family, shared_calls):
    """The reference attention path (every mask explicit) gives the same as SDPA's: both passes' masks hold."""
    eng = tiny_engine(family, attn="eager")
    assert eng.attn_implementation == "vlmguard_eager"
    alone, shared = both_ways(eng, pope_like(family), GenerationSpec(decoding="lqcd", max_new_tokens=5, logprobs=2))
    assert_same(alone, shared)
    assert shared_calls and sum(r.timings.prefill_shared_tokens for r in shared) > 0


def test_random_mixed_batches_answer_alike_shared_or_not():
    """A fixed-seed sample of mixed batches (families, decoders, vision-side pruners, text-only rows, repeated and
    different images, prompts of different lengths, one to six new tokens): the same tokens and log-probabilities
    with shared prefixes as without, and some of them do share."""
    import random

    rng = random.Random(7)
    images = [random_image(i, size) for i, size in enumerate([(40, 32), (64, 48), (48, 64), (64, 64)])]
    texts = ["Is there a dog in the image?", "Is there a cat in the image?", "describe the photo", "a",
             "what color is the car?", "Is there a dog in the image? Answer yes or no."]
    shared_any = 0
    for _ in range(12):
        family = rng.choice(["llava", "llava_next", "qwen2_vl"])
        reqs = [Request(rng.choice(texts), [] if rng.random() < 0.15 else [rng.choice(images)])
                for _ in range(rng.randint(2, 8))]
        decoding = rng.choice(["greedy", "lqcd", "vcd", "m3id", "iava", "sample", "vista"])
        kw = {"decoding": decoding, "max_new_tokens": rng.randint(1, 6), "logprobs": 2, "seed": 3}
        if rng.random() < 0.3 and all(r.images for r in reqs):
            kw.update(pruning=rng.choice(["flowcut", "random"]), budget=0.5)
        alone, shared = both_ways(tiny_engine(family), reqs, GenerationSpec(**kw))
        assert_same(alone, shared)
        shared_any += any(r.timings.prefill_shared_tokens for r in shared)
    assert shared_any >= 3
