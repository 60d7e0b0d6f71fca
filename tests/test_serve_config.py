"""Service pieces that need no Ray: config files, request translation, metrics, job arguments."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from vlmguard.api_schema import ChatCompletionRequest
from vlmguard.errors import InvalidInput
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image
from vlmguard.workers.config import ModelConfig, ServiceConfig, load_config, parse_config
from vlmguard.workers.image_intake import make_image_resolver
from vlmguard.workers.metrics import ServiceMetrics
from vlmguard.workers.openai_compat import chat_item, chat_spec

ROOT = Path(__file__).resolve().parents[1]
RESOLVE = make_image_resolver([])


def test_gpu_serve_yaml_parses_with_three_families():
    cfg = load_config(ROOT / "configs" / "serve-gpu.yaml")
    assert [m.served_name for m in cfg.models] == ["llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b"]
    assert all(m.num_gpus == 1 and not m.trust_remote_code for m in cfg.models)
    assert cfg.host == "0.0.0.0" and cfg.port == 8000 and cfg.app_name == "vlmguard"
    local = load_config(ROOT / "configs" / "serve-local.yaml")
    assert local.models[0].model == "tiny" and local.models[0].batching.enabled


def test_config_errors_are_one_line():
    with pytest.raises(InvalidInput, match="duplicate model names"):
        parse_config({"models": [{"model": "tiny"}, {"model": "tiny"}]})
    with pytest.raises(InvalidInput, match="num_replicas"):
        parse_config({"models": [{"model": "tiny", "num_replicas": 0}]})
    with pytest.raises(InvalidInput, match="no application"):
        parse_config({"applications": [{"import_path": "other.app:x"}]})
    with pytest.raises(InvalidInput, match="not found"):
        load_config(ROOT / "no-such.yaml")
    with pytest.raises(InvalidInput, match="ingress: model serves one model"):
        parse_config({"ingress": "model", "models": [{"model": "tiny"}, {"model": "random:llava"}]})
    with pytest.raises(InvalidInput, match="ingress"):
        parse_config({"ingress": "proxy"})
    with pytest.raises(InvalidInput, match="ingress_replicas applies to a separate ingress"):
        parse_config({"ingress": "model", "ingress_replicas": 2})
    with pytest.raises(InvalidInput, match="batching.mode"):
        parse_config({"models": [{"model": "tiny", "batching": {"mode": "continuous"}}]})


def test_batching_mode_defaults_to_inflight_and_can_be_overridden():
    from vlmguard.workers.launch import apply_overrides

    cfg = parse_config({"models": [{"model": "tiny"}]})
    assert cfg.models[0].batching.mode == "inflight"
    whole = apply_overrides(cfg, batch_mode="whole", max_batch_size=4)
    assert whole.models[0].batching.mode == "whole" and whole.models[0].batching.max_batch_size == 4
    assert cfg.models[0].batching.mode == "inflight"  # the original is not changed
    assert [m.prefix_cache_mb for m in apply_overrides(cfg, prefix_cache_mb=0).models] == [0.0]


def test_the_responses_store_file_is_a_serve_option(tmp_path):
    from vlmguard.workers.launch import apply_overrides

    cfg = parse_config({})
    kept = apply_overrides(cfg, responses_store_path=str(tmp_path / "responses.sqlite"))
    assert kept.responses_store_path == str(tmp_path / "responses.sqlite") and cfg.responses_store_path is None
    with pytest.raises(InvalidInput, match=f"^--responses-store-path {tmp_path}: {tmp_path} is a folder; name a file"):
        apply_overrides(cfg, responses_store_path=str(tmp_path),
                        names={"responses_store_path": f"--responses-store-path {tmp_path}"})


def test_prefix_sharing_is_on_by_default_and_a_model_may_turn_it_off():
    from vlmguard.testing import tiny_engine
    from vlmguard.workers.engine_worker import EngineWorker

    cfg = parse_config({"models": [{"model": "tiny"}, {"model": "random:llava", "share_prefixes": False}]})
    assert [m.share_prefixes for m in cfg.models] == [True, False]
    engine = tiny_engine("llava")
    try:
        assert EngineWorker("random:llava", engine=engine, share_prefixes=False).engine.share_prefixes is False
    finally:
        engine.share_prefixes = True  # the cached test engine is shared with other tests
    assert EngineWorker("random:llava", engine=engine).engine.share_prefixes is True


def test_the_prefix_cache_is_on_by_default_and_its_figures_are_in_the_model_card():
    from fastapi.testclient import TestClient

    from vlmguard.engine import Request
    from vlmguard.spec import GenerationSpec
    from vlmguard.testing import tiny_engine
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.engine_worker import EngineWorker

    cfg = parse_config({"models": [{"model": "tiny"}, {"model": "random:llava", "prefix_cache_mb": 0}]})
    assert [m.prefix_cache_mb for m in cfg.models] == [1024.0, 0.0]
    with pytest.raises(Exception, match="prefix_cache_mb"):
        parse_config({"models": [{"model": "tiny", "prefix_cache_mb": -1}]})
    engine = tiny_engine("llava")
    try:
        worker = EngineWorker("random:llava", engine=engine, prefix_cache_mb=8)
        assert engine.prefix_cache.max_bytes == 8 * 2**20
        client = TestClient(create_api(LocalBackend({"m": worker}), ServiceConfig()))
        image = random_image(1, (64, 48))
        for question in ("Is there a dog?", "Is there a cat?"):
            engine.generate([Request(question, [image])], GenerationSpec(max_new_tokens=2))
        card = client.get("/v1/models/m").json()
        assert card["prefix_cache"]["entries"] == 1 and card["prefix_cache"]["hits"] == 1
        assert card["prefix_cache"]["max_bytes"] == 8 * 2**20
        assert EngineWorker("random:llava", engine=engine, prefix_cache_mb=0).info()["prefix_cache"] is None
    finally:
        engine.prefix_cache = None  # the cached test engine is shared with other tests


def test_ingress_topology_follows_the_config():
    """One model: the model replica is the HTTP ingress (one hop fewer); several: a separate FastAPI ingress."""
    from vlmguard.workers.app import build_app

    one = parse_config({"models": [{"model": "tiny", "max_ongoing_requests": 4, "max_queued_requests": 6,
                                    "batching": {"max_batch_size": 8}}]})
    assert one.ingress_in_model and one.models[0].admission_limit == 8 + 6
    app = build_app(one)
    dep = app._bound_deployment
    assert dep.name == "ModelWorker_0_tiny" and dep.max_ongoing_requests == 14 + 8 and dep.max_queued_requests == -1
    assert hasattr(dep.func_or_class, "__serve_build_asgi_app__")

    sep = parse_config({"ingress": "separate", "models": [{"model": "tiny", "max_queued_requests": -1}]})
    assert not sep.ingress_in_model and sep.models[0].admission_limit is None
    assert build_app(sep)._bound_deployment.name == "Ingress"
    assert not parse_config({"ingress_replicas": 2}).ingress_in_model  # asked for ingress replicas: separate
    two = parse_config({"models": [{"model": "tiny"}, {"model": "random:llava"}]})
    assert not two.ingress_in_model and build_app(two)._bound_deployment.name == "Ingress"


def test_api_keys_from_env(monkeypatch):
    monkeypatch.setenv("MY_KEYS", "a, b")
    cfg = ServiceConfig(api_keys=["c"], api_key_env="MY_KEYS")
    assert cfg.resolved_api_keys() == ["c", "a", "b"]


def _req(**kw) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def test_chat_spec_maps_openai_fields_and_vlmguard_options():
    spec = chat_spec(_req(max_tokens=7, temperature=0.7, top_p=0.9, seed=3, stop="END",
                          vlmguard={"pruning": "fastv", "budget": 0.25, "decoding": "vcd", "params": {"alpha": 0.5}}),
                     64)
    assert (spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed, spec.stop) == (7, 0.7, 0.9, 3, ["END"])
    assert spec.sampling and spec.pruning == "fastv" and spec.budget == 0.25
    assert spec.decoding == "vcd" and spec.decoding_params == {"alpha": 0.5}
    assert not chat_spec(_req(), 64).sampling  # no temperature: greedy
    assert not chat_spec(_req(temperature=0), 64).sampling
    with pytest.raises(InvalidInput, match="limit of 64"):
        chat_spec(_req(max_tokens=65), 64)
    with pytest.raises(InvalidInput, match="limit of 64"):  # not GenerationSpec's "max_new_tokens <= 8192"
        chat_spec(_req(max_completion_tokens=100_000), 64)
    with pytest.raises(InvalidInput, match="unknown pruning method"):
        chat_spec(_req(vlmguard={"pruning": "nope"}), 64)


def test_chat_item_single_turn_multi_turn_and_image_rules():
    url = image_to_data_url(random_image(0, (20, 20)))
    req = _req(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]},
    ])
    item = chat_item(req, RESOLVE, max_images=4, max_new_tokens_limit=64, request_id="r1")
    assert item.prompt == "What?" and item.system == "Be brief." and len(item.images) == 1 and item.messages is None
    multi = _req(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "B?"},
    ])
    item = chat_item(multi, RESOLVE, max_images=4, max_new_tokens_limit=64, request_id="r2")
    assert [m["role"] for m in item.messages] == ["user", "assistant", "user"]
    assert item.messages[0]["content"][0] == {"type": "image"} and len(item.images) == 1
    with pytest.raises(InvalidInput, match="last message"):
        chat_item(_req(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), RESOLVE,
                  max_images=4, max_new_tokens_limit=64, request_id="r3")
    with pytest.raises(InvalidInput, match="too many images"):
        chat_item(req, RESOLVE, max_images=0, max_new_tokens_limit=64, request_id="r4")
    with pytest.raises(InvalidInput, match=r"messages\[0\].content\[0\]: .*turned off"):
        chat_item(_req(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]), RESOLVE, max_images=4,
            max_new_tokens_limit=64, request_id="r5")


def test_chat_request_accepts_neutral_openai_params_and_refuses_what_it_cannot_honour():
    ok = _req(n=1, logprobs=False, top_logprobs=0, response_format={"type": "text"}, tools=[], tool_choice="none",
              parallel_tool_calls=False, frequency_penalty=0, presence_penalty=0.0, logit_bias={}, user="u1")
    assert chat_spec(ok, 64).max_new_tokens == 64
    with pytest.raises(ValidationError, match="at most 16 choices") as e:
        _req(n=17)
    err = e.value.errors()[0]
    assert err["type"] == "unsupported_value" and err["loc"][0] == "n"
    # tool calling (tests/test_tool_calls.py): a choice other than none needs tools
    with pytest.raises(ValidationError, match="'auto' needs tools") as e:
        _req(tool_choice="auto")
    assert e.value.errors()[0]["loc"][0] == "tool_choice"


def test_chat_penalties_map_to_the_spec():
    spec = chat_spec(_req(frequency_penalty=0.5, presence_penalty=-1.0, repetition_penalty=1.3), 64)
    assert (spec.frequency_penalty, spec.presence_penalty, spec.repetition_penalty) == (0.5, -1.0, 1.3)
    plain = chat_spec(_req(), 64)
    assert (plain.frequency_penalty, plain.presence_penalty, plain.repetition_penalty) == (0.0, 0.0, 1.0)
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0)):
        with pytest.raises(ValidationError, match=field):
            _req(**{field: value})


def test_chat_logit_bias_maps_to_the_spec_by_token_id():
    assert chat_spec(_req(logit_bias={"50256": -100, "7": 2.5}), 64).logit_bias == {50256: -100.0, 7: 2.5}
    assert chat_spec(_req(logit_bias={}), 64).logit_bias == {} == chat_spec(_req(), 64).logit_bias
    for bias, needle in (({"dog": 1}, "valid integer"), ({"-3": 1}, "greater than or equal to 0"),
                         ({"5": 101}, "less than or equal to 100"), ({str(i): 1 for i in range(1025)}, "at most 1024")):
        with pytest.raises(InvalidInput, match=needle) as e:
            chat_spec(_req(logit_bias=bias), 64)
        assert e.value.param.startswith("logit_bias")
    with pytest.raises(ValidationError, match="not a boolean"):
        _req(logit_bias={"5": True})


def test_chat_guided_choice_maps_to_the_spec():
    from vlmguard.workers.openai_compat import request_param

    assert chat_spec(_req(guided_choice=["Yes", "No"]), 64).choices == ["Yes", "No"]
    assert chat_spec(_req(), 64).choices == []
    with pytest.raises(InvalidInput, match="at least 1 character") as e:
        chat_spec(_req(guided_choice=["Yes", ""]), 64)
    assert request_param(e.value.param, chat=True) == "guided_choice.1"
    with pytest.raises(InvalidInput, match="cannot go together"):
        chat_spec(_req(guided_choice=["Yes"], min_tokens=2), 64)


def test_chat_logprobs_map_to_the_spec_and_top_logprobs_need_logprobs():
    assert chat_spec(_req(), 64).logprobs is None
    assert chat_spec(_req(logprobs=False, top_logprobs=0), 64).logprobs is None
    assert chat_spec(_req(logprobs=True), 64).logprobs == 0
    assert chat_spec(_req(logprobs=True, top_logprobs=5), 64).logprobs == 5
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs: true"):
        _req(top_logprobs=2)
    with pytest.raises(ValidationError, match="less than or equal to 20"):
        _req(logprobs=True, top_logprobs=21)


def test_image_url_string_form_detail_and_unsupported_part_types():
    url = image_to_data_url(random_image(0, (20, 20)))
    req = _req(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": url},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])
    item = chat_item(req, RESOLVE, max_images=4, max_new_tokens_limit=64, request_id="r1")
    assert item.prompt == "What?" and len(item.images) == 2
    with pytest.raises(ValidationError, match="part type 'input_audio' is not supported"):
        _req(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    for kind in ([], {"a": None}):  # a list or an object where a name goes: an error, not a 500
        with pytest.raises(ValidationError, match=r"part type .* is not supported"):
            _req(messages=[{"role": "user", "content": [{"type": kind, "text": "hi"}]}])
    with pytest.raises(ValidationError, match="detail"):
        _req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "max"}}]}])


def test_url_allow_list():
    resolve = make_image_resolver(["https://images.example.org/"])
    with pytest.raises(InvalidInput, match="allow-list"):
        resolve("https://evil.example.com/a.png")
    with pytest.raises(InvalidInput, match="data URL"):
        resolve("file:///etc/passwd")


def test_metrics_json_and_prometheus():
    m = ServiceMetrics()
    for bs, pb in ((1, 1), (3, 1), (3, 2), (3, 2)):
        m.request_started()
        m.observe_result({"token_ids": [1, 2], "prompt_tokens": 10, "visual_tokens": 16,
                          "visual_tokens_kept": [16, 8, 8, 8],
                          "timings": {"decode_s": 0.1, "batch_size": bs, "prefill_batch": pb}})
        m.request_finished("/v1/chat/completions", 200, 0.2)
    m.request_started()
    m.request_finished("/v1/generate", 400, 0.01)
    s = m.snapshot()
    assert s["requests_total"] == 5 and s["requests_by_status"] == {"200": 4, "400": 1}
    assert s["max_batch_size_observed"] == 3 and s["batch_sizes"] == {"1": 1, "3": 3}
    assert s["prefill_batches"] == {"1": 2, "2": 2} and s["mean_prefill_batch"] == 1.5
    assert s["generated_tokens_total"] == 8 and s["visual_tokens_kept_mean"] == 10.0
    assert s["decode_tokens_per_s"] == pytest.approx(20.0) and s["in_flight"] == 0
    text = m.prometheus()
    assert 'vlmguard_requests_total{endpoint="/v1/generate",status="400"} 1' in text
    assert 'vlmguard_batch_results_total{batch_size="3"} 3' in text
    assert 'vlmguard_prefill_results_total{prefill_batch="2"} 2' in text
    assert 'vlmguard_request_latency_seconds_bucket{le="+Inf"} 4' in text


def test_a_request_whose_client_left_counts_as_499_not_as_a_server_error():
    """Serve cancels the request of a client that disconnected (or timed out) before its answer: /metrics
    counted it as a 500, so client time-outs looked like server errors."""
    import asyncio
    import json

    from vlmguard.workers.api import create_api

    class SlowBackend:
        def model_names(self):
            return ["m"]

        async def info(self, model):
            return {}

        async def generate(self, model, item):
            await asyncio.sleep(60)

    app = create_api(SlowBackend(), ServiceConfig(api_key_env=None))
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def main():
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.2)  # the request waits for its answer
        task.cancel()  # what Serve does when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        return sent

    assert asyncio.run(main()) == []
    s = app.state.metrics.snapshot()
    assert s["requests_by_endpoint"] == {"/v1/chat/completions 499": 1} and s["in_flight"] == 0


def test_job_arguments_are_checked_and_paths_made_absolute(tmp_path, monkeypatch):
    from vlmguard.workers import jobs

    monkeypatch.chdir(tmp_path)
    entry = jobs.bench_entrypoint(["pope", "--db", "runs/x.sqlite", "--dataset", "mini", "--limit", "3"])
    assert f"--db {tmp_path}/runs/x.sqlite" in entry and f"--dataset {tmp_path}/mini" in entry
    assert "-m vlmguard.workers.bench_job pope" in entry
    assert jobs.absolutize(["--dataset", "synthcoco"]) == ["--dataset", "synthcoco"]
    with pytest.raises(InvalidInput, match="bad benchmark job arguments"):
        jobs.submit_bench(["no-such-benchmark"], address="http://127.0.0.1:9")
    assert jobs.jobs_address("10.0.0.1:8265") == "http://10.0.0.1:8265"


class _FakeJobs:
    """Stands in for Ray's JobSubmissionClient: records submissions, or fails them as the Jobs API does."""

    def __init__(self, fail: str | None = None, status: str = "STOPPED"):
        self.fail, self.state, self.submitted = fail, status, []

    def submit_job(self, **kw):
        if self.fail:
            raise RuntimeError(self.fail)
        self.submitted.append(kw)
        return "raysubmit_1"

    def stop_job(self, job_id):
        return False

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(status=self.state, message="", entrypoint="", start_time=0, end_time=0)


