"""Analytic FLOPs: the published 7B anchor, and pruning lowers ViT and LLM FLOPs layer by layer."""
from __future__ import annotations

from transformers import LlamaConfig

from pruning_support import deep_llava_engine, requests
from vlmguard.engine import Request
from vlmguard.flops import llm_flops, result_flops
from vlmguard.pruning.adaptinfer_schedule import OFFICIAL_KEEPS_7B, OFFICIAL_LAYERS_7B
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


def test_llama7b_anchor():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32)
    assert round(llm_flops(cfg, [668] * 32) / 1e12, 2) == 4.44  # AdaptInfer's "full" row
    text = 668 - 576
    fed, cur, stage = [], 576, 0
    for i in range(32):
        fed.append(text + cur)
        if stage < 3 and OFFICIAL_LAYERS_7B[stage] == i:
            cur = OFFICIAL_KEEPS_7B[64][stage]
            stage += 1
    assert round(llm_flops(cfg, fed) / 1e12, 2) == 1.15  # AdaptInfer-64
    fastv = [668, 668] + [text + 64] * 30
    assert round(llm_flops(cfg, fastv) / 1e12, 2) == 1.23  # FastV keep 64


def test_pruning_lowers_flops():
    eng = deep_llava_engine()
    req = [Request("Is there a dog in the image?", [random_image(3, (48, 48))])]
    cfg = eng.model.config
    base = result_flops(cfg, eng.generate(req, GenerationSpec(max_new_tokens=1))[0])
    flow = result_flops(cfg, eng.generate(req, GenerationSpec(pruning="flowcut", budget=6, max_new_tokens=1))[0])
    fast = result_flops(cfg, eng.generate(req, GenerationSpec(pruning="fastv", budget=6, max_new_tokens=1))[0])
    assert flow.vision < base.vision and flow.llm < fast.llm < base.llm
    assert fast.vision == base.vision and flow.total < base.total
    qwen = tiny_engine("qwen2_vl")
    r = qwen.generate(requests()[:1], GenerationSpec(pruning="adaptinfer", budget=2, max_new_tokens=1))[0]
    assert result_flops(qwen.model.config, r).llm < result_flops(
        qwen.model.config, qwen.generate(requests()[:1], GenerationSpec(max_new_tokens=1))[0]).llm


def test_qwen2_vl_counts_its_tower_on_raw_patches_and_its_merger():
    """Qwen2-VL: the patch embedding sees C x t x p x p inputs (t frames), every ViT layer all raw patches
    (merged tokens x merge^2), and the merger MLP (D' x D', D' x d with D' = D x merge^2) every merged token."""
    qwen = tiny_engine("qwen2_vl")
    cfg = qwen.model.config
    r = qwen.generate(requests()[:1], GenerationSpec(max_new_tokens=1))[0]
    vc, d = cfg.vision_config, cfg.get_text_config().hidden_size
    merge, width = vc.spatial_merge_size, vc.embed_dim
    raw = r.visual_tokens * merge * merge
    mlp = int(width * vc.mlp_ratio)
    layer = 4 * raw * width * width + 2 * raw * raw * width + 2 * raw * width * mlp
    patch = raw * vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 * width
    m_in = width * merge * merge
    f = result_flops(cfg, r)
    assert f.vision == patch + vc.depth * layer
    assert f.projector == r.visual_tokens * (m_in * m_in + m_in * d)


def test_qwen2_vl_images_of_a_batch_attend_only_to_themselves():
    """The tower packs a batch's images into one varlen call, but each image attends only to its own patches:
    two images cost twice one image (the attention term is per image, not over the batch's patches)."""
    from vlmguard.flops import vision_flops

    cfg = tiny_engine("qwen2_vl").model.config
    one = vision_flops(cfg, "qwen2_vl", n_passes=1, n_visual=64)
    two = vision_flops(cfg, "qwen2_vl", n_passes=2, n_visual=128)
    assert two == (2 * one[0], 2 * one[1])
    packed_as_one = vision_flops(cfg, "qwen2_vl", n_passes=1, n_visual=128)
    assert packed_as_one[0] > two[0]  # what was counted before: (2 x patches)^2 attention
