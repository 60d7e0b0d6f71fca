"""``vlmguard run-batch``: a file of API requests run offline, batched, without a service (as ``vllm run-batch``).

The input is OpenAI's Batch API format, one request a line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}

(``url`` also ``/v1/completions``, OpenAI's legacy text completions, ``/v1/responses``, OpenAI's Responses API, or
``/v1/generate``, the native API). Each body goes
through the service's own API (``create_api``) in this process, so it is read, checked and answered exactly as the
HTTP service answers it, every pruner,
decoder and OpenAI parameter included; the model's requests share in-flight batches (``InflightBatcher``, as a
served replica's do). The output is OpenAI's batch output format, one line per request, in the order they
finish::

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "chatcmpl-...",
     "body": {...}}, "error": null}

A request the API refuses is its 4xx response (its body the API's error object); a line that is no request is
refused with the file, before any model is loaded. Each answer is written (and flushed) as it comes, so an
interrupted run keeps what it finished, and ``--resume`` goes on from the output file: requests already answered
are not run again, those that failed with a server error (5xx) are.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from vlmguard.errors import InvalidInput
from vlmguard.interrupts import Terminated
from vlmguard.workers.engine_worker import EngineWorker

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/generate")


@dataclass(frozen=True)
class BatchRequest:
    """One line of the input: where it came from, its id, the endpoint and the request body."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class BatchSummary:
    requests: int  # in the input file
    skipped: int  # answered in an earlier run (--resume)
    ok: int  # answered 2xx this run
    failed: int  # answered with an error status this run
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "skipped": self.skipped, "ok": self.ok, "failed": self.failed,
                "seconds": round(self.seconds, 3)}


def _parse_line(text: str, path: Path, line: int) -> BatchRequest | None:
    where = f"{path}:{line}"
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise InvalidInput(f"{where}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: a request line is a JSON object, got {type(obj).__name__}")
    cid, method, url, body = obj.get("custom_id"), obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if not isinstance(cid, str) or not cid:
        raise InvalidInput(f"{where}: custom_id must be a non-empty string")
    if method != "POST":
        raise InvalidInput(f"{where}: method must be POST, got {method!r}")
    if url not in URLS:
        raise InvalidInput(f"{where}: url must be one of {', '.join(URLS)}, got {url!r}")
    if not isinstance(body, dict):
        raise InvalidInput(f"{where}: body must be a JSON object (the request)")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(unknown)} (a line has custom_id, method, url, "
                           "body)")
    return BatchRequest(line, cid, url, body)


def read_requests(path: Path) -> Iterator[BatchRequest]:
    """The requests of a batch file, one at a time (a large file is never held whole); InvalidInput naming the
    file and line of the first that is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            for i, text in enumerate(f, 1):
                req = _parse_line(text, path, i)
                if req is not None:
                    yield req
    except FileNotFoundError:
        raise InvalidInput(f"--input: no such file: {path}") from None
    except UnicodeDecodeError as e:
        raise InvalidInput(f"--input: {path} is not UTF-8 text ({e.reason})") from None


def check_requests(path: Path) -> int:
    """Read the whole file once before any model work: every line a request, every custom_id once. Its count."""
    seen: dict[str, int] = {}
    for req in read_requests(path):
        if req.custom_id in seen:
            raise InvalidInput(f"{path}:{req.line}: custom_id {req.custom_id!r} repeats line {seen[req.custom_id]}")
        seen[req.custom_id] = req.line
    if not seen:
        raise InvalidInput(f"--input: {path} holds no request")
    return len(seen)


def answered_ids(output: Path) -> set[str]:
    """For --resume: rewrite ``output`` keeping its final records (a response below 500, 429 aside), return their
    custom_ids. Records of server errors, of overload and of no answer, and a last line cut by an interruption, are
    dropped: those requests run again."""
    keep, ids = [], set()
    with open(output, encoding="utf-8") as f:
        for text in f:
            try:
                rec = json.loads(text)
                status = rec["response"]["status_code"]  # (a request with no answer: response null, run again)
                cid = rec["custom_id"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(status, int) and status < 500 and status != 429 and cid not in ids:
                ids.add(cid)
                keep.append(text if text.endswith("\n") else text + "\n")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, output)
    return ids


def batch_record(req: BatchRequest, status: int, body: Any) -> dict[str, Any]:
    """A request's line of the output (OpenAI's batch output format)."""
    request_id = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.custom_id,
            "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                         "body": body},
            "error": None}


def _error_body(e: Any) -> dict[str, Any]:
    """An APIError as the API's error object."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


