"""Analytic prefill FLOPs of an LVLM: vision tower + projector + language model, on the tokens each layer
actually received (so pruning shows up layer by layer).

Convention (FastV / AdaptInfer / FlowCut tables): one multiply-accumulate counts as one FLOP, only the
matrix products are counted (no norms, softmax, activations, RoPE), attention counts the full n x n score
and value products (no causal halving). Multiply by 2 for hardware FLOPs.

Language model, per decoder layer that receives n tokens (hidden d, query width d_q = H * d_h, key/value
width d_kv = H_kv * d_h, MLP width m, gated MLP = 3 matrices)::

    F_llm(n) = n * d * (2 * d_q + 2 * d_kv)   # q, o and k, v projections
             + 2 * n^2 * d_q                  # q k^T and attn @ v
             + 3 * n * d * m                  # gate, up, down

For Llama-7B (d = d_q = d_kv = 4096, m = 11008) this is AdaptInfer's 4 n d^2 + 2 n^2 d + 3 n d m; with
n = 668 over 32 layers it gives 4.44 TFLOPs. n = text tokens + visual tokens fed to that layer
(``GenerationResult.visual_tokens_kept``), so LLM-side pruning lowers n from its cut on.

Vision tower (ViT, width D, MLP width M, two-matrix MLP), per encoder layer that receives n tokens, plus
the patch embedding on P patches of p x p x C pixels and the projector on the k tokens sent to the LLM::

    F_vit(n) = 4 * n * D^2 + 2 * n^2 * D + 2 * n * D * M
    F_patch  = P * (C * p^2) * D
    F_proj   = k * (D * d + d * d)            # LLaVA's two-layer MLP projector

Unpruned LLaVA runs the encoder layers up to the one it selects (``vision_feature_layer``, -2: all but the
last; ``vlmguard/models/vision_tower.py``); FlowCut runs the same layers with the shrinking counts it
reports (``flowcut_vit_tokens_per_layer``; per image of the batch, averaged when a batch had several
images). Qwen2-VL's ViT is counted with the same layer formula
on its raw patches (the 2x2 merger counted as the projector on the merged tokens).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from vlmguard.models.vision_tower import layers_needed


@dataclass
class FlopsReport:
    vit: float
    projector: float
    llm: float

    @property
    def total(self) -> float:
        return self.vit + self.projector + self.llm

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["total"] = self.total
        d["tflops"] = self.total / 1e12
        return d


def llm_layer_flops(n: int, d: int, d_q: int, d_kv: int, m: int) -> float:
    return float(n * d * (2 * d_q + 2 * d_kv) + 2 * n * n * d_q + 3 * n * d * m)


def vit_layer_flops(n: int, width: int, mlp: int) -> float:
    return float(4 * n * width * width + 2 * n * n * width + 2 * n * width * mlp)


def text_dims(text_config) -> tuple[int, int, int, int]:
    d = int(text_config.hidden_size)
    heads = int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or d // heads)
    kv = int(getattr(text_config, "num_key_value_heads", None) or heads)
    return d, heads * head_dim, kv * head_dim, int(text_config.intermediate_size)


def vision_dims(vision_config) -> tuple[int, int, int, int, int]:
    """(width, mlp width, layers, patch size, channels) for CLIP- or Qwen2-VL-style vision configs."""
    width = int(getattr(vision_config, "embed_dim", None) or vision_config.hidden_size)
    mlp = getattr(vision_config, "intermediate_size", None)
    if mlp is None:
        mlp = int(width * float(getattr(vision_config, "mlp_ratio", 4)))
    layers = int(getattr(vision_config, "num_hidden_layers", None) or vision_config.depth)
    patch = int(vision_config.patch_size)
    channels = int(getattr(vision_config, "num_channels", None) or getattr(vision_config, "in_channels", 3))
    return width, int(mlp), layers, patch, channels


def llm_flops(text_config, tokens_per_layer: Sequence[int]) -> float:
    d, d_q, d_kv, m = text_dims(text_config)
    return sum(llm_layer_flops(int(n), d, d_q, d_kv, m) for n in tokens_per_layer)


def vit_flops(vision_config, tokens_per_layer: Sequence[int], n_patches: int) -> float:
    width, mlp, _, patch, ch = vision_dims(vision_config)
    return float(n_patches * ch * patch * patch * width) + sum(vit_layer_flops(int(n), width, mlp)
                                                              for n in tokens_per_layer)


def prefill_flops(config, llm_tokens_per_layer: Sequence[int], vit_tokens_per_layer: Sequence[int] | None = None,
                  n_images: int = 1, n_patches: int | None = None, projected_tokens: int = 0) -> FlopsReport:
    """FLOPs of one request's prefill. ``vit_tokens_per_layer`` is per image (None: no image / not counted)."""
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    vit = 0.0
    proj = 0.0
    if vision is not None and vit_tokens_per_layer is not None and n_images:
        width = vision_dims(vision)[0]
        if n_patches is None:
            n_patches = max(int(vit_tokens_per_layer[0]) - 1, 0) if vit_tokens_per_layer else 0
        vit = n_images * vit_flops(vision, vit_tokens_per_layer, n_patches)
        d = int(text.hidden_size)
        proj = float(projected_tokens * (width * d + d * d))
    return FlopsReport(vit=vit, projector=proj, llm=llm_flops(text, llm_tokens_per_layer))


