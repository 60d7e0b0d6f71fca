"""GrowingCache (in-place KV appends) gives exactly what transformers' DynamicCache gives."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from vlmguard.kv_cache import GrowingCache, GrowingLayer


def test_growing_layer_matches_concatenation_across_reallocations_and_row_drops():
    torch.manual_seed(0)
    grow, ref = GrowingCache(), DynamicCache()
    k0, v0 = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    for c in (grow, ref):
        c.update(k0, v0, 0)
    for step in range(150):  # crosses the first capacity (5 + 64) and a regrowth
        k, v = torch.randn(3 if step < 100 else 2, 2, 1, 4), torch.randn(3 if step < 100 else 2, 2, 1, 4)
        if step == 100:  # drop a finished row: both caches select the same rows
            idx = torch.tensor([0, 2])
            grow.batch_select_indices(idx)
            ref.batch_select_indices(idx)
        gk, gv = grow.update(k, v, 0)
        rk, rv = ref.update(k, v, 0)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
    layer = grow.layers[0]
    assert isinstance(layer, GrowingLayer) and isinstance(grow, DynamicCache)
    assert grow.get_seq_length(0) == ref.get_seq_length(0) == 155
    assert layer._kbuf.shape[-2] >= 155  # appends went into spare capacity, not a fresh cat each step


@pytest.mark.parametrize("decoding", ["greedy", "vcd", "m3id"])
def test_engine_outputs_unchanged_with_growing_cache(monkeypatch, decoding):
    """Generation (incl. contrastive branch rows of another length): same tokens with either cache."""
    import vlmguard.runner as runner_mod
    from vlmguard.engine import Request
    from vlmguard.spec import GenerationSpec
    from vlmguard.testing import random_image, tiny_engine

    engine = tiny_engine("llava")
    reqs = [Request(prompt="Describe the image.", images=[random_image(i)]) for i in range(3)]
    spec = GenerationSpec(max_new_tokens=12, decoding=decoding)

    def run():
        out = engine.generate(reqs, spec)
        return [r.token_ids for r in out], [[s.main_prob for s in r.steps] for r in out]

    fast_ids, fast_p = run()
    monkeypatch.setattr(runner_mod, "GrowingCache", DynamicCache)
    ref_ids, ref_p = run()
    assert fast_ids == ref_ids
    for a, b in zip(fast_p, ref_p):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
