"""Three small gaps, each test failing before its fix:

1. The jobs page bounded only its first connection to the Ray Jobs API (``probe_jobs_api``): Ray's
   ``JobSubmissionClient`` sets no timeout, so a cluster that answered the probe and then stopped answering held
   the page for good on listing the jobs, a job's logs, stopping or submitting one. Now every call has a deadline
   and the page says the API did not answer.
2. ``drawing.token_grid`` took LLaVA-NeXT's base grid for 24 x 24 whatever the tower: a NeXT model with another
   vision resolution (the tiny NeXT model's 4 x 4, a 384-pixel tower's 27 x 27) was drawn on a wrong grid. Now the
   base grid is derived from the visual-token count and the image size.
3. A sweep listing one run twice ran and stored it once, but its progress listed it twice. Now each run is listed
   once, and one line names the duplicate dropped.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from test_bench_runner import SYNTH, FakeEngine
from test_dashboard_pages import StubJobs, all_text, page, quiet_env
from vlmguard.dashboard import drawing, service
from vlmguard.dashboard.service import JOBS_KEY, JobRow
from vlmguard.errors import VlmguardError

STALL_S = 6.0  # how long the stalled API holds a request: the old code waited that long (for good on a real one)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)


# ---- 1. every Jobs API call of the dashboard has a deadline ---------------------------------------------


class StallingJobsApi:
    """A Ray Jobs API that answers its first ``answers`` requests as ``/api/version`` does (the dashboard's probe,
    the client's version checks) and holds every later one without an answer (a stuck head node)."""

    def __init__(self, answers: int):
        import ray

        self.release = threading.Event()
        self.requests = 0
        api = self
        version = json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "x"}).encode()

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                api.requests += 1
                if api.requests > answers:
                    api.release.wait(STALL_S)
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(version)))
                self.end_headers()
                self.wfile.write(version)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling_api():
    made = []

    def make(answers: int) -> StallingJobsApi:
        made.append(StallingJobsApi(answers))
        return made[-1]

    yield make
    for api in made:
        api.close()


@pytest.mark.parametrize("call", ["list_jobs", "logs", "stop", "submit"])
def test_each_jobs_api_call_gives_up_when_the_cluster_stops_answering(stalling_api, tmp_path, call):
    from vlmguard.workers import jobs

    argv = service.bench_argv("pope", db=str(tmp_path / "r.sqlite"), limit=2, splits=["random"])
    jobs.check_bench_args(argv, local_paths=True)  # its imports, before the clock starts
    # the probe and the client's two version checks (list_jobs), or a new client's checks: then the call stalls
    api = stalling_api(3 if call == "list_jobs" else 2)
    backend = service.RayJobsBackend(api.address)
    backend.timeout = backend.submit_timeout = 1.0
    act = {"list_jobs": backend.list_jobs, "logs": lambda: backend.logs("raysubmit_x"),
           "stop": lambda: backend.stop("raysubmit_x"), "submit": lambda: backend.submit(argv)}[call]
    start = time.monotonic()
    with pytest.raises(VlmguardError, match="did not answer"):
        act()
    waited = time.monotonic() - start
    assert waited < 3, f"{call} waited {waited:.1f} s for a Jobs API that stopped answering"
    assert api.requests == (4 if call == "list_jobs" else 3)  # the call itself went out and stalled
    with pytest.raises(VlmguardError, match="still waits"):  # no second thread piles up behind the first
        backend.logs("raysubmit_x")


def test_jobs_page_says_so_when_the_cluster_stops_answering_after_the_probe(stalling_api, monkeypatch):
    api = stalling_api(3)  # the probe and the client's version checks; listing the jobs stalls
    monkeypatch.setenv("VLMGUARD_JOBS_ADDRESS", api.address)
    monkeypatch.setattr(service, "JOBS_CALL_TIMEOUT_S", 1.0)
    at = page("jobs_page.py")
    start = time.monotonic()
    at.run(timeout=STALL_S + 10)
    waited = time.monotonic() - start
    assert not at.exception, at.exception
    assert waited < 4, f"the page waited {waited:.0f} s for a Jobs API that stopped answering"
    assert "Ray Jobs API is not reachable" in " ".join(w.value for w in at.warning)
    assert "did not answer (list jobs) within 1 s" in all_text(at)


class StalledStop(StubJobs):
    def stop(self, job_id):
        raise VlmguardError(f"the Ray Jobs API at {self.address} did not answer (stop {job_id}) within 10 s")


def test_stopping_a_job_on_a_cluster_that_stopped_answering_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMGUARD_DB", str(tmp_path / "r.sqlite"))
    at = page("jobs_page.py")
    at.session_state[JOBS_KEY] = StalledStop([JobRow("raysubmit_a", "RUNNING", start_time=1)])
    at.run()
    at.button(key="stop_raysubmit_a").click().run()
    assert not at.exception, at.exception
    assert any("stop failed" in e.value and "did not answer" in e.value for e in at.error)


# ---- 2. LLaVA-NeXT's base grid follows the model's vision resolution --------------------------------------


def _lum(img: Image.Image, x: int, y: int) -> float:
    return float(np.asarray(img.convert("L"), dtype=np.float64)[y, x])


