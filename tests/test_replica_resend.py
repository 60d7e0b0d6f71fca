"""The separate ingress (workers/ingress.py ``RayBackend``) sends a call again when the model replica answering it
was lost (Serve's handle raises ``ActorDiedError`` / ``ActorUnavailableError``, or a task error caused by one),
``ServiceConfig.replica_retries`` times, then a 503 ``replica_lost``; a stream also after part of it went out,
resumed where the answer sent again repeats it.
The handles here are fakes of a ``DeploymentHandle``'s surface over a worker in this process, the HTTP API the
real one."""
from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.ingress import RayBackend, replica_lost
from vlmguard.workers.metrics import ServiceMetrics

MODEL = "tiny-qwen"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is a cat?"}], "max_tokens": 12}


def _unavailable() -> Exception:
    return ActorUnavailableError("the replica cannot be reached", None)


class FakeStream:
    """What ``handle.options(stream=True).stream.remote`` returns: async-iterable, with ``cancel``."""

    def __init__(self, events):
        self.events, self.cancelled = events, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.events.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A model deployment's handle over ``worker``: its first ``lose`` calls fail with ``error()`` as Serve's do
    when the replica died (a stream after ``after`` of its events)."""

    def __init__(self, worker, lose: int = 0, after: int = 0, error=ActorDiedError, diverge_at: int | None = None):
        self.local = LocalBackend({MODEL: worker})
        self.lose, self.after, self.error = lose, after, error
        self.diverge_at = diverge_at  # (a resent stream's event that comes back with another token)
        self.calls, self.streams, self.seeds = 0, [], []  # (the seed of each stream's request)
        self.generate = SimpleNamespace(remote=lambda item: self._unless_lost(self.local.generate(MODEL, item)))
        self.tokens = SimpleNamespace(remote=lambda *a: self._unless_lost(self.local.tokens(MODEL, *a)))
        self.stream = SimpleNamespace(remote=self._stream)
        self.info = SimpleNamespace(remote=lambda: self.local.info(MODEL))

    def options(self, stream: bool = False) -> "FakeHandle":
        return self

    async def _unless_lost(self, answer):
        self.calls += 1
        if self.calls <= self.lose:
            answer.close()
            await asyncio.sleep(0.01)
            raise self.error()
        return await answer

    def _stream(self, item) -> FakeStream:
        self.calls += 1
        self.seeds.append(item.spec.seed)
        self.streams.append(FakeStream(self._events(item, lost=self.calls <= self.lose, resent=self.calls > 1)))
        return self.streams[-1]

    async def _events(self, item, lost: bool, resent: bool):
        async with contextlib.aclosing(self.local.stream(MODEL, item)) as events:
            k = 0
            async for ev in events:
                if lost and k == self.after:
                    raise self.error()
                yield {**ev, "token_id": -1} if resent and k == self.diverge_at else ev
                k += 1


def _ask(handle: FakeHandle, body: dict, retries: int = 1, route: str = "/v1/chat/completions"):
    """POST ``body`` to ``route`` over ``handle``: (response, the app's metrics)."""
    metrics = ServiceMetrics()
    config = ServiceConfig(models=[ModelConfig(name=MODEL, model="random:qwen2_vl")], api_key_env=None,
                           replica_retries=retries)
    app = create_api(RayBackend({MODEL: handle}, retries, metrics), config, metrics=metrics)

    async def main():  # (an error the app answers 500 is answered, not raised here)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://api") as http:
            return await http.post(route, json=body, timeout=120)

    return asyncio.run(main()), metrics.snapshot()


def _stream_text(r) -> tuple[str, list[dict]]:
    import json

    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    text = "".join(c["delta"].get("content") or "" for ev in events for c in ev.get("choices", []))
    return text, events


@pytest.fixture(scope="module")
def plain(qwen):
    """The chat answer, and the streamed one, with no replica lost."""
    r, m = _ask(FakeHandle(qwen), CHAT)
    s, _ = _ask(FakeHandle(qwen), {**CHAT, "stream": True})
    assert r.status_code == 200 and s.status_code == 200 and m["replica_resends"] == 0
    text = r.json()["choices"][0]["message"]["content"]
    assert text and _stream_text(s)[0] == text
    return text


@pytest.mark.parametrize("error", [ActorDiedError, _unavailable])
def test_a_lost_replica_answer_is_sent_again(qwen, plain, error):
    handle = FakeHandle(qwen, lose=1, error=error)
    r, metrics = _ask(handle, CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain
    assert handle.calls == 2 and metrics["replica_resends"] == 1 and metrics["results"] == 1


def test_retries_spent_is_a_503_replica_lost(qwen):
    handle = FakeHandle(qwen, lose=3)
    r, metrics = _ask(handle, CHAT, retries=2)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    err = r.json()["error"]
    assert err["code"] == "replica_lost" and "'tiny-qwen'" in err["message"] and "3 tries" in err["message"]
    assert "ActorDiedError" in err["message"] and handle.calls == 3 and metrics["replica_resends"] == 2

    handle = FakeHandle(qwen, lose=1)
    r, metrics = _ask(handle, CHAT, retries=0)  # off: failed at once
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_lost" and handle.calls == 1
    assert metrics["replica_resends"] == 0


def test_a_stream_is_sent_again_before_it_started(qwen, plain):
    handle = FakeHandle(qwen, lose=1, after=0, diverge_at=0)  # lost before its first event: nothing to check
    r, metrics = _ask(handle, {**CHAT, "stream": True})
    text, events = _stream_text(r)
    assert r.status_code == 200 and text == plain and not any("error" in ev for ev in events)
    assert handle.calls == 2 and metrics["replica_resends"] == 1
    assert all(s.cancelled for s in handle.streams)  # (each handle's stream let go)


def test_a_started_stream_is_resumed_where_its_answer_repeats(qwen, plain):
    """Greedy: sent again, the tokens already sent are checked and skipped; the client sees one stream, each
    token once."""
    handle = FakeHandle(qwen, lose=1, after=3)
    r, metrics = _ask(handle, {**CHAT, "stream": True})
    text, events = _stream_text(r)
    assert r.status_code == 200 and text == plain and not any("error" in ev for ev in events)
    assert handle.calls == 2 and metrics["replica_resends"] == 1 and metrics["results"] == 1
    assert sum(1 for ev in events for c in ev.get("choices", []) if c.get("finish_reason")) == 1

    # sampled with a seed: the same draws again
    seeded = {**CHAT, "stream": True, "temperature": 1.0, "seed": 7}
    whole, _ = _ask(FakeHandle(qwen), seeded)
    r, metrics = _ask(FakeHandle(qwen, lose=1, after=3), seeded)
    assert _stream_text(r)[0] == _stream_text(whole)[0] and metrics["replica_resends"] == 1


def test_a_sampled_stream_without_a_seed_is_resumed_with_the_seed_it_was_given(qwen):
    """The ingress gives a sampled request without a seed one of its own, so that, sent again, it draws the same
    tokens; each try is sent with it, each request (each choice) with its own."""
    sampled = {**CHAT, "stream": True, "temperature": 1.0}
    handle = FakeHandle(qwen, lose=1, after=3)
    r, metrics = _ask(handle, sampled)
    text, events = _stream_text(r)
    assert r.status_code == 200 and not any("error" in ev for ev in events) and metrics["replica_resends"] == 1
    assert sum(1 for ev in events for c in ev.get("choices", []) if c.get("finish_reason")) == 1
    assert handle.calls == 2 and handle.seeds[0] == handle.seeds[1] is not None
    whole, _ = _ask(FakeHandle(qwen), {**sampled, "seed": handle.seeds[0]})
    assert text == _stream_text(whole)[0] != ""

    handle = FakeHandle(qwen)
    r, _ = _ask(handle, {**sampled, "n": 2})
    assert r.status_code == 200 and len(handle.seeds) == 2 and None not in handle.seeds
    assert handle.seeds[0] != handle.seeds[1]
    handle = FakeHandle(qwen)  # greedy: left without one
    _ask(handle, {**CHAT, "stream": True})
    assert handle.seeds == [None]


@pytest.mark.parametrize("case", ["diverged", "lost twice"])
def test_a_started_stream_that_cannot_resume_ends_with_an_error(qwen, plain, case):
    handle = FakeHandle(qwen, lose=2 if case == "lost twice" else 1, after=3,
                        diverge_at=1 if case == "diverged" else None)
    r, metrics = _ask(handle, {**CHAT, "stream": True})
    text, events = _stream_text(r)
    pieces = [c["delta"]["content"] for ev in events for c in ev.get("choices", []) if c["delta"].get("content")]
    assert r.status_code == 200 and len(pieces) <= 3 and r.text.rstrip().endswith("data: [DONE]")
    assert plain.startswith(text) and text != plain  # (the first 3 tokens, once)
    message = events[-1]["error"]["message"]
    assert handle.calls == 2 and metrics["replica_resends"] == 1
    if case == "diverged":  # the resent answer's second token differs from the one sent: not sent on
        assert "ResumeDiverged" in message and "lost after 3 tokens" in message and "differed at token 1" in message
    else:  # lost again, its one retry spent: the stream ends there
        assert "ActorDiedError" in message


def test_other_errors_are_not_sent_again(qwen):
    handle = FakeHandle(qwen, lose=1, error=lambda: RuntimeError("the request's own failure"))
    r, metrics = _ask(handle, CHAT)
    assert r.status_code == 500 and "the request's own failure" in r.json()["error"]["message"]
    assert handle.calls == 1 and metrics["replica_resends"] == 0


def test_replica_lost_reads_task_errors_by_their_cause():
    assert replica_lost(ActorDiedError()) and replica_lost(_unavailable())
    assert replica_lost(RayTaskError("generate", "traceback", ActorDiedError()))
    assert not replica_lost(RayTaskError("generate", "traceback", ValueError("bad")))
    assert not replica_lost(RuntimeError("x"))


def test_replica_retries_setting_is_checked():
    assert ServiceConfig().replica_retries == 1
    for bad in (-1, 6):
        with pytest.raises(ValidationError, match="replica_retries"):
            ServiceConfig(replica_retries=bad)


def test_token_calls_are_sent_again_too(qwen):
    """``/tokenize`` (and the Responses API's token counts) call the replica too: resent, then a 503."""
    body = {"model": MODEL, "prompt": "What is a cat?"}
    whole, _ = _ask(FakeHandle(qwen), body, route="/tokenize")
    handle = FakeHandle(qwen, lose=1)
    r, metrics = _ask(handle, body, route="/tokenize")
    assert r.status_code == 200 and r.json() == whole.json() and whole.json()["tokens"]
    assert handle.calls == 2 and metrics["replica_resends"] == 1
    r, _ = _ask(FakeHandle(qwen, lose=2), body, route="/tokenize")
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_lost" and r.headers["Retry-After"] == "1"
