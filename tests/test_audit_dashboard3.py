"""Dashboard audit 3: what a user does, widget by widget, on each page (``AppTest``).

Audited: the playground with every pruner x every decoder, their parameter widgets at their bounds (each request
checked as the service checks it: ``GenerationSpec`` and the method registries), odd image sizes and modes, unicode
and very long prompts, the per-token diagnostics (tokens a decoder changed), the kept-token overlay and score heatmap
per family (LLaVA-1.5's centre crop, LLaVA-NeXT's base grid, Qwen2-VL's merged patches); the leaderboard on databases
with only CHAIR or only POPE runs, runs still running, NaN metrics and filters that leave no row; the jobs page
without a Ray cluster.

Defects found (each test below failed before its fix):
1. The kept-token overlay and the score heatmap of LLaVA-1.5 (family ``llava``, the bundled tiny model too) spread
   the token grid over the whole image, but its CLIP processor resizes the shortest side and crops the centre square:
   on a non-square image every kept index was drawn on the wrong patch (token 0 of a 200 x 50 image on its left edge,
   a part the model never sees). Now the grid covers the centre square and the rest is shaded.
2. The jobs page hung for good on a Jobs API address that takes the connection and never answers (a stuck head node,
   a firewall dropping packets): Ray's ``JobSubmissionClient`` sets no timeout. Now the address is probed with a 3 s
   timeout first and the page says the Ray Jobs API is not reachable.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_dashboard_data import shared_fixture_db
from test_dashboard_pages import StubClient, all_text, frame_with, i_caption, page, quiet_env
from vlmguard.api_schema import ModelCard, ModelList
from vlmguard.dashboard import data, drawing
from vlmguard.dashboard.service import CLIENT_KEY
from vlmguard.spec import GenerationSpec


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    return shared_fixture_db(tmp_path_factory)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)
    data.clear_caches()


def _lum(img: Image.Image, x: int, y: int) -> float:
    return float(np.asarray(img.convert("L"), dtype=np.float64)[y, x])


# ---- 1. LLaVA-1.5 sees the centre square of a non-square image ---------------------------------------


def test_llava_kept_tokens_are_drawn_on_the_centre_square_the_model_sees():
    from transformers import AutoProcessor

    from vlmguard.models.resolve import tiny_model_path

    # the bundled model's own processor: a 200 x 50 image becomes its centre 50 x 50 (x 75..125)
    a = np.zeros((50, 200, 3), np.uint8)
    a[:, :75] = 255
    pv = AutoProcessor.from_pretrained(tiny_model_path()).image_processor(Image.fromarray(a), return_tensors="np")
    assert pv["pixel_values"].shape[-2:] == (96, 96) and pv["pixel_values"][0, 0, 48, 8:].max() < -1.5  # no white

    img = Image.new("RGB", (200, 50), (220, 220, 220))
    out = drawing.kept_overlay(img, [0], 16, "llava")  # 384 x 96 on screen; token 0: x 144..168, y 0..24
    assert out.size == (384, 96)
    assert _lum(out, 156, 12) > 200  # the kept token, top-left of the centre square
    assert _lum(out, 48, 12) < 150 and _lum(out, 330, 80) < 150  # outside the square: never seen
    assert _lum(out, 180, 12) < 100  # token 1, pruned
    scores = [0.0] * 16
    scores[3] = 1.0  # top-right of the centre square: x 216..240
    heat = drawing.score_heatmap(img, scores, "llava", alpha=1.0)
    assert _lum(heat, 228, 12) > _lum(heat, 156, 12) + 100
    assert _lum(heat, 20, 12) == pytest.approx(_lum(img.resize((384, 96)), 20, 12), abs=1)  # no heat outside
    # square images and the other families: the grid spans the whole image, as before
    sq = drawing.kept_overlay(Image.new("RGB", (64, 64), (220, 220, 220)), [0], 16, "llava", side=128)
    assert _lum(sq, 16, 16) > 200 and _lum(sq, 48, 16) < 100
    q = drawing.kept_overlay(img, [0], 12, "qwen2_vl")  # 2 x 6 grid over the whole image
    assert _lum(q, 32, 24) > 200 and _lum(q, 96, 24) < 100
    assert drawing.token_region((200, 50), "llava") == (75.0, 0.0, 125.0, 50.0)
    assert drawing.token_region((200, 50), "llava_next") == (0.0, 0.0, 200.0, 50.0)  # base grid: whole image


# ---- 2. the jobs page and a Jobs API that never answers ----------------------------------------------


def test_jobs_page_says_so_when_the_jobs_api_never_answers(monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog, nothing is ever read or answered
    # the old page waited for good; closing the socket at 12 s resets its connection, so it ends (late) either way
    guard = threading.Timer(12.0, silent.close)
    guard.start()
    try:
        monkeypatch.setenv("VLMGUARD_JOBS_ADDRESS", f"http://127.0.0.1:{silent.getsockname()[1]}")
        at = page("jobs_page.py")
        start = time.monotonic()
        at.run()
        waited = time.monotonic() - start
        assert not at.exception, at.exception
        assert waited < 10, f"the page waited {waited:.0f} s for a Jobs API that never answers"
        warn = " ".join(w.value for w in at.warning)
        assert "Ray Jobs API is not reachable" in warn and "timeout" in all_text(at).lower()
    finally:
        guard.cancel()
        silent.close()


# ---- the playground, widget by widget (no defect found) -----------------------------------------------


class CheckingClient(StubClient):
    """The stub service, checking every request as the service does (GenerationSpec, the methods' Params)."""

    def __init__(self, family: str = "llava", n: int = 16):
        super().__init__()
        self.family, self.N = family, n

    def models(self):
        return ModelList(data=[ModelCard(id="m", family=self.family, context_length=512)])

    def generate_stream(self, prompt, images=(), *, model=None, **spec):
        GenerationSpec(**spec).resolve()  # raises as the service would answer 4xx
        yield from super().generate_stream(prompt, images, model=model, **spec)


def _bounds(p: dict) -> list:
    lo = p.get("minimum")
    hi = p.get("maximum")
    return [v for v in (lo, hi) if v is not None]


def test_every_pruner_and_decoder_with_parameters_at_their_bounds_makes_a_valid_request():
    from vlmguard.dashboard.ui import method_schemas

    schemas = method_schemas()
    stub = CheckingClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.checkbox(key="pg_compare").uncheck()
    at.slider(key="pg_max_new").set_value(1)
    for pruning, pschema in schemas["pruning"].items():
        for decoding, dschema in schemas["decoding"].items():
            at.selectbox(key="pg_pruning").select(pruning)
            at.selectbox(key="pg_decoding").select(decoding)
            at.run()
            if pruning != "none":
                at.text_input(key="pg_budget").input("6")
            for prefix, name, schema in (("pg_pp", pruning, pschema), ("pg_dp", decoding, dschema)):
                for k, p in (schema.get("properties") or {}).items():
                    if p.get("type") in ("integer", "number") and "enum" not in p and _bounds(p):
                        at.number_input(key=f"{prefix}_{name}.{k}").set_value(_bounds(p)[-1])
            at.button(key="pg_go").click().run()
            assert not at.exception, (pruning, decoding, at.exception)
            assert not at.error, (pruning, decoding, [e.value for e in at.error])
            call = stub.calls[-1]
            assert (call["pruning"], call["decoding"]) == (pruning, decoding)
            assert "with methods" in [s.value for s in at.subheader]


@pytest.mark.parametrize("size,mode", [((1, 1), "RGB"), ((37, 500), "L"), ((333, 77), "RGBA"), ((64, 48), "P"),
                                       ((50, 50), "I;16"), ((20, 3000), "1")])
def test_odd_uploads_and_prompts_reach_the_service_and_draw(size, mode):
    stub = CheckingClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.radio(key="pg_source").set_value("upload an image").run()
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    at.file_uploader(key="pg_upload").upload("odd.png", buf.getvalue(), "image/png").run()
    prompt = "Ist da ein Hund? 犬はいますか 🐕 " + "x" * 5000
    at.text_area(key="pg_prompt").input(prompt)
    at.selectbox(key="pg_pruning").select("fastv")
    at.text_input(key="pg_budget").input("6")
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    main = [c for c in stub.calls if c["pruning"] == "fastv"][-1]
    assert main["prompt"] == prompt and main["images"][0].size == size
    assert "kept visual tokens: 6 of 16" in i_caption(at)
    at.text_area(key="pg_prompt").input("another").run()  # the results stay, marked stale
    assert not at.exception and any("Stale results" in w.value for w in at.warning)


@pytest.mark.parametrize("family,n", [("llava", 16), ("llava_next", 2928), ("qwen2_vl", 12), (None, 10)])
def test_each_family_draws_its_overlays_and_the_changed_tokens(family, n):
    stub = CheckingClient(family, n)
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.selectbox(key="pg_pruning").select("fastv")
    at.text_input(key="pg_budget").input("6")
    at.selectbox(key="pg_decoding").select("vcd")
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    caps = i_caption(at)
    assert f"kept visual tokens: 6 of {n}" in caps and f"kept visual tokens: {n} of {n}" in caps
    with_methods = [m.value for m in at.markdown if m.value.startswith("**Per-token probabilities**")][0]
    assert "the decoder changed 1 token(s): `0:No`" in with_methods
    steps = frame_with(at, "alternatives")  # the with-methods column's steps table comes first
    assert list(steps["changed"]) == [True, False, False] and list(steps["token"]) == ["No", "dog", "."]


# ---- the leaderboard on odd databases (no defect found) -----------------------------------------------


def _variant(src: Path, dst: Path, *sql: str) -> Path:
    shutil.copy(src, dst)
    conn = sqlite3.connect(dst)
    for s in sql:
        conn.execute(s)
    conn.commit()
    conn.close()
    return dst


def test_leaderboard_on_one_benchmark_running_runs_nan_metrics_and_empty_filters(fixture_db, tmp_path, monkeypatch):
    nan = json.dumps({"n": 24, "accuracy": float("nan"), "f1": float("nan")})
    dbs = {
        "chair": _variant(fixture_db, tmp_path / "c.sqlite", "DELETE FROM runs WHERE benchmark = 'pope'"),
        "pope": _variant(fixture_db, tmp_path / "p.sqlite", "DELETE FROM runs WHERE benchmark = 'chair'"),
        "odd": _variant(fixture_db, tmp_path / "o.sqlite",
                        "UPDATE runs SET status = 'running' WHERE benchmark = 'chair'",
                        f"UPDATE runs SET metrics = '{nan}' WHERE run_id = (SELECT min(run_id) FROM runs "
                        "WHERE benchmark = 'pope')"),
    }
    for name, db in dbs.items():
        monkeypatch.setenv("VLMGUARD_DB", str(db))
        at = page("leaderboard_page.py").run()
        assert not at.exception, (name, at.exception)
        n = len(data.load_runs(db))
        assert f"{n} of {n} runs" in all_text(at)
        info = " ".join(i.value for i in at.info)
        assert ("No POPE runs" in info) == (name == "chair") and ("No CHAIR runs" in info) == (name == "pope")
        for ch in at.get("vega_lite_chart"):
            assert "NaN" not in ch.proto.spec
        at.checkbox(key="flt_finished").check().run()
        assert not at.exception
        at.text_input(key="flt_search").input("no such run").run()
        assert not at.exception and "0 of" in all_text(at) and "No runs match the filters." in all_text(at)
        assert not at.get("vega_lite_chart")


def test_a_parameter_with_an_exclusive_bound_cannot_be_set_to_the_bound():
    """IAVA's ``gamma`` and M3ID's ``max_weight`` must be > 0: the form let a user enter exactly 0, which the
    service then refused. Every method parameter's widget bounds now lie inside what the method accepts."""
    from vlmguard.dashboard.ui import method_schemas, number_bounds
    from vlmguard.decoding import make_decoder
    from vlmguard.errors import InvalidInput

    decoders = method_schemas()["decoding"]
    for method, name in (("iava", "gamma"), ("m3id", "max_weight")):
        prop = decoders[method]["properties"][name]
        lo, _ = number_bounds(prop)
        assert lo is not None and lo > 0
        make_decoder(method, {name: lo})  # the lowest value the widget offers is accepted
        try:
            make_decoder(method, {name: 0.0})
        except InvalidInput:
            pass
        else:
            raise AssertionError(f"{method}.{name} = 0 should be refused by the method")
    assert number_bounds({"minimum": 0, "maximum": 1}) == (0.0, 1.0)
    assert number_bounds({"exclusiveMaximum": 2}) == (None, math.nextafter(2.0, -math.inf))