async def run_requests(client: Any, requests: Iterator[BatchRequest], out: TextIO, *, concurrency: int,
                       done: Callable[[dict[str, Any]], None] | None = None) -> tuple[int, int]:
    """Send every request through ``client`` (a :class:`vlmguard.client.AsyncClient`: the API in this process or a
    service's), at most ``concurrency`` at a time, and write each answer's record to ``out`` as it comes. A request
    that got no answer at all (the service unreachable after the client's retries) is a record with ``response``
    null and the ``error``. (answered 2xx, otherwise)."""
    from vlmguard.client import APIError

    counts = [0, 0]
    slots = asyncio.Semaphore(concurrency)

    async def one(req: BatchRequest) -> None:
        try:
            refused = next((k for k in ("stream", "background") if req.body.get(k) is True), None)
            if refused is not None:  # (a batch answers whole and now: OpenAI's batches refuse both too)
                record = batch_record(req, 400, {"error": {"message": f"{refused} is not supported in a batch",
                                                           "type": "invalid_request_error", "param": refused,
                                                           "code": None}})
            else:
                try:
                    record = batch_record(req, 200, await client.post(req.url, req.body))
                except APIError as e:
                    record = batch_record(req, e.status, _error_body(e)) if e.status else {
                        **batch_record(req, 0, None), "response": None,
                        "error": {"code": "no_answer", "message": e.message}}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            status = (record["response"] or {}).get("status_code", 0)
            counts[0 if 200 <= status < 300 else 1] += 1
            if done is not None:
                done(record)
        finally:
            slots.release()

    tasks = set()
    for req in requests:
        await slots.acquire()
        task = asyncio.create_task(one(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return counts[0], counts[1]


@dataclass(frozen=True)
class BatchPlan:
    """What a run will do, settled before any model loads: the input (checked whole), the output and the
    requests an earlier run answered (``--resume``)."""

    input: Path
    output: Path
    total: int
    skip: frozenset[str]

    @classmethod
    def make(cls, input_path: Path, output_path: Path, resume: bool = False) -> "BatchPlan":
        """The input is checked whole; the output must not exist unless ``resume`` (then it is read, and kept to
        its final records)."""
        if input_path.resolve() == output_path.resolve():
            raise InvalidInput("--output must not be --input")
        total = check_requests(input_path)
        skip: set[str] = set()
        if output_path.exists() and output_path.stat().st_size > 0:
            if not resume:
                raise InvalidInput(f"--output: {output_path} exists; --resume goes on from it (or remove it)")
            skip = answered_ids(output_path)
        return cls(input_path, output_path, total, frozenset(skip))


def run_batch(plan: BatchPlan, workers: dict[str, EngineWorker], *, max_batch_size: int = 8, wait_s: float = 0.02,
              concurrency: int | None = None, max_new_tokens_limit: int = 1024, local_media: Path | None = None,
              progress: bool = True) -> BatchSummary:
    """Run a batch file through ``workers`` (their keys are the ``model`` ids the bodies may name; a body without
    one gets the first) into the plan's output. ``local_media``: the folder whose images ``file://`` URLs may
    name."""
    import httpx

    from vlmguard.client import AsyncClient
    from vlmguard.workers.api import BatchingBackend, create_api
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig

    batching = BatchingConfig(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)
    models = [ModelConfig(name=name, max_new_tokens_limit=max_new_tokens_limit, max_queued_requests=-1,
                          batching=batching) for name in workers]
    week = 7 * 24 * 3600.0
    config = ServiceConfig(models=models, api_key_env=None, request_timeout_s=week, max_request_bytes=1 << 40,
                           allowed_local_media_path=None if local_media is None else str(local_media))
    backend = BatchingBackend.for_workers(workers, max_batch_size, wait_s)
    app = create_api(backend, config)
    try:
        return _drive(plan, lambda: AsyncClient("http://batch", transport=httpx.ASGITransport(app=app),
                                                timeout=week, max_retries=0),
                      concurrency or 2 * max_batch_size, progress)
    finally:
        backend.close()


def run_batch_remote(plan: BatchPlan, url: str, api_key: str | None = None, *, concurrency: int = 16,
                     timeout_s: float = 3600.0, max_retries: int = 8, progress: bool = True) -> BatchSummary:
    """Run a batch file through a running service at ``url`` (its replicas batch the requests): overloaded answers
    (429, 503) and lost connections are retried with backoff, honouring Retry-After."""
    from vlmguard.client import AsyncClient

    return _drive(plan, lambda: AsyncClient(url, api_key, timeout=timeout_s, max_retries=max_retries), concurrency,
                  progress)


@contextmanager
def _signals_cancel(task: Any, got: list[int]) -> Iterator[None]:
    """Inside the run's event loop: Ctrl-C and SIGTERM cancel the run's task at its next await (requests stop,
    every answer written so far stays whole) and are noted in ``got``, for the command to stop as the signal would
    once the loop has ended. A signal raised at any bytecode instead can leave the loop's and its libraries' state
    half-changed, and the loop's shutdown could then wait for ever. Off the main thread, nothing changes."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, lambda sig=sig: (got.append(sig), task.cancel()))
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no such support
            previous.pop(sig, None)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def _drive(plan: BatchPlan, make_client: Callable[[], Any], concurrency: int, progress: bool) -> BatchSummary:
    """The plan's requests not answered before, through the client ``make_client`` makes, into its output."""
    todo = (r for r in read_requests(plan.input) if r.custom_id not in plan.skip)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total - len(plan.skip), desc="run-batch", unit="req", mininterval=1.0)

    got: list[int] = []  # the signal that stopped the run

    async def main() -> tuple[int, int]:
        client = make_client()
        try:
            with open(plan.output, "a", encoding="utf-8") as out, _signals_cancel(asyncio.current_task(), got):
                return await run_requests(client, todo, out, concurrency=concurrency,
                                          done=(lambda _rec: bar.update(1)) if bar is not None else None)
        except asyncio.CancelledError:
            if not got:
                raise
            return 0, 0
        finally:
            await client.aclose()

    t0 = time.perf_counter()
    try:
        ok, failed = asyncio.run(main())
    finally:
        if bar is not None:
            bar.close()
    if got:  # stopped by a signal: stop the command as it would have
        raise Terminated() if got[0] == signal.SIGTERM else KeyboardInterrupt()
    return BatchSummary(plan.total, len(plan.skip), ok, failed, time.perf_counter() - t0)
