"""Python client for the vlmguard HTTP API: sync :class:`Client` and async :class:`AsyncClient`.

    from vlmguard.client import Client
    c = Client("http://127.0.0.1:8000", api_key=None)
    r = c.generate("Is there a dog?", images=["photo.png"], pruning="fastv", budget=64, max_new_tokens=16)
    r.text, r.visual_tokens_kept, r.timings.prefill_s
    reply = c.chat("Describe the image.", images=[pil_image], decoding="vcd", max_tokens=64)
    for chunk in c.chat_stream("Describe the image.", images=[pil_image]): print(chunk.choices[0].delta.content)
    yes = c.tokenize("Yes", add_special_tokens=False).tokens[0]  # a token id, e.g. for logit_bias
    c.chat("Is there a dog?", images=[pil_image], logit_bias={yes: -100})
    c.tokenize_chat("Is there a dog?", images=[pil_image]).count  # the prompt tokens that chat costs
    c.chat("List the objects.", images=[pil_image], response_format={"type": "json_object"})  # structured output
    c.complete("A photo of", max_tokens=8, logprobs=2).choices[0].text  # a text completion (no chat template)

Images may be PIL images, file paths, raw bytes, or data/http(s) URL strings. Results are the typed
pydantic models of :mod:`vlmguard.api_schema`. 429/503 answers (and dropped connections) are retried with
exponential backoff (honouring ``Retry-After``, seconds or an HTTP date, at most 30 s); other 3xx/4xx/5xx raise
:class:`APIError`, a server that cannot be reached raises ``APIError`` with ``status`` 0 (a connection not
accepted within ``connect_timeout`` seconds, default 10, counts as one), and no answer within ``timeout`` seconds
(``health``, ``models``, ``metrics``: :data:`STATUS_TIMEOUT_S`, 30) :class:`APITimeoutError`. An answer cut after
it began is not retried (the work may be done): ``APIError`` with ``status`` 0; a 2xx answer that is not JSON or
not the expected schema, a stream's error event, and a stream that ends before ``data: [DONE]`` raise ``APIError``
with ``status`` 200.
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import random
import time
from datetime import timezone
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence, Union

import httpx
from PIL import Image
from pydantic import BaseModel, ValidationError

from vlmguard.api_schema import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    GenerateResponse,
    GenerateStreamEvent,
    ModelList,
    TokenizeResponse,
    VlmguardOptions,
)
from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.spec import GenerationSpec

RETRY_STATUS = {429, 503}
# seconds to open a connection: a host that drops connection attempts (a firewall, a full listen queue) fails in
# this long, each retry included, rather than in ``timeout`` (minutes, sized for generation) times the attempts
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# seconds to wait for ``health()``, ``models()`` and ``metrics()`` (at most the client's ``timeout``): the server
# answers them without the engine, so a server that accepts connections and never answers fails in this long
STATUS_TIMEOUT_S = 30.0
# transport failures retried like a 503: nothing was answered (a refused or timed-out connection, a dropped one)
RETRY_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)
SPEC_FIELDS = set(GenerationSpec.model_fields)
OPTION_FIELDS = set(VlmguardOptions.model_fields)  # chat keyword arguments sent in the request's vlmguard object


class APIError(VlmguardError):
    """The server answered an error: ``status`` (HTTP), ``message``, ``type``, ``code`` and ``param`` from its
    body; ``status`` 0: no answer (the server cannot be reached, or see :class:`APITimeoutError`)."""

    def __init__(self, status: int, message: str, type_: str | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def __reduce__(self):  # pickled by its fields (a process pool, a Ray task): its args hold the formatted text
        return type(self), (self.status, self.message, self.type, self.code, self.param)


class APITimeoutError(APIError):
    """No answer within the client's ``timeout`` (``status`` 0); not retried, as the server may still be
    generating: pass a larger ``timeout``."""


def _transport_error(base_url: str, timeout: float, e: httpx.HTTPError, answering: bool = False) -> APIError:
    """An httpx failure (no HTTP answer; ``answering``: the answer was cut) -> an APIError with status 0 that says
    what happened."""
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return APITimeoutError(0, f"no answer from {base_url} within the client's timeout of {timeout:g} s "
                                  f"({type(e).__name__}); pass a larger timeout=")
    detail = f": {e}" if str(e) else ""
    if answering:  # not retried: the server took the request and may have done (some of) its work
        return APIError(0, f"the connection to {base_url} was lost mid-answer ({type(e).__name__}{detail}); "
                           f"not retried, as the server had taken the request")
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

        if 0 in image.size:  # Pillow < 12.2 raises SystemError ("tile cannot extend outside image") on saving it
            raise InvalidInput(f"cannot encode the {image.mode} image of size {image.size} as PNG: it is empty")
        try:
            return image_to_data_url(to_rgb(image) if image.mode not in ("RGB", "L") else image)
        except (OSError, ValueError) as e:  # an empty image, a mode PIL cannot convert (La, ...)
            raise InvalidInput(f"cannot encode the {image.mode} image of size {image.size} as PNG: {e}") from None
    raise InvalidInput(f"unsupported image type {type(image).__name__}")


def _image_list(images: Any) -> list[Any]:
    """``images``: a list of images; one image (a path, bytes, a URL, a PIL image) or None are taken too, rather
    than iterated over (a path's characters, an image's bytes)."""
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise InvalidInput(f"images must be a list of images, got {type(images).__name__}") from None


def _error_from(resp: httpx.Response) -> APIError:
    if resp.is_redirect:  # not followed: the API never redirects, a proxy in front of it does
        return APIError(resp.status_code, f"redirected to {resp.headers.get('location')} (not followed): "
                                          f"pass that address as the client's base_url")
    try:
        err = resp.json().get("error") or {}
        return APIError(resp.status_code, str(err.get("message") or resp.text), err.get("type"), err.get("code"),
                        err.get("param"))
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return APIError(resp.status_code, resp.text[:500] or resp.reason_phrase)


def _json_of(resp: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; one that is not JSON (a proxy's HTML page, ...) -> APIError."""
    try:
        return resp.json()
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        kind = resp.headers.get("content-type", "no content type")
        raise APIError(resp.status_code, f"the answer is not JSON ({kind}): {resp.text[:200]!r}") from None


