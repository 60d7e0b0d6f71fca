"""Python client for the vlmguard HTTP API: sync :class:`Client` and async :class:`AsyncClient`.

    from vlmguard.client import Client
    c = Client("http://127.0.0.1:8000", api_key=None)
    r = c.generate("Is there a dog?", images=["photo.png"], pruning="fastv", budget=64, max_new_tokens=16)
    r.text, r.visual_tokens_kept, r.timings.prefill_s
    reply = c.chat("Describe the image.", images=[pil_image], decoding="vcd", max_tokens=64)
    for chunk in c.chat_stream("Describe the image.", images=[pil_image]): print(chunk.choices[0].delta.content)

Images may be PIL images, file paths, raw bytes, or data/http(s) URL strings. Results are the typed
pydantic models of :mod:`vlmguard.api_schema`. 429/503 answers (and dropped connections) are retried with
exponential backoff (honouring ``Retry-After``); other 4xx/5xx raise :class:`APIError`, a server that cannot be
reached raises ``APIError`` with ``status`` 0, and no answer within ``timeout`` seconds :class:`APITimeoutError`.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import httpx
from PIL import Image

from vlmguard.api_schema import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    GenerateResponse,
    GenerateStreamEvent,
    ModelList,
)
from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.spec import GenerationSpec

RETRY_STATUS = {429, 503}
# transport failures retried like a 503: nothing was answered (a refused or timed-out connection, a dropped one)
RETRY_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)
SPEC_FIELDS = set(GenerationSpec.model_fields)
OPTION_FIELDS = {"pruning", "budget", "pruning_params", "decoding", "decoding_params", "params", "do_sample",
                 "top_k", "diagnostics"}


class APIError(VlmguardError):
    """The server answered an error: ``status`` (HTTP), ``message``, ``type``, ``code`` and ``param`` from its
    body; ``status`` 0: no answer (the server cannot be reached, or see :class:`APITimeoutError`)."""

    def __init__(self, status: int, message: str, type_: str | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


class APITimeoutError(APIError):
    """No answer within the client's ``timeout`` (``status`` 0); not retried, as the server may still be
    generating: pass a larger ``timeout``."""


def _transport_error(base_url: str, timeout: float, e: httpx.HTTPError) -> APIError:
    """An httpx failure (no HTTP answer) -> an APIError with status 0 that says what happened."""
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return APITimeoutError(0, f"no answer from {base_url} within the client's timeout of {timeout:g} s "
                                  f"({type(e).__name__}); pass a larger timeout=")
    detail = f": {e}" if str(e) else ""
    return APIError(0, f"cannot reach {base_url}: {type(e).__name__}{detail}")


def image_to_url(image: Image.Image | str | Path | bytes) -> str:
    """A PIL image, a path, raw bytes or a URL string -> a URL the API accepts."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise InvalidInput(f"image file not found: {p}")
        data = p.read_bytes()
        return f"data:image/{(p.suffix.lstrip('.') or 'png').lower()};base64," + base64.b64encode(data).decode()
    if isinstance(image, (bytes, bytearray)):
        return "data:image/png;base64," + base64.b64encode(bytes(image)).decode()
    if isinstance(image, Image.Image):
        from vlmguard.images import image_to_data_url, to_rgb

        return image_to_data_url(to_rgb(image) if image.mode not in ("RGB", "L") else image)
    raise InvalidInput(f"unsupported image type {type(image).__name__}")


def _error_from(resp: httpx.Response) -> APIError:
    try:
        err = resp.json().get("error") or {}
        return APIError(resp.status_code, str(err.get("message") or resp.text), err.get("type"), err.get("code"),
                        err.get("param"))
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return APIError(resp.status_code, resp.text[:500] or resp.reason_phrase)


def _retry_delay(attempt: int, backoff_s: float, resp: httpx.Response | None) -> float:
    if resp is not None:
        after = resp.headers.get("retry-after")
        if after:
            try:
                return min(float(after), 30.0)
            except ValueError:
                pass
    return min(backoff_s * (2 ** attempt), 30.0) * (0.5 + random.random() / 2)


