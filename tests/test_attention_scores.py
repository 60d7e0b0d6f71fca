"""The cheap score facility equals eager attention's weights (fp32, max abs diff < 1e-5)."""
from __future__ import annotations

import pytest
import torch

from vlmguard.engine import Engine
from vlmguard.models.base import Prompt
from vlmguard.testing import random_image, tiny_llava, tiny_qwen2_vl


@pytest.mark.parametrize("builder", [tiny_llava, tiny_qwen2_vl])
def test_cheap_scores_match_eager_attention(builder):
    model, proc = builder(attn="eager")
    eng = Engine(model, proc, attn_implementation="vlmguard_sdpa")
    model.set_attn_implementation("vlmguard_sdpa")
    prompts = [Prompt("Is there a dog in the image?", [random_image(1, (40, 32))]),
               Prompt("describe", [random_image(2, (64, 40))])]
    batch = eng.adapter.encode(prompts)
    n_layers = eng.adapter.num_layers
    # our probe: last two query rows of every layer, under SDPA
    rows = lambda s: torch.stack([torch.full((s.batch_size,), s.length - 2), torch.full((s.batch_size,), s.length - 1)], 1)
    probe = eng.probe_forward(prompts, score_layers=range(n_layers), query_rows=rows, per_head=True)
    # reference: the model's own eager attention weights
    model.set_attn_implementation("eager")
    inputs = {k: v for k, v in batch.vision_inputs.items()}
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True,
                    **inputs)
    model.set_attn_implementation("vlmguard_sdpa")
    L = batch.input_ids.shape[1]
    for i in range(n_layers):
        ref = out.attentions[i][:, :, L - 2:, :].float()
        ours = probe["scores"][i]
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_eager_attention_runs_every_tower_and_answers_as_sdpa(family):
    """``--attn eager`` runs each attention module with its own model's eager function (Llama's repeats
    key/value head groups, which CLIP's attention has not: the vision tower used to fail), with and without
    a vision-side pruner scoring the tower."""
    from vlmguard.engine import Request
    from vlmguard.spec import GenerationSpec
    from vlmguard.testing import tiny_engine

    reqs = [Request("Is there a dog in the image?", [random_image(1, (40, 32))])]
    for spec in (GenerationSpec(max_new_tokens=6), GenerationSpec(pruning="flowcut", budget=0.5, max_new_tokens=6)):
        eager, sdpa = (tiny_engine(family, attn=a).generate(reqs, spec)[0] for a in ("eager", "sdpa"))
        assert eager.token_ids == sdpa.token_ids and eager.visual_tokens_kept == sdpa.visual_tokens_kept


def test_bundled_model_runs_with_eager_attention():
    from vlmguard.engine import Request
    from vlmguard.spec import GenerationSpec

    eng = Engine.load("tiny", attn_implementation="eager")
    assert eng.attn_implementation == "vlmguard_eager"
    spec = GenerationSpec(pruning="flowcut", budget=16, max_new_tokens=4)
    out = eng.generate([Request("Is there a dog in the image?", [random_image(3, (96, 96))])], spec)[0]
    assert out.visual_tokens_kept and len(out.token_ids) >= 1
