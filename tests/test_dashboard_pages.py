"""Every dashboard page under Streamlit's ``AppTest``: empty and populated databases, filters, the playground
with a stubbed client (answer + overlays), the jobs page with a stubbed jobs backend, no-service notices."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from test_dashboard_data import FIX, shared_fixture_db
from vlmguard.api_schema import (GenerateResponse, GenerateStreamEvent, ModelCard, ModelList, StepModel, TimingsModel,
                                 TokenizeResponse)
from vlmguard.client import APIError
from vlmguard.dashboard import data
from vlmguard.dashboard.service import CLIENT_KEY, JOBS_KEY, JobRow

DASH = Path(__file__).resolve().parents[1] / "dashboard"
TIMEOUT = 60


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    return shared_fixture_db(tmp_path_factory)


def quiet_env(monkeypatch, tmp_path) -> None:
    """No service and no jobs server to reach, and a private cache (no cached SynthCOCO: render / upload only)."""
    monkeypatch.setenv("VLMGUARD_SERVICE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("VLMGUARD_JOBS_ADDRESS", "http://127.0.0.1:9")
    monkeypatch.setenv("VLMGUARD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)
    monkeypatch.setenv("VLMGUARD_IMAGE_DIRS", str(FIX / "images"))


def page(name: str) -> AppTest:
    """One page script of the dashboard, run on its own."""
    return AppTest.from_file(str(DASH / name), default_timeout=TIMEOUT)


def all_text(at: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader", "text", "code"):
        parts += [str(getattr(e, "value", "")) for e in getattr(at, kind)]
    return "\n".join(parts)


def frame_with(at: AppTest, column: str):
    """The first dataframe shown that has ``column``."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no dataframe with a {column!r} column")


# ---- leaderboard ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_leaderboard_without_runs_explains_how_to_fill(state, tmp_path, monkeypatch):
    db = tmp_path / "r.sqlite"
    if state == "empty":
        from vlmguard.bench import db as dbm

        dbm.connect(db).close()
    monkeypatch.setenv("VLMGUARD_DB", str(db))
    at = page("leaderboard_page.py").run()
    assert not at.exception
    info = " ".join(i.value for i in at.info)
    assert ("does not exist yet" if state == "missing" else "has no runs yet") in info
    assert "vlmguard bench pope" in info and str(db) in info
    assert not at.dataframe


def test_leaderboard_unreadable_database_is_an_error_message(tmp_path, monkeypatch):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("not a database, just text " * 100)
    monkeypatch.setenv("VLMGUARD_DB", str(bad))
    at = page("leaderboard_page.py").run()
    assert not at.exception
    assert "Cannot read the results database" in at.error[0].value and "not a vlmguard results database" in at.error[0].value


