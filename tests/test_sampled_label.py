"""A result says whether its tokens were drawn: ``GenerationResult.decoding["sampled"]`` (each request's own setting),
and the chat API's ``vlmguard`` object names a plain decoder by how it chose (``greedy`` | ``sample``) with a
``sampled`` flag for every decoder. Before, a chat request with a temperature reported ``decoding: greedy`` for
tokens it had sampled."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmguard.images import image_to_data_url
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

IMAGE = random_image(3, (40, 32))
MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "describe the photo"},
    {"type": "image_url", "image_url": {"url": image_to_data_url(IMAGE)}}]}]


def test_each_result_of_a_mixed_batch_says_whether_it_was_sampled():
    specs = [GenerationSpec(max_new_tokens=3, decoding="vcd"),
             GenerationSpec(max_new_tokens=3, decoding="vcd", do_sample=True, temperature=0.8, seed=1),
             GenerationSpec(max_new_tokens=3, decoding="vcd", do_sample=True, temperature=0.0)]
    results = tiny_engine("llava").generate([Request("describe", [IMAGE])] * 3, specs)
    assert [r.decoding["sampled"] for r in results] == [False, True, False]
    assert all(r.decoding["name"] == "vcd" for r in results)


def _chat(body: dict) -> dict:
    from test_client import _inprocess_app

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_inprocess_app()), base_url="http://test") as c:
            r = await c.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": MESSAGES,
                                                            "max_tokens": 3, **body})
            assert r.status_code == 200, r.text
            return r.json()["vlmguard"]

    return asyncio.run(main())


@pytest.mark.parametrize("body, decoding, sampled", [
    ({}, "greedy", False),
    ({"temperature": 0}, "greedy", False),
    ({"temperature": 0.9, "seed": 2}, "sample", True),  # reported "greedy" before
    ({"temperature": 0.9, "seed": 2, "vlmguard": {"decoding": "greedy"}}, "sample", True),
    ({"temperature": 0, "vlmguard": {"decoding": "sample"}}, "greedy", False),  # no draw at temperature 0
    ({"temperature": 0.9, "seed": 2, "vlmguard": {"decoding": "m3id"}}, "m3id", True),
    ({"vlmguard": {"decoding": "m3id"}}, "m3id", False),
])
def test_chat_names_how_the_tokens_were_chosen(body, decoding, sampled):
    info = _chat(body)
    assert (info["decoding"], info["sampled"]) == (decoding, sampled)
