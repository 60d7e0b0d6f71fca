"""What ``image_aspect: reference`` does on a served model reaches the dashboard: the model card carries
``reference_image_aspect`` (the engine's own resolution: the family's reference, or a checkpoint config's
``image_aspect_ratio``), and the playground draws a result on the padded square only where that pads. Before, the
playground decided by family alone, so a LLaVA checkpoint whose config says ``square`` was drawn padded although
the engine had not padded its images."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image

from test_dashboard_pages import CLIENT_KEY, StubClient, page, quiet_env
from vlmguard.api_schema import ModelCard, ModelList
from vlmguard.dashboard import drawing
from vlmguard.dashboard.service import ModelFacts, probe_service

WIDE = Image.new("RGB", (60, 30), (200, 10, 10))


def _cards(family: str) -> list[dict]:
    from vlmguard.testing import tiny_engine
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker(f"random:{family}", name="m", engine=tiny_engine(family))
    cfg = ServiceConfig(models=[ModelConfig(name="m", model=f"random:{family}")], api_key_env=None)
    app = create_api(LocalBackend({"m": worker}), cfg)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            r = await c.get("/v1/models")
            assert r.status_code == 200, r.text
            return r.json()["data"]

    return asyncio.run(main())


@pytest.mark.parametrize("family, reference", [("llava", "pad"), ("llava_next", "native"), ("qwen2_vl", "native")])
def test_the_model_card_says_what_reference_does(family, reference):
    card, = _cards(family)
    assert card["reference_image_aspect"] == reference


@pytest.mark.parametrize("reference, padded", [("native", False), ("pad", True), (None, True)])
def test_model_view_follows_the_cards_reference_over_the_family(reference, padded):
    view = drawing.model_view(WIDE, "llava", "reference", reference)
    assert view.size == ((60, 60) if padded else (60, 30))
    assert drawing.model_view(WIDE, "llava", "pad", "native").size == (60, 60)  # pad is pad whatever the reference
    assert drawing.model_view(WIDE, "llava", "native", "pad").size == (60, 30)


class SquareConfigStub(StubClient):
    """A LLaVA checkpoint whose config declares ``image_aspect_ratio: square``: reference leaves images alone."""

    def models(self):
        return ModelList(data=[ModelCard(id="tiny-llava", family="llava", reference_image_aspect="native")])


def test_the_playground_draws_with_the_cards_reference(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)
    assert probe_service(SquareConfigStub(), "u").facts["tiny-llava"] == ModelFacts("llava", None, "native")
    seen = []
    real = drawing.model_view
    monkeypatch.setattr(drawing, "model_view", lambda *a, **k: seen.append(a) or real(*a, **k))
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = SquareConfigStub()
    at.run()
    at.selectbox(key="pg_image_aspect").select("reference")
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    assert seen and all(a[1:] == ("llava", "reference", "native") for a in seen)