def _messages(prompt: str | None, images: Sequence[Any], messages: list[dict[str, Any]] | None,
              system: str | None) -> list[dict[str, Any]]:
    if messages is not None:
        if prompt is not None or images:
            raise InvalidInput("pass either messages or prompt/images, not both")
        return messages
    if prompt is None:
        raise InvalidInput("chat() needs a prompt or messages")
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    content += [{"type": "image_url", "image_url": {"url": image_to_url(im)}} for im in images]
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": content}]


def _chat_body(prompt, images, messages, system, model, stream, kwargs) -> dict[str, Any]:
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_FIELDS}
    body: dict[str, Any] = {"messages": _messages(prompt, images, messages, system), "stream": stream, **kwargs}
    if model:
        body["model"] = model
    if options:
        body["vlmguard"] = {**body.get("vlmguard", {}), **options}
    return body


def _generate_body(prompt, images, model, system, stream, spec) -> dict[str, Any]:
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise InvalidInput(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"prompt": prompt, "images": [image_to_url(i) for i in images], "spec": spec,
                            "stream": stream}
    if model:
        body["model"] = model
    if system:
        body["system"] = system
    return body


_DONE = object()


def _sse_event(line: str) -> Any:
    """One SSE line -> its JSON payload, ``_DONE`` at the end marker, or None for other lines."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    obj = json.loads(data)
    if "error" in obj:
        err = obj["error"]
        raise APIError(200, err.get("message", "stream failed"), err.get("type"), err.get("code"))
    return obj


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        obj = _sse_event(line)
        if obj is _DONE:
            return
        if obj is not None:
            yield obj


class _Base:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0, max_retries: int = 4,
                 backoff_s: float = 0.5):
        if "://" not in base_url:  # "127.0.0.1:8000", as `vlmguard job --address` takes it
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s


class Client(_Base):
    """Synchronous client (thread-safe; reuses one connection pool)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0, max_retries: int = 4,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries, backoff_s=backoff_s)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transport with retries ------------------------------------------------------------------
    def _send(self, method: str, path: str, body: dict[str, Any] | None = None, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            resp = None
            try:
                req = self._http.build_request(method, path, json=body)
                resp = self._http.send(req, stream=stream)
                if resp.status_code in RETRY_STATUS and attempt < self.max_retries:
                    resp.close()
                    time.sleep(_retry_delay(attempt, self.backoff_s, resp))
                    attempt += 1
                    continue
                if resp.status_code >= 400:
                    if stream:
                        resp.read()
                    raise _error_from(resp)
                return resp
            except RETRY_TRANSPORT as e:
                if attempt >= self.max_retries:
                    raise _transport_error(self.base_url, self.timeout, e) from None
                time.sleep(_retry_delay(attempt, self.backoff_s, None))
                attempt += 1
            except httpx.HTTPError as e:  # a timeout waiting for the answer, ...
                raise _transport_error(self.base_url, self.timeout, e) from None

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._send(method, path, body).json()

    # ---- API -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def models(self) -> ModelList:
        return ModelList.model_validate(self._json("GET", "/v1/models"))

    def metrics(self) -> dict[str, Any]:
        return self._json("GET", "/metrics?format=json")

    def generate(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                 system: str | None = None, **spec: Any) -> GenerateResponse:
        """Native generation: ``spec`` takes GenerationSpec fields (pruning, budget, decoding, max_new_tokens...)."""
        body = _generate_body(prompt, images, model, system, False, spec)
        return GenerateResponse.model_validate(self._json("POST", "/v1/generate", body))

    def generate_stream(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                        system: str | None = None, **spec: Any) -> Iterator[GenerateStreamEvent]:
        body = _generate_body(prompt, images, model, system, True, spec)
        resp = self._send("POST", "/v1/generate", body, stream=True)
        try:
            for obj in _sse_data(resp.iter_lines()):
                yield GenerateStreamEvent.model_validate(obj)
        except httpx.HTTPError as e:  # the server went away or fell silent mid-stream
            raise _transport_error(self.base_url, self.timeout, e) from None
        finally:
            resp.close()

    def chat(self, prompt: str | None = None, images: Sequence[Any] = (), *, messages: list[dict[str, Any]] | None = None,
             model: str | None = None, system: str | None = None, **kwargs: Any) -> ChatCompletionResponse:
        """OpenAI-style chat; ``kwargs``: max_tokens, temperature, top_p, seed, stop, and vlmguard options
        (pruning, budget, decoding, decoding_params/params, ...)."""
        body = _chat_body(prompt, images, messages, system, model, False, dict(kwargs))
        return ChatCompletionResponse.model_validate(self._json("POST", "/v1/chat/completions", body))

    def chat_stream(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                    messages: list[dict[str, Any]] | None = None, model: str | None = None, system: str | None = None,
                    **kwargs: Any) -> Iterator[ChatCompletionChunk]:
        body = _chat_body(prompt, images, messages, system, model, True, dict(kwargs))
        resp = self._send("POST", "/v1/chat/completions", body, stream=True)
        try:
            for obj in _sse_data(resp.iter_lines()):
                yield ChatCompletionChunk.model_validate(obj)
        except httpx.HTTPError as e:
            raise _transport_error(self.base_url, self.timeout, e) from None
        finally:
            resp.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as :class:`Client` (``await``; streams are async iterators)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0, max_retries: int = 4,
                 backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries, backoff_s=backoff_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
                    stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                req = self._http.build_request(method, path, json=body)
                resp = await self._http.send(req, stream=stream)
                if resp.status_code in RETRY_STATUS and attempt < self.max_retries:
                    await resp.aclose()
                    await asyncio.sleep(_retry_delay(attempt, self.backoff_s, resp))
                    attempt += 1
                    continue
                if resp.status_code >= 400:
                    if stream:
                        await resp.aread()
                    raise _error_from(resp)
                return resp
            except RETRY_TRANSPORT as e:
                if attempt >= self.max_retries:
                    raise _transport_error(self.base_url, self.timeout, e) from None
                await asyncio.sleep(_retry_delay(attempt, self.backoff_s, None))
                attempt += 1
            except httpx.HTTPError as e:
                raise _transport_error(self.base_url, self.timeout, e) from None

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return (await self._send(method, path, body)).json()

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/health")

    async def models(self) -> ModelList:
        return ModelList.model_validate(await self._json("GET", "/v1/models"))

    async def metrics(self) -> dict[str, Any]:
        return await self._json("GET", "/metrics?format=json")

    async def generate(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                       system: str | None = None, **spec: Any) -> GenerateResponse:
        body = _generate_body(prompt, images, model, system, False, spec)
        return GenerateResponse.model_validate(await self._json("POST", "/v1/generate", body))

    async def generate_stream(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                              system: str | None = None, **spec: Any) -> AsyncIterator[GenerateStreamEvent]:
        body = _generate_body(prompt, images, model, system, True, spec)
        resp = await self._send("POST", "/v1/generate", body, stream=True)
        try:
            async for obj in _asse_data(resp):
                yield GenerateStreamEvent.model_validate(obj)
        except httpx.HTTPError as e:
            raise _transport_error(self.base_url, self.timeout, e) from None
        finally:
            await resp.aclose()

    async def chat(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                   messages: list[dict[str, Any]] | None = None, model: str | None = None, system: str | None = None,
                   **kwargs: Any) -> ChatCompletionResponse:
        body = _chat_body(prompt, images, messages, system, model, False, dict(kwargs))
        return ChatCompletionResponse.model_validate(await self._json("POST", "/v1/chat/completions", body))

    async def chat_stream(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                          messages: list[dict[str, Any]] | None = None, model: str | None = None,
                          system: str | None = None, **kwargs: Any) -> AsyncIterator[ChatCompletionChunk]:
        body = _chat_body(prompt, images, messages, system, model, True, dict(kwargs))
        resp = await self._send("POST", "/v1/chat/completions", body, stream=True)
        try:
            async for obj in _asse_data(resp):
                yield ChatCompletionChunk.model_validate(obj)
        except httpx.HTTPError as e:
            raise _transport_error(self.base_url, self.timeout, e) from None
        finally:
            await resp.aclose()


async def _asse_data(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        obj = _sse_event(line)
        if obj is _DONE:
            return
        if obj is not None:
            yield obj


__all__ = ["Client", "AsyncClient", "APIError", "APITimeoutError", "image_to_url"]