def _parse(model: type[BaseModel], data: Any) -> Any:
    """A 2xx answer (or stream event) -> ``model``; one that does not fit (missing fields, ...) -> APIError."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "answer"
        raise APIError(200, f"the answer is not a valid {model.__name__} ({e.error_count()} error(s); "
                            f"{where}: {first['msg']}): {str(data)[:200]}") from None


def _retry_delay(attempt: int, backoff_s: float, resp: httpx.Response | None) -> float:
    if resp is not None:
        after = (resp.headers.get("retry-after") or "").strip()
        if after:
            try:
                delay = float(after)
            except ValueError:  # an HTTP date
                try:
                    when = email.utils.parsedate_to_datetime(after)
                    delay = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp() - time.time()
                except (TypeError, ValueError, IndexError, OverflowError):
                    delay = math.nan
            if not math.isnan(delay):  # negative (a date in the past) -> at once; huge -> the cap
                return min(max(delay, 0.0), 30.0)
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
    content += [{"type": "image_url", "image_url": {"url": image_to_url(im)}} for im in _image_list(images)]
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": content}]


def _chat_body(prompt, images, messages, system, model, stream, kwargs) -> dict[str, Any]:
    return _openai_body({"messages": _messages(prompt, images, messages, system)}, model, stream, kwargs)


# a text completion's prompt: a text, one prompt of token ids, or a list of texts or of token-id prompts
CompletionPrompt = Union[str, list[str], list[int], list[list[int]]]


def _completion_body(prompt, model, stream, kwargs) -> dict[str, Any]:
    return _openai_body({"prompt": prompt}, model, stream, kwargs)


def _openai_body(body: dict[str, Any], model: str | None, stream: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A chat or text completion's ``body``: OpenAI's fields (``kwargs``) as given, vlmguard's options among them
    (pruning, decoding...) in its ``vlmguard`` object."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_FIELDS}
    body = _with_model({**body, "stream": stream, **kwargs}, model)
    if options:
        body["vlmguard"] = {**body.get("vlmguard", {}), **options}
    return body


def _with_model(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """``body`` naming ``model`` where one is given (else the server's first model answers)."""
    return {**body, "model": model} if model else body


def _tokenize_body(text: str, model: str | None, add_special_tokens: bool, return_token_strs: bool
                   ) -> dict[str, Any]:
    return _with_model({"prompt": text, "add_special_tokens": add_special_tokens,
                        "return_token_strs": return_token_strs}, model)


def _tokenize_chat_body(prompt, images, messages, system, model, return_token_strs, tools=None,
                        tool_choice=None) -> dict[str, Any]:
    body = {"messages": _messages(prompt, images, messages, system), "return_token_strs": return_token_strs}
    body.update({k: v for k, v in (("tools", tools), ("tool_choice", tool_choice)) if v is not None})
    return _with_model(body, model)


def _detokenize_body(tokens: Sequence[int], model: str | None) -> dict[str, Any]:
    return _with_model({"tokens": list(tokens)}, model)


def _generate_body(prompt, images, model, system, stream, spec) -> dict[str, Any]:
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise InvalidInput(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"prompt": prompt, "images": [image_to_url(i) for i in _image_list(images)], "spec": spec,
                            "stream": stream}
    if model:
        body["model"] = model
    if system:
        body["system"] = system
    return body


_DONE = object()


def _sse_event(line: str) -> Any:
    """One SSE line -> its JSON payload, ``_DONE`` at the end marker, or None for other lines."""
    line = line.lstrip("\ufeff")  # a byte-order mark the stream may start with
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        obj = json.loads(data)
    except ValueError:
        raise APIError(200, f"malformed stream event (not JSON; a cut or garbled stream?): {data[:200]!r}") from None
    if isinstance(obj, dict) and "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        raise APIError(200, str(err.get("message") or "stream failed"), err.get("type"), err.get("code"),
                       err.get("param"))
    return obj


