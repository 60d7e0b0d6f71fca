"""Random baseline: seeded, batch-invariant, raster order."""
from __future__ import annotations

from pruning_support import requests
from vlmguard.spec import GenerationSpec
from vlmguard.testing import tiny_engine


def test_seeded_sample():
    eng = tiny_engine("llava")
    reqs = requests()
    run = lambda seed: eng.generate(reqs, GenerationSpec(pruning="random", budget=5, max_new_tokens=1,
                                                         pruning_params={"seed": seed}))
    a, b, c = run(0), run(0), run(1)
    assert [r.kept_indices for r in a] == [r.kept_indices for r in b]
    assert a[0].kept_indices != c[0].kept_indices
    assert all(len(r.kept_indices) == 5 and r.kept_indices == sorted(r.kept_indices) for r in a + c)
    # the sample depends on the seed and the token count only: same for every row of equal size
    assert a[0].kept_indices == a[1].kept_indices == a[2].kept_indices
