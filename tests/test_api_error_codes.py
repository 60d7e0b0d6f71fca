"""A prompt over the model's context is refused with OpenAI's own error code, ``context_length_exceeded`` (what
OpenAI-compatible clients act on, trimming the history), on the chat and the native API, streamed or not; other
errors keep vlmguard's error class as their code. Before, the code was ``ContextTooLong``."""
from __future__ import annotations

import asyncio

import httpx
import pytest

LONG = "x " * 600  # over the test model's context


def _post(path: str, body: dict) -> httpx.Response:
    from test_client import _inprocess_app

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_inprocess_app()), base_url="http://t") as c:
            return await c.post(path, json=body)

    return asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_context_has_openais_code(stream):
    chat = _post("/v1/chat/completions", {"model": "tiny-llava", "max_tokens": 4, "stream": stream,
                                          "messages": [{"role": "user", "content": LONG}]})
    native = _post("/v1/generate", {"prompt": LONG, "stream": stream, "spec": {"max_new_tokens": 4}})
    for r in (chat, native):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and "context" in error["message"]


def test_other_errors_keep_their_class_as_code():
    r = _post("/v1/chat/completions", {"model": "tiny-llava", "max_tokens": 4, "vlmguard": {"decoding": "nope"},
                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "UnknownMethod"