def test_leaderboard_populated_filters_and_drilldown(fixture_db, monkeypatch):
    monkeypatch.setenv("VLMGUARD_DB", str(fixture_db))
    at = page("leaderboard_page.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 10 and {"accuracy", "f1", "chair_s", "chair_i", "pruning", "budget", "decoding"} <= set(table.columns)
    assert "10 of 10 runs" in all_text(at)
    assert len(at.get("vega_lite_chart")) >= 3  # tokens-kept curve, CHAIR bars, Pareto view

    at.multiselect(key="flt_pruning").select("fastv").run()
    table = at.dataframe[0].value
    assert len(table) == 5 and set(table["pruning"]) == {"fastv"} and "5 of 10 runs" in all_text(at)
    at.multiselect(key="flt_benchmark").select("chair").run()
    table = at.dataframe[0].value
    assert len(table) == 1 and "accuracy" not in table.columns and "chair_i" in table.columns
    at.multiselect(key="flt_benchmark").unselect("chair").run()
    at.multiselect(key="flt_pruning").unselect("fastv").run()
    at.text_input(key="flt_search").input("random@36").run()
    assert len(at.dataframe[0].value) == 1
    at.text_input(key="flt_search").input("").run()

    # drill down into a greedy CHAIR run: the caption's hallucinated objects are highlighted
    runs = data.load_runs(fixture_db)
    chair_greedy = runs[(runs["benchmark"] == "chair") & (runs["decoding"] == "greedy")]["run_id"].iloc[0]
    at.selectbox(key="drill_run").select(chair_greedy).run()
    assert not at.exception
    at.selectbox(key="drill_sample").select("img:2").run()
    md = [m.value for m in at.markdown if "<mark" in m.value]
    assert md and "dogs</mark>" in md[0] and "bottle</mark>" in md[0]
    assert "**Hallucinated objects:** dog → dog, bottle → bottle" in all_text(at)
    assert at.image, "the sample's image is shown (found through VLMGUARD_IMAGE_DIRS)"

    # a POPE run: question, answer, label; "only wrong answers" narrows the sample table
    pope_base = runs[(runs["benchmark"] == "pope") & (runs["pruning"] == "fastv") & (runs["budget"] == 18)]
    at.selectbox(key="drill_run").select(pope_base["run_id"].iloc[0]).run()
    assert len(frame_with(at, "sample_key")) == 24
    at.checkbox(key="drill_only").check().run()
    assert not at.exception
    wrong = frame_with(at, "sample_key")
    assert 0 < len(wrong) < 24 and not wrong["correct"].any()
    text = all_text(at)
    assert "Is there" in text and {m.label for m in at.metric} >= {"label", "parsed prediction", "correct"}


# ---- playground ---------------------------------------------------------------------------------------


class StubClient:
    """Stands in for ``vlmguard.client.Client``: the typed results of the API schema, deterministic."""

    N = 16  # visual tokens (a 4 x 4 grid)

    def __init__(self, fail: str | None = None):
        self.calls: list[dict] = []
        self.fail = fail

    def health(self):
        return {"status": "ok", "models": {"tiny-llava": "ok"}}

    def models(self):
        return ModelList(data=[ModelCard(id="tiny-llava", family="llava", context_length=512)])

    def metrics(self):
        from vlmguard.workers.metrics import ServiceMetrics

        return ServiceMetrics().snapshot()  # (a service that has answered nothing yet)

    def _result(self, spec: dict) -> GenerateResponse:
        methods = spec.get("pruning", "none") != "none"
        budget = int(spec.get("budget") or self.N)
        scores = [float((7 * i) % self.N) for i in range(self.N)]
        kept = sorted(sorted(range(self.N), key=lambda i: -scores[i])[:budget]) if methods else None
        contrast = spec.get("decoding") == "vcd"
        words = ["No", "dog", "."] if methods else ["Yes", "a", "dog", "."]
        if (spec.get("guided") or {}).get("json_schema") is not None:  # a JSON answer
            words = ['{"n":', "3}"]
        steps = [StepModel(token_id=10 + i, token=w, main_prob=0.6 - 0.1 * i,
                           contrast_prob=(0.3 + 0.1 * i) if contrast else None, score=1.0 - 0.1 * i,
                           main_top_id=(99 if (contrast and i == 0) else 10 + i)) for i, w in enumerate(words)]
        pruning = {"name": spec.get("pruning", "none"), "budget": spec.get("budget")}
        if methods:
            pruning["visual_scores"] = scores
        k = spec.get("logprobs")
        logprobs = None if k is None else [
            {"token_id": s.token_id, "token": s.token, "logprob": -0.25 * (i + 1),
             "top": [{"token_id": s.token_id, "token": s.token, "logprob": -0.25 * (i + 1)},
                     {"token_id": 7, "token": "maybe", "logprob": -2.0}][:k]} for i, s in enumerate(steps)]
        return GenerateResponse(
            id="gen-1", model="tiny-llava", text=" ".join(words), token_ids=[s.token_id for s in steps],
            finish_reason="stop", prompt_tokens=40, visual_tokens=self.N,
            visual_tokens_kept=[self.N, self.N] + [budget] * 2 if methods else [self.N] * 4, kept_indices=kept,
            timings=TimingsModel(vision_s=0.001, prefill_s=0.012 if methods else 0.02, decode_s=0.03, ttft_s=0.015,
                                 total_s=0.05,
                                 # the plain run after the methods' one: the service's prefix cache had its image
                                 prefill_cached_tokens=0 if methods else 30),
            steps=steps, pruning=pruning, decoding={"name": spec.get("decoding", "greedy")}, logprobs=logprobs)

    def generate(self, prompt, images=(), *, model=None, **spec):
        self.calls.append({"prompt": prompt, "model": model, "images": list(images), **spec})
        return self._result(spec)

    WORDS = {"Yes": [23], "No": [22], "a dog": [5, 64]}  # what the stub's /tokenize knows

    def tokenize(self, text, *, model=None, add_special_tokens=True):
        return TokenizeResponse(count=len(self.WORDS.get(text, [1])), max_model_len=512,
                                tokens=self.WORDS.get(text, [1]))

    def generate_stream(self, prompt, images=(), *, model=None, **spec):
        self.calls.append({"prompt": prompt, "model": model, "images": list(images), "stream": True, **spec})
        if self.fail and spec.get("pruning") != "none":
            raise APIError(400, self.fail)
        r = self._result(spec)
        for i, s in enumerate(r.steps):
            yield GenerateStreamEvent(id=r.id, token_id=s.token_id, text=("" if i == 0 else " ") + s.token)
        yield GenerateStreamEvent(id=r.id, done=True, result=r)


def test_playground_without_service_shows_notice():
    at = page("playground_page.py").run()
    assert not at.exception
    warn = " ".join(w.value for w in at.warning)
    assert "not reachable" in warn and "http://127.0.0.1:9" in warn and "vlmguard serve" in warn
    assert not at.button


def test_playground_with_stub_client_shows_answer_and_overlays():
    stub = StubClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    assert not at.exception
    assert at.selectbox(key="pg_model").value == "tiny-llava"
    assert at.radio(key="pg_source").value == "render a SynthCOCO scene"  # no cached SynthCOCO in this test
    at.selectbox(key="pg_pruning").select("fastv")
    at.text_input(key="pg_budget").input("6")
    at.selectbox(key="pg_decoding").select("vcd")
    at.text_area(key="pg_prompt").input("Is there a dog in the image?")
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception

    main, plain = [c for c in stub.calls if c.get("stream")]
    assert main["pruning"] == "fastv" and main["budget"] == 6 and main["decoding"] == "vcd"
    assert main["diagnostics"] is True and main["prompt"] == "Is there a dog in the image?"
    assert main["logprobs"] == 3  # the steps table shows the final distribution's top 3
    assert main["model"] == "tiny-llava" and len(main["images"]) == 1
    assert plain["pruning"] == "none" and plain["decoding"] == "greedy" and "budget" not in plain
    text = all_text(at)
    assert [s.value for s in at.subheader] == ["with methods", "plain model"]
    assert "No dog ." in text and "Yes a dog ." in text  # the streamed answers
    captions = [c.value for c in at.caption]
    assert "kept visual tokens: 6 of 16" in " ".join(i_caption(at))
    assert "kept visual tokens: 16 of 16" in " ".join(i_caption(at))
    assert any("token scores (visual_scores)" in c for c in i_caption(at))
    assert any("reports no per-token scores" in c for c in captions)  # the plain model prunes nothing
    cached = [c for c in captions if "from the prefix cache" in c]
    assert len(cached) == 1 and "30 prompt tokens from the prefix cache" in cached[0]
    assert "the decoder changed 1 token(s): `0:No`" in text
    steps_table = frame_with(at, "alternatives")
    assert list(steps_table["alternatives"])[:2] == ["'No' 0.779 · 'maybe' 0.135", "'dog' 0.607 · 'maybe' 0.135"]
    assert len(at.get("vega_lite_chart")) == 2  # main vs contrast probabilities, per column
    assert {m.label for m in at.metric} >= {"prefill", "first token", "decode", "total"}
    assert "12.0 ms" in [m.value for m in at.metric] and "50.0 ms" in [m.value for m in at.metric]

    # a re-run (any widget change) keeps the last results on screen without calling the service again
    n = len(stub.calls)
    at.checkbox(key="pg_compare").uncheck().run()
    assert len(stub.calls) == n and "No dog ." in all_text(at)


def test_playground_token_selection_goes_to_both_sides():
    stub = StubClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.slider(key="pg_temperature").set_value(0.7)
    at.number_input(key="pg_sample_seed").set_value(5)
    at.slider(key="pg_min_p").set_value(0.1)
    at.slider(key="pg_presence").set_value(0.5)
    at.slider(key="pg_repetition").set_value(1.2)
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    main, plain = [c for c in stub.calls if c.get("stream")]
    for call in (main, plain):  # the plain model draws its tokens the same way: only the methods differ
        assert (call["do_sample"], call["temperature"], call["seed"], call["min_p"]) == (True, 0.7, 5, 0.1)
        assert (call["presence_penalty"], call["repetition_penalty"]) == (0.5, 1.2)
        assert "frequency_penalty" not in call and "top_p" not in call  # (each only when set)
    captions = " ".join(c.value for c in at.caption)
    assert "sampling T=0.7 seed 5 min-p 0.1" in captions and "presence penalty 0.5" in captions
    at.slider(key="pg_temperature").set_value(0.0)
    at.slider(key="pg_presence").set_value(0.0)
    at.slider(key="pg_repetition").set_value(1.0)
    at.button(key="pg_go").click().run()
    greedy = [c for c in stub.calls if c.get("stream")][-2]
    assert not {"do_sample", "temperature", "seed", "min_p", "presence_penalty", "repetition_penalty",
                "choices"} & set(greedy)  # (greedy: min-p does nothing, and is not sent)
    at.text_input(key="pg_choices").input(" Yes, No ,, ")  # the answer's choices, to both sides too
    at.button(key="pg_go").click().run()
    main, plain = [c for c in stub.calls if c.get("stream")][-2:]
    assert main["choices"] == plain["choices"] == ["Yes", "No"]
    assert "answer one of: Yes / No" in " ".join(c.value for c in at.caption)
    # token biases typed as words, to both sides too; a word of two tokens, or a bias out of range, holds it back
    at.text_input(key="pg_bias").input("Yes=-100, No = 5").run()
    at.button(key="pg_go").click().run()
    main, plain = [c for c in stub.calls if c.get("stream")][-2:]
    assert main["logit_bias"] == plain["logit_bias"] == {23: -100.0, 22: 5.0}
    assert "token bias 23: -100, 22: +5" in " ".join(c.value for c in at.caption)
    for bad, needle in (("a dog=3", "'a dog' is 2 tokens for this model"), ("Yes=-101", "'Yes=-101' is not WORD=BIAS"),
                        ("Yes", "'Yes' is not WORD=BIAS")):
        at.text_input(key="pg_bias").input(bad).run()
        assert any(needle in e.value for e in at.error) and at.button(key="pg_go").disabled, bad
    at.text_input(key="pg_bias").input("").run()
    assert not at.button(key="pg_go").disabled
    # the answer's format (structured output), to both sides too; a schema that is not JSON is an error, not sent
    at.text_input(key="pg_choices").input("")
    at.selectbox(key="pg_format").select("JSON schema").run()
    at.text_area(key="pg_format_text").input('{"type": "object", "required": ["n"]').run()
    assert any("the JSON schema is not JSON" in e.value for e in at.error)
    at.text_area(key="pg_format_text").input('{"type": "object", "required": ["n"]}').run()
    at.checkbox(key="pg_format_compact").check()
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    main, plain = [c for c in stub.calls if c.get("stream")][-2:]
    assert main["guided"] == plain["guided"] == {"json_schema": {"type": "object", "required": ["n"]},
                                                 "whitespace": "compact"}
    assert "choices" not in main and "answer format: JSON schema (compact)" in " ".join(c.value for c in at.caption)
    assert [c.value for c in at.code] == ['{\n  "n": 3\n}'] * 2  # indented, each side, once it has streamed in
    assert [c.value for c in at.run().code] == ['{\n  "n": 3\n}'] * 2  # and on the page's next runs
    at.selectbox(key="pg_format").select("regular expression").run()
    at.text_area(key="pg_format_text").input("(Yes|No)")
    at.button(key="pg_go").click().run()
    assert [c for c in stub.calls if c.get("stream")][-1]["guided"] == {"regex": "(Yes|No)"}
    assert "answer format: regex `(Yes|No)`" in " ".join(c.value for c in at.caption)


def test_playground_image_preprocessing_goes_to_both_sides_and_draws_the_padded_square():
    stub = StubClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.button(key="pg_go").click().run()
    assert not {"image_aspect"} & set(stub.calls[-1])  # the processor's own (native) by default
    at.selectbox(key="pg_image_aspect").select("reference")
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    main, plain = [c for c in stub.calls if c.get("stream")][-2:]
    assert main["image_aspect"] == plain["image_aspect"] == "reference"  # only the methods differ
    assert "images: reference" in " ".join(c.value for c in at.caption)


def i_caption(at: AppTest) -> list[str]:
    """Captions of the images shown (image elements carry their caption in the proto)."""
    out = []
    for img in at.image:
        for i in img.proto.imgs:
            out.append(i.caption)
    return out


def test_playground_service_error_is_shown():
    stub = StubClient(fail="budget 99 exceeds the 16 visual tokens of the image")
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.selectbox(key="pg_pruning").select("fastv")
    at.button(key="pg_go").click().run()
    assert not at.exception
    assert any("exceeds the 16 visual tokens" in e.value for e in at.error)
    assert "Yes a dog ." in all_text(at)  # the plain column still answered


def test_playground_says_what_a_timeout_means_for_its_user():
    """The client's own advice on a timeout ("pass a larger timeout=") is for code; the page names its limit."""
    from vlmguard.client import APITimeoutError

    class SlowService(StubClient):
        timeout = 300.0

        def generate_stream(self, prompt, images=(), *, model=None, **spec):
            raise APITimeoutError(0, "no answer from http://svc within the client's timeout of 300 s (ReadTimeout); "
                                     "pass a larger timeout=")
            yield

    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = SlowService()
    at.run()
    at.button(key="pg_go").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and all(e.startswith("the service sent nothing for 300 s (the playground's limit): ask for fewer "
                                       "new tokens") for e in errors), errors
    assert not any("timeout=" in e for e in errors)


# ---- jobs ---------------------------------------------------------------------------------------------


class StubJobs:
    """Stands in for the Ray Jobs API backend."""

    address = "http://stub-head:8265"

    def __init__(self, jobs: list[JobRow]):
        self.jobs = jobs
        self.submitted: list[list[str]] = []
        self.stopped: list[str] = []

    def list_jobs(self):
        return list(self.jobs)

    def submit(self, argv):
        self.submitted.append(list(argv))
        jid = f"raysubmit_new{len(self.submitted)}"
        self.jobs.insert(0, JobRow(jid, "PENDING", entrypoint="python -m vlmguard.workers.bench_job " + " ".join(argv)))
        return jid

    def logs(self, job_id):
        return "\n".join(f"log line {i}" for i in range(300)) + f"\n[bench-job] {job_id} done"

    def stop(self, job_id):
        self.stopped.append(job_id)
        return True


def test_jobs_page_without_cluster_shows_notice(fixture_db, monkeypatch):
    monkeypatch.setenv("VLMGUARD_DB", str(fixture_db))
    at = page("jobs_page.py").run()
    assert not at.exception
    warn = " ".join(w.value for w in at.warning)
    assert "Ray Jobs API is not reachable" in warn and "vlmguard serve" in warn


def test_jobs_page_lists_jobs_progress_logs_and_submits(fixture_db, monkeypatch):
    monkeypatch.setenv("VLMGUARD_DB", str(fixture_db))
    db = str(fixture_db)
    jobs = StubJobs([
        JobRow("raysubmit_running", "RUNNING", f"python -m vlmguard.workers.bench_job pope --split random --db {db}",
               start_time=1_000, metadata={"vlmguard": "bench"}),
        JobRow("raysubmit_old", "SUCCEEDED", "python -m vlmguard.workers.bench_job chair --limit 4",
               start_time=500, end_time=900),
    ])
    at = page("jobs_page.py")
    at.session_state[JOBS_KEY] = jobs
    at.run()
    assert not at.exception, at.exception
    listed = frame_with(at, "job")
    assert list(listed["job"]) == ["raysubmit_running", "raysubmit_old"]
    assert list(listed["status"]) == ["RUNNING", "SUCCEEDED"]
    assert listed["benchmark"].iloc[0] == f"pope --split random --db {db}"
    text = all_text(at)
    assert "Job `raysubmit_running`: RUNNING" in text and "log line 299" in text and "log line 99" not in text
    assert len(at.get("progress")) == 10  # every run of the job's database was written after its start
    assert at.button(key="stop_raysubmit_running")
    at.button(key="stop_raysubmit_running").click().run()
    assert jobs.stopped == ["raysubmit_running"]

    at.selectbox(key="job_bench").select("pope")
    at.multiselect(key="job_splits").select("adversarial")
    at.number_input(key="job_limit").set_value(8)
    at.selectbox(key="job_pruning").select("fastv")
    at.text_input(key="job_budgets").input("36, 0.25")
    at.selectbox(key="job_decoding").select("vcd")
    submit = next(b for b in at.button if b.label == "Submit")
    submit.click().run()
    assert not at.exception, at.exception
    assert len(jobs.submitted) == 2
    first, second = jobs.submitted
    assert first[:5] == ["pope", "--dataset", "synthcoco", "--db", str(Path(db).resolve())]
    assert ["--split", "random", "--split", "adversarial"] == first[5:9]
    assert first[first.index("--limit") + 1] == "8" and first[first.index("--budget") + 1] == "36"
    assert second[second.index("--budget") + 1] == "0.25" and "--decoding" in second and "vcd" in second
    assert "submitted `raysubmit_new2`" in all_text(at)
    assert at.selectbox(key="jobs_pick").value == "raysubmit_new2"


# ---- the whole app ------------------------------------------------------------------------------------


def test_app_navigates_between_pages(fixture_db, monkeypatch):
    monkeypatch.setenv("VLMGUARD_DB", str(fixture_db))
    at = AppTest.from_file(str(DASH / "app.py"), default_timeout=TIMEOUT)
    at.session_state[CLIENT_KEY] = StubClient()
    at.session_state[JOBS_KEY] = StubJobs([])
    at.run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Leaderboard"] and len(at.dataframe[0].value) == 10
    at.switch_page("playground_page.py").run()
    assert not at.exception and [t.value for t in at.title] == ["Playground"]
    at.switch_page("chat_page.py").run()
    assert not at.exception and [t.value for t in at.title] == ["Chat"] and at.chat_input
    at.switch_page("jobs_page.py").run()
    assert not at.exception and [t.value for t in at.title] == ["Jobs"] and "No jobs yet" in all_text(at)
    at.switch_page("service_page.py").run()
    assert not at.exception and [t.value for t in at.title] == ["Service"] and "No request answered yet" in all_text(at)


def test_playground_upload_goes_to_the_service():
    import io

    from PIL import Image

    stub = StubClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.radio(key="pg_source").set_value("upload an image").run()
    assert at.button(key="pg_go").disabled  # nothing to send yet
    at.file_uploader(key="pg_upload").upload("junk.png", b"definitely not a png", "image/png").run()
    assert any("cannot read the uploaded image" in e.value for e in at.error)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="PNG")
    at.file_uploader(key="pg_upload").upload("green.png", buf.getvalue(), "image/png").run()
    assert not at.exception and not at.button(key="pg_go").disabled
    at.checkbox(key="pg_compare").uncheck()
    at.selectbox(key="pg_pruning").select("none")
    at.button(key="pg_go").click().run()
    assert not at.exception
    (call,) = stub.calls
    assert call["images"][0].size == (64, 48) and call["pruning"] == "none" and "budget" not in call
    assert [s.value for s in at.subheader] == ["with methods"]


