"""OpenAI's legacy text completions (``POST /v1/completions``): a request's prompts as work items, and results back as
completions and their stream's chunks.

A prompt is continued as it is: no chat template and no image (the engine's ``raw_prompt``; a model's image
placeholder in it is refused, as there is no image for it). Its sampling fields, penalties, answer formats and
``vlmguard`` object are a chat request's (:class:`~vlmguard.api_schema.SamplingRequest`), so each prompt is answered as
the engine answers that text, every pruner and decoder included (the pruners leave a prompt without an image whole).
"""
from __future__ import annotations

import time
from typing import Any

from vlmguard.api_schema import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from vlmguard.errors import InvalidInput
from vlmguard.workers.engine_worker import WorkItem
from vlmguard.workers.openai_compat import (chat_spec_and_format, choice_items, usage, vlmguard_info,
                                             vllm_prompt_logprobs)


def completion_items(req: CompletionRequest, *, max_new_tokens_limit: int, request_id: str) -> list[WorkItem]:
    """The work of a completion request: each prompt ``n`` times, one batch; answer ``j = p * n + k`` (prompt ``p``,
    its ``k``-th) seeded ``seed + j`` when the request has a seed."""
    if req.scores_only and not req.echo:
        raise InvalidInput("max_tokens 0 writes nothing: with echo (and logprobs) it scores the prompt",
                           param="max_new_tokens")
    spec, format_param = chat_spec_and_format(req, max_new_tokens_limit)
    spec = spec.model_copy(update={"exact_text": True})  # (a continuation's text is what its tokens write)
    prompts, n = req.prompts, req.n or 1
    items: list[WorkItem] = []
    for p, prompt in enumerate(prompts):
        own = spec if spec.seed is None else spec.model_copy(update={"seed": (spec.seed + p * n) % 2**63})
        text, ids = (prompt, None) if isinstance(prompt, str) else ("", list(prompt))
        item = WorkItem(prompt=text, spec=own, raw_prompt=True, format_param=format_param, prompt_token_ids=ids,
                        request_id=request_id if len(prompts) == 1 else f"{request_id}-p{p}")
        items += choice_items(item, n)
    return items


def prompt_only(result: dict[str, Any]) -> dict[str, Any]:
    """The result of a request that asked for no new token (``max_tokens: 0`` with ``echo``): the one token drawn to
    score its prompt is left out (no text, tokens or answer entries), and it ended at its length."""
    return {**result, "text": "", "token_ids": [], "logprobs": None if result.get("logprobs") is None else [],
            "end_logprob": None, "finish_reason": "length"}


def answer_entries(result: dict[str, Any], echo: bool, k: int = 0) -> list[dict[str, Any]]:
    """A finished answer's log-probability entries as the legacy completions list them: its prompt's first with
    ``echo`` (their ``k`` most likely tokens), then its tokens', then the token that ended it (an end of sequence,
    whose text the answer leaves out), as vLLM does, so that a harness reading the prompt's entries from a one-token
    answer (lm-eval's ``[ctxlen:-1]``) finds each where it looks."""
    entries = [{**e, "top": e.get("top", [])[:k]} for e in result.get("prompt_logprobs") or []] if echo else []
    entries += result.get("logprobs") or []
    return entries + ([result["end_logprob"]] if result.get("end_logprob") else [])


def completion_logprobs(entries: list[dict[str, Any]] | None, text: str, offset: int = 0
                        ) -> CompletionLogprobs | None:
    """``TokenLogprob`` dicts (a result's or a stream event's) as the legacy ``logprobs`` object; ``text``: what the
    tokens wrote, beginning at character ``offset`` of the choice's text. A token's ``text_offset`` is where it begins
    there: the text may leave out a token (a special token), which takes no room, or the space a token begins with
    (the answer's first, as the tokenizer decodes it); tokens that each hold part of a character (their text U+FFFD,
    their ``bytes`` its bytes) begin where it does, and the one that completes it takes its room."""
    if entries is None:
        return None
    out, at, part = CompletionLogprobs(), 0, b""
    for e in entries:
        out.tokens.append(e["token"])
        out.token_logprobs.append(e["logprob"])
        out.top_logprobs.append(None if e["logprob"] is None else {t["token"]: t["logprob"] for t in e.get("top", [])})
        out.text_offset.append(offset + at)
        pieces = (e["token"], e["token"].lstrip())
        if "\ufffd" in e["token"] and e.get("bytes"):  # (part of a character)
            part += bytes(e["bytes"])
            try:
                pieces, part = (part.decode("utf-8"),), b""
            except UnicodeDecodeError:
                continue
        at += len(next((w for w in pieces if w and text.startswith(w, at)), ""))
    return out


def completion_response(request_id: str, model: str, req: CompletionRequest, echoes: list[str],
                        results: list[dict[str, Any]]) -> CompletionResponse:
    """A completion from one result per answer (the ``vlmguard`` object is the first answer's); ``echoes``: with
    ``echo``, the text each choice's begins with (its prompt's)."""
    choices = []
    for k, r in enumerate(results):
        echoed = echoes[k] if req.echo else ""
        logprobs = completion_logprobs(answer_entries(r, req.echo, req.logprobs or 0), echoed + r["text"]) \
            if req.logprobs is not None else None
        choices.append(CompletionChoice(index=k, text=echoed + r["text"], finish_reason=r["finish_reason"],
                                        logprobs=logprobs,
                                        prompt_logprobs=vllm_prompt_logprobs(r.get("prompt_logprobs"),
                                                                             req.prompt_logprobs)))
    return CompletionResponse(id=request_id, created=int(time.time()), model=model, choices=choices,
                              usage=usage(results, req.n or 1),
                              vlmguard=vlmguard_info(results[0], req.vlmguard.diagnostics))


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str = "", *,
                     logprobs: CompletionLogprobs | None = None, finish_reason: str | None = None,
                     result: dict[str, Any] | None = None, with_steps: bool = False) -> CompletionResponse:
    """One chunk of a streamed completion: choice ``index``'s next text (its last with ``finish_reason`` and, as
    vlmguard's extension, its ``result``'s ``vlmguard`` object)."""
    return CompletionResponse(
        id=request_id, created=created, model=model,
        choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)],
        vlmguard=vlmguard_info(result, with_steps) if result is not None else None)


def usage_chunk(request_id: str, model: str, created: int, results: list[dict[str, Any]], n: int
                ) -> CompletionResponse:
    """The last chunk of a stream that asked for usage (``stream_options.include_usage``): no choices."""
    return CompletionResponse(id=request_id, created=created, model=model, choices=[],
                              usage=usage(results, n))
