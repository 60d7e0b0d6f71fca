"""Random baseline: seeded, batch-invariant, raster order."""
from __future__ import annotations

import pytest
import torch

from pruning_support import requests
from vlmguard.models.base import Prompt
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


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_vision_side_positions_match_a_physically_shorter_input(mode: str):
    """A vision-side cut feeds the LLM exactly what transformers computes on the shortened input: the kept
    features in place of <image>, with contiguous positions ("compact", as FlowCut's reference) or the
    positions the tokens had before the cut ("original")."""
    eng = tiny_engine("llava")
    req = requests()[0]
    spec = GenerationSpec(pruning="random", budget=5, max_new_tokens=1, pruning_params={"position_mode": mode})
    res = eng.generate([req], spec)[0]
    model, ad = eng.model, eng.adapter
    batch = ad.encode([Prompt(req.prompt, req.images)])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    with torch.no_grad():
        feats = ad.image_features(batch)[0]
        emb = model.get_input_embeddings()(ids)
        img = (ids == model.config.image_token_id).nonzero().squeeze(1)
        start, n_vis = int(img[0]), img.numel()
        kept = torch.tensor(res.kept_indices)
        x = torch.cat([emb[:start], feats[kept], emb[start + n_vis:]])[None]
        n_after = ids.numel() - start - n_vis
        if mode == "compact":
            pos = torch.arange(x.shape[1])
        else:
            pos = torch.cat([torch.arange(start), start + kept, start + n_vis + torch.arange(n_after)])
        hidden = model.model.language_model(inputs_embeds=x, position_ids=pos[None]).last_hidden_state
        probs = torch.softmax(model.lm_head(hidden[0, -1]).float(), -1)
    assert res.token_ids[0] == int(probs.argmax())
    assert res.steps[0].main_prob == pytest.approx(float(probs.max()), abs=1e-5)


def test_flowcut_position_mode_is_a_parameter():
    from vlmguard.pruning import make_pruner

    assert make_pruner("flowcut", 16, None).position_mode == "compact"  # the reference's contiguous positions
    assert make_pruner("flowcut", 16, {"position_mode": "original"}).position_mode == "original"
