"""Regression tests from an audit of the Qwen2-VL family through the user-facing paths (HTTP API, in-flight
batcher, benchmarks, CLI, FLOPs, dashboard grid), on ``tiny_engine("qwen2_vl")`` / ``random:qwen2_vl``.

Defects found, each a test below that failed on the code as audited (commit c736645):

* ``result_flops`` counted a multi-image Qwen2-VL request's tower as ONE pass over all its images' patches, but
  the tower attends within each image: an unpruned request with a 48- and a 40-patch image reported 3.51 MFLOPs
  of vision work where its two images alone report 3.02 together. The engine now reports each request's images'
  raw patch counts (``pruning["vision_patches"]``) and ``result_flops`` counts one pass per image.
* ``vlmguard generate --help`` (and every command sharing its model options) named only a path, an HF id and
  ``tiny`` as models, not ``random:FAMILY`` (which works, and which ``prune analyze --help`` names).

Checked without finding a defect (asserted below where cheap): chat with system text, several images of
different sizes and several turns; pruning budgets as counts and ratios (kept counts of the request's own visual
tokens); POPE's opera/halc presets use the chat template (not LLaVA's raw framing) on Qwen2-VL; the dashboard's
token grid matches the processor's grid for non-square images.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vlmguard.engine import Request
from vlmguard.flops import result_flops
from vlmguard.images import image_to_data_url
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

SYNTH = Path(__file__).resolve().parent / "fixtures" / "bench" / "synth_mini"
# (width, height): 8-pixel patches merged 2x2 -> 48 raw patches (12 tokens) and 40 (10 tokens)
SIZES = [(56, 84), (112, 56)]
PATCHES = [48, 40]


def images():
    return [random_image(3 + j, s) for j, s in enumerate(SIZES)]


def test_multi_image_flops_count_one_tower_pass_per_image():
    eng = tiny_engine("qwen2_vl")
    cfg, spec = eng.model.config, GenerationSpec(max_new_tokens=1)
    ims = images()
    two = eng.generate([Request("describe the photo", ims)], spec)[0]
    ones = [eng.generate([Request("describe the photo", [im])], spec)[0] for im in ims]
    # was 3514368 (one 88-patch pass) against 3022848 for the two images alone
    assert result_flops(cfg, two).vision == sum(result_flops(cfg, o).vision for o in ones) == 3022848.0
    assert two.pruning["vision_patches"] == PATCHES and [o.pruning["vision_patches"] for o in ones] == [[48], [40]]


def test_batched_requests_report_only_their_own_images_patches():
    eng = tiny_engine("qwen2_vl")
    reqs = [Request("describe the photo", images()), Request("hi", []),
            Request("is there a cat", [random_image(9, (32, 32))])]
    out = eng.generate(reqs, GenerationSpec(max_new_tokens=1, decoding="vcd"))  # branch rows carry images too
    assert [r.pruning.get("vision_patches") for r in out] == [PATCHES, None, [16]]


def test_generate_help_names_random_family_models(capsys):
    from vlmguard.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'random:FAMILY' (a tiny random-weight model: llava, llava_next, qwen2_vl)" in help_text


@pytest.fixture(scope="module")
def api():
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:qwen2_vl", name="tq", engine=tiny_engine("qwen2_vl"))
    cfg = ServiceConfig(models=[ModelConfig(name="tq", model="random:qwen2_vl", max_new_tokens_limit=8)],
                        api_key_env=None)
    with TestClient(create_api(LocalBackend({"tq": worker}), cfg), raise_server_exceptions=False) as c:
        yield c


def user(text: str, *ims) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_to_data_url(im)}} for im in ims]
    return {"role": "user", "content": [{"type": "text", "text": text}, *parts]}


@pytest.mark.parametrize("budget,kept", [(5, 5), (0.5, 11)])
def test_chat_with_system_turns_and_two_image_sizes_equals_the_engine(api, budget, kept):
    a, b = images()
    messages = [{"role": "system", "content": "be brief"}, user("Is there a dog?", a),
                {"role": "assistant", "content": "yes"}, user("and a cat?", b)]
    r = api.post("/v1/chat/completions", json={"model": "tq", "max_tokens": 4, "messages": messages,
                                               "vlmguard": {"pruning": "fastv", "budget": budget}})
    assert r.status_code == 200, r.text
    ext = r.json()["vlmguard"]
    assert ext["visual_tokens"] == 22 and ext["visual_tokens_kept"][-1] == kept == len(ext["kept_indices"])
    eng = tiny_engine("qwen2_vl")
    # every user turn laid out as a one-message request is: its image, then its text (workers/README.md)
    conv = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and a cat?"}]}]
    prompt = eng.adapter.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    alone = eng.generate([Request(prompt, [a, b], raw_prompt=True)],
                         GenerationSpec(max_new_tokens=4, pruning="fastv", budget=budget))[0]
    assert ext["kept_indices"] == alone.kept_indices
    assert r.json()["choices"][0]["message"]["content"] == alone.text


@pytest.mark.parametrize("preset", ["opera", "halc"])
def test_pope_raw_llava_presets_use_the_chat_template_on_qwen2_vl(preset):
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.runner import _pope_items

    items, knobs = _pope_items(synth_dataset(SYNTH), "random", preset, None, tiny_engine("qwen2_vl").adapter)
    assert not any(it.raw for it in items) and items[0].prompt == "Is there a dog in the image?"
    assert knobs["prompt"] == ""


@pytest.mark.parametrize("size,grid", [((56, 84), (4, 3)), ((112, 56), (2, 5)), ((200, 120), (3, 5))])
def test_dashboard_grid_is_the_processors_grid(size, grid):
    from vlmguard.dashboard.drawing import token_grid

    eng = tiny_engine("qwen2_vl")
    thw = eng.processor.image_processor(images=[random_image(1, size)], return_tensors="pt")["image_grid_thw"]
    _, h, w = thw[0].tolist()
    assert (h // 2, w // 2) == grid and token_grid(grid[0] * grid[1], size, "qwen2_vl") == (*grid, grid[0] * grid[1])
