"""Seeded randomized audit of in-flight batching's in-place KV cache (vlmguard/kv_cache.py: ``GrowingLayer``'s
``update`` / ``keep_rows`` / ``add_rows``, ``GrowingCache``) and of ``LayerRunner.reorder`` / ``merge``
(vlmguard/runner.py) that drive it.

Unit level: random sequences of decode appends, requests leaving (random ascending subsets, empty and all rows),
other row selections (another order, duplicates: gathers), requests joining (cohorts longer and shorter than
the batch, in layers whose stages have other lengths and other validity groupings, with and without spare rows,
straight after their prefill or after steps of their own) are applied to a ``DecodeState`` of several layers
whose pruning stages share validity tensors. After every operation, every reader's view (each layer's
``keys`` / ``values``, the tensors ``update`` hands to attention) is checked against a reference of plain
tensors (gathers, concatenations, left padding with zeros, the same trimming of slots no row attends to), and
each live row's valid keys / values against its own history; validity tensors stay shared per stage and match
the cache lengths, positions follow their rows.

Engine level: on the tiny random models of every family, random schedules of requests joining a running batch
(groups of one to three, different prompts, images or none, lengths, stop strings, ``max_new_tokens``, seeded
sampling with penalties, log-probabilities) and leaving it (finishing or dropped by their callers), under the
pruners (fastv / adaptinfer / flowcut / random with budgets) and decoders (greedy, vcd, vista, m3id with branch
rows): every request gets exactly the tokens (and log-probabilities, approximately) it gets alone.

Defect found (one, latent: ``DecodeBatch`` never steps a batch with no rows):

- ``GrowingLayer.update`` took a layer whose rows had all left (``keep_rows([])``: keys (0, H, S, D)) for a fresh
  layer (``numel() == 0``) and replaced it with the step alone: the layer lost its S slots (S -> 1) while its
  validity counted S + 1, so the next join padded the cache to another length than the mask
  (``DynamicLayer`` keeps (0, H, S + 1, D)). Now only a layer without slots starts afresh.
  ``test_an_emptied_layer_keeps_its_slots_when_it_appends_and_joins``; the op fuzz hits it too.

None otherwise, over 40 op sequences x 60 operations at unit level and 100 engine schedules (614 requests, 71
of them dropped by their callers, 240 joins into a running batch, up to 17 rows).
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from vlmguard.kv_cache import GrowingCache, GrowingLayer
from vlmguard.runner import DecodeState, LayerRunner

H, D = 2, 3
N_LAYERS = 5

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- unit level -------------------------------------------------------------------------------------------------

def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad the slot axis (-2 for K/V, -1 for validity) with zeros / False."""
    axis = -2 if x.dim() == 4 else -1
    pad = length - x.shape[axis]
    if not pad:
        return x
    shape = list(x.shape)
    shape[axis] = pad
    return torch.cat([x.new_zeros(shape), x], dim=axis)


