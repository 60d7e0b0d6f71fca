"""One Engine and the logic of serving it, free of Ray (the Serve deployment in ``deployment.py`` wraps it).

A :class:`WorkItem` is what the ingress sends after validating the HTTP request (images decoded, spec
built). :meth:`EngineWorker.generate_many` runs a list of items as few ``Engine.generate`` calls as
possible: items of one pruner and decoder (``GenerationSpec.batch_key``) share one batch, each with its own
length, stop strings, token selection and report settings; if a batch fails on a user error (say one prompt is
longer than the context), each item is retried alone so only the offending one gets the error.
Answers are plain dicts: ``{"result": GenerationResult.to_dict()}`` or ``{"error": {...}}``.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from PIL import Image

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.spec import GenerationSpec
from vlmguard.tool_calls import ToolUse

log = logging.getLogger("vlmguard.workers")

# One per request: true once its caller has left (a timeout, a client gone), read between decode steps.
Gone = Callable[[], bool]


@dataclass
class WorkItem:
    """A validated generation request, picklable (travels from the ingress to a model replica)."""

    prompt: str
    spec: GenerationSpec
    images: list[Image.Image] = field(default_factory=list)
    system: str | None = None
    # A multi-turn conversation (OpenAI messages reduced to text/image parts), templated by the replica
    # with the model's own chat template; ``prompt`` is then unused.
    messages: list[dict[str, Any]] | None = None
    request_id: str | None = None
    # ``prompt`` is already templated, with the model's image placeholders (a benchmark preset's own framing, sent
    # by a benchmark job; the HTTP API never sets it)
    raw_prompt: bool = False
    # which replica should take it: a hash of its first image (without one, of its conversation's opening), set by
    # the ingress (workers/routing.py)
    routing_key: str | None = None
    # the tools a chat request offers (``vlmguard/tool_calls.py``): their block ends the system turn
    tools: ToolUse | None = None
    # the chat request's field its answer format (``spec.guided``) came from, which an error about it names
    format_param: str | None = None
    # a text completion's prompt given as token ids (``Request.prompt_token_ids``; ``prompt`` is then unused)
    prompt_token_ids: list[int] | None = None


def with_own_seed(item: WorkItem, seed: int | None = None) -> WorkItem:
    """``item``, given a seed of its own where it samples without one (``seed``, else a random one: the engine would
    draw one for it anyway, so its answer is as random), so that it can be run again to the same tokens: a stream
    sent again after its replica was lost (``ingress.RayBackend.stream``), a background response another process takes
    over with the seed its run record keeps (``api.py``)."""
    if item.spec.sampling and item.spec.seed is None:
        item.spec = item.spec.model_copy(update={"seed": secrets.randbits(31) if seed is None else seed})
    return item


def event_dict(ev: Any) -> dict[str, Any]:
    """A ``StreamEvent``'s token, text and log-probability entries as plain data (what travels to the ingress)."""
    out: dict[str, Any] = {"token_id": ev.token_id, "text": ev.text, "done": ev.done}
    if ev.logprobs:
        out["logprobs"] = [asdict(e) for e in ev.logprobs]
    if ev.prompt_logprobs is not None:
        out["prompt_logprobs"] = [asdict(e) for e in ev.prompt_logprobs]
    return out


def error_answer(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, VlmguardError):
        status = getattr(exc, "http_status", 400)
        return {"error": {"message": str(exc), "type": "server_error" if status >= 500 else "invalid_request_error",
                          "code": type(exc).__name__, "status": status, "param": getattr(exc, "param", None)}}
    return {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                      "code": type(exc).__name__, "status": 500}}