# a stream that ends without its "data: [DONE]" was cut (a proxy, a server that failed mid-answer): an error,
# never a silently short answer
_TRUNCATED = "the stream ended before its end marker (data: [DONE]): the answer is incomplete"


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        obj = _sse_event(line)
        if obj is _DONE:
            return
        if obj is not None:
            yield obj
    raise APIError(200, _TRUNCATED)


class _Base:
    _http_class: Any  # httpx.Client or httpx.AsyncClient: its connection pool, made once per client

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0, max_retries: int = 4,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S):
        if "://" not in base_url:  # "127.0.0.1:8000", as `vlmguard job submit --address` takes it
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._http = self._http_class(base_url=self.base_url, headers=self.headers, transport=transport,
                                      timeout=self._timeouts(timeout))

    def _timeouts(self, timeout: float) -> httpx.Timeout:
        """httpx's timeouts: ``timeout`` for each read, write and pool wait, at most ``connect_timeout`` to connect."""
        return httpx.Timeout(timeout, connect=min(self.connect_timeout, timeout))

    def _status_timeout(self, timeout: float | None) -> float:
        return min(self.timeout, STATUS_TIMEOUT_S) if timeout is None else timeout


class Client(_Base):
    """Synchronous client (thread-safe; reuses one connection pool)."""

    _http_class = httpx.Client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transport with retries ------------------------------------------------------------------
    def _send(self, method: str, path: str, body: dict[str, Any] | None = None, stream: bool = False,
              timeout: float | None = None) -> httpx.Response:
        """``timeout``: this request's own, instead of the client's."""
        wait = self.timeout if timeout is None else timeout
        attempt = 0
        while True:
            resp = None
            try:
                req = self._http.build_request(method, path, json=body, timeout=self._timeouts(wait))
                resp = self._http.send(req, stream=True)
                if not stream or not resp.is_success:
                    try:
                        resp.read()
                    except httpx.HTTPError as e:
                        resp.close()
                        if not resp.is_success:  # an error answer cut short: a dropped connection, as before
                            raise
                        # a 2xx answer cut short: not retried, as that could do the work twice
                        raise _transport_error(self.base_url, wait, e, answering=True) from None
                if resp.status_code in RETRY_STATUS and attempt < self.max_retries:
                    resp.close()
                    time.sleep(_retry_delay(attempt, self.backoff_s, resp))
                    attempt += 1
                    continue
                if not resp.is_success:  # 3xx (not followed) and 4xx/5xx
                    raise _error_from(resp)
                return resp
            except RETRY_TRANSPORT as e:
                if attempt >= self.max_retries:
                    raise _transport_error(self.base_url, wait, e) from None
                time.sleep(_retry_delay(attempt, self.backoff_s, None))
                attempt += 1
            except httpx.HTTPError as e:  # a timeout waiting for the answer, ...
                raise _transport_error(self.base_url, wait, e) from None

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        return _json_of(self._send(method, path, body, timeout=timeout))

    # ---- API -------------------------------------------------------------------------------------
    # health, models and metrics wait ``timeout`` seconds, default :data:`STATUS_TIMEOUT_S` (or the client's own
    # timeout if shorter)
    def health(self, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/health", timeout=self._status_timeout(timeout))

    def models(self, timeout: float | None = None) -> ModelList:
        return _parse(ModelList, self._json("GET", "/v1/models", timeout=self._status_timeout(timeout)))

    def metrics(self, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/metrics?format=json", timeout=self._status_timeout(timeout))

    def tokenize(self, text: str, *, model: str | None = None, add_special_tokens: bool = True,
                 return_token_strs: bool = False) -> TokenizeResponse:
        """``text``'s token ids under the model's tokenizer (the ids a ``logit_bias`` names)."""
        return _parse(TokenizeResponse, self._json("POST", "/tokenize", _tokenize_body(
            text, model, add_special_tokens, return_token_strs)))

    def tokenize_chat(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                      messages: list[dict[str, Any]] | None = None, model: str | None = None,
                      system: str | None = None, return_token_strs: bool = False,
                      tools: list[dict[str, Any]] | None = None, tool_choice: Any = None) -> TokenizeResponse:
        """The token ids ``chat`` with these arguments feeds the model (template, visual tokens, the block of the
        ``tools`` it offers): its prompt's count."""
        return _parse(TokenizeResponse, self._json("POST", "/tokenize", _tokenize_chat_body(
            prompt, images, messages, system, model, return_token_strs, tools, tool_choice)))

    def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return _parse(DetokenizeResponse, self._json("POST", "/detokenize", _detokenize_body(tokens, model))).prompt

    def generate(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                 system: str | None = None, **spec: Any) -> GenerateResponse:
        """Native generation: ``spec`` takes GenerationSpec fields (pruning, budget, decoding, max_new_tokens...)."""
        body = _generate_body(prompt, images, model, system, False, spec)
        return _parse(GenerateResponse, self._json("POST", "/v1/generate", body))

    def generate_stream(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                        system: str | None = None, **spec: Any) -> Iterator[GenerateStreamEvent]:
        yield from self._events("/v1/generate", _generate_body(prompt, images, model, system, True, spec),
                                GenerateStreamEvent)

    def chat(self, prompt: str | None = None, images: Sequence[Any] = (), *, messages: list[dict[str, Any]] | None = None,
             model: str | None = None, system: str | None = None, **kwargs: Any) -> ChatCompletionResponse:
        """OpenAI-style chat; ``kwargs``: max_tokens, temperature, top_p, seed, stop, and vlmguard options
        (pruning, budget, decoding, decoding_params/params, ...)."""
        body = _chat_body(prompt, images, messages, system, model, False, dict(kwargs))
        return _parse(ChatCompletionResponse, self._json("POST", "/v1/chat/completions", body))

    def chat_stream(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                    messages: list[dict[str, Any]] | None = None, model: str | None = None, system: str | None = None,
                    **kwargs: Any) -> Iterator[ChatCompletionChunk]:
        body = _chat_body(prompt, images, messages, system, model, True, dict(kwargs))
        yield from self._events("/v1/chat/completions", body, ChatCompletionChunk)

    def complete(self, prompt: CompletionPrompt, *, model: str | None = None, **kwargs: Any) -> CompletionResponse:
        """OpenAI's legacy text completion: ``prompt`` (a text, a list of token ids, or a list of either) continued as
        it is, no chat template, no image; ``kwargs``: max_tokens, n, echo, logprobs (with echo, the prompt's too),
        temperature, seed, stop... and vlmguard options."""
        body = _completion_body(prompt, model, False, dict(kwargs))
        return _parse(CompletionResponse, self._json("POST", "/v1/completions", body))

    def complete_stream(self, prompt: CompletionPrompt, *, model: str | None = None,
                        **kwargs: Any) -> Iterator[CompletionResponse]:
        yield from self._events("/v1/completions", _completion_body(prompt, model, True, dict(kwargs)),
                                CompletionResponse)

    def _events(self, path: str, body: dict[str, Any], model: type[BaseModel]) -> Iterator[Any]:
        """A streamed answer's events, parsed as ``model`` (the request is sent when the first is asked for)."""
        resp = self._send("POST", path, body, stream=True)
        try:
            for obj in _sse_data(resp.iter_lines()):
                yield _parse(model, obj)
        except httpx.HTTPError as e:  # the server went away or fell silent mid-stream
            raise _transport_error(self.base_url, self.timeout, e, answering=True) from None
        finally:
            resp.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as :class:`Client` (``await``; streams are async iterators)."""

    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
                    stream: bool = False, timeout: float | None = None) -> httpx.Response:
        wait = self.timeout if timeout is None else timeout
        attempt = 0
        while True:
            try:
                req = self._http.build_request(method, path, json=body, timeout=self._timeouts(wait))
                resp = await self._http.send(req, stream=True)
                if not stream or not resp.is_success:
                    try:
                        await resp.aread()
                    except httpx.HTTPError as e:
                        await resp.aclose()
                        if not resp.is_success:  # an error answer cut short: a dropped connection, as before
                            raise
                        # a 2xx answer cut short: not retried, as that could do the work twice
                        raise _transport_error(self.base_url, wait, e, answering=True) from None
                if resp.status_code in RETRY_STATUS and attempt < self.max_retries:
                    await resp.aclose()
                    await asyncio.sleep(_retry_delay(attempt, self.backoff_s, resp))
                    attempt += 1
                    continue
                if not resp.is_success:  # 3xx (not followed) and 4xx/5xx
                    raise _error_from(resp)
                return resp
            except RETRY_TRANSPORT as e:
                if attempt >= self.max_retries:
                    raise _transport_error(self.base_url, wait, e) from None
                await asyncio.sleep(_retry_delay(attempt, self.backoff_s, None))
                attempt += 1
            except httpx.HTTPError as e:
                raise _transport_error(self.base_url, wait, e) from None

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None,
                    timeout: float | None = None) -> Any:
        return _json_of(await self._send(method, path, body, timeout=timeout))

    async def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """Any endpoint's JSON answer to ``body`` (``/v1/responses``, say), with this client's retries; an error
        answer raises :class:`APIError` with its status and the fields of its body."""
        return await self._json("POST", path, body, timeout=timeout)

    async def health(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._json("GET", "/health", timeout=self._status_timeout(timeout))

    async def models(self, timeout: float | None = None) -> ModelList:
        return _parse(ModelList, await self._json("GET", "/v1/models", timeout=self._status_timeout(timeout)))

    async def metrics(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._json("GET", "/metrics?format=json", timeout=self._status_timeout(timeout))

    async def tokenize(self, text: str, *, model: str | None = None, add_special_tokens: bool = True,
                       return_token_strs: bool = False) -> TokenizeResponse:
        return _parse(TokenizeResponse, await self._json("POST", "/tokenize", _tokenize_body(
            text, model, add_special_tokens, return_token_strs)))

    async def tokenize_chat(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                            messages: list[dict[str, Any]] | None = None, model: str | None = None,
                            system: str | None = None, return_token_strs: bool = False,
                            tools: list[dict[str, Any]] | None = None, tool_choice: Any = None) -> TokenizeResponse:
        return _parse(TokenizeResponse, await self._json("POST", "/tokenize", _tokenize_chat_body(
            prompt, images, messages, system, model, return_token_strs, tools, tool_choice)))

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return _parse(DetokenizeResponse, await self._json("POST", "/detokenize",
                                                           _detokenize_body(tokens, model))).prompt

    async def generate(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                       system: str | None = None, **spec: Any) -> GenerateResponse:
        body = _generate_body(prompt, images, model, system, False, spec)
        return _parse(GenerateResponse, await self._json("POST", "/v1/generate", body))

    async def generate_stream(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                              system: str | None = None, **spec: Any) -> AsyncIterator[GenerateStreamEvent]:
        async for ev in self._events("/v1/generate", _generate_body(prompt, images, model, system, True, spec),
                                     GenerateStreamEvent):
            yield ev

    async def chat(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                   messages: list[dict[str, Any]] | None = None, model: str | None = None, system: str | None = None,
                   **kwargs: Any) -> ChatCompletionResponse:
        body = _chat_body(prompt, images, messages, system, model, False, dict(kwargs))
        return _parse(ChatCompletionResponse, await self._json("POST", "/v1/chat/completions", body))

    async def chat_stream(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                          messages: list[dict[str, Any]] | None = None, model: str | None = None,
                          system: str | None = None, **kwargs: Any) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self._events("/v1/chat/completions",
                                        _chat_body(prompt, images, messages, system, model, True, dict(kwargs)),
                                        ChatCompletionChunk):
            yield chunk

    async def complete(self, prompt: CompletionPrompt, *, model: str | None = None,
                       **kwargs: Any) -> CompletionResponse:
        body = _completion_body(prompt, model, False, dict(kwargs))
        return _parse(CompletionResponse, await self._json("POST", "/v1/completions", body))

    async def complete_stream(self, prompt: CompletionPrompt, *, model: str | None = None,
                              **kwargs: Any) -> AsyncIterator[CompletionResponse]:
        async for chunk in self._events("/v1/completions", _completion_body(prompt, model, True, dict(kwargs)),
                                        CompletionResponse):
            yield chunk

    async def _events(self, path: str, body: dict[str, Any], model: type[BaseModel]) -> AsyncIterator[Any]:
        resp = await self._send("POST", path, body, stream=True)
        try:
            async for obj in _asse_data(resp):
                yield _parse(model, obj)
        except httpx.HTTPError as e:
            raise _transport_error(self.base_url, self.timeout, e, answering=True) from None
        finally:
            await resp.aclose()


async def _asse_data(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        obj = _sse_event(line)
        if obj is _DONE:
            return
        if obj is not None:
            yield obj
    raise APIError(200, _TRUNCATED)


__all__ = ["Client", "AsyncClient", "APIError", "APITimeoutError", "image_to_url"]