class Ref:
    """What the state must hold, by plain tensor ops: per layer K / V (B, H, S_i, D), per stage group a validity
    (B, S_g), which layer belongs to which group, the next positions and each row's own history."""

    def __init__(self, ks, vs, valid, groups, pos, hist):
        self.k, self.v, self.valid, self.groups, self.pos, self.hist = ks, vs, valid, groups, pos, hist

    def append(self, nk, nv):
        self.k = [torch.cat([k, a], dim=-2) for k, a in zip(self.k, nk)]
        self.v = [torch.cat([v, a], dim=-2) for v, a in zip(self.v, nv)]
        self.valid = [torch.cat([v, v.new_ones(v.shape[0], 1)], dim=1) for v in self.valid]
        self.pos = self.pos + 1
        for r, h in enumerate(self.hist):
            for i in range(N_LAYERS):
                h[i][0].append(nk[i][r, :, 0])
                h[i][1].append(nv[i][r, :, 0])

    def select(self, rows):
        idx = torch.tensor(rows, dtype=torch.long)
        valid = [v[idx] for v in self.valid]
        trims = []
        for g, v in enumerate(valid):
            used = v.any(dim=0)
            trims.append(int(used.int().argmax()) if bool(used.any()) else 0)
            valid[g] = v[:, trims[-1]:]
        self.valid = valid
        self.k = [k[idx][..., trims[self.groups[i]]:, :] for i, k in enumerate(self.k)]
        self.v = [v[idx][..., trims[self.groups[i]]:, :] for i, v in enumerate(self.v)]
        self.pos = self.pos[idx]
        self.hist = [[(list(h[i][0]), list(h[i][1])) for i in range(N_LAYERS)] for h in (self.hist[r] for r in rows)]

    def join(self, other: "Ref"):
        pairs, groups, valid = {}, [], []
        for i in range(N_LAYERS):
            key = (self.groups[i], other.groups[i])
            if key not in pairs:
                va, vb = self.valid[key[0]], other.valid[key[1]]
                n = max(va.shape[1], vb.shape[1])
                pairs[key] = len(valid)
                valid.append(torch.cat([_left_pad(va, n), _left_pad(vb, n)]))
            groups.append(pairs[key])
        ks, vs = [], []
        for i in range(N_LAYERS):
            n = valid[groups[i]].shape[1]
            ks.append(torch.cat([_left_pad(self.k[i], n), _left_pad(other.k[i], n)]))
            vs.append(torch.cat([_left_pad(self.v[i], n), _left_pad(other.v[i], n)]))
        self.k, self.v, self.valid, self.groups = ks, vs, valid, groups
        self.pos = torch.cat([self.pos, other.pos])
        self.hist = self.hist + other.hist


def _cohort(rng: random.Random, rows: int, base: int) -> tuple[DecodeState, Ref]:
    """A prefilled cohort: random stage grouping (layers after a cut share a shorter validity), left-padded rows
    with holes (pruned / masked slots), keys and values as a prefill leaves them in the cache."""
    cuts = sorted(rng.sample(range(1, N_LAYERS), rng.randint(0, 2)))
    groups = [sum(1 for c in cuts if c <= i) for i in range(N_LAYERS)]
    n_groups = groups[-1] + 1
    lengths = [base]
    for _ in range(n_groups - 1):
        lengths.append(max(1, lengths[-1] - rng.randint(0, 4)))
    valid = []
    for s in lengths:
        v = torch.zeros(rows, s, dtype=torch.bool)
        for r in range(rows):
            own = rng.randint(1, s)
            v[r, s - own:] = torch.rand(own) > 0.2
            v[r, s - 1] = True  # the last prompt token is real
        valid.append(v)
    cache = GrowingCache()
    ks, vs = [], []
    for i in range(N_LAYERS):
        s = lengths[groups[i]]
        k = torch.randn(rows, H, s, D)
        v = torch.randn(rows, H, s, D)
        # the prefill keeps what attention computed: a value view of another layout (values are a transpose)
        v = v.transpose(1, 2).contiguous().transpose(1, 2) if rng.random() < 0.5 else v
        cache.update(k, v, i)
        ks.append(k.clone())
        vs.append(v.clone())
    pos = torch.tensor([rng.randint(5, 50) for _ in range(rows)])
    hist = [[(list(ks[i][r][:, valid[groups[i]][r]].unbind(1)), list(vs[i][r][:, valid[groups[i]][r]].unbind(1)))
             for i in range(N_LAYERS)] for r in range(rows)]
    layer_valid = [valid[g] for g in groups]  # one tensor object per stage
    state = DecodeState(cache=cache, layer_valid=layer_valid, next_positions=pos.clone())
    return state, Ref(ks, vs, [v.clone() for v in valid], groups, pos.clone(), hist)


