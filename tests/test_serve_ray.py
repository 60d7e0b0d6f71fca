"""The service on a real local Ray cluster (CPU): OpenAI SDK, streaming, native API, batching, bad input over
HTTP, and a benchmark Ray Job that survives a replica being killed.

One cluster + app for the whole module (start-up is the expensive part): two replicas of the tiny random
LLaVA, API-key auth on, dynamic batching on.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
SYNTH_MINI = ROOT / "tests" / "fixtures" / "bench" / "synth_mini"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "random:llava"


@pytest.fixture(scope="module")
def service():
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig
    from vlmguard.workers.launch import start_service

    cfg = ServiceConfig(
        models=[ModelConfig(model=MODEL, num_replicas=2, num_cpus=1, max_ongoing_requests=16, max_queued_requests=64,
                            max_new_tokens_limit=64,
                            batching=BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.05))],
        api_keys=[KEY], api_key_env=None, max_request_bytes=8 * 1024 * 1024, request_timeout_s=120,
    )
    svc = start_service(cfg, port=0, num_cpus=4, dashboard_port=0)
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def image_url() -> str:
    return image_to_data_url(random_image(0, (48, 40)))


def _chat_body(image_url: str, text: str = "Is there a dog in the image?", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image_url}}]}],
        "max_tokens": 6, **kw}


def _healthy(svc) -> None:
    r = httpx.get(svc.url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"


# ---- happy paths ----------------------------------------------------------------------------------------

def test_openai_sdk_chat_completion(service, image_url):
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    resp = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0, seed=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Is there a dog in the image?"},
                                               {"type": "image_url", "image_url": {"url": image_url}}]}],
        extra_body={"vlmguard": {"pruning": "fastv", "budget": 8, "params": {}}},
    )
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    info = resp.model_extra["vlmguard"]
    assert info["pruning"] == "fastv" and info["visual_tokens"] == 16
    kept = info["visual_tokens_kept"]
    assert kept[0] == 16 and kept[-1] == 8  # FastV: full image tokens before layer K, 8 after
    assert len(info["kept_indices"]) == 8


def test_openai_sdk_streaming_matches_non_streaming(service, image_url):
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    kwargs = dict(model=MODEL, max_tokens=6, messages=_chat_body(image_url)["messages"])
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert text.strip() == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_sdk_logprobs_over_ray_streamed_and_not(service, image_url):
    """Log-probabilities through the replicas' in-flight batcher: per chunk while streaming, adding up to the
    non-streamed answer's; concurrent requests with other lengths and settings share the batch."""
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    kwargs = dict(model=MODEL, max_tokens=6, messages=_chat_body(image_url)["messages"], logprobs=True,
                  top_logprobs=2, extra_body={"vlmguard": {"pruning": "fastv", "budget": 8}})
    full = client.chat.completions.create(**kwargs)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    with cf.ThreadPoolExecutor(4) as pool:  # other lengths and settings, the same pruner: one batch
        others = [pool.submit(client.chat.completions.create, model=MODEL, max_tokens=n, temperature=0.7, seed=n,
                              messages=_chat_body(image_url)["messages"],
                              extra_body={"vlmguard": {"pruning": "fastv", "budget": 8}}) for n in (3, 9, 12)]
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert all(1 <= f.result().usage.completion_tokens <= n for f, n in zip(others, (3, 9, 12)))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_openai_sdk_n_choices_over_ray(service, image_url):
    """n > 1 through a replica: choice k is the request seeded seed + k, streamed with each choice's index."""
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    kw = dict(model=MODEL, max_tokens=6, temperature=0.9, messages=_chat_body(image_url)["messages"])
    many = client.chat.completions.create(n=4, seed=7, **kw)
    singles = [client.chat.completions.create(seed=7 + k, **kw).choices[0].message.content for k in range(4)]
    assert [c.message.content for c in many.choices] == singles and [c.index for c in many.choices] == [0, 1, 2, 3]
    chunks = list(client.chat.completions.create(n=2, seed=7, stream=True, **kw))
    text = {k: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
            for k in (0, 1)}
    assert [text[0].strip(), text[1].strip()] == singles[:2]


