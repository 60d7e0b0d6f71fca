"""The HTTP API (FastAPI): OpenAI-compatible chat, native generate, models, health, metrics.

:func:`create_api` builds the app around a :class:`Backend` — the Ray Serve ingress passes one backed by
deployment handles (``ingress.py``); :class:`LocalBackend` runs engines in-process (tests, debugging).

Every error is JSON ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape): user errors (bad
JSON, bad or unsupported fields, bad images, unknown methods, prompts longer than the context) are 4xx; overload
is 503 with ``Retry-After``; a request over ``request_timeout_s`` is 504.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
import contextlib
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmguard.api_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateStreamEvent,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.responses_schema import ResponsesRequest
from vlmguard.tool_calls import CallStream
from vlmguard.workers import background_runs
from vlmguard.workers.background_runs import BackgroundRun, overseen, replay, run_key, run_record
from vlmguard.workers.completions_api import completion_chunk, completion_items, completion_logprobs, \
    completion_response, prompt_only, usage_chunk
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker, WorkItem, answer_alone, stream_alone, with_own_seed
from vlmguard.workers.image_intake import make_image_resolver
from vlmguard.workers.inflight import InflightBatcher
from vlmguard.workers.metrics import ServiceMetrics
from vlmguard.workers.openai_compat import (
    COMPLETION_REQUEST_FIELDS,
    chat_chunk,
    chat_item,
    chat_logprobs,
    chat_response,
    choice_items,
    generate_item,
    generate_response,
    request_param,
    usage,
    vlmguard_info,
)
from vlmguard.workers.conversations import ConversationCreate, ConversationUpdate, ItemsCreate, as_items, \
    conversation_messages, item_page, items_form, new_conversation
from vlmguard.workers.response_store import RUNNING, Responses, StoreUnavailable, StoredResponse, api_responses, \
    missing
from vlmguard.workers.responses_api import ChatForm, ParamNames, ResponseEvents, ResponseHead, chat_request, \
    input_items, new_id, response_object, stored_response, truncations, wants_logprobs, with_ids

PUBLIC_PATHS = {"/health"}
CLIENT_CLOSED = 499  # metrics status of a request cancelled before its answer started (nginx's "client closed")
ROUTES = {"/health", "/metrics", "/v1/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/v1/responses", "/v1/responses/input_tokens", "/v1/conversations", "/v1/generate", "/tokenize",
          "/detokenize"}
MODEL_CARD_ROUTE = "/v1/models/{model_id}"  # the metrics endpoint of GET /v1/models/ID: one series for every ID
RESPONSE_ROUTE = "/v1/responses/{response_id}"  # (and of a stored response: GET, DELETE)
INPUT_ITEMS_ROUTE = "/v1/responses/{response_id}/input_items"
CANCEL_ROUTE = "/v1/responses/{response_id}/cancel"
CONVERSATION_ROUTES = {3: "/v1/conversations/{conversation_id}", 4: "/v1/conversations/{conversation_id}/items",
                       5: "/v1/conversations/{conversation_id}/items/{item_id}"}  # (by the path's slashes)
log = logging.getLogger("vlmguard.workers")


class Overloaded(Exception):
    """The backend could not take the request now (queue full; ``code`` says why); answered 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0, code: str = "overloaded"):
        super().__init__(message)
        self.retry_after_s, self.code = retry_after_s, code


class APIFailure(Exception):
    """An error answer with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None, spec_param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers
        self.param = param  # the request's field at fault, as the request spells it
        self.spec_param = spec_param  # or the engine's name for it (VlmguardError.param), spelled per route


class Backend(Protocol):
    def model_names(self) -> list[str]: ...

    async def info(self, model: str) -> dict[str, Any]: ...

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]: ...

    def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]: ...

    async def tokens(self, model: str, method: str, *args: Any) -> dict[str, Any]:
        """An EngineWorker's ``tokenize`` or ``detokenize`` (``method``) on one of the model's replicas."""


class LocalBackend:
    """Engines in this process (no Ray, no batching across requests)."""

    def __init__(self, workers: dict[str, EngineWorker]):
        self.workers = workers

    def model_names(self) -> list[str]:
        return list(self.workers)

    async def info(self, model: str) -> dict[str, Any]:
        return self.workers[model].info()

    async def tokens(self, model: str, method: str, *args: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.workers[model].tokens, method, *args)

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]:
        return await answer_alone(self.workers[model], item)  # stops generating when the request is cancelled

    async def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        """Each event as the engine yields it; closing the stream (client gone, timeout) stops the generation."""
        async for ev in stream_alone(self.workers[model], item):
            yield ev


class BatchingBackend(LocalBackend):
    """Engines in this process whose requests share in-flight batches (as a served replica's do): the path of
    ``vlmguard run-batch``, and of tests that drive a replica's batching without Ray."""

    def __init__(self, workers: dict[str, EngineWorker], batchers: dict[str, InflightBatcher]):
        super().__init__(workers)
        self.batchers = batchers

    @classmethod
    def for_workers(cls, workers: dict[str, EngineWorker], max_batch_size: int, wait_s: float) -> "BatchingBackend":
        return cls(workers, {name: InflightBatcher(w, max_batch_size, wait_s) for name, w in workers.items()})

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]:
        return await self.batchers[model].submit(item)

    async def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        """Each event as the engine yields it: in the running batch when the decoder joins, else alone. Closing the
        stream (client gone, timeout) closes the engine's at once, which stops the request."""
        batcher = self.batchers[model]
        events = batcher.stream(item) if batcher.joins(item.spec) else stream_alone(self.workers[model], item)
        try:
            async for ev in events:
                yield ev
        finally:
            await events.aclose()

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()


# OpenAI's own codes for the errors OpenAI-compatible clients act on (a prompt over the context: clients trim the
# history on ``context_length_exceeded``); other errors keep vlmguard's error class as their code
OPENAI_ERROR_CODES = {"ContextTooLong": "context_length_exceeded"}


def error_json(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
               headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    code = OPENAI_ERROR_CODES.get(code, code)
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _invalid_request(e: ValidationError) -> APIFailure:
    """A request that fails its schema -> 400 naming the fields; ``param`` is the first one, ``code`` says
    whether it is a parameter (``unsupported_parameter``) or value (``unsupported_value``) this server lacks."""
    errors = e.errors()
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "request"
        msg = "unrecognized request argument" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    first = errors[0]
    code = {"extra_forbidden": "unsupported_parameter", "unsupported_value": "unsupported_value"}.get(
        first["type"], "invalid_request")
    return APIFailure(400, "invalid request: " + "; ".join(parts), code=code,
                      param=".".join(str(x) for x in first.get("loc", ())) or None)


@dataclass
class ChoiceEvent:
    """One event of a streamed choice (``create_api``'s ``choice_events``): a text piece, the choice's result (its
    last), or the failure that ends the answer."""

    index: int
    text: str = ""
    logprobs: list[dict[str, Any]] | None = None  # the entries of this piece's tokens (of a result: those not sent)
    # on the choice's first event, where its spec asked for them: its prompt's entries (``prompt_logprobs``)
    prompt_logprobs: list[dict[str, Any]] | None = None
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


def _request_param(request: Request, param: str | None) -> str | None:
    """An engine-side ``param`` as this route's request spells it (:func:`request_param`)."""
    path = request.url.path
    if path.endswith("/v1/completions"):
        return request_param(param, chat=True, fields=COMPLETION_REQUEST_FIELDS)
    return request_param(param, chat=path.endswith("/chat/completions"))


def _unavailable(e: Overloaded) -> APIFailure:
    """The 503 with Retry-After of a backend that could not take a request (``e.code`` says why)."""
    return APIFailure(503, str(e), "overloaded_error", e.code, {"Retry-After": str(max(1, round(e.retry_after_s)))})


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            503: "overloaded_error", 504: "timeout_error"}.get(status, "invalid_request_error" if status < 500
                                                                   else "server_error")