def _append(state: DecodeState, ref: Ref, rng: random.Random) -> None:
    """A decode step's cache writes, as ``LayerRunner.decode_step`` does them (one validity per stage)."""
    b = state.next_positions.shape[0]
    nk = [torch.randn(b, H, 1, D) for _ in range(N_LAYERS)]
    nv = [torch.randn(b, H, 1, D) for _ in range(N_LAYERS)]
    ones = torch.ones(b, 1, dtype=torch.bool)
    new_valid = {}
    for v in state.layer_valid:
        new_valid.setdefault(id(v), torch.cat([v, ones], dim=1))
    want_k = [torch.cat([k, a], dim=-2) for k, a in zip(ref.k, nk)]
    want_v = [torch.cat([v, a], dim=-2) for v, a in zip(ref.v, nv)]
    for i in range(N_LAYERS):
        got_k, got_v = state.cache.update(nk[i], nv[i], i)  # what attention reads this step
        assert torch.equal(got_k, want_k[i]) and torch.equal(got_v, want_v[i]), f"update of layer {i}"
    state.layer_valid = [new_valid[id(v)] for v in state.layer_valid]
    state.next_positions = state.next_positions + 1
    ref.append(nk, nv)


def _check(state: DecodeState, ref: Ref, what: str) -> None:
    assert torch.equal(state.next_positions, ref.pos), what
    for i in range(N_LAYERS):
        layer = state.cache.layers[i]
        valid = state.layer_valid[i]
        assert torch.equal(valid, ref.valid[ref.groups[i]]), f"{what}: validity of layer {i}"
        for j in range(N_LAYERS):  # layers of one stage share one validity tensor, others do not
            assert (state.layer_valid[j] is valid) == (ref.groups[j] == ref.groups[i]), f"{what}: sharing {i} {j}"
        assert layer.keys.shape == ref.k[i].shape, f"{what}: keys shape of layer {i}"
        assert torch.equal(layer.keys, ref.k[i]) and torch.equal(layer.values, ref.v[i]), f"{what}: layer {i}"
        assert valid.shape[1] == layer.keys.shape[-2], f"{what}: layer {i} validity vs cache"
        for r, h in enumerate(ref.hist):  # each row attends to exactly its own history
            mine = layer.keys[r][:, valid[r]]
            assert torch.equal(mine, torch.stack(h[i][0], dim=1)), f"{what}: row {r} layer {i} keys"
            assert torch.equal(layer.values[r][:, valid[r]], torch.stack(h[i][1], dim=1)), f"{what}: row {r}"


RUNNER = object.__new__(LayerRunner)  # reorder uses no adapter


def _run_ops(seed: int, steps: int) -> dict[str, int]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    state, ref = _cohort(rng, rng.randint(1, 4), rng.randint(3, 12))
    counts = {"append": 0, "leave": 0, "leave_all": 0, "leave_none": 0, "gather": 0, "join": 0,
              "join_in_place": 0, "join_longer": 0}
    for t in range(steps):
        b = ref.pos.shape[0]
        op = rng.choice(["append"] * 3 + ["leave", "leave", "join", "join", "gather"])
        if op == "append":  # (also on a batch whose rows all left)
            _append(state, ref, rng)
        elif op == "leave":
            k = rng.choice([0, b] + [rng.randint(0, b)] * 3)
            rows = sorted(rng.sample(range(b), k))
            counts["leave_none" if not rows else "leave_all" if k == b else "leave"] += 1
            RUNNER.reorder(state, rows)
            ref.select(rows)
        elif op == "gather" and b:
            rows = [rng.randrange(b) for _ in range(rng.randint(1, b + 1))]
            RUNNER.reorder(state, rows)
            ref.select(rows)
        elif op == "join" and b < 10:
            longest = max(v.shape[1] for v in ref.valid)
            other, oref = _cohort(rng, rng.randint(1, 3), rng.randint(1, longest + 6))
            for _ in range(rng.choice([0, 0, 1, 2])):  # a cohort that already decoded steps of its own
                _append(other, oref, rng)
            bufs = [state.cache.layers[i]._kbuf for i in range(N_LAYERS)]
            counts["join_longer"] += any(ov.shape[1] > v.shape[1] for ov, v in zip(other.layer_valid,
                                                                                   state.layer_valid))
            state = LayerRunner.merge(state, other)
            ref.join(oref)
            counts["join_in_place"] += any(b is not None and state.cache.layers[i]._kbuf is b
                                           for i, b in enumerate(bufs))
        else:
            continue
        if op != "leave":
            counts[op] += 1
        _check(state, ref, f"seed {seed} op {t} {op}")
    return counts