def unpruned_vit_tokens(config) -> list[int]:
    """Tokens per encoder layer of an unpruned CLIP tower (CLS + patches), every layer LLaVA runs."""
    vision = config.vision_config
    width, _, layers, patch, _ = vision_dims(vision)
    n = (int(vision.image_size) // patch) ** 2 + 1
    return [n] * layers_needed(layers, config.vision_feature_layer)


def result_flops(config, result: Any) -> FlopsReport:
    """Prefill FLOPs of a :class:`~vlmguard.results.GenerationResult` (tokens actually fed per layer)."""
    text_tokens = int(result.prompt_tokens) - int(result.visual_tokens)
    llm_tokens = [text_tokens + int(v) for v in result.visual_tokens_kept]
    if not result.visual_tokens:
        return prefill_flops(config, llm_tokens)
    projected = int(result.visual_tokens_kept[0]) if result.visual_tokens_kept else 0
    vit_rows = (result.pruning or {}).get("flowcut_vit_tokens_per_layer")
    model_type = getattr(config, "model_type", "")
    if vit_rows:
        n_layers = max(len(r) for r in vit_rows)
        vit_tokens = [sum(r[i] for r in vit_rows if i < len(r)) / len(vit_rows) for i in range(n_layers)]
        n_patches = int(vit_rows[0][0]) - 1
        batch = max(int(getattr(getattr(result, "timings", None), "batch_size", 1) or 1), 1)
        n_images = max(1, round(len(vit_rows) / batch))  # images (NeXT: crops) per request
    elif model_type in ("llava", "llava_next"):
        vit_tokens = unpruned_vit_tokens(config)
        n_patches = vit_tokens[0] - 1
        # LLaVA-NeXT: crops per image ~ visual tokens / tokens per crop (base + grid)
        n_images = max(1, round(int(result.visual_tokens) / n_patches)) if model_type == "llava_next" else 1
    else:
        # Qwen2-VL: raw patches = merged visual tokens * merge^2, every layer sees all of them
        vision = config.vision_config
        merge = int(getattr(vision, "spatial_merge_size", 2))
        raw = int(result.visual_tokens) * merge * merge
        vit_tokens = [raw] * vision_dims(vision)[2]
        n_patches = raw
        n_images = 1
    return prefill_flops(config, llm_tokens, [int(round(x)) for x in vit_tokens], n_images=n_images,
                         n_patches=n_patches, projected_tokens=projected)
