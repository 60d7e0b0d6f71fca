"""OpenAI's ``n`` (several choices of one chat request): choice k is the request with seed ``seed + k``; usage
counts the prompt once and every choice's tokens; streamed chunks carry each choice's index and add up to the
non-streamed choices; a choice that fails fails the request."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image

MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "describe the photo"},
    {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(1, (40, 32)))}}]}]


def _scenario(fn):
    import openai
    from test_client import _inprocess_app

    app = _inprocess_app()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await fn(openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http,
                                               max_retries=0))

    return asyncio.run(main())


def test_n_choices_are_the_request_with_consecutive_seeds_streamed_and_not():
    kw = dict(model="tiny-llava", messages=MESSAGES, max_tokens=6, temperature=0.9)

    async def fn(client):
        many = await client.chat.completions.create(n=3, seed=5, logprobs=True, **kw)
        singles = [await client.chat.completions.create(seed=5 + k, **kw) for k in range(3)]
        stream = await client.chat.completions.create(n=3, seed=5, stream=True, stream_options={"include_usage": True},
                                                      **kw)
        chunks = [c async for c in stream]
        greedy = await client.chat.completions.create(n=2, model="tiny-llava", messages=MESSAGES, max_tokens=5)
        return many, singles, chunks, greedy

    many, singles, chunks, greedy = _scenario(fn)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in many.choices}) > 1  # sampled with their own seeds
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert [len(c.logprobs.content) for c in many.choices] == [s.usage.completion_tokens for s in singles]
    streamed = {k: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
                for k in range(3)}
    assert [streamed[k].strip() for k in range(3)] == [c.message.content for c in many.choices]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == many.usage.completion_tokens and not chunks[-1].choices
    assert greedy.choices[0].message.content == greedy.choices[1].message.content  # greedy choices are alike


def test_a_request_whose_choices_fail_gets_one_error():
    import openai

    long = "x " * 600  # over the test model's context

    async def fn(client):
        with pytest.raises(openai.BadRequestError, match="context"):
            await client.chat.completions.create(model="tiny-llava", n=3, max_tokens=4,
                                                 messages=[{"role": "user", "content": long}])
        with pytest.raises(openai.BadRequestError, match="context"):
            await client.chat.completions.create(model="tiny-llava", n=3, max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": long}])
        with pytest.raises(openai.BadRequestError, match="at most 16 choices"):
            await client.chat.completions.create(model="tiny-llava", n=17, messages=MESSAGES)
        return True

    assert _scenario(fn)


def test_more_choices_than_a_replica_admits_is_a_400_not_a_503_for_ever():
    from vlmguard.testing import tiny_engine
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:llava", name="tiny-llava", engine=tiny_engine("llava"))
    cfg = ServiceConfig(models=[ModelConfig(name="tiny-llava", model="random:llava", max_ongoing_requests=2,
                                            max_queued_requests=0, batching=BatchingConfig(enabled=False))],
                        api_key_env=None)
    app = create_api(LocalBackend({"tiny-llava": worker}), cfg)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"model": "tiny-llava", "messages": MESSAGES, "max_tokens": 2}
            return [await http.post("/v1/chat/completions", json={**body, "n": n}) for n in (2, 3)]

    ok, refused = asyncio.run(main())
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
    assert "admits at most 2 generations at once" in refused.json()["error"]["message"]