def test_unit_ops_match_plain_tensors():
    """40 seeded sequences of 60 operations each (2400 operations), every reader's view checked after each."""
    total: dict[str, int] = {}
    for seed in range(40):
        for k, n in _run_ops(seed, 60).items():
            total[k] = total.get(k, 0) + n
    assert all(n >= 5 for n in total.values()), total  # every kind of operation ran, several times


def test_an_emptied_layer_keeps_its_slots_when_it_appends_and_joins():
    """All rows leave, a step appends (nothing to write) and a cohort joins: the cache keeps the slots its
    validity counts (DynamicLayer's semantics), so the joiner is padded to the validity's length."""
    layer = GrowingLayer()
    layer.update(torch.randn(2, H, 5, D), torch.randn(2, H, 5, D))
    layer.update(torch.randn(2, H, 1, D), torch.randn(2, H, 1, D))  # into a buffer with room
    layer.keep_rows([], torch.tensor([], dtype=torch.long))
    assert layer.keys.shape == (0, H, 6, D)
    layer.update(torch.randn(0, H, 1, D), torch.randn(0, H, 1, D))
    assert layer.keys.shape == (0, H, 7, D) and layer.values.shape == (0, H, 7, D)
    k, v = torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)
    layer.add_rows(k, v)
    assert torch.equal(layer.keys, _left_pad(k, 7)) and torch.equal(layer.values, _left_pad(v, 7))


# ---- engine level -----------------------------------------------------------------------------------------------

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
PRUNERS = ["none", "fastv", "adaptinfer", "adaptinfer-renumber", "flowcut", "random"]
FLOWCUT_BUDGET = {"llava": (3, 8), "llava_next": (4, 12), "qwen2_vl": (1, 3)}  # below every request's visual tokens
DECODERS = {"greedy": {}, "vcd": {}, "m3id": {"gate": False}, "vista": {"vsv_lambda": 0.3}, "sample": {}}
PROMPTS = ["Is there a dog in the image?", "hi", "describe the photo", "what color is the car on the street in this "
           "picture and is there a person with a dog", "a red car", "count the cats on the table", "yes"]
STOPS = ["e", " the", "a", "is"]


def _request(rng: random.Random, name: str):
    from vlmguard.engine import Request
    from vlmguard.testing import random_image

    images = [] if rng.random() < 0.15 else [random_image(rng.randrange(1000), (rng.choice([32, 40, 48, 64]),
                                                                                rng.choice([32, 40, 48, 64])))]
    return Request(rng.choice(PROMPTS), images, request_id=name)


