"""FastV: both scoring variants from the cheap path equal eager attention; the cut sits at layer K."""
from __future__ import annotations

import pytest
import torch

from pruning_support import requests
from vlmguard.engine import Engine
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.pruning.base import PruneContext
from vlmguard.pruning.fastv import FastVParams, FastVPruner
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine, tiny_llava, tiny_qwen2_vl

PROMPTS = [Prompt("Is there a dog in the image?", [random_image(1, (40, 32))]),
           Prompt("describe", [random_image(2, (64, 40))])]


def eager_reference(model, batch):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True,
                        **batch.vision_inputs)
    finally:
        model.set_attn_implementation("vlmguard_sdpa")
    return out.attentions


def cheap_scores(eng: Engine, pruner: FastVPruner, prompts):
    """Run the pruner's own hooks on an unpruned prefill and capture its (B, L) scores."""
    batch = eng.adapter.encode(prompts)
    seq = eng.adapter.build_sequence(batch, eng.adapter.image_features(batch), eng.model.dtype, eng.device)
    ctx = PruneContext(adapter=eng.adapter, batch=batch, main_rows=list(range(len(prompts))),
                       n_visual=batch.image_token_mask.sum(1).tolist())
    got = {}

    def after(i, s, req):
        if req is not None:
            got["scores"] = pruner.visual_scores(ctx, s, req)
        return None

    eng.runner.prefill(seq, before=lambda i, s: pruner.before_layer(ctx, i, s), after=after)
    return got["scores"], batch


@pytest.mark.parametrize("builder", [tiny_llava, tiny_qwen2_vl])
@pytest.mark.parametrize("query", ["last", "all"])
def test_cheap_scores_equal_eager_attention(builder, query):
    model, proc = builder(attn="eager")
    eng = Engine(model, proc, attn_implementation="vlmguard_sdpa")
    model.set_attn_implementation("vlmguard_sdpa")
    pruner = FastVPruner(FastVParams(K=2, query=query), 4)
    ours, batch = cheap_scores(eng, pruner, PROMPTS)
    attn = eager_reference(model, batch)[1].float()  # layer K-1 = 1, (B, H, L, L)
    valid = batch.attention_mask
    if query == "last":
        ref = attn[:, :, -1, :].mean(dim=1)
    else:  # mean attention received from every valid query, head mean
        ref = (attn.mean(dim=1) * valid[:, :, None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)
    vis = batch.image_token_mask
    assert (ours[vis] - ref[vis]).abs().max().item() < 1e-5
    # and the kept sets agree
    for r in range(len(PROMPTS)):
        pos = vis[r].nonzero().squeeze(1)
        ours_top = set(pos[torch.argsort(-ours[r, pos], stable=True)[:4]].tolist())
        ref_top = set(pos[torch.argsort(-ref[r, pos], stable=True)[:4]].tolist())
        assert ours_top == ref_top


@pytest.mark.parametrize("K", [1, 3])
def test_cut_after_layer_k_minus_1(K):
    eng = tiny_engine("llava")
    res = eng.generate(requests()[:1], GenerationSpec(pruning="fastv", budget=5, pruning_params={"K": K},
                                                      max_new_tokens=2))[0]
    assert res.visual_tokens_kept == [16] * K + [5] * (4 - K)
    assert list(map(int, res.pruning["fastv_kept"])) == [K - 1]


def test_ratio_budget_is_one_minus_r():
    eng = tiny_engine("llava")
    res = eng.generate(requests()[:1], GenerationSpec(pruning="fastv", budget=0.5, max_new_tokens=1))[0]
    assert res.visual_tokens_kept == [16, 16, 8, 8]  # R = 50% (FastV's default)


def test_k_beyond_the_model_is_rejected():
    eng = tiny_engine("llava")
    with pytest.raises(InvalidInput, match="K=4"):
        eng.generate(requests()[:1], GenerationSpec(pruning="fastv", budget=4, pruning_params={"K": 4}))
    with pytest.raises(InvalidInput, match="query"):
        GenerationSpec(pruning="fastv", budget=4, pruning_params={"query": "first"}).resolve()
