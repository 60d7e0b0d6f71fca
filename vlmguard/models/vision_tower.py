"""Run a CLIP vision tower only as deep as LLaVA reads it.

LLaVA-1.5 and LLaVA-NeXT feed the LLM ``hidden_states[vision_feature_layer]`` of the CLIP tower, -2 in the
released checkpoints, so the tower's last layer (and its post-layernorm) computes features nobody reads:
1 of 24 layers of CLIP ViT-L/14-336, 1 of 5 in the bundled SynthCOCO model. transformers'
``get_image_features`` runs the whole tower and collects every hidden state; :func:`select_features` drives
the tower's own modules (``embeddings`` -> ``pre_layrnorm`` -> ``encoder.layers``) up to the deepest layer
selected, and returns exactly what ``get_image_features`` selects, bit for bit (the same modules on the same
inputs; ``tests/test_vision_tower.py`` compares them). Like serving engines that load a truncated tower, but
without changing the loaded model. FlowCut's stage V (``pruning/flowcut_vision.py``) stops at the same layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def layers_needed(n_layers: int, feature_layer: int | Sequence[int]) -> int:
    """How many encoder layers must run for ``hidden_states[feature_layer]`` (hidden_states has n_layers + 1
    entries: the embeddings, then every layer's output)."""
    return max(_absolute(n_layers, feature_layer))


def _absolute(n_layers: int, feature_layer: int | Sequence[int]) -> list[int]:
    wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return [i if i >= 0 else n_layers + 1 + i for i in wanted]


def is_clip_like(tower: nn.Module) -> bool:
    """A tower with CLIP's module layout (the layout this runner drives); anything else uses transformers."""
    encoder = getattr(tower, "encoder", None)
    return (hasattr(tower, "embeddings") and hasattr(tower, "pre_layrnorm")
            and isinstance(getattr(encoder, "layers", None), nn.ModuleList))


@torch.no_grad()
def select_features(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int | Sequence[int],
                    strategy: str) -> torch.Tensor:
    """LLaVA's selected vision features, (images, tokens, D x layers): the hidden states of
    ``feature_layer`` (concatenated along the feature axis for a list), CLS dropped for the ``default``
    strategy, computed with only the layers they need."""
    layers = tower.encoder.layers
    wanted = _absolute(len(layers), feature_layer)
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states = {0: h} if 0 in wanted else {}
    for i in range(max(wanted)):
        h = layers[i](h, None)
        if i + 1 in wanted:
            states[i + 1] = h
    picked = [states[i] for i in wanted]
    if strategy == "default":
        picked = [s[:, 1:] for s in picked]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
