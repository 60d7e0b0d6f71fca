"""Every decoder composes with every pruner in one request (docs/decoding.md, composition rule)."""
from __future__ import annotations

import pytest
import torch

from pruning_support import DECODER_PARAMS as ALL_DECODER_PARAMS
from vlmguard.decoding import DECODERS
from vlmguard.engine import Request
from vlmguard.pruning import PRUNERS
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

DECODER_PARAMS = {k: v for k, v in ALL_DECODER_PARAMS.items() if k != "greedy"}
PRUNER_NAMES = [n for n in ("random", "fastv", "adaptinfer", "flowcut") if n in PRUNERS]


def test_all_pruners_present():
    assert PRUNER_NAMES == ["random", "fastv", "adaptinfer", "flowcut"]


@pytest.mark.parametrize("pruner", PRUNER_NAMES)
@pytest.mark.parametrize("decoder", list(DECODER_PARAMS))
def test_decoder_composes_with_pruner(decoder, pruner, monkeypatch):
    eng = tiny_engine("llava")
    cls = DECODERS.get(decoder)
    seen: list[dict[str, torch.Tensor]] = []
    original = cls.combine

    def spy(self, step):
        seen.append({k: v for k, v in step.logits.items()})
        return original(self, step)

    monkeypatch.setattr(cls, "combine", spy)
    reqs = [Request("Is there a dog in the image?", [random_image(1, (40, 32))]),
            Request("describe the photo", [random_image(2, (64, 40))])]
    spec = GenerationSpec(pruning=pruner, budget=0.5, decoding=decoder, decoding_params=DECODER_PARAMS[decoder],
                          max_new_tokens=4)
    res = eng.generate(reqs, spec)
    assert len(res) == 2
    for out in res:
        assert len(out.token_ids) == 4 and len(out.steps) == 4
        assert out.pruning["name"] == pruner and out.decoding["name"] == decoder
        assert out.decoding["applied"] == [True]  # its own entry (a result never shows the batch's others)
        assert out.kept_indices is not None and 0 < len(out.kept_indices) < out.visual_tokens
        if pruner != "adaptinfer":  # AdaptInfer's schedule decides its own per-layer counts
            assert len(out.kept_indices) == out.visual_tokens // 2
    assert len(seen) == 4 and all("main" in step for step in seen)  # one combine per decoding step
    for step in seen:  # every branch produced finite logits for every request
        assert all(v.shape[0] == 2 and torch.isfinite(v).all() for v in step.values())


@pytest.mark.parametrize("decoder", list(DECODER_PARAMS))
def test_decoder_composes_with_flowcut_on_qwen2_vl(decoder):
    """Qwen2-VL: FlowCut's ViT stage (whole merge blocks, per image view) and its layer-1 cut under every
    decoder's branches; the main rows get exactly K tokens from LLM layer 2 on."""
    from vlmguard.testing import tiny_engine as engine_of

    eng = engine_of("qwen2_vl")
    reqs = [Request("Is there a dog in the image?", [random_image(1, (64, 64))]),
            Request("describe the photo", [random_image(2, (64, 48))])]
    spec = GenerationSpec(pruning="flowcut", budget=3, decoding=decoder, decoding_params=DECODER_PARAMS[decoder],
                          max_new_tokens=3)
    for out in eng.generate(reqs, spec):
        assert len(out.token_ids) == 3 and out.decoding["applied"] == [True]
        assert out.visual_tokens_kept[0] == 6 and out.visual_tokens_kept[2:] == [3] * (len(out.visual_tokens_kept) - 2)
        assert out.pruning["flowcut_vit_tokens_per_layer"] and len(out.kept_indices) == 3