def test_openai_sdk_models_stream_chunks_and_error_shape(service, image_url):
    """What an OpenAI SDK user relies on beyond the happy path: models.retrieve, a stream without usage, the
    bare-string image_url form, and 4xx errors with ``param`` / ``code`` for parameters the server cannot honour."""
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-17")
    assert e.value.code == "model_not_found"
    kwargs = dict(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Is there a dog?"}, {"type": "image_url", "image_url": image_url}]}])
    chunks = list(client.chat.completions.create(stream=True, user="u1", logprobs=False, frequency_penalty=0,
                                                 response_format={"type": "text"}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {(c.id, c.object, c.model) for c in chunks} == {(chunks[0].id, "chat.completion.chunk", MODEL)}
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)  # no usage chunk unless asked for
    for extra, param in [({"n": 17}, "n"), ({"extra_body": {"frobnicate": 1}}, "frobnicate")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**extra, **kwargs)
        assert e.value.param == param and e.value.code in ("unsupported_value", "unsupported_parameter"), e.value.body
    # OpenAI's logit_bias: +100 makes the whole answer of one token, each request its own; a token past the model's
    # vocabulary is refused, naming the field
    forced = [client.chat.completions.create(logit_bias={t: 100}, logprobs=True, **kwargs) for t in ("7", "9")]
    pieces = [{e.token for e in f.choices[0].logprobs.content} for f in forced]
    assert [len(p) for p in pieces] == [1, 1] and pieces[0] != pieces[1]
    with pytest.raises(openai.BadRequestError, match="past the model's vocabulary") as e:
        client.chat.completions.create(logit_bias={"99999999": -100}, **kwargs)
    assert e.value.param == "logit_bias"
    # vLLM's guided_choice (extra_body): the answer is one of the texts
    chosen = client.chat.completions.create(extra_body={"guided_choice": ["a cat", "a dog"]},
                                            **{**kwargs, "max_tokens": 12})
    assert chosen.choices[0].message.content in ("a cat", "a dog") and chosen.choices[0].finish_reason == "stop"
    # structured output: OpenAI's response_format json_schema (the SDK's parse), vLLM's guided_regex streamed; a
    # bad regex is a 400 naming the field
    schema = {"type": "object", "additionalProperties": False, "required": ["animal", "count"],
              "properties": {"animal": {"enum": ["cat", "dog", "none"]}, "count": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 9}}}
    answer = client.chat.completions.create(
        response_format={"type": "json_schema", "json_schema": {"name": "sighting", "schema": schema}},
        extra_body={"vlmguard": {"json_whitespace": "compact"}}, **{**kwargs, "max_tokens": 40})
    parsed = json.loads(answer.choices[0].message.content)
    assert set(parsed) == {"animal", "count"} and parsed["animal"] in ("cat", "dog", "none")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, extra_body={"guided_regex": "(yes|no), [0-9]"}, **{**kwargs, "max_tokens": 12}))
    assert re.fullmatch(r"(yes|no), [0-9]", streamed), streamed
    with pytest.raises(openai.BadRequestError, match="unclosed character class") as e:
        client.chat.completions.create(extra_body={"guided_regex": "[a-"}, **kwargs)
    assert e.value.param == "guided_regex"
    with pytest.raises(openai.BadRequestError, match="'required' needs tools") as e:
        client.chat.completions.create(tool_choice="required", **kwargs)
    assert e.value.param == "tool_choice"
    # tool calling: a named function's call comes back as the message's tool_calls, its arguments per the schema
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["n"],
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
    called = client.chat.completions.create(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}},
                                            extra_body={"vlmguard": {"json_whitespace": "compact"}},
                                            **{**kwargs, "max_tokens": 64})
    (call,) = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "f"
    assert set(json.loads(call.function.arguments)) == {"n"}
    # the Responses API through the replica: the same question, the same answer as the chat API's
    reply = client.responses.create(model=MODEL, max_output_tokens=4, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Is there a dog?"}, {"type": "input_image", "image_url": image_url}]}])
    plain = client.chat.completions.create(**kwargs)
    assert reply.output_text == plain.choices[0].message.content
    assert reply.usage.input_tokens == plain.usage.prompt_tokens and reply.id.startswith("resp_")
    # ... kept by the replica serving HTTP: continued by its id as the conversation sent whole, retrieved
    follow = client.responses.create(model=MODEL, max_output_tokens=3, previous_response_id=reply.id, input="Why?")
    whole = client.responses.create(model=MODEL, max_output_tokens=3, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Is there a dog?"},
                                     {"type": "input_image", "image_url": image_url}]},
        reply.output[0].model_dump(exclude_none=True), {"role": "user", "content": "Why?"}])
    assert (follow.output_text, follow.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
    assert client.responses.retrieve(reply.id).output_text == reply.output_text
    # OpenAI's legacy text completions, over Ray: streamed, the same text as whole
    done = client.completions.create(model=MODEL, prompt=["USER: Is there a dog? ASSISTANT:", "A photo of"],
                                     max_tokens=6)
    assert done.object == "text_completion" and [c.index for c in done.choices] == [0, 1]
    assert 0 < done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 0
    pieces = {0: "", 1: ""}
    for chunk in client.completions.create(model=MODEL, prompt=["USER: Is there a dog? ASSISTANT:", "A photo of"],
                                           max_tokens=6, stream=True):
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert [pieces[0], pieces[1]] == [c.text for c in done.choices] and pieces[1] != ""


def test_run_batch_sends_a_file_of_requests_to_the_service(service, image_url, tmp_path):
    """``vlmguard run-batch --url``: the service's replicas answer the file, each line as the API answers it."""
    from cli_support import run_json

    lines = [{"custom_id": "a", "url": "/v1/chat/completions", "body": _chat_body(image_url, max_tokens=5)},
             {"custom_id": "b", "url": "/v1/responses",
              "body": {"model": MODEL, "input": "Hello", "max_output_tokens": 3}},
             {"custom_id": "c", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": []}}]
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_json(["run-batch", "-i", str(requests), "-o", str(out), "--url", service.url, "--api-key", KEY,
                        "--json"])
    assert (summary["ok"], summary["failed"]) == (2, 1)
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    direct = httpx.post(service.url + "/v1/chat/completions", json=_chat_body(image_url, max_tokens=5), headers=AUTH,
                        timeout=60).json()
    assert records["a"]["response"]["body"]["choices"][0]["message"] == direct["choices"][0]["message"]
    assert records["b"]["response"]["body"]["object"] == "response"
    assert records["c"]["response"]["status_code"] == 400


def test_native_generate_and_python_client(service):
    from vlmguard.client import Client

    with Client(service.url, api_key=KEY) as c:
        r = c.generate("Describe the image.", images=[random_image(3, (40, 40))], pruning="random", budget=4,
                       max_new_tokens=5, seed=0)
        assert r.model == MODEL and r.visual_tokens == 16
        assert r.kept_indices is not None and len(r.kept_indices) == 4
        assert all(k == 4 for k in r.visual_tokens_kept)
        assert r.timings.prefill_s > 0 and r.timings.total_s >= r.timings.prefill_s
        assert len(r.steps) == len(r.token_ids) and 1 <= len(r.token_ids) <= 5
        assert r.pruning["name"] == "random"
        events = list(c.generate_stream("Describe the image.", images=[random_image(3, (40, 40))], pruning="random",
                                        budget=4, max_new_tokens=5, seed=0))
        assert events[-1].done and events[-1].result is not None
        assert events[-1].result.token_ids == r.token_ids
        assert "".join(e.text for e in events).strip() == r.text
        chat = c.chat("Is there a cat?", images=[random_image(4, (32, 32))], max_tokens=4, decoding="vcd",
                      decoding_params={"alpha": 1.0})
        assert chat.vlmguard.decoding == "vcd" and chat.usage.completion_tokens >= 1
        forced = c.generate("Describe the image.", images=[random_image(3, (40, 40))], max_new_tokens=3,
                            logit_bias={7: 100})  # the native spec's logit_bias: JSON's string keys read as ids
        assert forced.token_ids == [7, 7, 7]
        tokens = c.tokenize("a dog", add_special_tokens=False, return_token_strs=True)
        assert tokens.count == len(tokens.tokens) == len(tokens.token_strs) > 0
        assert c.detokenize(tokens.tokens) == "a dog"
        counted = c.tokenize_chat("Is there a cat?", images=[random_image(4, (32, 32))])  # the chat's prompt above
        assert counted.count == chat.usage.prompt_tokens


def test_concurrent_requests_are_batched(service, image_url):
    body = _chat_body(image_url, max_tokens=8)

    def one(_: int) -> httpx.Response:
        return httpx.post(service.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    # each answer says how many requests it was decoded with; 16 at once over 2 replicas must share batches
    # (this does not depend on which replica the router picked, unlike one replica's metrics below)
    sizes = [a.json()["vlmguard"]["timings"]["batch_size"] for a in answers]
    assert max(sizes) > 1, sizes
    # metrics are per ingress replica: read them from one that served some of the requests
    for _ in range(20):
        snap = httpx.get(service.url + "/metrics?format=json", headers=AUTH).json()
        if snap["batch_sizes"]:
            break
    assert snap["generated_tokens_total"] > 0 and snap["visual_tokens_kept_mean"] > 0
    assert snap["max_batch_size_observed"] == max(int(k) for k in snap["batch_sizes"])
    for _ in range(20):
        prom = httpx.get(service.url + "/metrics", headers=AUTH).text
        if 'vlmguard_requests_total{endpoint="/v1/chat/completions",status="200"}' in prom:
            break
    assert 'vlmguard_requests_total{endpoint="/v1/chat/completions",status="200"}' in prom
    prom_sizes = [int(line.split('batch_size="')[1].split('"')[0]) for line in prom.splitlines()
                  if line.startswith("vlmguard_batch_results_total{")]
    assert prom_sizes and all(k >= 1 for k in prom_sizes)


def test_a_chats_next_turns_reach_the_replica_that_cached_its_image(service):
    """Two replicas, each with its own prefix cache: the ingress routes by the first image (workers/routing.py), so
    every conversation's next turns are prefilled from the cache. By load alone each would land on the replica
    that holds its image half the time (all 12 here: 1 in 4096)."""
    card = httpx.get(service.url + f"/v1/models/{MODEL}", headers=AUTH, timeout=30).json()
    assert card["routing"] == "image_affinity" and card["prefix_cache"] is not None
    assert not service.config.ingress_in_model  # auto chose the ingress that reads images
    for i in range(6):
        first = [{"type": "image_url", "image_url": {"url": image_to_data_url(random_image(500 + i, (48, 40)))}},
                 {"type": "text", "text": "What is in the image?"}]
        cached = _chat_cached_tokens(service, first, "And the colours?")
        assert cached[0] == 0 and cached[1] > 0 and cached[2] > 0, (i, cached)


def _chat_cached_tokens(service, first: Any, then: Any, turns: int = 3) -> list[int]:
    """A chat of ``turns`` turns (``first``: the first user turn's content, then ``then`` each time, or a tuple of
    the later turns' contents): the prompt tokens each turn took from the answering replica's prefix cache."""
    messages = [{"role": "user", "content": first}]
    later = list(then) if isinstance(then, tuple) else [then] * (turns - 1)
    cached = []
    for k in range(turns):
        r = httpx.post(service.url + "/v1/chat/completions", headers=AUTH, timeout=120,
                       json={"model": MODEL, "messages": messages, "max_tokens": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        if k < turns - 1:
            messages.append({"role": "user", "content": later[k]})
    return cached


def test_a_text_only_chats_next_turns_reach_the_replica_that_cached_its_history(service):
    """Without an image the ingress routes by the conversation's opening (its first user turn), and the replica's
    prefix cache anchors the prompt by its first tokens: every next turn takes the history from the cache."""
    opening = "Here are my notes from the trip. " + " ".join(f"Day {d}: we walked to the river and back." for d in
                                                             range(1, 6))
    for i in range(6):
        cached = _chat_cached_tokens(service, f"{opening} Summary number {i}, please?", "And then?")
        assert cached[1] > 0 and cached[2] > 0, (i, cached)


def test_an_image_that_joins_a_text_chat_reaches_the_replica_with_its_history(service):
    """A chat that begins without an image and takes one with its second question stays with its opening's
    replica: that question takes the text history from the cache (anchored by its first tokens), the next one the
    history with the image."""
    opening = "Here is what I saw on my walk. " + " ".join(f"Stop {d}: a bench, a tree and a lamp." for d in
                                                           range(1, 6))
    for i in range(6):
        image = {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(700 + i, (48, 40)))}}
        cached = _chat_cached_tokens(service, f"{opening} Which stop was best, {i}?",
                                     ([image, {"type": "text", "text": "Is it this one?"}], "And then?"))
        assert cached[1] > 0 and cached[2] > cached[1], (i, cached)


def test_no_direct_urls_without_direct_ingress(service):
    """The module's cluster was started without Serve's direct ingress: only the proxy serves the app."""
    from vlmguard.workers.launch import direct_ingress_urls

    assert service.direct_urls == [] and direct_ingress_urls(service.config, wait_s=0) == []


# ---- bad input over HTTP --------------------------------------------------------------------------------

def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _bad_cases():
    return {
        "corrupt image bytes": (lambda u: _chat_body(_data_url(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)), 400,
                                "image"),
        "empty image": (lambda u: _chat_body("data:image/png;base64,"), 400, "empty"),
        "50 megapixel image": (lambda u: _chat_body(_data_url(_png_bytes(Image.new("L", (10_000, 5_000))))), 400,
                               "too large"),
        "unsupported format": (lambda u: _chat_body(_data_url(_png_bytes(random_image(1, (16, 16)), "PPM"),
                                                              "image/x-portable-pixmap")), 400, "unsupported format"),
        "unknown method": (lambda u: {**_chat_body(u), "vlmguard": {"decoding": "no-such-decoder"}}, 400,
                           "unknown decoding method"),
        "invalid budget": (lambda u: {**_chat_body(u), "vlmguard": {"pruning": "fastv", "budget": -3}}, 400, "budget"),
        "budget without pruning": (lambda u: {**_chat_body(u), "vlmguard": {"budget": 8}}, 400,
                                   "needs a pruning method"),
        "url when urls are off": (lambda u: _chat_body("https://example.com/cat.png"), 400, "turned off"),
        "prompt longer than the context": (lambda u: _chat_body(u, text="dog " * 700), 400, "context"),
        "unknown model": (lambda u: {**_chat_body(u), "model": "gpt-17"}, 404, "not served"),
        "too many new tokens": (lambda u: _chat_body(u, max_tokens=100), 400, "limit of 64"),
        "more new tokens than any spec": (lambda u: _chat_body(u, max_tokens=100_000), 400, "limit of 64"),
        "n > 16": (lambda u: _chat_body(u, n=17), 400, "at most 16 choices"),
        "unknown response_format": (lambda u: _chat_body(u, response_format={"type": "xml"}), 400,
                                    "response_format.type"),
        "unknown field": (lambda u: {**_chat_body(u), "frobnicate": 1}, 400, "frobnicate"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_a_4xx_json_error_and_the_worker_stays_healthy(service, image_url, case):
    make, status, needle = _bad_cases()[case]
    r = httpx.post(service.url + "/v1/chat/completions", json=make(image_url), headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower() and err["type"] and "param" in err and "code" in err
    _healthy(service)


def test_malformed_json_missing_auth_and_oversize_body(service, image_url):
    url = service.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"messages": [', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed json" in r.json()["error"]["message"].lower()
    r = httpx.post(url, json=_chat_body(image_url))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url, json=_chat_body(image_url), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(url, content=b"{" + b" " * (9 * 1024 * 1024) + b"}", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    r = httpx.post(service.url + "/v1/generate", json={"prompt": "hi", "spec": {"budget": 0}}, headers=AUTH)
    assert r.status_code == 400 and "budget" in r.json()["error"]["message"]
    assert httpx.get(service.url + "/health").status_code == 200  # health needs no key
    ok = httpx.post(url, json=_chat_body(image_url), headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text


# ---- backpressure and load ------------------------------------------------------------------------------

@pytest.mark.parametrize("ingress", ["model", "separate"])
def test_overload_is_503_with_retry_after_and_a_clear_message(service, image_url, ingress):
    """A second app on the same cluster with room for 1 running + 1 queued request: the rest are refused,
    by the replica's own admission control (ingress: model) or by Serve's handle queue (separate)."""
    from ray import serve

    from vlmguard.workers.app import build_app
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig

    cfg = ServiceConfig(app_name="bp", route_prefix="/bp", api_key_env=None, ingress=ingress, models=[
        ModelConfig(model=MODEL, num_replicas=1, num_cpus=0, max_ongoing_requests=1, max_queued_requests=1,
                    batching=BatchingConfig(enabled=False))])
    serve.run(build_app(cfg), name="bp", route_prefix="/bp")
    try:
        body = _chat_body(image_url, max_tokens=48)

        def one(_: int) -> httpx.Response:
            return httpx.post(service.url + "/bp/v1/chat/completions", json=body, timeout=120)

        with cf.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert "overloaded" in refused.json()["error"]["message"] and refused.json()["error"]["type"] == "overloaded_error"
        # /tokenize and /detokenize reach the replica in either topology (no admission: they generate nothing)
        ids = httpx.post(service.url + "/bp/tokenize", json={"prompt": "a cat", "add_special_tokens": False},
                         timeout=60).json()["tokens"]
        back = httpx.post(service.url + "/bp/detokenize", json={"tokens": ids}, timeout=60)
        assert back.json() == {"prompt": "a cat"}
        bad = httpx.post(service.url + "/bp/detokenize", json={"tokens": [10 ** 7]}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    finally:
        serve.delete("bp")
    _healthy(service)


def test_replicas_ray_cannot_place_end_the_deploy_at_the_start_timeout(service, capsys):
    """serve.run waits for ever for replicas that need more than the cluster has; deploy_app gives up at its limit,
    says meanwhile what they wait for, removes the app and names the shortfall. The running app is untouched."""
    from ray import serve

    from vlmguard.errors import VlmguardError
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.launch import deploy_app

    cfg = ServiceConfig(app_name="unplaceable", route_prefix="/unplaceable", api_key_env=None,
                        models=[ModelConfig(model=MODEL, num_cpus=64)])
    with pytest.raises(VlmguardError) as ei:
        deploy_app(cfg, timeout_s=4, report_every_s=1)
    msg = str(ei.value)
    assert msg.startswith("the app 'unplaceable' was not running after 4 s (--start-timeout), so it was removed: the "
                          "replicas reserve more CPUs than the Ray cluster at "), msg
    assert "has (4): random:llava 64 (1 replica x 64)" in msg and "ModelWorker_0_random_llava" in msg, msg
    assert "waiting for the app 'unplaceable' (" in capsys.readouterr().err
    assert "unplaceable" not in serve.status().applications
    _healthy(service)


def test_separate_ingress_serves_two_models(service, image_url):
    """Several models in one app: the FastAPI ingress deployment routes each request to its model's replicas."""
    from ray import serve

    from vlmguard.workers.app import build_app
    from vlmguard.workers.config import ModelConfig, ServiceConfig

    cfg = ServiceConfig(app_name="multi", route_prefix="/multi", api_key_env=None, models=[
        ModelConfig(name=name, model=MODEL, num_cpus=0, max_new_tokens_limit=8) for name in ("first", "second")])
    assert not cfg.ingress_in_model
    serve.run(build_app(cfg), name="multi", route_prefix="/multi")
    try:
        assert set(serve.status().applications["multi"].deployments) == {
            "Ingress", "ModelWorker_0_first", "ModelWorker_1_second"}
        url = service.url + "/multi"
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == ["first", "second"]
        for name in ("first", "second"):
            r = httpx.post(url + "/v1/chat/completions", json={**_chat_body(image_url), "model": name}, timeout=120)
            assert r.status_code == 200 and r.json()["model"] == name, r.text
        r = httpx.post(url + "/v1/chat/completions", json={**_chat_body(image_url), "model": "third"}, timeout=60)
        assert r.status_code == 404 and "not served here" in r.json()["error"]["message"]
    finally:
        serve.delete("multi")


def test_a_background_stream_goes_on_when_its_client_leaves(service):
    """Behind the separate ingress (the ingress calls the model's deployment): a client that leaves a background
    stream after its first event cancels its HTTP request, and Ray Serve cancels the calls a request made to other
    deployments with it; the background answer, which runs in a context of its own, is not among them and ends."""
    import openai

    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    ends = []
    for _ in range(3):
        stream = client.responses.create(model=MODEL, input="Hi", max_output_tokens=64, background=True, stream=True)
        opening = next(iter(stream))
        stream.close()
        rest = list(client.responses.retrieve(opening.response.id, stream=True, starting_after=0))
        ends.append((rest[-1].type, len(rest)))
    assert all(kind in ("response.completed", "response.incomplete") and n > 4 for kind, n in ends), ends


def test_replicas_serving_http_share_one_store_of_responses(service, tmp_path):
    """Two replicas of a model serve the HTTP API themselves: a conversation continued by id is found whichever
    replica the proxy picks (power of two choices: each follow-up lands on either), because both keep their responses
    in the service's one store deployment, here in a SQLite file; so are the Conversations API's conversations."""
    import openai
    from ray import serve

    from vlmguard.workers.app import build_app
    from vlmguard.workers.config import ModelConfig, ServiceConfig

    path = tmp_path / "responses.sqlite"
    cfg = ServiceConfig(app_name="conv", route_prefix="/conv", api_key_env=None, responses_store_path=str(path),
                        models=[ModelConfig(model=MODEL, num_replicas=2, num_cpus=0, routing="power_of_two",
                                            max_new_tokens_limit=256)])
    assert cfg.ingress_in_model and cfg.api_processes == 2 and cfg.responses_shared
    serve.run(build_app(cfg), name="conv", route_prefix="/conv")
    try:
        assert set(serve.status().applications["conv"].deployments) == {"ModelWorker_0_random_llava",
                                                                        "ResponseStore"}
        client = openai.OpenAI(base_url=service.url + "/conv/v1", api_key="none", max_retries=0)
        chain = [client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)]
        for i in range(6):
            chain.append(client.responses.create(model=MODEL, previous_response_id=chain[-1].id, input=f"{i}?",
                                                 max_output_tokens=2))
        assert all(r.store for r in chain)
        assert [r.usage.input_tokens for r in chain] == sorted({r.usage.input_tokens for r in chain})  # growing
        assert [client.responses.retrieve(r.id).id for r in chain] == [r.id for r in chain]
        conv = client.conversations.create(items=[{"role": "user", "content": "Hi"}])  # (edited by the store itself)
        for i in range(4):
            client.responses.create(model=MODEL, conversation=conv.id, input=f"{i}?", max_output_tokens=2, store=False)
        assert len(list(client.conversations.items.list(conv.id, limit=100))) == 1 + 4 * 2
        later = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, background=True)
        for _ in range(600):  # (polled on either replica: the task runs on the one that took the request)
            polled = client.responses.retrieve(later.id)
            if polled.status not in ("queued", "in_progress"):
                break
            time.sleep(0.1)
        assert later.status == "queued" and polled.status in ("completed", "incomplete") and polled.output_text
        stream = client.responses.create(model=MODEL, input="Hi", max_output_tokens=200, background=True, stream=True)
        opening = next(iter(stream))
        stream.close()  # (its client leaves: the answer goes on; its calls to the model are not cancelled with it)
        streamed_id = opening.response.id
        again = [[ev.model_dump() for ev in client.responses.retrieve(streamed_id, stream=True, starting_after=1)]
                 for _ in range(4)]  # (on either replica: from the one answering it, or from the store)
        assert again[0][-1]["type"] in ("response.completed", "response.incomplete")
        assert all(events == again[0] for events in again) and again[0][0]["sequence_number"] == 2
        with sqlite3.connect(path) as db:
            kept = {r for (r,) in db.execute("SELECT id FROM responses UNION SELECT id FROM conversations")}
        pages = {k for k in kept if k.startswith(f"{streamed_id}#run.")}  # (its events, a page a beat)
        assert kept - pages == {r.id for r in chain} | {conv.id, later.id, f"{later.id}#run", streamed_id,
                                                         f"{streamed_id}#run"}
        assert pages and not any("#run." in k for k in kept - pages)
    finally:
        serve.delete("conv")


@pytest.mark.slow
def test_load_16_clients_for_60_s_has_no_5xx(service):
    from vlmguard.workers.loadgen import run_load

    report = run_load(service.url, concurrency=16, duration_s=60, api_key=KEY, model=MODEL)
    print(json.dumps(report))
    assert report["requests_ok"] > 0 and report["server_5xx_other_than_503"] == 0 and not report["transport_errors"]


# ---- benchmark job + fault -------------------------------------------------------------------------------

def _replica_actor_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::") and "ModelWorker" in a["name"])


def _count_samples(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_benchmark_job_survives_a_killed_replica(service, tmp_path, capsys):
    import ray

    from vlmguard.cli import main
    from vlmguard.workers import jobs

    db = tmp_path / "results.sqlite"
    bench = ["bench", "pope", "--dataset", str(SYNTH_MINI), "--split", "random", "--limit", "24", "--batch-size", "1",
             "--max-new-tokens", "24", "--db", str(db)]
    assert main(["job", "submit", "--address", service.dashboard_url, "--json", *bench]) == 0
    job_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["job_id"]

    deadline = time.monotonic() + 120
    while _count_samples(db) < 2:  # the job is under way on both replicas
        assert time.monotonic() < deadline, jobs.logs(job_id, service.dashboard_url)
        assert jobs.status(job_id, service.dashboard_url)["status"] not in jobs.TERMINAL or _count_samples(db) >= 24
        time.sleep(0.2)
    victim = _replica_actor_names()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    assert _count_samples(db) < 24, "the job ended before the replica was killed"

    st = jobs.wait(job_id, service.dashboard_url, timeout_s=240)
    log_text = jobs.logs(job_id, service.dashboard_url)
    assert st["status"] == "SUCCEEDED", log_text
    result = json.loads([ln for ln in log_text.splitlines() if ln.startswith("{")][-1])
    run = result["runs"][0]
    print(f"calls retried after the kill: {result['retries']}")
    assert run["status"] == "finished" and run["n_samples"] == run["n_expected"] == 24
    with sqlite3.connect(db) as conn:
        n, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT sample_key) FROM samples").fetchone()
        status = conn.execute("SELECT status FROM runs WHERE run_id = ?", (run["run_id"],)).fetchone()[0]
    assert n == distinct == 24 and status == "finished"  # every sample exactly once

    assert main(["job", "status", job_id, "--address", service.dashboard_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    assert main(["job", "logs", job_id, "--address", service.dashboard_url]) == 0
    assert "[bench-job]" in capsys.readouterr().out

    # The killed replica is replaced and the service answers again.
    deadline = time.monotonic() + 120
    while len(_replica_actor_names()) < 2 or victim in _replica_actor_names():
        assert time.monotonic() < deadline, _replica_actor_names()
        time.sleep(0.5)
    _healthy(service)


def test_a_sweep_config_runs_as_one_job(service, tmp_path, capsys, monkeypatch):
    """`job submit bench sweep CONFIG.yaml` (issue 6: a sweep as a Ray Job): every run of the config, each sharded
    over the served model's replicas, into the database the config names, relative to where it was submitted."""
    from vlmguard.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(
        f"model: {MODEL}\ndataset: {SYNTH_MINI}\ndb: out/sweep.sqlite\nlimit: 6\nbatch_size: 2\n"
        "benchmarks: [{pope: {splits: [random]}}]\n"
        "methods:\n  - {name: base}\n  - {name: fastv, pruning: fastv, budget: 8}\n")
    argv = ["job", "submit", "--address", service.dashboard_url, "--wait", "--json", "bench", "sweep", "sweep.yaml"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "SUCCEEDED" and out["result"]["benchmark"] == "sweep"
    runs = out["result"]["runs"]
    assert len(runs) == 2 and all(r["status"] == "finished" and r["n_samples"] == 6 for r in runs)
    with sqlite3.connect(tmp_path / "out" / "sweep.sqlite") as conn:
        rows = conn.execute("SELECT pruning, status FROM runs ORDER BY pruning").fetchall()
        n = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert rows == [("fastv", "finished"), ("none", "finished")] and n == 12
