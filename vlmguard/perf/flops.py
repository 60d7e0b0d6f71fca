"""Analytic prefill FLOPs of an LVLM (ViT + projector + LLM) given the tokens actually fed to each layer.

Used for the *ideal* speed-up of a pruning method: FLOPs(no pruning) / FLOPs(method), both counted with the
tokens each layer really processed in that run (``GenerationResult.visual_tokens_kept`` for the LLM, the
pruner's reported per-layer counts inside the vision tower when it prunes there). One multiply-add = 2 FLOPs.
Elementwise work (norms, activations, softmax, RoPE) and the pruners' own scoring are not counted: the ideal
is what a perfect implementation of the same token schedule would cost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from vlmguard.models.vision_tower import layers_needed


@dataclass
class PrefillFlops:
    vision: float  # vision tower incl. patch embedding
    projector: float  # multimodal projector / patch merger
    llm: float  # decoder layers + final lm_head on the last position
    total: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def llm_layer_flops(n: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> float:
    """One causal decoder layer (Llama / Qwen2: gated MLP) run on ``n`` tokens without a cache."""
    q, kv = heads * head_dim, kv_heads * head_dim
    linear = 2.0 * n * (hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate)
    attention = 2.0 * 2.0 * q * n * (n + 1) / 2.0  # QK^T and AV over the visible (causal) keys
    return linear + attention


def vit_layer_flops(n: int, hidden: int, intermediate: int) -> float:
    """One bidirectional pre-LN ViT block on ``n`` tokens (q, k, v, o projections; 2-matrix MLP)."""
    return 2.0 * n * (4 * hidden * hidden + 2 * hidden * intermediate) + 4.0 * n * n * hidden


def _text_dims(tc: Any) -> tuple[int, int, int, int, int, int]:
    heads = int(tc.num_attention_heads)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    return int(tc.hidden_size), heads, kv_heads, head_dim, int(tc.intermediate_size), int(tc.vocab_size)


def llm_prefill_flops(text_config: Any, tokens_per_layer: Sequence[int]) -> float:
    d, h, hkv, hd, inter, vocab = _text_dims(text_config)
    body = sum(llm_layer_flops(int(n), d, h, hkv, hd, inter) for n in tokens_per_layer)
    return body + 2.0 * d * vocab  # lm_head on the last position only


def vision_flops(config: Any, family: str, n_passes: int, vit_passes: Sequence[Sequence[int]] | None = None,
                 n_visual_out: int = 0) -> tuple[float, float]:
    """(vision tower, projector) FLOPs of ``n_passes`` ViT passes (LLaVA-NeXT: one per crop).

    ``vit_passes``: for each pass, the tokens fed to each layer it ran (a vision-side pruner's schedule);
    default: all its tokens through every layer the model reads (Qwen2-VL: the whole tower; LLaVA: up to
    ``vision_feature_layer``, where ``vlmguard/models/vision_tower.py`` stops).
    ``n_visual_out``: visual tokens that reach the projector (after any vision-side pruning).
    """
    vc = config.vision_config
    tc = config.get_text_config()
    if family == "qwen2_vl":
        dv = int(getattr(vc, "embed_dim", None) or vc.hidden_size)
        inter = int(dv * float(getattr(vc, "mlp_ratio", 4)))
        depth = int(getattr(vc, "depth", None) or vc.num_hidden_layers)
        merge = int(getattr(vc, "spatial_merge_size", 2))
        patch_in = (int(getattr(vc, "in_channels", 3)) * int(getattr(vc, "temporal_patch_size", 2))
                    * int(vc.patch_size) ** 2)
        patches = int(n_visual_out) * merge * merge  # Qwen2-VL's tower runs on all patches of all images
        layers = [list(p) for p in vit_passes] if vit_passes else [[patches] * depth]
        vit = 2.0 * patches * patch_in * dv + sum(vit_layer_flops(int(n), dv, inter) for p in layers for n in p)
        m_in = dv * merge * merge
        proj = 2.0 * int(n_visual_out) * (m_in * m_in + m_in * int(tc.hidden_size))
        return vit, proj
    dv, inter = int(vc.hidden_size), int(vc.intermediate_size)
    grid = int(vc.image_size) // int(vc.patch_size)
    patches = grid * grid
    depth = layers_needed(int(vc.num_hidden_layers), config.vision_feature_layer)
    layers = [list(p) for p in vit_passes] if vit_passes else [[patches + 1] * depth] * n_passes
    patch_in = int(getattr(vc, "num_channels", 3)) * int(vc.patch_size) ** 2
    vit = n_passes * 2.0 * patches * patch_in * dv + sum(vit_layer_flops(int(n), dv, inter) for p in layers for n in p)
    feat_layers = config.vision_feature_layer
    n_feat = len(feat_layers) if isinstance(feat_layers, (list, tuple)) else 1
    dt = int(tc.hidden_size)
    proj = 2.0 * int(n_visual_out) * (dv * n_feat * dt + dt * dt)
    return vit, proj


def batch_prefill_flops(config: Any, family: str, rows: Sequence[tuple[int, Sequence[int]]], n_passes: int,
                        n_visual_total: int, vit_passes: Sequence[Sequence[int]] | None = None,
                        projected_tokens: int | None = None) -> PrefillFlops:
    """FLOPs of one batch's prefill.

    rows: per request row, (text tokens, visual tokens fed to each LLM layer);
    n_passes: ViT passes of the batch (images, or anyres crops); n_visual_total: visual tokens of the batch
    before pruning; projected_tokens: visual tokens the projector ran on (default: n_visual_total).
    """
    tc = config.get_text_config()
    llm = sum(llm_prefill_flops(tc, [text + int(v) for v in vis]) for text, vis in rows)
    vit = proj = 0.0
    if n_passes and n_visual_total:
        out = projected_tokens if projected_tokens is not None else n_visual_total
        vit, _ = vision_flops(config, family, n_passes, vit_passes, n_visual_out=n_visual_total)
        _, proj = vision_flops(config, family, n_passes, vit_passes, n_visual_out=out)
    return PrefillFlops(vision=vit, projector=proj, llm=llm, total=vit + proj + llm)
