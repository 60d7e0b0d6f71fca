"""Audit of the LLaVA-NeXT family (anyres: an image becomes a base crop plus a grid of crops, unpadded, with newline
tokens, so its visual token count depends on its size) through the user-facing paths: the chat API and
``/v1/generate`` of the in-process app, mixed engine batches against each request alone, FLOPs, the dashboard's
drawing of a real NeXT result.

Defect found (one):

- ``result_flops`` guessed a NeXT request's vision tower passes as visual tokens / tokens per crop, which unpadding
  and newline tokens make wrong (a 20x60 image: 3 crops, 40 tokens, counted as 2 passes; a 64x64 image: 5 crops,
  88 tokens, counted as 6), so the vision FLOPs of an unpruned (or non-FlowCut) NeXT request were off by whole
  crops. The engine now reports each image's crops (``pruning["vision_crops"]``) and ``result_flops`` uses them.
  ``test_next_flops_count_each_images_crops``.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmguard.dashboard.drawing import find_visual_scores, kept_overlay, token_grid
from vlmguard.client import image_to_url
from vlmguard.engine import Request
from vlmguard.flops import result_flops, vision_flops
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")

# (width, height) -> (anyres crops, visual tokens) of the tiny NeXT (4 x 4 patches per crop, pinpoints 32x64,
# 64x32, 64x64)
SIZES = {(20, 60): (3, 40), (64, 64): (5, 88), (30, 30): (3, 36), (60, 20): (3, 34), (33, 47): (5, 72)}


def _next():
    return tiny_engine("llava_next")


def _crops(eng, req: Request) -> int:
    return eng.adapter.encode([eng._prompts([req])[0]]).vision_inputs["pixel_values"].shape[1]


def test_next_flops_count_each_images_crops():
    eng = _next()
    cfg = eng.model.config
    spec = GenerationSpec(max_new_tokens=1)
    reqs = [Request("Is there a dog?", [random_image(i, size)]) for i, size in enumerate(SIZES)]
    batch = eng.generate(reqs, spec)
    for req, size, res in zip(reqs, SIZES, batch):
        crops, n_visual = SIZES[size]
        assert _crops(eng, req) == crops and res.visual_tokens == n_visual
        vit, _ = vision_flops(cfg, "llava_next", crops, n_visual)
        assert result_flops(cfg, res).vision == vit, size
        assert res.pruning["vision_crops"] == [crops]
        assert result_flops(cfg, eng.generate([req], spec)[0]).total == result_flops(cfg, res).total
    # two images in one request: their crops add up (3 + 5); fastv leaves the vision side whole
    two = eng.generate([Request("What color?", [random_image(1, (20, 60)), random_image(2, (64, 64))])],
                       GenerationSpec(max_new_tokens=1, pruning="fastv", budget=6))[0]
    assert two.visual_tokens == 128 and result_flops(cfg, two).vision == vision_flops(cfg, "llava_next", 8, 128)[0]


MIXED = [("fastv", 6), ("fastv", 0.3), ("flowcut", 8), ("flowcut", 0.5), ("adaptinfer", 8), ("random", 0.5)]


@pytest.mark.parametrize("pruning,budget", MIXED)
def test_mixed_next_batch_equals_each_request_alone(pruning, budget):
    """Images of different sizes (one, two, none) in one batch: each request's tokens, visual token counts,
    kept indices and FLOPs are those it gets alone."""
    eng = _next()
    cfg = eng.model.config
    reqs = [Request("Is there a dog?", [random_image(1, (20, 60))]),
            Request("What color is the car?", [random_image(2, (64, 64)), random_image(3, (30, 30))]),
            Request("describe", [random_image(4, (60, 20))]), Request("hi there", [])]
    spec = GenerationSpec(max_new_tokens=4, pruning=pruning, budget=budget)
    batch = eng.generate(reqs, spec)
    assert [r.visual_tokens for r in batch] == [40, 124, 34, 0]
    for req, got in zip(reqs, batch):
        alone = eng.generate([req], spec)[0]
        assert got.token_ids == alone.token_ids
        assert got.visual_tokens_kept == alone.visual_tokens_kept and got.kept_indices == alone.kept_indices
        assert result_flops(cfg, got).total == result_flops(cfg, alone).total


def _app():
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:llava_next", name="next", engine=_next())
    cfg = ServiceConfig(models=[ModelConfig(name="next", model="random:llava_next", max_new_tokens_limit=32)],
                        api_key_env=None)
    return create_api(LocalBackend({"next": worker}), cfg)


IMAGES = [random_image(1, (20, 60)), random_image(2, (64, 64)), random_image(3, (30, 30))]


def _chat(options=None, **extra):
    content = [{"type": "text", "text": "Is there a dog?"}]
    content += [{"type": "image_url", "image_url": {"url": image_to_url(im)}} for im in IMAGES]
    body = {"model": "next", "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}
    return {**body, "vlmguard": options} if options else body


def _post_all(bodies: dict[str, tuple[str, dict]]) -> dict[str, httpx.Response]:
    app = _app()

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as h:
            return {k: await h.post(path, json=body) for k, (path, body) in bodies.items()}

    return asyncio.run(scenario())


def test_chat_api_on_next_images_of_three_sizes():
    """Three images (40 + 88 + 36 visual tokens) in one chat request: budgets as counts and ratios, FlowCut's
    per-crop stage V then its cut at LLM layer 1, streaming equal to the whole answer, clear 400s for budgets
    no request can take."""
    chat = "/v1/chat/completions"
    out = _post_all({
        "fastv": (chat, _chat({"pruning": "fastv", "budget": 0.3})),
        "flowcut": (chat, _chat({"pruning": "flowcut", "budget": 20})),
        "flowcut_stream": (chat, _chat({"pruning": "flowcut", "budget": 20}, stream=True)),
        "too_many": (chat, _chat({"pruning": "fastv", "budget": 100000})),
        "zero": (chat, _chat({"pruning": "fastv", "budget": 0})),
        "ratio_over_one": (chat, _chat({"pruning": "random", "budget": 1.5})),
        "below_images": (chat, _chat({"pruning": "flowcut", "budget": 2})),
        "generate": ("/v1/generate", {"prompt": "Is there a dog?", "images": [image_to_url(im) for im in IMAGES],
                                      "spec": {"pruning": "flowcut", "budget": 20, "max_new_tokens": 4}}),
    })
    fastv = out["fastv"].json()["vlmguard"]
    assert fastv["visual_tokens"] == 164 and fastv["visual_tokens_kept"] == [164, 164, 49, 49]  # round(0.3 * 164)
    flow = out["flowcut"].json()
    # stage V keeps floor(K / 2) per crop of each image's share (7, 7, 6 of 20), unpadding drops some: 25, then
    # layer 1 cuts to 20
    assert flow["vlmguard"]["visual_tokens_kept"] == [25, 25, 20, 20]
    kept = flow["vlmguard"]["kept_indices"]
    assert len(kept) == 20 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 164
    gen = out["generate"].json()
    assert gen["kept_indices"] == kept and flow["choices"][0]["message"]["content"] == gen["text"]
    # each answer reports its prefill's analytic FLOPs, the native API and the chat extension alike (issue 3)
    assert gen["prefill_flops"] == flow["vlmguard"]["prefill_flops"]
    assert gen["prefill_flops"]["llm"] < fastv["prefill_flops"]["llm"]  # 25/20 visual tokens against 164/49
    stream = out["flowcut_stream"].text
    assert stream.rstrip().endswith("data: [DONE]") and f'"kept_indices":{kept}'.replace(" ", "") in stream
    for key, message in [("too_many", "budget 100000 exceeds the 164 visual tokens"), ("zero", "got 0"),
                         ("ratio_over_one", "budget 1.5 is neither"),
                         ("below_images", "flowcut: budget 2 is below one token per image (3 images)")]:
        assert out[key].status_code == 400 and message in out[key].json()["error"]["message"], key


def test_dashboard_draws_the_base_grid_of_a_real_next_result():
    """A real FlowCut result on a 64x64 image (88 tokens: the 4 x 4 base grid first, then the unpadded crops):
    the dashboard draws the base grid, with the kept indices below 16 outlined and its scores as the heatmap."""
    eng = _next()
    image = random_image(5, (64, 64))
    res = eng.generate([Request("Is there a dog?", [image])],
                       GenerationSpec(max_new_tokens=1, pruning="flowcut", budget=20))[0]
    assert res.visual_tokens == 88 and token_grid(res.visual_tokens, image.size, "llava_next") == (4, 4, 16)
    key, scores = find_visual_scores(res.pruning, res.visual_tokens)
    assert key == "visual_scores" and len(scores) == 88
    overlay = kept_overlay(image, res.kept_indices, res.visual_tokens, "llava_next", side=64)
    base_kept = {i for i in res.kept_indices if i < 16}
    for idx in range(16):  # a kept cell has its green outline at the cell's top-left pixel, a pruned one none
        x, y = (idx % 4) * 16, (idx // 4) * 16
        assert (overlay.getpixel((x, y)) == (60, 230, 90)) == (idx in base_kept), idx