def _sse(obj: BaseModel | dict[str, Any] | str) -> bytes:
    if isinstance(obj, BaseModel):
        data = obj.model_dump_json(exclude_none=True)
    elif isinstance(obj, dict):
        data = json.dumps(obj)
    else:
        data = obj
    return f"data: {data}\n\n".encode()


def _entries(tokens: list[Any]) -> list[dict[str, Any]]:
    """Chat log-probability entries (TokenLogprobModel) as the Responses API's dicts (the same fields)."""
    return [t.model_dump() for t in tokens]


def stream_query(query: Any) -> int | None:
    """``GET /v1/responses/{id}``'s query: None to answer the response, else stream its events numbered after this
    (``stream=true``, ``starting_after=N``; -1 when not given: all of them)."""
    flag = query.get("stream", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise APIFailure(400, f"stream: expected true or false, got {query['stream']!r}", param="stream")
    after = query.get("starting_after")
    if after is not None and not (after.isdigit() and flag in ("true", "1")):
        raise APIFailure(400, f"starting_after: expected a sequence number (an integer from 0) with stream=true, got "
                              f"{after!r}", param="starting_after")
    return (int(after) if after is not None else -1) if flag in ("true", "1") else None


def _typed_sse(event: dict[str, Any]) -> bytes:
    """A Responses stream's event: its type as the SSE event name, the whole event as its data."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


@contextmanager
def _as_responses_errors(names: ParamNames) -> Iterator[None]:
    """Errors about the chat request a Responses request became, naming the Responses request's fields."""
    try:
        yield
    except ValidationError as e:
        failure = _invalid_request(e)
        failure.param, failure.message = names.rename(failure.param), names.message(failure.message)
        raise failure from None
    except APIFailure as e:
        e.param, e.spec_param = names.rename(e.param or request_param(e.spec_param, chat=True)), None
        e.message = names.message(e.message)
        raise
    except VlmguardError as e:
        status = getattr(e, "http_status", 400)
        raise APIFailure(status, names.message(str(e)), _error_type(status), type(e).__name__,
                         param=names.rename(request_param(e.param, chat=True))) from None


def create_api(backend: Backend, config: ServiceConfig, metrics: ServiceMetrics | None = None,
               responses: Responses | None = None) -> FastAPI:
    """The HTTP API over ``backend``; ``responses``: where its stored Responses live (default: a store of its own)."""
    metrics = metrics or ServiceMetrics()
    api_keys = [k.encode() for k in config.resolved_api_keys()]
    resolve_image = make_image_resolver(config.image_url_allowlist, timeout_s=config.image_fetch_timeout_s,
                                        max_bytes=config.max_request_bytes,
                                        local_root=config.allowed_local_media_path)
    limits = {m.served_name: m.max_new_tokens_limit for m in config.models}
    admits = {m.served_name: m.admission_limit for m in config.models}  # generations a replica admits at once
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await stop_background()  # (Serve runs an ingress app's shutdown when its replica stops)

    app = FastAPI(title="vlmguard", version=_version(), lifespan=lifespan,
                  description="Vision-language models with visual-token pruning and hallucination-reducing decoding.")
    app.state.metrics = metrics
    app.state.config = config
    store = app.state.responses = responses or api_responses(config)

    # ---- errors -----------------------------------------------------------------------------------
    @app.exception_handler(APIFailure)
    async def _api_failure(request: Request, e: APIFailure):
        return error_json(e.status, e.message, e.type, e.code, e.headers,
                          e.param or _request_param(request, e.spec_param))

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, e: Overloaded):  # (a token count's or a model card's call)
        return await _api_failure(request, _unavailable(e))

    @app.exception_handler(VlmguardError)
    async def _user_error(request: Request, e: VlmguardError):
        status = getattr(e, "http_status", 400)
        return error_json(status, str(e), _error_type(status), type(e).__name__,
                          param=_request_param(request, e.param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = str(e.detail)
        if e.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):  # no such route
            message = f"invalid URL ({request.method} {request.url.path}): {message.lower()}"
        return error_json(e.status_code, message, _error_type(e.status_code), None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        return error_json(500, f"internal error: {type(e).__name__}: {e}", "server_error", type(e).__name__)

    # ---- auth, size limit and metrics around every request ---------------------------------------
    app.add_middleware(_Guard, config=config, api_keys=api_keys, metrics=metrics)

    # ---- helpers -----------------------------------------------------------------------------------
    async def read_json(request: Request, model_cls: type[BaseModel]) -> Any:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_request_bytes:
                raise APIFailure(413, f"request body exceeds the limit of {config.max_request_bytes} bytes",
                                 "request_too_large")
        if not body:
            raise APIFailure(400, "request body is empty; expected a JSON object")
        try:
            # decoded strictly: json.loads(bytes) lets surrogates through ("surrogatepass"), which fail later (500s)
            raw = bytes(body)
            text = raw.decode(json.detect_encoding(raw))
            data = json.loads(text)
        except RecursionError:
            raise APIFailure(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers over Python's digit limit
            raise APIFailure(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if "\\ud" in text or "\\uD" in text:  # and so do \ud800 escapes of lone surrogates
            try:
                json.dumps(data, ensure_ascii=False).encode()
            except RecursionError:
                raise APIFailure(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
            except UnicodeEncodeError:
                raise APIFailure(400, "malformed JSON body: a \\u escape is a lone UTF-16 surrogate, not a "
                                      "character", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIFailure(400, "request body must be a JSON object")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise _invalid_request(e) from None

    async def work_item(chat: ChatCompletionRequest, model: str, request_id: str) -> WorkItem:
        """A chat request checked and turned into the model's work (images decoded off the event loop)."""
        return await run_in_threadpool(chat_item, chat, resolve_image, max_images=config.max_images_per_request,
                                       max_new_tokens_limit=limits.get(model, 1024), request_id=request_id,
                                       max_pixels=config.max_request_pixels)

    def pick_model(name: str | None, default_first: bool = True) -> str:
        names = backend.model_names()
        if not name and default_first:
            return names[0]
        if name not in names:
            raise APIFailure(404, f"model {name!r} is not served here (available: {', '.join(names)})",
                             "not_found_error", "model_not_found")
        return name

    def admitted_whole(model: str, answers: int, what: str, param: str) -> None:
        """A 400 for a request of more ``answers`` (its ``what``, its field ``param``) than a replica of ``model``
        admits at once: it would never be admitted whole, a 503 retried for ever."""
        if admits.get(model) is not None and answers > admits[model]:
            raise APIFailure(400, f"{what}: a replica of {model!r} admits at most {admits[model]} generations at once",
                             code="unsupported_value", param=param)

    async def first_answer(awaitable: Any, item: WorkItem) -> dict[str, Any]:
        """Await the backend's first answer, turning timeouts, overload and error answers into APIFailure."""
        try:
            answer = await asyncio.wait_for(awaitable, timeout=config.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIFailure(504, f"request timed out after {config.request_timeout_s:g} s", "timeout_error") from None
        except Overloaded as e:
            raise _unavailable(e) from None
        if "error" in answer:
            err = answer["error"]
            raise APIFailure(int(err.get("status", 400)), err["message"], err.get("type", "invalid_request_error"),
                             err.get("code"), spec_param=_format_param(item, err.get("param")))
        return answer

    async def run(model: str, item: WorkItem) -> dict[str, Any]:
        answer = await first_answer(backend.generate(model, item), item)
        failed(answer["result"], item)
        metrics.observe_result(answer["result"])
        return answer["result"]

    def failed(result: dict[str, Any] | None, item: WorkItem) -> None:
        """A result that ended with an error is a 500 naming it where the model failed (its scores became NaN
        mid-answer), a 400 where the request's format did (guided output the vocabulary cannot go on with)."""
        event = error_event(result)
        if event is not None:
            err = event["error"]
            raise APIFailure(400 if err["type"] == "invalid_request_error" else 500, err["message"], err["type"],
                             err["code"], spec_param=_format_param(item) if err["code"] == "FormatDeadEnd" else None)

    def stream_failure(ev: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any] | None:
        """The SSE error that ends a stream at event ``ev`` (the backend's error, or ``result`` ended with an
        error), else None; a good ``result`` is counted in the metrics, and so is a failure (the answer had
        started: its status, 200, does not show it)."""
        if "error" in ev:
            metrics.observe_failure()
            return {"error": {k: v for k, v in ev["error"].items() if k not in ("status", "param")}}
        failure = error_event(result)
        if failure is None and result:
            metrics.observe_result(result)
        return failure

    def error_event(result: dict[str, Any] | None) -> dict[str, Any] | None:
        """The SSE error of a streamed result that ended with an error (counted in the metrics), else None."""
        if result and result.get("error"):
            metrics.observe_failure()
            code = result.get("error_code") or "NonFiniteLogits"
            kind = "invalid_request_error" if code == "FormatDeadEnd" else "server_error"
            return {"error": {"message": result["error"], "type": kind, "code": code}}
        return None

    async def open_stream(model: str, item: WorkItem) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
        """Start a stream and wait for its first event, so errors before any token are plain 4xx answers."""
        gen = backend.stream(model, item).__aiter__()
        try:
            first = await first_answer(gen.__anext__(), item)
        except StopAsyncIteration:
            raise APIFailure(500, "the model ended the stream without a result", "server_error") from None
        return first, gen

    async def events(first: dict[str, Any], gen: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """The stream's events from its first; a backend that fails mid-stream (a replica gone) ends it with an
        error event, so the answer still ends well-formed (an error, then ``[DONE]``), one choice or several."""
        yield first
        try:
            async for ev in gen:
                yield ev
        except Exception as e:  # noqa: BLE001 - sent to the client as the stream's error event
            yield _internal_error_event(e)

    async def all_or_none(coros: list[Any], streams: bool = False) -> list[Any]:
        """Await every coroutine (a request's choices); when one fails, cancel the others (closing the streams
        that did open) and raise its error."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            if streams:
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is None:
                        await _aclose(t.result()[1])
            raise

    async def merged(opened: list[tuple[dict[str, Any], Any]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(choice, event) from every opened stream as they come, each up to its end (done or error)."""
        if len(opened) == 1:
            try:
                async for ev in events(*opened[0]):
                    yield 0, ev
                    if ev.get("done") or "error" in ev:
                        return
            finally:  # now, not when the generator is collected: the replica frees the request's admission slot
                await _aclose(opened[0][1])
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, first: dict[str, Any], gen: Any) -> None:
            try:  # (a backend that fails mid-stream comes out of events() as this choice's error event)
                async for ev in events(first, gen):
                    await queue.put((k, ev))
                    if ev.get("done") or "error" in ev:
                        break
            finally:
                await queue.put((k, None))

        tasks = [asyncio.create_task(pump(k, first, gen)) for k, (first, gen) in enumerate(opened)]
        try:
            left = len(tasks)
            while left:
                k, ev = await queue.get()
                if ev is None:
                    left -= 1
                else:
                    yield k, ev
        finally:  # the client left, or an error ends the answer: stop every choice
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each stream ends inside its cancelled pump
            for _, gen in opened:
                await _aclose(gen)

    async def choice_events(opened: list[tuple[dict[str, Any], Any]], want_logprobs: bool
                            ) -> AsyncIterator[ChoiceEvent]:
        """The events of a request's opened streams (one a choice) as they come: text pieces with their
        log-probability entries (``want_logprobs``), each choice's result with the entries no event carried, or the
        failure that ends them all (the last). The streams end with it: use it in ``contextlib.aclosing``."""
        sent = [0] * len(opened)  # log-probability entries sent so far, per choice
        first = [True] * len(opened)  # no event of the choice yet
        source = merged(opened)
        try:
            async for k, ev in source:
                result = (ev.get("result") or {}) if ev.get("done") else None
                failure = stream_failure(ev, result)
                if failure is not None:
                    yield ChoiceEvent(k, failure=failure)
                    return
                prompt = (ev.get("prompt_logprobs") or (result or {}).get("prompt_logprobs")) if first[k] else None
                if result is not None:
                    rest = (result.get("logprobs") or [])[sent[k]:] if want_logprobs else None
                    first[k] = False
                    yield ChoiceEvent(k, logprobs=rest, prompt_logprobs=prompt, result=result)
                elif ev.get("text") or ev.get("logprobs") or prompt:
                    entries = ev.get("logprobs") or []
                    sent[k] += len(entries)
                    first[k] = False
                    yield ChoiceEvent(k, ev.get("text", ""), entries if want_logprobs else None, prompt)
        finally:
            await source.aclose()  # an error or a client that left: stop every choice now

    # ---- routes ------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse)
    async def health():
        states: dict[str, str] = {}
        for name in backend.model_names():
            try:
                await asyncio.wait_for(backend.info(name), timeout=10.0)
                states[name] = "ok"
            except Exception as e:  # noqa: BLE001 - reported in the body
                states[name] = f"{type(e).__name__}: {e}"[:300]
        ok = all(v == "ok" for v in states.values())
        body = HealthResponse(status="ok" if ok else "degraded", models=states)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    async def model_card(name: str) -> ModelCard:
        try:
            info = await asyncio.wait_for(backend.info(name), timeout=10.0)
        except Exception:  # noqa: BLE001 - list the model without details
            info = {}
        return ModelCard(id=name, family=info.get("family"), context_length=info.get("context_length"),
                         dtype=info.get("dtype"), quantization=info.get("quantization"),
                         grid_side=info.get("grid_side"), reference_image_aspect=info.get("reference_image_aspect"),
                         prefix_cache=info.get("prefix_cache"), routing=info.get("routing"))

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[await model_card(name) for name in backend.model_names()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str):
        return await model_card(pick_model(model_id, default_first=False))

    @app.get("/metrics")
    async def metrics_endpoint(format: str = "prometheus"):
        if format == "json":
            return JSONResponse(metrics.snapshot())
        if format != "prometheus":
            raise APIFailure(400, "format must be 'prometheus' or 'json'")
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/metrics")
    async def metrics_json():
        return JSONResponse(metrics.snapshot())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        model = pick_model(req.model)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        item = await work_item(req, model, rid)
        with_steps = req.vlmguard.diagnostics
        n = req.n or 1
        admitted_whole(model, n, f"n={n}", "n")
        items = choice_items(item, n)  # n > 1: the request n times, in one batch
        tier = "default" if req.service_tier else None  # (echoed when asked for, as OpenAI does: the one tier)
        if not req.stream:
            results = await all_or_none([run(model, it) for it in items])
            answer = chat_response(rid, model, results, with_steps, item.tools, req.prompt_logprobs)
            return JSONResponse(answer.model_copy(update={"service_tier": tier}).model_dump(exclude_none=True))
        opened = await all_or_none([open_stream(model, it) for it in items], streams=True)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        want_logprobs = item.spec.logprobs is not None

        async def body() -> AsyncIterator[bytes]:
            created = int(time.time())

            def chunk(**kw: Any) -> bytes:
                piece = chat_chunk(rid, model, created, **kw)
                return _sse(piece if tier is None else piece.model_copy(update={"service_tier": tier}))

            results: list[dict[str, Any] | None] = [None] * len(items)
            # with tools, text goes out as content until it may be a call; a held call goes out as it is written
            # (vlmguard/tool_calls.py)
            calls = [CallStream(item.tools) if item.tools is not None else None for _ in items]
            for k in range(len(items)):
                yield chunk(role="assistant", content="", index=k)
            async with contextlib.aclosing(choice_events(opened, want_logprobs)) as events_of_choices:
                async for e in events_of_choices:
                    k = e.index
                    if e.failure is not None:
                        yield _sse(e.failure)
                        break
                    if e.result is not None:
                        results[k] = e.result
                        finish = e.result.get("finish_reason", "stop")
                        if calls[k] is not None:
                            text, pieces, finish = calls[k].finish(finish)
                            if text or pieces:
                                yield chunk(content=text or None, tool_calls=pieces, index=k)
                        yield chunk(finish_reason=finish, result=e.result or None, with_steps=with_steps,
                                    logprobs=e.logprobs, index=k)
                        continue
                    text, pieces = e.text, []
                    if calls[k] is not None:
                        text, pieces = calls[k].feed(text)
                    if text or pieces or e.logprobs:
                        yield chunk(content=text if text or not pieces else None, tool_calls=pieces, index=k,
                                    logprobs=e.logprobs)
                else:
                    if include_usage and all(results):
                        yield chunk(results=results, usage_only=True)
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await read_json(request, CompletionRequest)
        model = pick_model(req.model)
        rid = f"cmpl-{uuid.uuid4().hex}"
        items = await run_in_threadpool(completion_items, req, max_new_tokens_limit=limits.get(model, 1024),
                                        request_id=rid)
        admitted_whole(model, len(items), f"{len(items)} answers (prompts x n)",
                       "n" if len(req.prompts) == 1 else "prompt")
        tier = "default" if req.service_tier else None
        n = req.n or 1

        async def of_prompt(j: int, answer: Awaitable[Any]) -> Any:
            """``answer``, answer ``j``'s; an error about its prompt names it, one of several, by its place."""
            try:
                return await answer
            except APIFailure as e:
                if len(req.prompts) > 1 and e.param is None and e.spec_param in ("prompt", "images", "system"):
                    e.param, e.message = f"prompt.{j // n}", re.sub(r"^request \d+: ", f"prompt[{j // n}]: ", e.message)
                raise

        echoes = [it.prompt for it in items]  # the text each choice's begins with, with echo

        async def text_of(p: int, prompt: str | list[int]) -> str:
            try:
                return prompt if isinstance(prompt, str) else (await token_call(model, "detokenize", prompt))["prompt"]
            except APIFailure as e:  # (ids past the tokenizer's vocabulary)
                e.param = "prompt" if len(req.prompts) == 1 else f"prompt.{p}"
                raise

        if req.echo and any(it.prompt_token_ids is not None for it in items):
            texts = [await text_of(p, prompt) for p, prompt in enumerate(req.prompts)]
            echoes = [texts[j // n] for j in range(len(items))]
        if not req.stream:
            results = await all_or_none([of_prompt(j, run(model, it)) for j, it in enumerate(items)])
            results = [prompt_only(r) for r in results] if req.scores_only else results
            answer = completion_response(rid, model, req, echoes, results)
            return JSONResponse(answer.model_copy(update={"service_tier": tier}).model_dump(exclude_none=True))
        opened = await all_or_none([of_prompt(j, open_stream(model, it)) for j, it in enumerate(items)], streams=True)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        want_logprobs = req.logprobs is not None

        async def body() -> AsyncIterator[bytes]:
            created = int(time.time())

            def chunk(piece: CompletionResponse) -> bytes:
                return _sse(piece if tier is None else piece.model_copy(update={"service_tier": tier}))

            offsets = [len(echoes[k]) if req.echo else 0 for k in range(len(items))]  # each choice's text sent so far
            results: list[dict[str, Any] | None] = [None] * len(items)
            # each choice's echo: at once, or with its prompt's log-probabilities on its first event
            echo_due = [req.echo and want_logprobs] * len(items)
            if req.echo and not want_logprobs:
                for k in range(len(items)):
                    yield chunk(completion_chunk(rid, model, created, k, echoes[k]))
            async with contextlib.aclosing(choice_events(opened, want_logprobs)) as events_of_choices:
                async for e in events_of_choices:
                    k = e.index
                    if e.failure is not None:
                        yield _sse(e.failure)
                        break
                    if echo_due[k]:
                        echo_due[k] = False
                        yield chunk(completion_chunk(rid, model, created, k, echoes[k],
                                                     logprobs=completion_logprobs(e.prompt_logprobs or [], echoes[k])))
                    if req.scores_only:  # (the token drawn to score the prompt is not an answer)
                        if e.result is None:
                            continue
                        e = dataclasses.replace(e, result=prompt_only(e.result), logprobs=None)
                    entries = e.logprobs
                    if e.result is not None and want_logprobs and e.result.get("end_logprob"):
                        entries = [*(entries or []), e.result["end_logprob"]]
                    # (the result's: the entries no event carried, the text already sent)
                    piece = completion_logprobs(entries, "" if e.result else e.text, offsets[k]) \
                        if entries else None
                    if e.result is not None:
                        results[k] = e.result
                        yield chunk(completion_chunk(rid, model, created, k, logprobs=piece, result=e.result or None,
                                                     finish_reason=e.result.get("finish_reason", "stop"),
                                                     with_steps=req.vlmguard.diagnostics))
                        continue
                    offsets[k] += len(e.text)
                    if e.text or piece:
                        yield chunk(completion_chunk(rid, model, created, k, e.text, logprobs=piece))
                else:
                    if include_usage and all(results):
                        yield chunk(usage_chunk(rid, model, created, results, n))
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def conversation(req: ResponsesRequest, upto: list[str] | None = None
                           ) -> tuple[StoredResponse | None, ChatForm]:
        """The stored response a request continues (``previous_response_id``; None without one), and the chat
        request the two mean together. ``upto``: the ids of the conversation's items when the request was made (a
        lost background response answered again): only those, which the conversation must still begin with."""
        earlier = None
        if req.conversation_id is not None:  # its items as the conversation a response would have kept
            if req.previous_response_id is not None:
                raise APIFailure(400, "conversation and previous_response_id cannot both be given: a conversation "
                                      "holds the earlier turns itself", param="conversation")
            conv = await conversation_entry(req.conversation_id)
            if upto is not None:
                if [it.get("id") for it in conv.items[:len(upto)]] != upto:
                    raise APIFailure(409, f"conversation {req.conversation_id!r} lost items it had when this "
                                          "response was asked for: it cannot be answered again",
                                     code="conversation_changed", param="conversation")
                conv = StoredResponse(response=conv.response, messages=[], items=conv.items[:len(upto)], size=1)
            messages = conversation_messages(conv)
            earlier = StoredResponse(response={"output": []}, messages=messages, items=conv.items, size=1)
            return earlier, chat_request(req, messages, "conversation")
        if req.previous_response_id is not None:
            earlier = await store.get(req.previous_response_id)
            if earlier is None or earlier.response.get("object") != "response":
                raise APIFailure(400, f"previous_response_id: {missing(req.previous_response_id, store)}",
                                 code="previous_response_not_found", param="previous_response_id")
            earlier = await as_it_stands(req.previous_response_id, earlier)
            status = earlier.response.get("status")
            if status not in ("completed", "incomplete"):  # (a background one queued, running, cancelled, failed)
                raise APIFailure(400, f"previous_response_id: response {req.previous_response_id!r} is {status}: "
                                      "only a finished response can be continued", param="previous_response_id")
        return earlier, chat_request(req, earlier.messages if earlier is not None else None)

    async def form_item(form: ChatForm, model: str, rid: str) -> WorkItem:
        """The model's work for the chat request ``form`` means; an error names the Responses request's field."""
        with _as_responses_errors(form.names):
            return await work_item(ChatCompletionRequest.model_validate(form.body), model, rid)

    async def counted_item(form: ChatForm, model: str, rid: str) -> tuple[WorkItem, dict[str, Any]]:
        """The model's work for ``form``, and its prompt's tokens as the replica counts them (``tokenize_chat``)."""
        item = await form_item(form, model, rid)
        with _as_responses_errors(form.names):
            return item, await token_call(model, "tokenize_chat", item, False)

    async def fitted(req: ResponsesRequest, form: ChatForm, model: str, rid: str) -> tuple[ChatForm, WorkItem]:
        """The chat form a request is answered with, and its work item. With ``truncation: auto``, a conversation
        whose prompt and ``max_output_tokens`` exceed the model's context loses the fewest turns from its middle that
        make it fit (``truncations``; the candidates counted by the replica, a binary search); when none fits, the
        whole conversation goes on to be refused as too long."""
        if req.truncation != "auto":
            return form, await form_item(form, model, rid)
        item, counted = await counted_item(form, model, rid)
        room = counted["max_model_len"] - item.spec.max_new_tokens
        if counted["count"] <= room:
            return form, item
        best, options = (form, item), truncations(form)
        lo, hi = 0, len(options) - 1
        while lo <= hi:  # (fewer tokens further down the list)
            mid = (lo + hi) // 2
            shorter, counted = await counted_item(options[mid], model, rid)
            if counted["count"] <= room:
                best, hi = (options[mid], shorter), mid - 1
            else:
                lo = mid + 1
        return best

    async def keep(rid: str, response: dict[str, Any], form: ChatForm, req: ResponsesRequest,
                   earlier: StoredResponse | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Store a finished response (when its request asked to; its ``store`` says whether it was kept; a background
        one unless it was cancelled meanwhile), and add its input items (``items``, with their ids) and output items to
        the conversation it names (an answer is not lost to a store that fails)."""
        if req.background:
            done = await store.edit(rid, "finish", stored_response(response, form, earlier, items))
            if done is None or done.response["status"] == "cancelled":
                return response
        elif response["store"]:
            response["store"] = await store.put(rid, stored_response(response, form, earlier, items))
        if req.conversation_id is not None:
            try:
                added = await store.edit(req.conversation_id, "append", [*items, *response["output"]])
            except StoreUnavailable as e:
                added, why = None, str(e)
            else:
                why = f"it was {store.lost}"
            if added is None:
                log.warning("response %s not added to conversation %s: %s", rid, req.conversation_id, why)
        return response

    async def whole_response(head: ResponseHead, item: WorkItem) -> dict[str, Any]:
        """A request answered whole, as a Response."""
        answer = chat_response(head.id, head.model, await run(head.model, item), head.req.vlmguard.diagnostics,
                               item.tools)
        choice = answer.choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        entries = _entries(choice.logprobs.content if choice.logprobs else []) if wants_logprobs(head.req) else None
        return response_object(head, choice.message.content, calls, choice.finish_reason, answer.usage,
                               answer.vlmguard, entries)

    # ---- background responses: answered by a task of this process, polled and cancelled through the store -----
    background: dict[str, BackgroundRun] = {}

    async def start_background(head: ResponseHead, item: WorkItem, form: ChatForm, req: ResponsesRequest,
                               earlier: StoredResponse | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The response kept as queued with its run record (workers/background_runs.py), and a task of this process
        that answers it."""
        queued = head.response("queued", [])
        # (answered again by another process if this one is lost, from its request: in a conversation, with the
        # conversation's items as they are now, named by their ids; streamed, going on from the events it streamed,
        # which its answer repeats: sampled, with the seed it has here)
        item = with_own_seed(item)
        redo = None if not config.background_retries else {
            "request": req.model_dump(mode="json", exclude_none=True), "model": head.model,
            "created_at": head.created_at, "items": items, "seed": item.spec.seed,
            **({"upto": [it.get("id") for it in earlier.items]} if req.conversation_id is not None else {})}
        if not (await store.put(head.id, stored_response(queued, form, earlier, items))
                and await store.put(run_key(head.id), run_record(bool(req.stream), redo=redo))):
            raise APIFailure(413, "the request is larger than this server keeps (responses_store_mb): a background "
                                  "response must be stored", "request_too_large", param="background")
        launch_background(head, item, form, req, earlier, items)
        return queued

    def launch_background(head: ResponseHead, item: WorkItem, form: ChatForm, req: ResponsesRequest,
                          earlier: StoredResponse | None, items: list[dict[str, Any]],
                          resume: tuple[list[dict[str, Any]], int] | None = None) -> None:
        """A task of this process that answers a stored background response (``resume``: the events a lost process
        streamed of it, and their pages, which the answer goes on from)."""
        run = background[head.id] = BackgroundRun(head.id, bool(req.stream))
        if resume is not None:
            run.resume(*resume)
        # In a context of its own: Ray Serve cancels the calls a request makes to other deployments when the request
        # is cancelled (its client left), by the request's context that a task inherits; the answer must go on.
        run.task = asyncio.create_task(answer_in_background(head, item, form, req, earlier, items, run),
                                       context=contextvars.Context())
        metrics.background_changed(+1)
        # (once done, the streams following it here read on from the store)
        run.task.add_done_callback(lambda _: (background.pop(head.id, None), run.finish(),
                                              metrics.background_changed(-1)))

    async def as_it_stands(rid: str, entry: StoredResponse) -> StoredResponse:
        """A stored response as it stands: as kept while a task of this process answers it, else overseen
        (``background_runs.overseen``: a background response its process lost is taken over here, or failed)."""
        if rid in background:
            return entry
        return await overseen(store, rid, entry, config.background_lost_s, config.background_retries, take_over)

    async def take_over(rid: str, redo: dict[str, Any]) -> None:
        """A lost background response answered again here, from the start, from its stored request
        (``background_runs.overseen``); one that cannot be (its model no longer served, the response it continued
        gone) is failed with why."""
        try:
            req = ResponsesRequest.model_validate(redo["request"])
            model = pick_model(redo["model"])
            earlier, form = await conversation(req, redo.get("upto"))
            item = with_own_seed((await fitted(req, form, model, rid))[1], redo.get("seed"))
            resume = await background_runs.logged_events(store, rid) if req.stream else None
            if req.stream and resume is None:
                raise APIFailure(500, "the server process answering it stopped without finishing it, and the events "
                                      "it streamed are no longer all kept (responses_store_mb); send the request "
                                      "again", code="server_lost")
        except (APIFailure, VlmguardError, ValidationError) as e:
            await failed_in_background(rid, {"code": getattr(e, "code", None) or type(e).__name__,
                                             "message": getattr(e, "message", str(e))})
            return
        log.warning("background response %s: its process was lost; answering it again here", rid)
        metrics.background_taken_over()
        head = ResponseHead(rid, model, req, stored=True, created_at=redo["created_at"])
        launch_background(head, item, form, req, earlier, redo["items"], resume)

    async def answer_in_background(head: ResponseHead, item: WorkItem, form: ChatForm, req: ResponsesRequest,
                                   earlier: StoredResponse | None, items: list[dict[str, Any]],
                                   run: BackgroundRun) -> None:
        """The task of a background response; whatever happens (answered, failed, cancelled here or elsewhere,
        stopped), the run's last events are then written, so that a stream read elsewhere has every one."""
        try:
            await answered_in_background(head, item, form, req, earlier, items, run)
        finally:
            with contextlib.suppress(StoreUnavailable):
                await run.flush(store)

    async def answered_in_background(head: ResponseHead, item: WorkItem, form: ChatForm, req: ResponsesRequest,
                                     earlier: StoredResponse | None, items: list[dict[str, Any]],
                                     run: BackgroundRun) -> None:
        """Answer (streamed into ``run`` when the request streams), beating its run record every
        ``BACKGROUND_POLL_S`` with the new events and checking the store for a cancel made by another process of the
        API (one made here cancels this task); the answer or the failure is then kept."""
        work = asyncio.create_task(streamed_in_background(head, item, form, run) if req.stream
                                   else whole_response(head, item))
        try:
            await store.edit(head.id, "move", (["queued"], {"status": "in_progress"}))
            while not (await asyncio.wait({work}, timeout=background_runs.BACKGROUND_POLL_S))[0]:
                await run.beat(store)
                now = await store.get(head.id)
                if now is None or now.response["status"] == "cancelled":
                    return
            with _as_responses_errors(form.names):
                response = work.result()
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # (this task: cancelled here, or the API stops)
                raise
            failure = {"code": "server_error", "message": "the model's answer was cancelled before it ended"}
        except (APIFailure, VlmguardError) as e:
            failure = {"code": getattr(e, "code", None) or type(e).__name__, "message": getattr(e, "message", str(e))}
        except Exception as e:  # (what a foreground request answers as a 500)
            log.exception("background response %s failed", head.id)
            failure = {"code": "server_error", "message": f"internal error: {type(e).__name__}: {e}"}
        else:
            failure = None
        finally:
            work.cancel()  # (a cancelled or abandoned answer stops generating)
        try:
            await run.flush(store)  # (its last events before the response ends: a stream read elsewhere ends with them)
            if failure is None:
                await keep(head.id, response, form, req, earlier, items)
            else:
                await failed_in_background(head.id, failure)
        except StoreUnavailable as e:  # (nowhere to say it but the log)
            log.warning("background response %s not kept: %s", head.id, e)

    async def streamed_in_background(head: ResponseHead, item: WorkItem, form: ChatForm,
                                     run: BackgroundRun) -> dict[str, Any]:
        """A background request answered as a stream, its events added to ``run``; the final response (a stream
        that ends in an error raises it). A run going on from a lost process's events (``BackgroundRun.resume``)
        adds only the events after those, once the answer has repeated them (else it fails: ``resume_diverged``)."""
        events = ResponseEvents(head, wants_logprobs(head.req))
        sent = len(run.events)

        def diverged(how: str) -> APIFailure:
            return APIFailure(500, f"the server process answering it stopped after {sent} events; answered again, "
                                   f"{how}, so it cannot go on; send the request again", "server_error",
                              "resume_diverged")

        def add(fresh: list[dict[str, Any]]) -> None:
            for ev in fresh:
                k = ev["sequence_number"]
                if k >= sent:
                    run.add([ev])
                elif not background_runs.repeats(ev, run.events[k]):
                    raise diverged(f"event {k} differed from the one streamed")

        add(events.start(queued=True))
        with _as_responses_errors(form.names):
            opened = await open_stream(head.model, item)
        last = run.events[-1]
        async for last in response_events(events, item, opened):
            add([last])
            if last["type"] == "error":
                raise APIFailure(500, last["message"], "server_error", last["code"])
        if last["sequence_number"] < sent - 1:
            raise diverged(f"it ended after {last['sequence_number'] + 1}")
        return last["response"]

    async def failed_in_background(rid: str, failure: dict[str, str]) -> None:
        """A background response kept as failed with ``failure`` (its code and message), unless it was cancelled."""
        await store.edit(rid, "move", (RUNNING, {"status": "failed", "error": failure}))

    async def stop_background() -> None:
        """When the API stops: its background answers still running are cancelled. One that another process may
        answer again is left to the first that reads it (``background_runs.hand_over``); the others are kept as
        failed, so that a client polling one is told to send it again instead of waiting for ever."""
        stopped = list(background.items())
        for _, run in stopped:
            run.task.cancel()
        for rid, run in stopped:
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
            stopped_failure = {"code": "server_stopped",
                               "message": "the server stopped before it answered; send the request again"}
            with contextlib.suppress(StoreUnavailable):
                if not await background_runs.hand_over(store, rid, config.background_retries):
                    await failed_in_background(rid, stopped_failure)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str):
        """A background response cancelled while it is queued or in progress (its generation stops; cancelling
        again answers the same); a finished one cannot be."""
        entry = await stored(response_id)
        if not entry.response.get("background"):
            raise APIFailure(400, f"response {response_id!r} was not created in the background: only a background "
                                  "response can be cancelled", param="response_id")
        changed = await store.edit(response_id, "move", (RUNNING, {"status": "cancelled"}))
        status = changed.response["status"] if changed is not None else "gone"
        if status != "cancelled":
            raise APIFailure(400, f"response {response_id!r} is {status}: only a queued or in-progress response "
                                  "can be cancelled", param="response_id")
        run = background.get(response_id)
        if run is not None:
            run.task.cancel()
        return JSONResponse(changed.response)

    @app.post("/v1/responses")
    async def responses(request: Request):
        """OpenAI's Responses API: the request turned into the chat request it means (after the conversation of the
        stored response it continues), answered as one, written as a Response (workers/responses_api.py), and kept
        for the next request (workers/response_store.py)."""
        req: ResponsesRequest = await read_json(request, ResponsesRequest)
        model = pick_model(req.model)
        if req.background and (req.store is False or not store.enabled):
            none_kept = "" if store.enabled else "; this server stores no responses (responses_store_mb: 0)"
            raise APIFailure(400, f"background: a background response is polled (GET /v1/responses/ID), so it is "
                                  f"stored{none_kept}", param="background" if not store.enabled else "store")
        earlier, form = await conversation(req)
        rid = new_id("resp")
        head = ResponseHead(rid, model, req, stored=store.enabled and req.store is not False)
        answered, item = await fitted(req, form, model, rid)
        own_items = input_items(req)  # (their ids: one set for the queued, finished and conversation's copies)
        if req.background:
            queued = await start_background(head, item, form, req, earlier, own_items)
            if not req.stream:
                return JSONResponse(queued)
            return sse_stream(replay(store, background, rid, -1, lambda: stored(rid)))
        with _as_responses_errors(answered.names):
            if not req.stream:
                response = await whole_response(head, item)
                return JSONResponse(await keep(rid, response, form, req, earlier, own_items))
            opened = await open_stream(model, item)

        async def stream() -> AsyncIterator[dict[str, Any]]:
            events = ResponseEvents(head, wants_logprobs(req))
            for ev in events.start():
                yield ev
            async for ev in response_events(events, item, opened):
                if ev["type"] in ("response.completed", "response.incomplete"):
                    await keep(rid, ev["response"], form, req, earlier, own_items)  # (before a client can follow it)
                yield ev

        return sse_stream(stream())

    def sse_stream(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        """A Responses stream: each event with its type as the SSE event name."""
        async def body() -> AsyncIterator[bytes]:
            async for ev in events:
                yield _typed_sse(ev)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def response_events(events: ResponseEvents, item: WorkItem,
                              opened: tuple[dict[str, Any], Any]) -> AsyncIterator[dict[str, Any]]:
        """The events of a Response from an opened stream of the model, after its opening ones: text and call
        pieces as they come, then its end (``response.completed`` or ``incomplete``, or an ``error``)."""
        with_steps, logprobs = events.head.req.vlmguard.diagnostics, events.logprobs is not None
        calls = CallStream(item.tools) if item.tools is not None else None
        pending: list[dict[str, Any]] = []  # log-probability entries of tokens whose text has not gone out
        received = 0
        source = merged([opened])
        try:
            async for _, ev in source:
                result = (ev.get("result") or {}) if ev.get("done") else None
                failure = stream_failure(ev, result)
                if failure is not None:
                    yield events.error(failure["error"])
                    return
                out: list[dict[str, Any]] = []
                if logprobs:
                    fresh = (result.get("logprobs") or [])[received:] if result is not None else \
                        ev.get("logprobs") or []
                    received += len(fresh)
                    pending += _entries(chat_logprobs(fresh).content or [])
                text, pieces = "", []
                if result is not None:
                    finish = result.get("finish_reason", "stop")
                    if calls is not None:
                        text, pieces, finish = calls.finish(finish)
                elif ev.get("text"):
                    text, pieces = calls.feed(ev["text"]) if calls is not None else (ev["text"], [])
                if text:
                    out, pending = events.text_delta(text, pending), []
                out += events.call_pieces(pieces)
                if result is not None:
                    out += events.finish(finish, usage(result), vlmguard_info(result, with_steps))
                for e in out:
                    yield e
        finally:
            await source.aclose()

    @app.post("/v1/responses/input_tokens")
    async def responses_input_tokens(request: Request):
        """OpenAI's input token count of a Responses request: the prompt it would be fed, visual tokens included
        (``usage.input_tokens`` of its answer), counted by a replica's processor without running the model."""
        req: ResponsesRequest = await read_json(request, ResponsesRequest)
        model = pick_model(req.model)
        earlier, form = await conversation(req)
        answered, item = await fitted(req, form, model, "input_tokens")  # (truncation: auto, the prompt it fits)
        with _as_responses_errors(answered.names):
            counted = await token_call(model, "tokenize_chat", item, False)
        return JSONResponse({"object": "response.input_tokens", "input_tokens": counted["count"]})

    async def stored(response_id: str) -> StoredResponse:
        """A stored response, or a 404; as it stands (:func:`as_it_stands`)."""
        entry = await store.get(response_id)
        if entry is None or entry.response.get("object") != "response":  # (a conversation's id is none)
            raise APIFailure(404, missing(response_id, store), "not_found_error", "response_not_found")
        return await as_it_stands(response_id, entry)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        """A stored response, as it was answered or as it stands; with ``stream=true``, a background response created
        with ``stream: true`` streamed again, its events numbered after ``starting_after`` (default: all), live
        until it ends."""
        entry = await stored(response_id)
        after = stream_query(request.query_params)
        if after is None:
            return JSONResponse(entry.response)
        record = await store.get(run_key(response_id)) if entry.response.get("background") else None
        if record is None or not record.response.get("stream"):
            raise APIFailure(400, f"response {response_id!r} was not created with background and stream true (or "
                                  "its events are no longer kept): only such a response is streamed again",
                             param="stream")
        return sse_stream(replay(store, background, response_id, after, lambda: stored(response_id)))

    async def removed(key: str, find: Callable[[str], Awaitable[StoredResponse]], kind: str) -> JSONResponse:
        """A kept response or conversation deleted (``find`` says it is missing), OpenAI's answer for it."""
        await find(key)
        await store.delete(key)
        return JSONResponse({"id": key, "object": kind, "deleted": True})

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        deleted = await removed(response_id, stored, "response")
        await background_runs.forget(store, response_id)  # (a background response's run record and events, if any)
        return deleted

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, request: Request):
        """The items a stored response answered, as OpenAI lists them (a page of ``limit`` after the item ``after``,
        newest first unless ``order=asc``): those of the response it continued and that response's output, then
        its own input."""
        return JSONResponse(page_of((await stored(response_id)).items, request, f"response {response_id!r}"))

    def page_of(items: list[dict[str, Any]], request: Request, owner: str) -> dict[str, Any]:
        query = request.query_params
        return item_page(items, query.get("limit", "20"), query.get("order", "desc"), query.get("after"), owner)

    # ---- conversations (workers/conversations.py) --------------------------------------------------------------
    async def conversation_entry(cid: str) -> StoredResponse:
        entry = await store.get(cid)
        if entry is None or entry.response.get("object") != "conversation":
            why = missing(cid, store).replace("no stored response", "no conversation").replace(
                "responses_store_mb", "conversations_store_mb")
            raise APIFailure(404, why, "not_found_error", "conversation_not_found", param="conversation")
        return entry

    async def edited(cid: str, name: str, arg: Any) -> StoredResponse:
        changed = await store.edit(cid, name, arg)
        if changed is None:  # (gone since it was read, or grown past the store's whole budget)
            raise APIFailure(404, f"conversation {cid!r} is no longer stored: it was deleted, or it outgrew the "
                                  "store (conversations_store_mb)", "not_found_error", "conversation_not_found")
        return changed

    async def checked_items(items: list[Any], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``items`` with an id each, checked to continue the conversation ``before`` as a request's input would
        (its images decoded too); an error names the item (``items.2.content.0``)."""
        if not items:
            return []
        k = len(before)
        try:
            await form_item(items_form(items, before), pick_model(None), "conversation")
        except InvalidInput as e:
            raise APIFailure(400, as_items(str(e), k), param=as_items(e.param or "items", k)) from None
        except APIFailure as e:
            e.message, e.param = as_items(e.message, k), as_items(e.param or "items", k)
            raise
        return with_ids(items)

    @app.post("/v1/conversations")
    async def create_conversation(request: Request):
        """A new conversation, with up to 20 items and metadata; a Responses request continues it by its id."""
        body: ConversationCreate = await read_json(request, ConversationCreate)
        if not store.enabled or config.conversations_store_mb <= 0:
            budget = "responses_store_mb" if not store.enabled else "conversations_store_mb"
            raise APIFailure(400, f"this server stores no conversations ({budget}: 0)")
        entry = new_conversation(await checked_items(body.items or [], []), body.metadata)
        if not await store.put(entry.response["id"], entry):
            raise APIFailure(413, "the conversation is larger than this server keeps (conversations_store_mb)",
                             "request_too_large")
        return JSONResponse(entry.response)

    @app.get("/v1/conversations/{cid}")
    async def get_conversation(cid: str):
        return JSONResponse((await conversation_entry(cid)).response)

    @app.post("/v1/conversations/{cid}")
    async def update_conversation(cid: str, request: Request):
        """A conversation's metadata replaced."""
        body: ConversationUpdate = await read_json(request, ConversationUpdate)
        await conversation_entry(cid)
        return JSONResponse((await edited(cid, "update", {"metadata": body.metadata})).response)

    @app.delete("/v1/conversations/{cid}")
    async def delete_conversation(cid: str):
        return await removed(cid, conversation_entry, "conversation.deleted")

    @app.post("/v1/conversations/{cid}/items")
    async def add_conversation_items(cid: str, request: Request):
        """Up to 20 items added to a conversation (checked to continue it, as a request's input would)."""
        body: ItemsCreate = await read_json(request, ItemsCreate)
        items = await checked_items(body.items, (await conversation_entry(cid)).items)
        await edited(cid, "append", items)
        return JSONResponse({"object": "list", "data": items, "first_id": items[0]["id"], "last_id": items[-1]["id"],
                             "has_more": False})

    @app.get("/v1/conversations/{cid}/items")
    async def list_conversation_items(cid: str, request: Request):
        """A page of a conversation's items (``limit`` 1-100, ``order`` desc (default) or asc, ``after`` an item)."""
        return JSONResponse(page_of((await conversation_entry(cid)).items, request, f"conversation {cid!r}"))

    async def conversation_item(cid: str, item_id: str) -> dict[str, Any]:
        item = next((it for it in (await conversation_entry(cid)).items if it.get("id") == item_id), None)
        if item is None:
            raise APIFailure(404, f"no item {item_id!r} in conversation {cid!r}", "not_found_error", "item_not_found")
        return item

    @app.get("/v1/conversations/{cid}/items/{item_id}")
    async def get_conversation_item(cid: str, item_id: str):
        return JSONResponse(await conversation_item(cid, item_id))

    @app.delete("/v1/conversations/{cid}/items/{item_id}")
    async def delete_conversation_item(cid: str, item_id: str):
        """An item removed from a conversation; the conversation is the answer."""
        await conversation_item(cid, item_id)
        return JSONResponse((await edited(cid, "remove", item_id)).response)

    async def token_call(model: str, method: str, *args: Any) -> dict[str, Any]:
        out = await backend.tokens(model, method, *args)
        if "error" in out:
            raise APIFailure(400, out["error"], param=out.get("param"))
        return out

    @app.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
    async def tokenize(request: Request):
        """vLLM's: a text's token ids under the model's tokenizer (no chat template, no image), or a chat's as the
        model is fed its prompt (chat template, visual tokens)."""
        req: TokenizeRequest = await read_json(request, TokenizeRequest)
        model = pick_model(req.model)
        if req.messages is None:
            return TokenizeResponse(**await token_call(model, "tokenize", req.prompt, req.add_special_tokens,
                                                       req.return_token_strs))
        try:  # read as the chat endpoint reads them
            chat = ChatCompletionRequest(messages=req.messages, tools=req.tools, tool_choice=req.tool_choice)
        except ValidationError as e:  # (the tool choice's checks)
            raise _invalid_request(e) from None
        item = await work_item(chat, model, "tokenize")
        return TokenizeResponse(**await token_call(model, "tokenize_chat", item, req.return_token_strs))

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request):
        """vLLM's: the text of token ids."""
        req: DetokenizeRequest = await read_json(request, DetokenizeRequest)
        return DetokenizeResponse(**await token_call(pick_model(req.model), "detokenize", req.tokens))

    @app.post("/v1/generate")
    async def generate(request: Request):
        req: GenerateRequest = await read_json(request, GenerateRequest)
        model = pick_model(req.model)
        rid = f"gen-{uuid.uuid4().hex}"
        item = await run_in_threadpool(generate_item, req, resolve_image, max_images=config.max_images_per_request,
                                       max_new_tokens_limit=limits.get(model, 1024), request_id=rid,
                                       max_pixels=config.max_request_pixels)
        if not req.stream:
            result = await run(model, item)
            return JSONResponse(generate_response(rid, model, result).model_dump())
        first, gen = await open_stream(model, item)

        async def body() -> AsyncIterator[bytes]:
            sent = 0  # log-probability entries sent so far
            try:
                async for ev in events(first, gen):
                    result = ev.get("result")
                    failure = stream_failure(ev, result)
                    if failure is not None:
                        yield _sse(failure)
                        break
                    entries = ev.get("logprobs") or []
                    if ev.get("done") and result:  # what no token event carried (the done event's are not relayed)
                        entries = (result.get("logprobs") or [])[sent:]
                    sent += len(entries)
                    yield _sse(GenerateStreamEvent(id=rid, token_id=ev.get("token_id"), text=ev.get("text", ""),
                                                   done=bool(ev.get("done")), logprobs=entries,
                                                   prompt_logprobs=ev.get("prompt_logprobs"),
                                                   result=generate_response(rid, model, result) if result else None))
                    if ev.get("done"):
                        break
            finally:  # the answer's end, an error or a client that left: the backend stream ends now
                await _aclose(gen)
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


class _Guard:
    """Auth, the request size limit and metrics around every HTTP request, as a plain ASGI middleware
    (Starlette's ``BaseHTTPMiddleware`` runs each request through an extra task and memory streams)."""

    def __init__(self, app: Any, *, config: ServiceConfig, api_keys: list[bytes], metrics: ServiceMetrics):
        self.app, self.config, self.api_keys, self.metrics = app, config, api_keys, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = _route_path(scope)
        self.metrics.request_started()
        status: list[int | None] = [None]  # set when the response starts

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = Headers(scope=scope)
            length = headers.get("content-length")
            if self.api_keys and path not in PUBLIC_PATHS and not _authorized(headers, self.api_keys):
                response = error_json(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                      "authentication_error", "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            elif length is not None and length.isdigit() and int(length) > self.config.max_request_bytes:
                response = error_json(413, f"request body of {int(length)} bytes exceeds the limit of "
                                           f"{self.config.max_request_bytes} bytes", "request_too_large")
            else:
                await self.app(scope, receive, send_status)
                return
            await response(scope, receive, send_status)
        except asyncio.CancelledError:  # the client went away (Serve cancels its request): no server error
            if status[0] is None:
                status[0] = CLIENT_CLOSED
            raise
        finally:
            self.metrics.request_finished(path, status[0] or 500, time.perf_counter() - t0)


def _format_param(item: WorkItem, param: str | None = "guided") -> str | None:
    """An engine-side ``param`` of ``item`` as its route spells it where it is the answer format: the chat field
    the format came from (``guided_json``, ``tool_choice``...), else the spec's field (``guided.regex``)."""
    if param is None or param.split(".")[0] != "guided":
        return param
    if item.format_param is not None:
        return item.format_param
    return f"guided.{item.spec.guided.kind}" if item.spec.guided is not None else param


def _internal_error_event(e: BaseException) -> dict[str, Any]:
    """The SSE error event of a stream whose backend failed after it started (logged: the client sees only this)."""
    log.error("a stream's backend failed after the stream started: %s: %s", type(e).__name__, e, exc_info=e)
    return {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error"}}


async def _aclose(stream: Any) -> None:
    """Close a backend stream if it can be closed (an async generator), ignoring errors while closing."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - best effort: the request is being abandoned
            pass


def _route_path(scope: dict[str, Any]) -> str:
    """The path within the app (Serve's route prefix removed); model cards count as their route, unknown paths as
    "other" in metrics (labels a client cannot multiply)."""
    path = scope.get("path") or "/"
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    if path in ROUTES:
        return path
    if path.startswith("/v1/responses/") and path.count("/") in (3, 4):
        return RESPONSE_ROUTE if path.count("/") == 3 else INPUT_ITEMS_ROUTE if path.endswith("/input_items") \
            else CANCEL_ROUTE if path.endswith("/cancel") else "other"
    if path.startswith("/v1/conversations/") and path.count("/") in CONVERSATION_ROUTES:
        route = CONVERSATION_ROUTES[path.count("/")]
        return route if path.count("/") == 3 or path.split("/")[4] == "items" else "other"
    return MODEL_CARD_ROUTE if path.startswith("/v1/models/") else "other"


def _authorized(headers: Headers, keys: list[bytes]) -> bool:
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:
        return False
    g = given.encode()
    ok = False
    for k in keys:  # compare against every key, constant time each
        ok |= hmac.compare_digest(g, k)
    return ok


def _version() -> str:
    from vlmguard import __version__

    return __version__


__all__ = ["create_api", "Backend", "LocalBackend", "Overloaded", "APIFailure"]