def test_the_tiny_llava_next_base_grid_is_4_by_4():
    from vlmguard.engine import Request
    from vlmguard.spec import GenerationSpec
    from vlmguard.testing import tiny_engine

    eng = tiny_engine("llava_next")  # 32-pixel tower, 8-pixel patches: a 4 x 4 base grid, then the crops' grid
    for size in [(64, 64), (200, 50), (50, 200), (96, 72)]:
        image = Image.new("RGB", size, (200, 200, 200))
        n = eng.generate([Request("describe", [image])], GenerationSpec(max_new_tokens=1))[0].visual_tokens
        assert drawing.token_grid(n, size, "llava_next") == (4, 4, 16), (size, n)
    out = drawing.kept_overlay(Image.new("RGB", (64, 64), (220, 220, 220)), [0], 88, "llava_next")
    assert _lum(out, 70, 70) > 200  # token 0 is the top-left quarter's cell (0..96 on the 384-pixel copy)
    assert _lum(out, 120, 40) < 150  # token 1, pruned


def test_the_service_tells_the_grid_side_and_the_drawing_takes_it():
    """The model card carries each model's grid side (LLaVA-NeXT: its base grid), so the drawing need not infer it
    from the token count; Qwen2-VL's grid follows each image, so it has none."""
    import asyncio

    import httpx

    from test_client import _inprocess_app
    from vlmguard.testing import tiny_engine
    from vlmguard.workers.engine_worker import EngineWorker

    for family, side in (("llava", None), ("llava_next", 4), ("qwen2_vl", None)):
        eng = tiny_engine(family)
        vc = eng.model.config.vision_config
        want = side if family != "llava" else vc.image_size // vc.patch_size
        assert EngineWorker(family, name=family, engine=eng).info()["grid_side"] == want

    async def models():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_inprocess_app()), base_url="http://t") as c:
            return (await c.get("/v1/models")).json()

    card = asyncio.run(models())["data"][0]
    llava = tiny_engine("llava").model.config.vision_config
    assert card["grid_side"] == llava.image_size // llava.patch_size
    status = service.probe_service(StubModels(card), "http://t")
    assert {m: f.grid_side for m, f in status.facts.items()} == {card["id"]: card["grid_side"]}
    # given by the service, the base grid is taken as it is; without it, inferred from the count and the image
    assert drawing.token_grid(88, (64, 64), "llava_next", grid_side=4) == (4, 4, 16)
    assert drawing.token_grid(88, (64, 64), "llava_next", grid_side=3) == (3, 3, 9)
    assert drawing.token_grid(88, (64, 64), "llava_next") == (4, 4, 16)


class StubModels:
    def __init__(self, card: dict):
        self.card = card

    def models(self):  # a ModelList's shape: cards under .data
        from types import SimpleNamespace

        return SimpleNamespace(data=[self.card])


def test_a_384_pixel_llava_next_tower_has_a_27_by_27_base_grid():
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil as LlavaNextImageProcessor,
    )

    from vlmguard.testing import make_tokenizer

    side = 384
    pins = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
    ip = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                 image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=make_tokenizer(["<image>"]), patch_size=14,
                              vision_feature_select_strategy="default", image_token="<image>")
    for w, h in [(640, 480), (480, 640), (384, 384), (1000, 300)]:
        n = proc._get_number_of_features(h, w, side, side)  # what the processor puts in the prompt
        assert drawing.token_grid(n, (w, h), "llava_next") == (27, 27, 729), ((w, h), n)
    # the 336-pixel tower, and a count no NeXT layout gives: 24 x 24 as before
    assert drawing.token_grid(2928, (672, 672), "llava_next") == (24, 24, 576)
    assert drawing.token_grid(3001, (672, 672), "llava_next") == (24, 24, 576)


# ---- 3. a sweep lists each run once ---------------------------------------------------------------------


def test_a_run_listed_twice_is_listed_once_and_the_duplicate_named(tmp_path):
    from vlmguard.bench.sweep import run_sweep

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"model: fake\ndataset: {SYNTH}\nlimit: 2\n"
                   "benchmarks:\n  - pope: {splits: [random, random]}\n"
                   "methods:\n  - {name: base}\n  - {name: plain}\n  - {name: held, min_new_tokens: 2}\n")
    lines: list[str] = []
    outcomes = run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=lambda name: FakeEngine(), progress=False,
                         echo=lines.append)
    assert len(outcomes) == 2 and len({o.run_id for o in outcomes}) == 2
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split(" -> ")[0] for line in progress] == [
        "[1/2] fake base budget=None pope random", "[2/2] fake held budget=None pope random"]
    assert [line for line in lines if not line.startswith("[")] == [
        "dropped a duplicate run: fake base budget=None pope random",
        "dropped a duplicate run: fake plain budget=None pope random (the same run as fake base budget=None pope "
        "random)",
        "dropped a duplicate run: fake plain budget=None pope random (the same run as fake base budget=None pope "
        "random)",
        "dropped a duplicate run: fake held budget=None pope random",
    ]


def test_a_json_sweep_names_the_duplicate_on_stderr(tmp_path, capsys):
    from vlmguard.cli import main

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"model: tiny\ndataset: {SYNTH}\nlimit: 1\ndb: {tmp_path / 's.sqlite'}\n"
                   "benchmarks:\n  - pope: {splits: [random, random]}\nmethods:\n  - {name: base}\n")
    assert main(["bench", "sweep", str(cfg), "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out.strip().splitlines()[-1])["runs"]) == 1
    assert "dropped a duplicate run: tiny base budget=None pope random" in err.splitlines()