class EngineWorker:
    """Holds one Engine; thread-safe (one engine call at a time)."""

    def __init__(self, model: str = "tiny", *, name: str | None = None, device: str = "auto",
                 dtype: str = "auto", attn_implementation: str = "auto", trust_remote_code: bool = False,
                 torch_threads: int | None = None, engine: Any = None, share_prefixes: bool = True,
                 prefix_cache_mb: float = 0.0, quantization: str = "none"):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if engine is None:
            from vlmguard.engine import Engine

            engine = Engine.load(model, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                 trust_remote_code=trust_remote_code, quantization=quantization)
        self.engine = engine
        engine.share_prefixes = share_prefixes
        engine.enable_prefix_cache(prefix_cache_mb)
        self.name = name or model
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # _own_tokenizer's copy
        self._adapter: Any = None  # _own_adapter's copy
        self._tok_lock = threading.Lock()
        self.started = time.time()
        self.batches = 0
        self.items = 0

    # ---- info ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.engine.model_name, "family": self.engine.family,
                "context_length": self.engine.context_length, "batches": self.batches, "items": self.items,
                # what a benchmark run's identity needs, so a job resumes (and shares) a local run of the same
                # weights and precision
                "revision": self.engine.revision, "dtype": str(self.engine.model.dtype).removeprefix("torch."),
                "quantization": getattr(self.engine, "quantization", "none"),
                # what a benchmark preset with its own framing reads of the model (``PopePrompt.frame``)
                "default_system": self.engine.adapter.default_system(),
                "image_placeholder": self.engine.adapter.image_placeholder,
                "grid_side": self.engine.adapter.grid_side(),
                "reference_image_aspect": self.engine.adapter.image_aspect("reference"),
                "prefix_cache": self.prefix_cache_info()}

    # ---- tokens (/tokenize, /detokenize) ----------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True, return_token_strs: bool = False) -> dict[str, Any]:
        """``text``'s token ids under the model's tokenizer (no chat template): :class:`TokenizeResponse`'s fields."""
        tok = self._own_tokenizer()
        return self._ids_answer(tok(text, add_special_tokens=add_special_tokens)["input_ids"], tok, return_token_strs)

    def detokenize(self, ids: list[int]) -> dict[str, Any]:
        """The text of token ids (special tokens included, as the model would read them)."""
        tok = self._own_tokenizer()
        beyond = [t for t in ids if t >= len(tok)]
        if beyond:
            raise InvalidInput(f"token id {beyond[0]} is past the tokenizer's vocabulary (ids 0-{len(tok) - 1})",
                               param="tokens")
        return {"prompt": tok.decode(ids)}

    def tokenize_chat(self, item: WorkItem, return_token_strs: bool = False) -> dict[str, Any]:
        """The token ids a chat request's prompt is fed (``item`` as ``chat_item`` makes it): the chat template with
        the generation prompt, each image's visual tokens (the image sized as a request's would be). Encoded with
        this worker's own copy of the processor, beside generation (``_own_adapter``)."""
        adapter = self._own_adapter()
        ids = self.engine.prompt_ids(self._request(item), item.spec, adapter=adapter)
        return self._ids_answer(ids, adapter.tokenizer, return_token_strs)

    def _ids_answer(self, ids: list[int], tok: Any, return_token_strs: bool) -> dict[str, Any]:
        """:class:`TokenizeResponse`'s fields for ``ids`` (their token strings under ``tok`` when asked for)."""
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.engine.context_length, "tokens": ids}
        if return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    def tokens(self, method: str, *args: Any) -> dict[str, Any]:
        """``tokenize``, ``tokenize_chat`` or ``detokenize`` as a backend calls them (over a Ray handle too): bad
        input comes back as ``{"error": message, "param": field}``, not as an exception."""
        if method not in ("tokenize", "tokenize_chat", "detokenize"):
            raise ValueError(f"no token method {method!r}")
        try:
            return getattr(self, method)(*args)
        except VlmguardError as e:
            return {"error": str(e), "param": getattr(e, "param", None)}

    def _own_tokenizer(self) -> Any:
        """A copy of the model's tokenizer for the API's calls: they run beside generation, whose processor calls
        set the shared tokenizer's padding (a fast tokenizer used from two threads while one changes its settings
        fails with "Already borrowed")."""
        with self._tok_lock:
            if self._tokenizer is None:
                self._tokenizer = copy.deepcopy(self.engine.adapter.tokenizer)
            return self._tokenizer

    def _own_adapter(self) -> Any:
        """The model's adapter with a copy of its processor (its tokenizer and image processor), for the API's
        ``tokenize_chat``: the processor's tokenizer is the shared one ``_own_tokenizer`` copies for the same
        reason."""
        with self._tok_lock:
            if self._adapter is None:
                adapter = copy.copy(self.engine.adapter)
                adapter.processor = copy.deepcopy(self.engine.adapter.processor)
                adapter.tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
                self._adapter = adapter
            return self._adapter

    def prefix_cache_info(self) -> dict[str, Any] | None:
        """The prefix cache's figures (entries, bytes, hits, misses, ...); None when it is off."""
        cache = self.engine.prefix_cache
        return None if cache is None else asdict(cache.stats)

    # ---- requests ------------------------------------------------------------------------------
    def _request(self, item: WorkItem):
        from vlmguard.engine import check_text
        from vlmguard.results import Request

        messages = item.messages
        if item.tools is not None and not messages:  # one turn, laid out as format_prompt lays it out
            messages = [{"role": "user", "content": [*({"type": "image"} for _ in item.images),
                                                     {"type": "text", "text": item.prompt}]}]
        if messages:  # the chat template places the images: a user's own placeholder text would be one more
            placeholder = self.engine.adapter.image_placeholder
            for i, m in enumerate(messages):
                for part in m["content"]:
                    check_text(part.get("text"), f"messages[{i}]", placeholder)
            text = self.engine.adapter.format_messages(messages) if item.tools is None else \
                self._with_tools(messages, item.system, item.tools)
            return Request(prompt=text, images=list(item.images), request_id=item.request_id, raw_prompt=True)
        return Request(prompt=item.prompt, images=list(item.images), request_id=item.request_id,
                       system=item.system, raw_prompt=item.raw_prompt, prompt_token_ids=item.prompt_token_ids)

    def _with_tools(self, messages: list[dict[str, Any]], system: str | None, tools: ToolUse) -> str:
        """The prompt of a conversation that offers ``tools``, its system turn ending with the tools' block: its own
        system text (a system message, else ``system``, else the family's default, else the one its chat template
        writes without a system turn), a blank line, the block. Where the chat template leaves system turns out,
        the block begins the first user turn instead."""
        from vlmguard.engine import check_text

        adapter, block = self.engine.adapter, tools.prompt_block()
        try:  # (a description that holds the image placeholder would be one more image of the request)
            check_text(block, "tools", adapter.image_placeholder)
        except InvalidInput as e:
            raise InvalidInput(str(e), param="tools") from None
        given = [m for m in messages if m["role"] == "system"]
        if given:
            system = given[0]["content"][0]["text"]
        if system is None:  # the family's default, else what its template writes without a system turn
            system = adapter.default_system() or adapter.template_system()
        rest = [m for m in messages if m["role"] != "system"]
        text = adapter.format_messages([{"role": "system", "content": [
            {"type": "text", "text": f"{system}\n\n{block}" if system else block}]}, *rest])
        if block in text:
            return text
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        content = messages[first]["content"]
        texts = [c for c in content if c["type"] == "text"]
        if texts:  # the turn's text part begins with the block (its images stay first, as the turn lays them out)
            content = [c if c is not texts[0] else {"type": "text", "text": f"{block}\n\n{c['text']}"}
                       for c in content]
        else:
            content = [*content, {"type": "text", "text": block}]
        return adapter.format_messages([*messages[:first], {**messages[first], "content": content},
                                        *messages[first + 1:]])

    def _run(self, items: list[WorkItem], gone: Sequence[Gone] | None = None) -> list[dict[str, Any] | None]:
        reqs = [self._request(it) for it in items]
        with self._lock:
            results = self._generate(reqs, [it.spec for it in items], gone)
            self.batches += 1
            self.items += sum(r is not None for r in results)
        if len(results) != len(items):
            raise RuntimeError(f"engine returned {len(results)} results for {len(items)} requests")
        out: list[dict[str, Any] | None] = []
        for it, r in zip(items, results):
            if r is None:  # its caller left: nobody to answer
                out.append(None)
                continue
            r.request_id = it.request_id
            out.append({"result": r.to_dict()})
        return out

    def _generate(self, reqs: list, specs: list[GenerationSpec], gone: Sequence[Gone] | None) -> list:
        """``engine.generate``; with ``gone``, a request whose caller leaves leaves the batch at the next decode
        step (its result None) and the others go on as they would have. Once every caller has left, the batch
        stops (before its prefill when they left while it waited for the engine)."""
        if gone is None:
            return self.engine.generate(reqs, specs)
        if all(left() for left in gone):  # everyone left while the batch waited for the engine: no prefill
            return [None] * len(reqs)
        batch = self.engine.start_batch(reqs, specs)
        try:
            done = batch.finish(lambda b: b.drop({lv.index for lv in b.lives if gone[lv.index]()}))
        finally:
            batch.close()
        return [done.get(i) for i in range(len(reqs))]

    def _run_group(self, items: list[WorkItem], gone: Sequence[Gone] | None = None) -> list[dict[str, Any] | None]:
        try:
            return self._run(items, gone)
        except BaseException as e:  # noqa: BLE001 - reported per item below (an engine's BaseException too)
            if len(items) == 1:
                if not isinstance(e, VlmguardError):
                    log.exception("generation failed")
                return [error_answer(e)]
        # One bad item must not fail its batch-mates: run each alone.
        return [self._run_group([it], None if gone is None else [gone[i]])[0] for i, it in enumerate(items)]

    # ---- in-flight batching (``inflight.py``) ---------------------------------------------------
    def joinable(self, spec: GenerationSpec) -> bool:
        """Whether requests of ``spec`` can join a running batch (``Decoder.joinable``)."""
        return bool(getattr(spec.resolve()[1], "joinable", False))

    def start_batch(self, items: list[WorkItem], indices: list[int]):
        """Prefill ``items`` (one ``GenerationSpec.batch_key``): a ``DecodeBatch`` to step with :meth:`advance`.
        Raises on bad input."""
        reqs = [self._request(it) for it in items]
        with self._lock:
            batch = self.engine.start_batch(reqs, [it.spec for it in items], indices)
            self.batches += 1  # prefill batches: a batch that joins a running one counts too
            return batch

    def advance(self, batch) -> list[Any]:
        """One token for every request of ``batch``: its ``StreamEvent``s (finished requests carry results)."""
        with self._lock:
            events = list(batch.advance())
        self.items += sum(1 for ev in events if ev.done)
        return events

    def generate_many(self, items: list[WorkItem], gone: Sequence[Gone] | None = None) -> list[dict[str, Any] | None]:
        """Answer each item, batching items of one pruner and decoder (``GenerationSpec.batch_key``) into one
        engine call; each keeps its own length, stop strings, token selection and report settings.

        ``gone``: one check per item, true once its caller has left; such an item stops generating at the next
        decode step (its batch-mates go on unchanged) and its answer is None."""
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.spec.batch_key(), []).append(i)
        answers: list[dict[str, Any] | None] = [None] * len(items)
        for idxs in groups.values():
            group_gone = None if gone is None else [gone[i] for i in idxs]
            for i, ans in zip(idxs, self._run_group([items[i] for i in idxs], group_gone)):
                answers[i] = ans
        return answers

    def generate_one(self, item: WorkItem, cancel: threading.Event | None = None) -> dict[str, Any] | None:
        """One item's answer (``{"result"}`` or ``{"error"}``, as :meth:`generate_many` gives it), generated
        through :meth:`stream` so that setting ``cancel`` (its caller left: a timeout, a client gone) stops it
        while it waits for the engine or at its next token. None when it was cancelled."""
        last: dict[str, Any] | None = None
        for ev in self.stream(item, cancel):
            if "error" in ev:
                return ev
            last = ev
        if last is not None and "result" in last:
            return {"result": last["result"]}
        if cancel is not None and cancel.is_set():
            return None
        return error_answer(RuntimeError("the generation ended without a result"))

    def _acquire(self, cancel: threading.Event | None, poll_s: float = 0.05) -> bool:
        """Take the engine lock; with ``cancel``, give up (False, lock not held) once it is set."""
        if cancel is None:
            return self._lock.acquire()
        while not cancel.is_set():
            if self._lock.acquire(timeout=poll_s):
                if not cancel.is_set():
                    return True
                self._lock.release()
        return False

    def stream(self, item: WorkItem, cancel: threading.Event | None = None) -> Iterator[dict[str, Any]]:
        """Yield ``{"token_id", "text", "done", "result"?}`` per generated token, or one ``{"error"}``."""
        try:
            req = self._request(item)
            if not self._acquire(cancel):  # the caller left while it waited for the engine: no prefill
                return
            try:
                gen = self.engine.stream([req], item.spec)
                try:
                    for ev in gen:
                        if cancel is not None and cancel.is_set():
                            return
                        out = event_dict(ev)
                        if ev.done and ev.result is not None:
                            ev.result.request_id = item.request_id
                            out["result"] = ev.result.to_dict()
                        yield out
                finally:
                    gen.close()
                self.batches += 1
                self.items += 1
            finally:
                self._lock.release()
        except GeneratorExit:  # closed by its consumer: nothing more to send
            raise
        except BaseException as e:  # noqa: BLE001 - sent to the client as an error event
            if not isinstance(e, VlmguardError):
                log.exception("streaming generation failed")
            yield error_answer(e)


async def answer_alone(worker: EngineWorker, item: WorkItem) -> dict[str, Any] | None:
    """``worker.generate_one(item)`` in a thread; when the awaiting task is cancelled (its request timed out,
    its client left), the generation stops too, instead of running to its end for nobody."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(worker.generate_one, item, cancel)
    finally:
        cancel.set()


async def stream_alone(worker: EngineWorker, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
    """``worker.stream(item)`` in an executor thread, each event as the engine yields it; closing this stream (the
    client left, a first-token timeout) stops the generation at its next token, or before it starts."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def put(ev: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the caller's event loop closed: nobody left to send to
            cancel.set()

    def produce() -> None:
        try:
            for ev in worker.stream(item, cancel):
                put(ev)
        finally:
            put(done)

    task = loop.run_in_executor(None, produce)
    try:
        while (ev := await queue.get()) is not done:
            yield ev
    finally:
        cancel.set()  # the client left (or we finished): stop generating
        if not task.done():
            # a stream still queued for an executor thread never starts; a running one stops at its next token or
            # while it waits for the engine (EngineWorker.stream) - no waiting for it here, so the request's
            # admission slot frees at once
            task.cancel()
