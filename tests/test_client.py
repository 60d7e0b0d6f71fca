"""The Python client: retries with backoff on 429/503, APIError on 4xx, and the async client against the real
FastAPI app (in-process, engines without Ray)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from vlmguard.client import APIError, AsyncClient, Client, image_to_url
from vlmguard.testing import random_image, tiny_engine


def _ok_generate() -> dict:
    return {"id": "gen-1", "model": "m", "text": "yes", "token_ids": [5], "finish_reason": "stop", "prompt_tokens": 9,
            "visual_tokens": 16, "visual_tokens_kept": [16, 16], "kept_indices": None,
            "timings": {"prefill_s": 0.01, "total_s": 0.02, "batch_size": 2}, "steps": []}


def test_sync_client_retries_503_and_429_then_succeeds():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503, json={"error": {"message": "overloaded", "type": "overloaded_error"}},
                                  headers={"Retry-After": "0"})
        if len(calls) == 2:
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=_ok_generate())

    with Client("http://svc", api_key="k", transport=httpx.MockTransport(handler), backoff_s=0.001) as c:
        r = c.generate("Is there a dog?", images=[random_image(0, (8, 8))], pruning="fastv", budget=4)
    assert r.text == "yes" and r.timings.batch_size == 2
    assert len(calls) == 3 and calls[0].headers["authorization"] == "Bearer k"
    body = json.loads(calls[-1].content)
    assert body["spec"] == {"pruning": "fastv", "budget": 4} and body["images"][0].startswith("data:image/png;base64,")


def test_client_gives_up_after_max_retries_and_raises_api_error_on_4xx():
    def overloaded(request):
        return httpx.Response(503, json={"error": {"message": "server overloaded", "type": "overloaded_error"}})

    with Client("http://svc", transport=httpx.MockTransport(overloaded), max_retries=2, backoff_s=0.001) as c:
        with pytest.raises(APIError) as e:
            c.health()
    assert e.value.status == 503 and "overloaded" in e.value.message

    def bad(request):
        return httpx.Response(400, json={"error": {"message": "unknown decoding method 'x'", "type": "invalid_request_error",
                                                   "code": "UnknownMethod"}})

    calls = []
    with Client("http://svc", transport=httpx.MockTransport(lambda r: calls.append(r) or bad(r))) as c:
        with pytest.raises(APIError) as e:
            c.chat("hi", decoding="x")
    assert len(calls) == 1 and e.value.status == 400 and e.value.code == "UnknownMethod"
    assert json.loads(calls[0].content)["vlmguard"] == {"decoding": "x"}
    from vlmguard.errors import InvalidInput

    with pytest.raises(InvalidInput, match="image file not found: /no/such/file.png"):
        image_to_url("/no/such/file.png")


def _inprocess_app():
    """The real FastAPI app on a tiny random LLaVA, without Ray."""
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:llava", name="tiny-llava", engine=tiny_engine("llava"))
    cfg = ServiceConfig(models=[ModelConfig(name="tiny-llava", model="random:llava", max_new_tokens_limit=32)],
                        api_key_env=None)
    return create_api(LocalBackend({"tiny-llava": worker}), cfg)


def test_async_client_against_the_api_in_process():
    app = _inprocess_app()
    img = random_image(2, (36, 36))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://test", transport=transport) as c:
            models = await c.models()
            assert [m.id for m in models.data] == ["tiny-llava"] and models.data[0].family == "llava"
            r = await c.generate("Is there a dog?", images=[img], pruning="fastv", budget=6, max_new_tokens=4)
            assert r.visual_tokens_kept[-1] == 6 and len(r.token_ids) <= 4
            chat = await c.chat("Is there a dog?", images=[img], max_tokens=4, pruning="fastv", budget=6)
            assert chat.vlmguard.visual_tokens_kept[-1] == 6
            chunks = [ch async for ch in c.chat_stream("Is there a dog?", images=[img], max_tokens=4)]
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            events = [e async for e in c.generate_stream("Is there a dog?", images=[img], max_new_tokens=3)]
            assert events[-1].done and len(events[-1].result.token_ids) <= 3
            text = await c.complete(["A photo of", "USER: hi"], max_tokens=4, logprobs=1, decoding="m3id")
            assert [ch.index for ch in text.choices] == [0, 1] and text.vlmguard.decoding == "m3id"
            assert len(text.choices[0].logprobs.tokens) == len(text.choices[0].logprobs.text_offset) <= 4
            pieces = [ch async for ch in c.complete_stream("A photo of", max_tokens=4, decoding="m3id")]
            assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text
            ids = (await c.tokenize("A photo of")).tokens  # scored as token ids: the prompt's entries, then one
            scored = (await c.complete(ids, max_tokens=1, echo=True, logprobs=0)).choices[0].logprobs
            assert len(scored.tokens) == len(ids) + 1 and scored.token_logprobs[0] is None
            assert all(v is not None for v in scored.token_logprobs[1:])
            with pytest.raises(APIError) as e:
                await c.chat("x " * 600, images=[img], max_tokens=4)
            assert e.value.status == 400 and "context" in e.value.message
            snap = await c.metrics()
            assert snap["requests_by_status"]["400"] == 1 and snap["results"] == 8

    asyncio.run(scenario())


def test_api_rejects_out_of_range_seeds_bool_budgets_and_server_file_schedules(tmp_path):
    """4xx with a message, never a 500: a seed no generator holds, ``budget: true``, and an AdaptInfer schedule
    named as a file on the server (remote requests send the schedule object itself, which works)."""
    app = _inprocess_app()
    img = image_to_url(random_image(2, (36, 36)))
    schedule_file = tmp_path / "sched.json"
    schedule_file.write_text(json.dumps({"layers": [0, 1]}))

    def chat(**extra):
        body = {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Is there a dog?"}, {"type": "image_url", "image_url": {"url": img}}]}], **extra}
        return body

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as h:
            out = {}
            out["seed"] = await h.post("/v1/chat/completions", json=chat(seed=2**70, temperature=0.7))
            out["seed_stream"] = await h.post("/v1/chat/completions", json=chat(seed=2**70, stream=True))
            out["gen_seed"] = await h.post("/v1/generate", json={"prompt": "hi", "images": [img],
                                                                 "spec": {"seed": 2**70, "decoding": "sample"}})
            out["budget"] = await h.post("/v1/chat/completions", json=chat(vlmguard={"pruning": "fastv", "budget": True}))
            out["file"] = await h.post("/v1/chat/completions", json=chat(vlmguard={
                "pruning": "adaptinfer", "budget": 4, "pruning_params": {"schedule": str(schedule_file)}}))
            out["inline"] = await h.post("/v1/chat/completions", json=chat(vlmguard={
                "pruning": "adaptinfer", "budget": 4, "pruning_params": {"schedule": {"layers": [0, 1]}}}))
            out["gen_inline"] = await h.post("/v1/generate", json={"prompt": "hi", "images": [img], "spec": {
                "pruning": "adaptinfer", "budget": 4, "max_new_tokens": 1, "pruning_params": {"schedule": {"layers": [0, 1]}}}})
            out["bad_inline"] = await h.post("/v1/chat/completions", json=chat(vlmguard={
                "pruning": "adaptinfer", "budget": 4, "pruning_params": {"schedule": {"layers": "x"}}}))
            return out

    out = asyncio.run(scenario())
    for key in ("seed", "seed_stream", "gen_seed"):
        assert out[key].status_code == 400 and "seed" in out[key].json()["error"]["message"], key
    assert out["budget"].status_code == 400 and "budget: must be a number, not a boolean" in out["budget"].json()["error"]["message"]
    assert out["file"].status_code == 400 and "file on the server" in out["file"].json()["error"]["message"]
    assert out["inline"].status_code == 200, out["inline"].text
    assert out["gen_inline"].json()["pruning"]["adaptinfer_schedule"][0]["source"] == "inline"
    assert out["bad_inline"].status_code == 400 and "'layers' must be" in out["bad_inline"].json()["error"]["message"]


class _BrokenStream(httpx.SyncByteStream):
    """An SSE answer whose connection goes silent after its first event."""

    def __iter__(self):
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": []}\n\n'
        raise httpx.ReadTimeout("timed out")


def test_timeouts_and_lost_connections_are_api_errors_never_raw_httpx_errors():
    """A slow answer is an APITimeoutError (an APIError, status 0, naming the timeout; not retried: the server
    may still be generating), also mid-stream and in the async client; a refused connection is retried, then an
    APIError; the error's ``param`` is kept; a URL without a scheme means http."""
    from vlmguard.client import APITimeoutError

    calls = []

    def slow(request):
        calls.append(request)
        raise httpx.ReadTimeout("timed out", request=request)

    with Client("http://svc", transport=httpx.MockTransport(slow), timeout=2.5, backoff_s=0.001) as c:
        with pytest.raises(APITimeoutError) as e:
            c.generate("x", max_new_tokens=2)
    assert len(calls) == 1 and e.value.status == 0 and "timeout of 2.5 s" in str(e.value)
    assert isinstance(e.value, APIError)

    def stream(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_BrokenStream())

    with Client("http://svc", transport=httpx.MockTransport(stream)) as c:
        it = c.chat_stream("x")
        assert next(it).id == "c"
        with pytest.raises(APITimeoutError, match="no answer from http://svc"):
            next(it)

    refused = []

    def down(request):
        refused.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with Client("http://svc", transport=httpx.MockTransport(down), max_retries=2, backoff_s=0.001) as c:
        with pytest.raises(APIError, match="cannot reach http://svc: ConnectError") as e:
            c.health()
    assert len(refused) == 3 and e.value.status == 0 and not isinstance(e.value, APITimeoutError)

    def bad(request):
        return httpx.Response(400, json={"error": {"message": "messages: Field required", "param": "messages",
                                                   "code": "invalid_request"}})

    with Client("http://svc", transport=httpx.MockTransport(bad)) as c:
        with pytest.raises(APIError) as e:
            c.chat(messages=[])
    assert e.value.param == "messages" and e.value.message == "messages: Field required"
    assert Client("127.0.0.1:8000").base_url == "http://127.0.0.1:8000"

    async def async_slow():
        async with AsyncClient("http://svc", transport=httpx.MockTransport(slow), timeout=1.0) as ac:
            await ac.chat("x")

    with pytest.raises(APITimeoutError, match=r"timeout of 1 s \(ReadTimeout\)"):
        asyncio.run(async_slow())


def test_api_errors_survive_pickling():
    """An APIError raised in a worker process (a process pool, a Ray task) comes back whole; it could not be
    unpickled (its args hold the formatted text, its constructor the fields)."""
    import pickle

    from vlmguard.client import APITimeoutError

    for e in (APIError(400, "bad budget", "invalid_request_error", "InvalidInput", "vlmguard.budget"),
              APITimeoutError(0, "no answer within 3 s")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
        assert (back.status, back.message, back.type, back.code, back.param) == (
            e.status, e.message, e.type, e.code, e.param)
