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
    assert flow.vit < base.vit and flow.llm < fast.llm < base.llm
    assert fast.vit == base.vit and flow.total < base.total
    qwen = tiny_engine("qwen2_vl")
    r = qwen.generate(requests()[:1], GenerationSpec(pruning="adaptinfer", budget=2, max_new_tokens=1))[0]
    assert result_flops(qwen.model.config, r).llm < result_flops(
        qwen.model.config, qwen.generate(requests()[:1], GenerationSpec(max_new_tokens=1))[0]).llm