def test_job_submission_default_db_server_errors_and_local_paths(tmp_path, monkeypatch, capsys):
    """The default DB is made absolute like the others (not left to the job's working directory, where the
    cluster was started); a refused submission is one line with the Jobs API's reason, not its traceback; with
    the Jobs API on this machine, a --db that cannot be a results DB or a missing file is refused before
    submission (on a remote cluster paths are the cluster's); options a job would ignore are refused."""
    from vlmguard.cli import main
    from vlmguard.errors import VlmguardError
    from vlmguard.workers import jobs

    monkeypatch.chdir(tmp_path)
    for var in ("VLMGUARD_JOBS_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert f"--db {tmp_path}/runs/vlmguard.sqlite" in jobs.bench_entrypoint(["pope", "--limit", "3"])
    assert jobs.bench_entrypoint(["pope", "--db=a.sqlite"]).endswith(f"--db={tmp_path}/a.sqlite")

    ray_text = ("Request failed with status code 500: Traceback (most recent call last):\n  File \"job_head.py\", "
                "line 419, in submit_job\n    resp = await x()\nRuntimeError: Request failed with status code 400: "
                "Traceback (most recent call last):\n  File \"job_manager.py\", line 553, in submit_job\n    raise "
                "ValueError(\nValueError: Job with submission_id j1 already exists. Please use a different "
                "submission_id.\n.\n.")
    monkeypatch.setattr(jobs, "client", lambda address=None: _FakeJobs(fail=ray_text))
    with pytest.raises(VlmguardError) as e:
        jobs.submit_bench(["pope", "--limit", "2"], submission_id="j1")
    assert str(e.value) == ("job submission failed: Job with submission_id j1 already exists. Please use a "
                            "different submission_id")

    fake = _FakeJobs()
    monkeypatch.setattr(jobs, "client", lambda address=None: fake)
    not_db = tmp_path / "notes.txt"
    not_db.write_text("not a database\n")
    for argv, needle in ((["--db", str(tmp_path)], "is a directory"),
                         (["--db", str(not_db)], "not a vlmguard results database"),
                         (["--db", str(not_db / "x.sqlite")], "is a file"),
                         (["--image-ids", "nope.txt"], "--image-ids nope.txt: file not found"),
                         (["--device", "cuda"], "--device cannot be used in a job")):
        with pytest.raises(InvalidInput, match=needle):
            jobs.submit_bench(["pope", *argv], address="http://127.0.0.1:8265")
    assert fake.submitted == [] and not (tmp_path / "runs").exists()
    jobs.submit_bench(["pope", "--db", str(tmp_path)], address="http://10.0.0.1:8265")  # the head's paths
    assert len(fake.submitted) == 1

    # `job submit bench ... --json` is the submit command's --json; `job stop` of an ended job names its state
    assert main(["job", "submit", "bench", "pope", "--limit", "2", "--json"]) == 0
    assert capsys.readouterr().out.strip().startswith('{"job_id": "raysubmit_1"')
    assert "--json" not in fake.submitted[-1]["entrypoint"]
    assert main(["job", "stop", "raysubmit_1"]) == 0
    assert capsys.readouterr().out.strip() == "job raysubmit_1: not running (already STOPPED)"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from vlmguard.cli import main
    from vlmguard.workers.launch import free_port

    bad = tmp_path / "serve.yaml"
    bad.write_text("models: [{model: tiny, num_replicas: -1}]\n")
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmguard: error: invalid service config") and "num_replicas" in err and "\n" not in err
    assert main(["job", "status", "raysubmit_x", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmguard: error: cannot reach the Ray Jobs API") and "\n" not in err
    assert main(["job", "submit", "bench"]) == 2
    assert "needs a benchmark" in capsys.readouterr().err


def test_direct_ingress_urls_wait_for_every_expected_replica(monkeypatch):
    """Replicas publish their own HTTP address a little after they turn healthy: the lookup waits for as
    many as were asked for (start_service asks for every ingress replica and fails clearly without them)."""
    import ray.serve.context as serve_context

    from vlmguard.workers import launch

    def group(*ports):
        return {"target_groups": [{"app_name": "vlmguard", "protocol": "RequestProtocol.HTTP", "route_prefix": "/",
                                   "targets": [{"name": f"SERVE_REPLICA::app#{p}", "ip": "10.0.0.1", "port": p}
                                               for p in ports]},
                                  {"app_name": "other", "protocol": "HTTP", "route_prefix": "/",
                                   "targets": [{"name": "SERVE_REPLICA::x", "ip": "10.0.0.1", "port": 1}]}]}

    published = iter([group(), group(9001), group(9001, 9002)])
    calls = []

    class Client:
        def get_serve_details(self):
            calls.append(1)
            return next(published)

    monkeypatch.setattr(serve_context, "_get_global_client", lambda: Client())
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    cfg = ServiceConfig(app_name="vlmguard", direct_ingress=True)
    urls = launch.direct_ingress_urls(cfg, wait_s=60, expected=2)
    assert urls == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert len(calls) == 3
    published = iter([group(9001)] * 3)
    assert launch.direct_ingress_urls(cfg, wait_s=0, expected=2) == ["http://127.0.0.1:9001"]  # the caller decides


def test_gpu_reservation_follows_the_device():
    """Ray hides the GPUs from a replica that reserves none: a CUDA replica reserves one unless told otherwise,
    and ``auto`` is CUDA on a cluster with GPUs (it used to reserve none, so on a GPU machine `vlmguard serve
    --model M` ran the model on the CPU)."""
    from vlmguard.workers.app import model_deployment
    from vlmguard.workers.config import ModelConfig

    auto = ModelConfig()
    assert auto.num_gpus is None and auto.gpus_per_replica(0) == 0 and auto.gpus_per_replica(2) == 1
    assert ModelConfig(device="cuda").gpus_per_replica(0) == 1 and ModelConfig(device="cuda:1").gpus_per_replica(8) == 1
    assert ModelConfig(device="cpu").gpus_per_replica(8) == 0
    assert ModelConfig(device="cuda", num_gpus=0.5).gpus_per_replica(8) == 0.5
    with pytest.raises(InvalidInput, match="device cuda needs num_gpus > 0 per replica"):
        parse_config({"models": [{"model": "tiny", "device": "cuda", "num_gpus": 0}]})
    options = lambda m: model_deployment(m, 0)._bound_deployment.ray_actor_options  # noqa: E731
    assert options(ModelConfig(device="cuda")) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert options(ModelConfig()) == {"num_cpus": 1.0}  # no Ray cluster connected here: no GPUs


def test_serve_refuses_gpu_replicas_this_machine_lacks(capsys, monkeypatch, tmp_path):
    """A local service whose replicas reserve GPUs the machine lacks is refused before Ray starts (the
    replicas would wait for a GPU for ever)."""
    import vlmguard.workers.launch
    from vlmguard.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(vlmguard.workers.launch, "start_service", forbidden)
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("models: [{model: tiny, device: cuda, num_replicas: 2}]\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "the replicas reserve more GPUs than this machine has (0): tiny 2" in err
    assert err.rstrip().endswith("set device cpu, a fractional num_gpus or fewer replicas, or join a cluster (--address)")


def test_throughput_optimized_mode_is_set_on_the_clusters_vlmguard_starts(monkeypatch):
    """Ray Serve's throughput-optimized mode is a cluster-wide environment flag read when the cluster starts, which
    turns direct ingress on too: the config implies direct ingress (the service looks for the replicas' URLs), and
    the clusters vlmguard starts get both flags while this process's environment is left as it was."""
    import os

    from vlmguard.cli import build_parser
    from vlmguard.workers.launch import DIRECT_INGRESS_ENV, THROUGHPUT_OPTIMIZED_ENV, apply_overrides, cluster_env

    for key in (DIRECT_INGRESS_ENV, THROUGHPUT_OPTIMIZED_ENV):
        monkeypatch.delenv(key, raising=False)
    cfg = ServiceConfig(models=[ModelConfig(model="tiny")], throughput_optimized=True)
    assert cfg.direct_ingress is True
    plain = ServiceConfig(models=[ModelConfig(model="tiny")])
    assert (plain.throughput_optimized, plain.direct_ingress) == (False, False)
    assert apply_overrides(plain, throughput_optimized=True).direct_ingress is True
    with cluster_env(False, throughput_optimized=True):
        assert (os.environ[DIRECT_INGRESS_ENV], os.environ[THROUGHPUT_OPTIMIZED_ENV]) == ("1", "1")
    with cluster_env(True):
        assert os.environ[DIRECT_INGRESS_ENV] == "1" and THROUGHPUT_OPTIMIZED_ENV not in os.environ
    assert DIRECT_INGRESS_ENV not in os.environ and THROUGHPUT_OPTIMIZED_ENV not in os.environ
    parser = build_parser()
    assert parser.parse_args(["serve", "--throughput-optimized"]).throughput_optimized is True
    assert parser.parse_args(["serve"]).throughput_optimized is None  # the config's
    assert parser.parse_args(["perf", "serve", "--throughput-optimized"]).throughput_optimized is True
