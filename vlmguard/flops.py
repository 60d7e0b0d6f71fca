"""Analytic prefill FLOPs of an LVLM: vision tower + projector + language model, on the tokens each layer
actually received (so pruning shows up layer by layer). One model of the towers, counted in one of two
conventions (:class:`Convention`):

- ``PAPER`` — the FastV / AdaptInfer / FlowCut tables: one multiply-accumulate = one FLOP, attention counts
  the full n x n score and value products, no lm_head. ``result_flops`` reports a result in it.
- ``HARDWARE`` — the ideal speed-up of ``vlmguard perf prefill``: two FLOPs per multiply-accumulate, causal
  attention counts only the keys each query sees (n(n+1)/2 pairs), plus the lm_head on the last position.

Only matrix products are counted (no norms, softmax, activations, RoPE, nor a pruner's own scoring): what a
perfect implementation of the same token schedule would cost. In multiply-accumulates:

Language model, per decoder layer that receives n tokens (hidden d, query width d_q = H * d_h, key/value
width d_kv = H_kv * d_h, MLP width m, gated MLP = 3 matrices; pairs = n^2, or n(n+1)/2 when causal)::

    F_llm(n) = n * d * (2 * d_q + 2 * d_kv)   # q, o and k, v projections
             + 2 * pairs * d_q                # q k^T and attn @ v
             + 3 * n * d * m                  # gate, up, down
    lm_head  = d * vocab                      # last position (HARDWARE only)

For Llama-7B (d = d_q = d_kv = 4096, m = 11008) PAPER is AdaptInfer's 4 n d^2 + 2 n^2 d + 3 n d m; with
n = 668 over 32 layers it gives 4.44 TFLOPs. n = text tokens + visual tokens fed to that layer
(``GenerationResult.visual_tokens_kept``), so LLM-side pruning lowers n from its cut on.

Vision tower (ViT width D, MLP width M, two-matrix MLP, bidirectional), per encoder layer that receives n
tokens, plus the patch embedding on P patches of C x p x p pixels (Qwen2-VL: C x t x p x p, t frames)::

    F_vit(n) = 4 * n * D^2 + 2 * n^2 * D + 2 * n * D * M
    F_patch  = P * (C * p^2) * D
    F_proj   = k * (D * f * d + d * d)        # LLaVA's two-layer MLP on k tokens, f feature layers
             = k * (D' * D' + D' * d)         # Qwen2-VL's merger, D' = D * merge^2, on k merged tokens

Unpruned LLaVA runs the encoder layers up to the one it selects (``vision_feature_layer``, -2: all but the
last; ``vlmguard/models/vision_tower.py``); FlowCut runs the same layers with the shrinking counts it
reports (``flowcut_vit_tokens_per_layer``). Qwen2-VL's tower runs every layer on all raw patches
(merged visual tokens x merge^2), or, under FlowCut, on the raw patches of the merge blocks it still holds
(the same report); its merger then runs on the kept blocks only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from vlmguard.models.vision_tower import layers_needed


@dataclass(frozen=True)
class Convention:
    """How FLOPs are counted (see module doc)."""

    flops_per_mac: int  # 1: a multiply-accumulate is one FLOP (the papers' tables); 2: hardware FLOPs
    causal: bool  # the LLM's attention counts only the keys each query sees
    lm_head: bool  # count the lm_head on the last position


PAPER = Convention(flops_per_mac=1, causal=False, lm_head=False)
HARDWARE = Convention(flops_per_mac=2, causal=True, lm_head=True)


@dataclass
class PrefillFlops:
    vision: float  # vision tower incl. patch embedding
    projector: float  # multimodal projector / patch merger
    llm: float  # decoder layers (+ the lm_head on the last position, HARDWARE)

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm

    def to_dict(self) -> dict[str, float]:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm, "total": self.total}


@dataclass(frozen=True)
class TextDims:
    hidden: int
    q_width: int  # heads * head_dim
    kv_width: int  # kv heads * head_dim
    mlp: int
    vocab: int

    @classmethod
    def of(cls, text_config: Any) -> "TextDims":
        d = int(text_config.hidden_size)
        heads = int(text_config.num_attention_heads)
        head_dim = int(getattr(text_config, "head_dim", None) or d // heads)
        kv = int(getattr(text_config, "num_key_value_heads", None) or heads)
        return cls(d, heads * head_dim, kv * head_dim, int(text_config.intermediate_size),
                   int(getattr(text_config, "vocab_size", 0) or 0))


def llm_layer_flops(n: int, dims: TextDims, conv: Convention = PAPER) -> float:
    """One decoder layer run on ``n`` tokens without a cache."""
    d, dq, dkv = dims.hidden, dims.q_width, dims.kv_width
    pairs = n * (n + 1) / 2 if conv.causal else n * n
    return conv.flops_per_mac * (n * d * (2 * dq + 2 * dkv) + 2 * pairs * dq + 3 * n * d * dims.mlp)


def vit_layer_flops(n: int, width: int, mlp: int, conv: Convention = PAPER) -> float:
    """One bidirectional pre-LN ViT block on ``n`` tokens (q, k, v, o projections; 2-matrix MLP)."""
    return float(conv.flops_per_mac * (4 * n * width * width + 2 * n * n * width + 2 * n * width * mlp))


def llm_flops(text_config: Any, tokens_per_layer: Sequence[int], conv: Convention = PAPER) -> float:
    """The decoder layers on the tokens each received (+ the lm_head on the last position, if counted)."""
    dims = TextDims.of(text_config)
    body = sum(llm_layer_flops(int(n), dims, conv) for n in tokens_per_layer)
    return body + (conv.flops_per_mac * dims.hidden * dims.vocab if conv.lm_head else 0.0)


def unpruned_vit_tokens(config: Any) -> list[int]:
    """Tokens per encoder layer of an unpruned CLIP tower (CLS + patches), every layer LLaVA runs."""
    vc = config.vision_config
    n = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
    return [n] * layers_needed(int(vc.num_hidden_layers), config.vision_feature_layer)


def vision_flops(config: Any, family: str, n_passes: int, n_visual: int,
                 vit_passes: Sequence[Sequence[int]] | None = None, projected: int | None = None,
                 conv: Convention = PAPER) -> tuple[float, float]:
    """(vision tower, projector) FLOPs of ``n_passes`` ViT passes (LLaVA-NeXT: one per crop).

    ``n_visual``: visual tokens the images give before any pruning (Qwen2-VL: merged tokens; its raw patches
    are ``n_visual * merge^2``). ``vit_passes``: for each pass, the tokens fed to each layer it ran (a
    vision-side pruner's schedule); default: all tokens through every layer the model reads.
    ``projected``: visual tokens that went through the projector (default ``n_visual``).
    """
    vc = config.vision_config
    dt = int(config.get_text_config().hidden_size)
    out = n_visual if projected is None else projected
    if family == "qwen2_vl":
        dv = int(getattr(vc, "embed_dim", None) or vc.hidden_size)
        mlp = int(dv * float(getattr(vc, "mlp_ratio", 4)))
        depth = int(getattr(vc, "depth", None) or vc.num_hidden_layers)
        merge = int(getattr(vc, "spatial_merge_size", 2))
        patch_in = (int(getattr(vc, "in_channels", 3)) * int(getattr(vc, "temporal_patch_size", 2))
                    * int(vc.patch_size) ** 2)
        patches = int(n_visual) * merge * merge  # the tower runs on all raw patches of all images
        # packed into one call, but each image attends only to itself (varlen): one "pass" per image, the
        # patches split evenly over them (the exact split when the images are of one size)
        per_pass = [patches // max(1, n_passes) + (i < patches % max(1, n_passes)) for i in range(max(1, n_passes))]
        layers = [list(p) for p in vit_passes] if vit_passes else [[n] * depth for n in per_pass]
        m_in = dv * merge * merge
        proj_macs = int(out) * (m_in * m_in + m_in * dt)
    else:
        dv, mlp = int(vc.hidden_size), int(vc.intermediate_size)
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2 * n_passes
        patch_in = int(getattr(vc, "num_channels", 3)) * int(vc.patch_size) ** 2
        layers = [list(p) for p in vit_passes] if vit_passes else [unpruned_vit_tokens(config)] * n_passes
        feat = config.vision_feature_layer
        n_feat = len(feat) if isinstance(feat, (list, tuple)) else 1
        proj_macs = int(out) * (dv * n_feat * dt + dt * dt)
    vit = conv.flops_per_mac * patches * patch_in * dv + sum(vit_layer_flops(int(n), dv, mlp, conv)
                                                            for p in layers for n in p)
    return float(vit), float(conv.flops_per_mac * proj_macs)


def batch_prefill_flops(config: Any, family: str, rows: Sequence[tuple[int, Sequence[int]]], n_passes: int,
                        n_visual_total: int, vit_passes: Sequence[Sequence[int]] | None = None,
                        projected_tokens: int | None = None, conv: Convention = PAPER) -> PrefillFlops:
    """FLOPs of one batch's prefill.

    rows: per request row, (text tokens, visual tokens fed to each LLM layer); n_passes: ViT passes of the
    batch (images, or anyres crops); n_visual_total: visual tokens of the batch before pruning;
    projected_tokens: visual tokens the projector ran on (default: n_visual_total).
    """
    tc = config.get_text_config()
    llm = sum(llm_flops(tc, [text + int(v) for v in vis], conv) for text, vis in rows)
    vit = proj = 0.0
    if n_passes and n_visual_total:
        vit, proj = vision_flops(config, family, n_passes, n_visual_total, vit_passes, projected_tokens, conv)
    return PrefillFlops(vision=vit, projector=proj, llm=llm)


def _family(config: Any) -> str:
    """The family of a model's config, as the engine's adapters name it (an unsupported type is an error, not
    counted as some other family)."""
    from vlmguard.errors import InvalidInput
    from vlmguard.models.families import ADAPTERS

    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise InvalidInput(f"no FLOP model for model type {model_type!r} (known: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[model_type].family


def qwen_image_passes(config: Any, patches_per_image: Sequence[int]) -> list[list[int]]:
    """Qwen2-VL's tower work as one pass per image, its raw patches through every layer (each image attends only
    to itself, so a request's images of different sizes are not one even split of their total)."""
    vc = config.vision_config
    depth = int(getattr(vc, "depth", None) or vc.num_hidden_layers)
    return [[int(n)] * depth for n in patches_per_image]


def result_flops(config: Any, result: Any, conv: Convention = PAPER) -> PrefillFlops:
    """Prefill FLOPs of one :class:`~vlmguard.results.GenerationResult` (tokens actually fed per layer)."""
    text_tokens = int(result.prompt_tokens) - int(result.visual_tokens)
    row = (text_tokens, [int(v) for v in result.visual_tokens_kept])
    n_visual = int(result.visual_tokens)
    if not n_visual:
        return batch_prefill_flops(config, "", [row], n_passes=0, n_visual_total=0, conv=conv)
    family = _family(config)
    vit_rows = (result.pruning or {}).get("flowcut_vit_tokens_per_layer")
    passes = None
    n_passes = 1
    if vit_rows:  # FlowCut's schedule of this request's own images (NeXT: crops), one list per tower pass
        passes = [list(r) for r in vit_rows]
        n_passes = len(passes)
    elif family == "llava_next":  # the crops the engine counted; else ~ visual tokens / tokens per crop
        n_passes = (sum((result.pruning or {}).get("vision_crops") or [])
                    or max(1, round(n_visual / (unpruned_vit_tokens(config)[0] - 1))))
    elif family == "qwen2_vl" and (result.pruning or {}).get("vision_patches"):
        passes = qwen_image_passes(config, result.pruning["vision_patches"])
        n_passes = len(passes)
    elif family == "llava":  # one tower pass per image (a request may carry several): visual tokens / per image
        per_image = unpruned_vit_tokens(config)[0] - (0 if config.vision_feature_select_strategy == "full" else 1)
        n_passes = max(1, round(n_visual / per_image))
    # the projector (Qwen2-VL: the merger) runs on what the vision side kept, what reached LLM layer 0
    projected = row[1][0] if row[1] else n_visual
    return batch_prefill_flops(config, family, [row], n_passes=n_passes, n_visual_total=n_visual,
                               vit_passes=passes, projected_tokens=projected, conv=conv)
