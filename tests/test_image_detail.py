"""OpenAI's image ``detail``: ``low`` fits the image within 512 x 512 before the model's processor sizes it
(``vlmguard.images.low_detail``), so a model whose visual tokens grow with the image is fed fewer; ``auto`` / ``high``
leave it as it is. Chat and Responses requests alike."""
from __future__ import annotations

import pytest
from PIL import Image

from service_support import qwen_api, run_with_sdk
from vlmguard.engine import Engine
from vlmguard.images import image_to_data_url, low_detail
from vlmguard.testing import random_image, tiny_qwen2_vl
from vlmguard.workers.engine_worker import EngineWorker

WIDE = image_to_data_url(random_image(5, (640, 480)))
SMALL = image_to_data_url(random_image(6, (320, 200)))


def test_low_detail_fits_the_image_in_512_pixels_keeping_its_aspect():
    assert low_detail(Image.new("RGB", (1024, 768))).size == (512, 384)
    assert low_detail(Image.new("RGB", (300, 2000))).size == (77, 512)
    small = Image.new("RGB", (320, 200))
    assert low_detail(small) is small


@pytest.fixture(scope="module")
def app():
    model, proc = tiny_qwen2_vl(max_side=640, context=4096)  # (its processor lets a 640 x 480 image be 1200 tokens)
    return qwen_api(EngineWorker("random:qwen2_vl", name="tiny-qwen", engine=Engine(model, proc, name="tiny-qwen")))


def _chat(url: str, detail: str | None) -> dict:
    image = {"url": url, **({"detail": detail} if detail else {})}
    return {"model": "tiny-qwen", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": image}, {"type": "text", "text": "What is here?"}]}]}


def test_low_detail_feeds_fewer_visual_tokens_in_chat_and_responses(app):
    async def scenario(client, http):
        chats = {d: (await http.post("/v1/chat/completions", json=_chat(WIDE, d))).json()
                 for d in (None, "auto", "high", "low")}
        small = [(await http.post("/v1/chat/completions", json=_chat(SMALL, d))).json() for d in (None, "low")]
        response = await client.responses.create(model="tiny-qwen", max_output_tokens=3, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": WIDE, "detail": "low"},
                                         {"type": "input_text", "text": "What is here?"}]}])
        return chats, small, response

    chats, small, response = run_with_sdk(app, scenario)
    tokens = {d: c["usage"]["prompt_tokens"] for d, c in chats.items()}
    # 640 x 480 in 16-pixel cells (patch 8, merged 2 x 2): 40 x 30 = 1200 visual tokens; low: 512 x 384, 32 x 24 = 768
    assert tokens[None] == tokens["auto"] == tokens["high"] and tokens[None] - tokens["low"] == 1200 - 768
    assert chats["low"]["vlmguard"]["visual_tokens"] == 768 and chats[None]["vlmguard"]["visual_tokens"] == 1200
    assert response.usage.input_tokens == tokens["low"]
    assert small[0]["usage"] == small[1]["usage"]  # within 512 x 512 already: as it is
    assert small[0]["choices"][0]["message"]["content"] == small[1]["choices"][0]["message"]["content"]


def test_the_native_api_and_vlmguard_generate_take_an_image_detail(app, tmp_path, monkeypatch):
    from cli_support import run_json

    async def scenario(client, http):
        return [(await http.post("/v1/generate", json={
            "model": "tiny-qwen", "prompt": "What is here?", "images": [WIDE], "spec": {"max_new_tokens": 2},
            **({"image_detail": detail} if detail else {})})).json() for detail in (None, "low", "middle")]

    whole, low, bad = run_with_sdk(app, scenario)
    assert (whole["visual_tokens"], low["visual_tokens"]) == (1200, 768)
    assert bad["error"]["param"] == "image_detail"

    random_image(5, (640, 480)).save(tmp_path / "wide.png")
    model, proc = tiny_qwen2_vl(max_side=640, context=4096)
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **kw: Engine(model, proc, name="tiny-qwen")))
    cli = {detail: run_json(["generate", "--model", "tiny-qwen", "--image", str(tmp_path / "wide.png"), "--prompt",
                             "What is here?", "--max-new-tokens", "2", "--image-detail", detail, "--json"])
           for detail in ("auto", "low")}
    assert (cli["auto"]["visual_tokens"], cli["low"]["visual_tokens"]) == (1200, 768)
