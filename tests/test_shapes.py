"""Random-weight real-shape models: configs match the real checkpoints; -cpu variants build and run."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmguard.errors import InvalidInput
from vlmguard.models.shapes import SHAPES, build_config, build_shape, shape_spec


def test_full_shapes_match_real_configs():
    c = build_config("llava-1.5-7b")
    assert (c.text_config.num_hidden_layers, c.text_config.hidden_size, c.text_config.num_attention_heads,
            c.text_config.num_key_value_heads, c.text_config.intermediate_size) == (32, 4096, 32, 32, 11008)
    v = c.vision_config
    assert (v.num_hidden_layers, v.hidden_size, v.image_size, v.patch_size) == (24, 1024, 336, 14)
    assert (v.image_size // v.patch_size) ** 2 == 576
    n = build_config("llava-next-7b")
    assert n.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    q = build_config("qwen2-vl-7b")
    t = q.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (q.vision_config.depth, q.vision_config.embed_dim) == (32, 1280)
    with pytest.raises(InvalidInput):
        shape_spec("llava-70b")


@pytest.mark.parametrize("name", [s for s in SHAPES if s.endswith("-cpu")])
def test_cpu_shape_builds_and_runs(name: str):
    full = build_config(name.removesuffix("-cpu"))
    model, processor = build_shape(name, seed=0)
    cfg = model.config
    # same depths as the full shape
    if hasattr(cfg.vision_config, "depth"):
        assert cfg.vision_config.depth == full.vision_config.depth
    else:
        assert cfg.vision_config.num_hidden_layers == full.vision_config.num_hidden_layers
    assert cfg.text_config.num_hidden_layers == full.text_config.num_hidden_layers
    # a small image keeps the test fast (LLaVA resizes to 336 px anyway: 576 visual tokens)
    image = Image.new("RGB", (224, 224), (90, 140, 30))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cup in the image?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    enc = processor(images=image, text=text, return_tensors="pt")
    n_visual = int((enc["input_ids"] == cfg.image_token_id).sum())
    if name.startswith("llava-1.5"):
        assert n_visual == 576
    assert n_visual > 0
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape[:2] == enc["input_ids"].shape
    assert torch.isfinite(out.logits[:, -1]).all()


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b"])
def test_cpu_shape_keeps_the_vision_share_of_prefill_flops(name: str):
    """Scaling both towers alike keeps the ViT's share of an unpruned prefill close to the real model's, so
    the ideal speed-ups of vision-side and LLM-side pruning on the -cpu shape mean what they mean at full size."""
    from vlmguard.flops import llm_flops, vision_flops

    def vit_share(cfg) -> float:
        if name.startswith("qwen"):  # a 448 x 448 image: 1024 raw patches, 256 merged tokens
            family, n_visual = "qwen2_vl", 256
        else:
            family = cfg.model_type
            n_visual = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        vit, _ = vision_flops(cfg, family, 1, n_visual)
        llm = llm_flops(cfg.text_config, [n_visual + 40] * cfg.text_config.num_hidden_layers)
        return vit / (vit + llm)

    full, cpu = vit_share(build_config(name)), vit_share(build_config(name + "-cpu"))
    assert 0.5 < cpu / full < 2.0, (full, cpu)


def test_cpu4_shape_divides_both_towers_by_four():
    full, cpu4 = build_config("llava-1.5-7b"), build_config("llava-1.5-7b-cpu4")
    for part in ("vision_config", "text_config"):
        f, c = getattr(full, part), getattr(cpu4, part)
        assert c.num_hidden_layers == f.num_hidden_layers
        assert (c.hidden_size * 4, c.intermediate_size * 4) == (f.hidden_size, f.intermediate_size)
        assert c.hidden_size // c.num_attention_heads == f.hidden_size // f.num_attention_heads  # head dims kept
    assert cpu4.vision_config.image_size == full.vision_config.image_size


def test_perf_engine_keeps_the_shapes_whole_vocabulary():
    """The shapes keep the real output layer (32064 rows) with a ~100-token stand-in tokenizer: the perf engine's
    logits, and so every decoder's combine and the sampler, cover all of it as on the real checkpoint (cut to the
    tokenizer's ids, a vocabulary-wide contrast timed ~300x too cheap)."""
    from vlmguard.perf.models import load_engine

    engine = load_engine("llava-1.5-7b-cpu", device="cpu")
    rows = engine.model.lm_head.out_features
    assert rows == 32064 and len(engine.adapter.tokenizer) < rows
    hidden = torch.zeros(1, engine.model.lm_head.in_features)
    assert engine.adapter.logits(hidden).shape[-1] == rows