def _spec(rng: random.Random, base):
    own = {"max_new_tokens": rng.randint(1, 10)}
    if base.decoding == "sample" or rng.random() < 0.3:
        own.update(do_sample=True, temperature=rng.choice([0.7, 1.0, 1.4]), top_k=rng.choice([0, 5, 20]),
                   min_p=rng.choice([0.0, 0.1]), seed=rng.randrange(10_000))
    if rng.random() < 0.25:
        own["stop"] = [rng.choice(STOPS)]
    if rng.random() < 0.3:
        own["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.15:
        own[rng.choice(["repetition_penalty", "presence_penalty"])] = 1.3
    if rng.random() < 0.15:  # (ids every tiny family's vocabulary has)
        own["stop_token_ids"] = [rng.randrange(5, 40)]
    if rng.random() < 0.1:
        own["ignore_eos"] = True
    return base.model_copy(update=own)


def _schedule(seed: int):
    """A random schedule: the engine configuration, and per step the groups joining and the requests dropped."""
    from vlmguard.spec import GenerationSpec

    rng = random.Random(seed)
    family = FAMILIES[seed % 3]
    attn = "eager" if seed % 5 == 4 else "sdpa"  # eager attention: every mask is given, none implied
    pruner = rng.choice(PRUNERS)
    params = {}
    if pruner == "adaptinfer-renumber":  # each stage's layers decode from their own positions (1-D RoPE only)
        pruner, params = "adaptinfer", ({"position_mode": "renumber"} if family != "qwen2_vl" else {})
    decoder = rng.choice(list(DECODERS))
    budget = (None if pruner == "none" else rng.randint(*FLOWCUT_BUDGET[family]) if pruner == "flowcut"
              else rng.choice([0.3, 0.5, 0.7]))
    base = GenerationSpec(pruning=pruner, budget=budget, pruning_params=params, decoding=decoder,
                          decoding_params=DECODERS[decoder], diagnostics=False, max_new_tokens=4)
    joins, drops, names = {}, {}, []
    step = 0
    for g in range(rng.randint(2, 5)):
        group = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            name = f"s{seed}r{len(names)}"
            names.append(name)
            if group and rng.random() < 0.3:  # another choice of the previous request: the same image objects
                prev = group[-1][1]           # (prefilled once, then gathered, where the decoder allows)
                req = dataclasses.replace(prev, request_id=name)
            else:
                req = _request(rng, name)
            group.append((name, req, _spec(rng, base)))
        joins.setdefault(step, []).append(group)
        if rng.random() < 0.3:
            drops[step + rng.randint(1, 3)] = rng.randrange(len(names))  # a caller that leaves
        step += rng.choice([0, 1, 1, 2, 3])
    return (family, attn), base, joins, drops, names


def _run_schedule(seed: int):
    from vlmguard.testing import tiny_engine

    (family, attn), base, joins, drops, names = _schedule(seed)
    eng = tiny_engine(family, attn)  # shared: only generated from, never changed
    reqs = {n: (r, s) for groups in joins.values() for g in groups for n, r, s in g}
    results, dropped, batch, step = {}, set(), None, 0
    try:
        while batch is None or batch.active or step <= max(joins):
            for group in joins.get(step, []):
                other = eng.start_batch([r for _, r, _ in group], [s for _, _, s in group],
                                        indices=[names.index(n) for n, _, _ in group])
                if batch is None or not batch.active:  # nothing running (yet, or any more): it starts one
                    if batch is not None:
                        batch.close()
                    batch = other
                    continue
                try:
                    batch.absorb(other)
                finally:
                    other.close()
            if step in drops and batch is not None:
                idx = drops[step]
                if any(lv.index == idx for lv in batch.lives):
                    dropped.add(names[idx])
                    batch.drop({idx})
            if batch is not None:
                for ev in batch.advance():
                    if ev.done:
                        results[names[ev.index]] = ev.result
            step += 1
    finally:
        if batch is not None:
            batch.close()
    assert sorted(set(results) | dropped) == sorted(names)
    what = f"seed {seed}: {family} ({attn}) x {base.pruning} ({base.budget}) x {base.decoding}"
    for name in names:
        if name in dropped:
            continue
        req, spec = reqs[name]
        alone, joined = eng.generate([req], spec)[0], results[name]
        assert joined.token_ids == alone.token_ids, f"{what}: request {name}"
        assert (joined.finish_reason, joined.text) == (alone.finish_reason, alone.text), f"{what}: request {name}"
        assert joined.kept_indices == alone.kept_indices, f"{what}: request {name}"
        if spec.logprobs is not None:
            flat = [[x for lp in r.logprobs for x in [lp.logprob, *(t.logprob for t in lp.top)]]
                    for r in (joined, alone)]
            assert flat[0] == pytest.approx(flat[1], rel=1e-4, abs=1e-5), f"{what}: request {name}"
    return len(names), len(dropped)


@pytest.mark.parametrize("chunk", range(4))
def test_engine_random_schedules_equal_alone(chunk):
    """100 seeded schedules (25 per chunk, each family in turn, one in five with eager attention)."""
    n_req = n_dropped = 0
    for seed in range(chunk * 25, chunk * 25 + 25):
        a, b = _run_schedule(seed)
        n_req, n_dropped = n_req + a, n_dropped + b
    assert n_req > 75 and n_dropped > 0