def test_leaderboard_sorts_synthcoco_hallucinations_by_kind(tmp_path, monkeypatch, capsys):
    """A real CHAIR run of the bundled model on SynthCOCO: the CHAIR tab traces every hallucinated mention in the
    world's scene graph, with the counts ``vlmguard synth hallucinations`` gives."""
    import json

    from vlmguard.cli import main
    from vlmguard.synth import build as build_mod

    monkeypatch.setenv("VLMGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(build_mod.DEFAULT_COUNTS, "test", 12)
    db = tmp_path / "r.sqlite"
    assert main(["bench", "chair", "--model", "tiny", "--dataset", "synthcoco", "--limit", "12", "--batch-size", "12",
                 "--db", str(db), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["synth", "hallucinations", "--db", str(db), "--json"]) == 0
    (cli,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.setenv("VLMGUARD_DB", str(db))
    at = page("leaderboard_page.py").run()
    assert not at.exception
    assert "Hallucinations by kind (SynthCOCO)" in all_text(at)
    kinds = data.hallucination_kinds(db, data.load_runs(db))
    assert list(kinds["kind"]) == ["a nearly invisible object that is there",
                                   "the co-occurrence partner of a visible object",
                                   "another object typical of the scene type", "foreign to the scene type"]
    assert list(kinds["count"]) == [cli["counts"][k] for k in ("hidden", "partner", "scene", "foreign")]
    assert kinds["count"].sum() == cli["hallucinated"] > 0 and (kinds["mentions"] == cli["mentions"]).all()
    shown = frame_with(at, "kind")
    assert shown.drop(columns="kind").to_numpy().sum() == cli["hallucinated"]


def test_leaderboard_compares_runs_against_a_chosen_baseline(fixture_db, monkeypatch):
    """The 'Against a baseline' tab shows ``vlmguard compare``'s rows for the shown runs, and follows the baseline
    picked in its selectbox and the leaderboard's filters."""
    from vlmguard.bench.compare import compare_runs

    monkeypatch.setenv("VLMGUARD_DB", str(fixture_db))
    at = page("leaderboard_page.py").run()
    assert not at.exception and at.selectbox(key="vs_baseline").value == "base"
    shown = frame_with(at, "ci_low")
    expected = compare_runs(fixture_db, "base")
    assert len(shown) == len(expected) > 0
    assert set(shown["metric"]) == {"accuracy", "accuracy_retained", "chair_i", "chair_s", "chair_i_distinct"}
    vcd = next(c for c in expected if c.benchmark == "pope" and c.method == "vcd" and c.metric == "accuracy")
    row = shown[(shown["benchmark"] == "pope") & (shown["method"] == "vcd") & (shown["metric"] == "accuracy")].iloc[0]
    assert row["change"] == pytest.approx(vcd.change) and row["ci_low"] <= row["change"] <= row["ci_high"]
    at.selectbox(key="vs_baseline").select("fastv@36").run()
    assert not at.exception
    vs_fastv = frame_with(at, "ci_low")  # POPE only: there is no fastv@36 CHAIR run
    assert set(vs_fastv["benchmark"]) == {"pope"}
    assert set(vs_fastv["method"]) == {"base", "fastv@72", "fastv@18", "random@36", "vcd", "fastv@36+vcd"}
    at.multiselect(key="flt_benchmark").select("chair").run()
    assert not at.exception
    chair = frame_with(at, "ci_low")
    assert set(chair["benchmark"]) == {"chair"} and set(chair["method"]) == {"vcd", "fastv@36+vcd"}


def _add_partial_copy(db: Path, source_run: str, n: int, **knobs) -> str:
    """A run like ``source_run`` with other ``knobs`` that stopped after ``n`` of its samples (killed)."""
    from vlmguard.bench import db as dbm

    run = dbm.get_run(db, source_run)
    conn = dbm.connect(db)
    try:
        new_knobs = {k: run[k] for k in dbm.RUN_COLUMNS if k in run}
        run_id = dbm.ensure_run(conn, {**new_knobs, **knobs}, n_expected=run["n_expected"], package_version="test")
        dbm.add_samples(conn, run_id, [{k: s.get(k) for k in dbm.SAMPLE_COLUMNS}
                                       for s in dbm.run_samples(db, source_run)[:n]])
    finally:
        conn.close()
    return run_id


def test_leaderboard_marks_partial_runs_and_shows_the_reports_numbers(fixture_db, tmp_path, monkeypatch):
    """A killed run reads 'partial N/M' as in ``vlmguard report`` (table, run picker, CHAIR tables, Pareto combos,
    a label on the tokens-kept chart); 'finished runs only' hides it; every number the report has is shown."""
    import json
    import shutil

    from vlmguard.bench.db import list_runs
    from vlmguard.bench.report import COLUMNS, flatten, status_cell

    db = tmp_path / "r.sqlite"
    shutil.copy(fixture_db, db)
    runs = data.load_runs(fixture_db)
    pope_src = runs[(runs["benchmark"] == "pope") & (runs["pruning"] == "none") & (runs["decoding"] == "greedy")]
    chair_src = runs[(runs["benchmark"] == "chair") & (runs["decoding"] == "greedy")]
    pope_part = _add_partial_copy(db, pope_src["run_id"].iloc[0], 10, decoding="m3id")
    chair_part = _add_partial_copy(db, chair_src["run_id"].iloc[0], 2, decoding="m3id")
    monkeypatch.setenv("VLMGUARD_DB", str(db))
    at = page("leaderboard_page.py").run()
    assert not at.exception

    table = at.dataframe[0].value.set_index("run_id")
    assert table.loc[pope_part, "status"] == "partial 10/24" and table.loc[chair_part, "status"] == "partial 2/4"
    report = {r["run_id"]: {**flatten(r), "status": status_cell(flatten(r))} for r in list_runs(db)}
    assert set(report) == set(table.index)
    for run_id, row in report.items():  # every column of `vlmguard report` shows the report's value
        for col in COLUMNS:
            if col in ("run_id", "created_at") or (col not in table.columns and row[col] is None):
                continue  # a column without a value in any shown run is hidden
            shown, want = table.loc[run_id, col], row[col]
            if want is None:
                assert pd.isna(shown), (run_id, col, shown)
            else:
                assert shown == (pytest.approx(want) if isinstance(want, float) else want), (run_id, col, shown)

    options = at.selectbox(key="drill_run").options
    assert any(o.endswith(f"m3id · random (partial 10/24)  ({pope_part})") for o in options)
    assert "none + m3id (partial 2/4)" in set(frame_with(at, "CHAIR_i")["method"])
    assert "none + m3id (partial)" in set(frame_with(at, "pareto")["combo"])
    tokens = json.loads(at.get("vega_lite_chart")[0].proto.spec)  # the partial points carry their status
    (label,) = [lay for lay in tokens["layer"] if lay["mark"]["type"] == "text"]
    assert label["encoding"]["text"]["field"] == "status" and "finished" in json.dumps(label["transform"])

    at.checkbox(key="flt_finished").check().run()
    assert not at.exception and not ({pope_part, chair_part} & set(at.dataframe[0].value["run_id"]))
    assert "10 of 12 runs" in all_text(at)


def test_playground_rejects_non_finite_budgets_and_odd_uploads(monkeypatch):
    """'inf' / 'nan' are no budget (int(inf) raised OverflowError); an image a few pixels high draws its kept-token
    overlay (a rectangle under one pixel raised ValueError); a small file that decodes to too many pixels is an
    error message (PIL's DecompressionBombError is no OSError)."""
    import io

    from PIL import Image

    stub = StubClient()
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = stub
    at.run()
    at.selectbox(key="pg_pruning").select("fastv").run()
    for text in ("inf", "-inf", "nan"):
        at.text_input(key="pg_budget").input(text).run()
        assert not at.exception, at.exception
        assert any("is not a finite number" in e.value for e in at.error) and at.button(key="pg_go").disabled

    at.text_input(key="pg_budget").input("6")
    at.radio(key="pg_source").set_value("upload an image").run()
    buf = io.BytesIO()
    Image.new("RGB", (4000, 2), (200, 30, 30)).save(buf, format="PNG")
    at.file_uploader(key="pg_upload").upload("thin.png", buf.getvalue(), "image/png").run()
    at.button(key="pg_go").click().run()
    assert not at.exception, at.exception
    assert "kept visual tokens: 6 of 16" in i_caption(at) and "kept visual tokens: 16 of 16" in i_caption(at)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100 x 100 image is then over twice the limit
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    at.file_uploader(key="pg_upload").upload("bomb.png", buf.getvalue(), "image/png").run()
    assert not at.exception, at.exception
    assert any("cannot read the uploaded image" in e.value and "pixels" in e.value for e in at.error)
    at.file_uploader(key="pg_upload").upload("junk.png", b"not an image", "image/png").run()
    assert any(e.value == "cannot read the uploaded image (not a PNG, JPEG, WebP or BMP file)" for e in at.error)
