"""The truncated CLIP tower: exactly transformers' get_image_features, without the layers nobody reads."""
from __future__ import annotations

import pytest
import torch

from vlmguard.engine import Engine
from vlmguard.models.base import Prompt
from vlmguard.models.vision_tower import layers_needed
from vlmguard.testing import FAMILIES, random_image


def _hf_features(adapter, batch):
    """What transformers computes (the whole tower, every hidden state collected)."""
    kwargs = {}
    if adapter.family == "llava_next":
        kwargs["image_sizes"] = batch.vision_inputs["image_sizes"]
    out = adapter.model.model.get_image_features(
        pixel_values=batch.vision_inputs["pixel_values"], vision_feature_layer=adapter.vision_feature_layer,
        vision_feature_select_strategy=adapter.vision_feature_select_strategy, return_dict=True, **kwargs)
    return torch.cat(list(out.pooler_output))


def _batch(adapter, sizes):
    return adapter.encode([Prompt("Describe this image.", [random_image(i, size)]) for i, size in enumerate(sizes)])


def _layer_calls(tower) -> list[int]:
    calls = [0] * len(tower.encoder.layers)
    for i, layer in enumerate(tower.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_layers_needed():
    assert layers_needed(24, -2) == 23  # LLaVA-1.5: CLIP ViT-L's last layer is never read
    assert layers_needed(5, -1) == 5
    assert layers_needed(24, [-2, -5, 3]) == 23
    assert layers_needed(3, 0) == 0  # the embeddings only


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("feature_layer", [-2, [-3, -2], -1])
def test_features_equal_transformers(family, feature_layer):
    model, proc = FAMILIES[family](seed=3)
    model.config.vision_feature_layer = feature_layer
    if isinstance(feature_layer, list):  # the projector reads one layer's width per selected layer
        proj = model.model.multi_modal_projector
        proj.linear_1 = torch.nn.Linear(proj.linear_1.in_features * len(feature_layer), proj.linear_1.out_features)
    adapter = Engine(model, proc).adapter
    # LLaVA-NeXT: images of different aspect ratios get different crop counts and unpadding
    batch = _batch(adapter, [(40, 32), (32, 64), (64, 32)])
    calls = _layer_calls(adapter.vision_tower)
    with torch.no_grad():
        ours = torch.cat(list(adapter.encode_images(batch)))
    assert calls[-1] == (1 if feature_layer == -1 else 0)  # the unread last layer did not run
    theirs = _hf_features(adapter, batch)
    assert torch.equal(ours, theirs)


def test_bundled_model_features_equal_transformers():
    engine = Engine.load("tiny", device="cpu")
    adapter = engine.adapter
    batch = _batch(adapter, [(96, 96), (120, 80)])
    calls = _layer_calls(adapter.vision_tower)
    with torch.no_grad():
        ours = torch.cat(list(adapter.encode_images(batch)))
    assert calls == [1, 1, 1, 1, 0]  # feature layer -2 of a 5-layer tower
    assert torch.equal(ours, _hf_features(adapter, batch))
