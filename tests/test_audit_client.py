"""The Python client against servers that misbehave: Retry-After values that are negative, NaN or HTTP dates; a
2xx answer cut mid-body (never retried: the work may be done); streams that end before ``[DONE]`` or carry
garbage; 2xx bodies that are not JSON or not the schema, and redirects; a single image or a bad ``images``
argument. Each gives a clear :class:`APIError` / ``InvalidInput``, never a raw ValueError, JSONDecodeError,
pydantic ValidationError or AttributeError."""
from __future__ import annotations

import asyncio
import json
import time
from email.utils import formatdate

import httpx
import pytest
from PIL import Image

from vlmguard.client import APIError, AsyncClient, Client
from vlmguard.errors import InvalidInput
from vlmguard.testing import random_image

CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hé"}}]}


def _sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def _stream_answer(body: bytes):
    return lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def test_retry_after_negative_nan_and_http_dates_never_crash_and_dates_are_honoured(monkeypatch):
    slept = []
    monkeypatch.setattr("vlmguard.client.time.sleep", slept.append)
    for value in ("-5", "nan", formatdate(time.time() + 3, usegmt=True), "Wed, 21 Oct 2015 07:28:00 GMT"):
        calls = []

        def busy(request, value=value):
            calls.append(request)
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers={"Retry-After": value})

        slept.clear()
        with Client("http://svc", transport=httpx.MockTransport(busy), max_retries=2, backoff_s=0.001) as c:
            with pytest.raises(APIError) as e:
                c.health()
        assert e.value.status == 503 and len(calls) == 3, value
        assert len(slept) == 2 and all(0 <= s <= 30 for s in slept), (value, slept)
        if value.endswith("GMT") and "2015" not in value:  # a date 3 s ahead: about 3 s, not the 1 ms backoff
            assert all(1.5 < s <= 3.0 for s in slept), slept
        if "2015" in value or value == "-5":  # already past: at once
            assert slept == [0.0, 0.0], (value, slept)


class _CutBody(httpx.SyncByteStream):
    def __iter__(self):
        yield b'{"id": "gen-1", "model": '
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_a_2xx_answer_cut_mid_body_is_not_retried():
    """The server took the request and began answering: a retry could generate twice."""
    calls = []

    def cut(request):
        calls.append(request)
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=_CutBody())

    with Client("http://svc", transport=httpx.MockTransport(cut), max_retries=3, backoff_s=0.001) as c:
        with pytest.raises(APIError, match="lost mid-answer") as e:
            c.generate("Is there a dog?", max_new_tokens=4)
    assert len(calls) == 1 and e.value.status == 0


def test_streams_without_done_or_with_garbage_raise_api_errors():
    ok = json.dumps(CHUNK, ensure_ascii=False)
    with Client("http://svc", transport=httpx.MockTransport(_stream_answer(_sse(ok)))) as c:
        it = c.chat_stream("x")
        assert next(it).choices[0].delta.content == "hé"
        with pytest.raises(APIError, match=r"ended before its end marker") as e:
            next(it)
    assert e.value.status == 200

    async def async_cut():
        async with AsyncClient("http://svc", transport=httpx.MockTransport(_stream_answer(_sse(ok)))) as ac:
            return [ch async for ch in ac.chat_stream("x")]

    with pytest.raises(APIError, match=r"ended before its end marker"):
        asyncio.run(async_cut())

    for body, match in ((_sse(ok, '{"error": "boom"}'), "boom"), (_sse("hello", "[DONE]"), "not JSON"),
                        (_sse('{"id": "c"}', "[DONE]"), "not a valid ChatCompletionChunk")):
        with Client("http://svc", transport=httpx.MockTransport(_stream_answer(body))) as c:
            with pytest.raises(APIError, match=match):
                list(c.chat_stream("x"))

    # a stream that begins with a byte-order mark keeps its first event
    with Client("http://svc", transport=httpx.MockTransport(_stream_answer(b"\xef\xbb\xbf" + _sse(ok, "[DONE]")))) as c:
        assert [ch.choices[0].delta.content for ch in c.chat_stream("x")] == ["hé"]


def test_2xx_answers_that_are_not_json_or_not_the_schema_and_redirects_are_api_errors():
    html = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    answers = {"html": httpx.Response(200, text=html, headers={"content-type": "text/html"}),
               "fields": httpx.Response(200, json={"id": "x"}),
               "redirect": httpx.Response(302, headers={"location": "https://svc/"})}
    for key, answer in answers.items():
        with Client("http://svc", transport=httpx.MockTransport(lambda request, a=answer: a), max_retries=0) as c:
            for call in (lambda: c.chat("x"), lambda: c.generate("x"), c.models):
                with pytest.raises(APIError) as e:
                    call()
                assert e.value.status == (302 if key == "redirect" else 200), key
                assert {"html": "not JSON", "fields": "not a valid", "redirect": "https://svc/"}[key] in e.value.message


def test_a_single_image_is_taken_and_bad_images_fail_before_any_request(tmp_path):
    calls = []

    def handler(request):
        calls.append(json.loads(request.content))
        return httpx.Response(400, json={"error": {"message": "stop"}})

    path = tmp_path / "a.png"
    random_image(0, (8, 8)).save(path)
    with Client("http://svc", transport=httpx.MockTransport(handler), max_retries=0) as c:
        for single in (str(path), random_image(1, (8, 8)), path.read_bytes()):
            with pytest.raises(APIError):
                c.generate("x", images=single)
            assert len(calls[-1]["images"]) == 1 and calls[-1]["images"][0].startswith("data:image/")
        with pytest.raises(APIError):
            c.chat("x", images=None)
        n = len(calls)
        with pytest.raises(InvalidInput, match="images must be a list"):
            c.chat("x", images=5)
        with pytest.raises(InvalidInput, match="cannot encode"):
            c.generate("x", images=[Image.new("RGB", (0, 0))])
        assert len(calls) == n
