"""Translating API requests into :class:`WorkItem` s and engine results back into API responses."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

from PIL import Image
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from vlmguard.api_schema import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    FunctionCall,
    GenerateRequest,
    GenerateResponse,
    ImagePart,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    SamplingRequest,
    TextPart,
    TokenLogprobModel,
    ToolCallModel,
    TopLogprobModel,
    Usage,
    VlmguardInfo,
)
from vlmguard.errors import InvalidInput
from vlmguard.images import low_detail
from vlmguard.spec import GenerationSpec, GuidedOutput, format_validation_error
from vlmguard.tool_calls import CallDelta, Function, ToolCall, ToolUse, call_text, response_text, schema_error
from vlmguard.workers.engine_worker import WorkItem

DEFAULT_CHAT_MAX_TOKENS = 128
# Stop strings are matched against the text's end at every generated token (``decode_batch._hold_back``: work
# proportional to their count x length, under the engine lock): a remote request gets at most these.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
ImageResolver = Callable[[str], Image.Image]


# Where a GenerationSpec field (or the engine's prompt / images) sits in a chat request: OpenAI's own fields; the
# others are in the ``vlmguard`` object. A native request has the spec's fields in its ``spec`` object.
CHAT_REQUEST_FIELDS = {"prompt": "messages", "images": "messages", "system": "messages",
                       "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "logprobs": "logprobs",
                       **{k: k for k in ("temperature", "top_p", "min_p", "seed", "stop", "stop_token_ids",
                                         "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")},
                       "choices": "guided_choice", "guided.regex": "guided_regex", "guided.grammar": "guided_grammar",
                       "guided.json_schema": "response_format", "guided.json_object": "response_format",
                       "guided": "response_format"}


# A (legacy) completion request's: the chat request's, but for its prompt
COMPLETION_REQUEST_FIELDS = {**CHAT_REQUEST_FIELDS, "prompt": "prompt", "images": "prompt", "system": "prompt"}


def request_param(param: str | None, chat: bool, fields: dict[str, str] = CHAT_REQUEST_FIELDS) -> str | None:
    """An error's ``param`` (:class:`~vlmguard.errors.VlmguardError`: a GenerationSpec field or the engine's
    ``prompt`` / ``images``) as a chat (``vlmguard.budget``, ``max_tokens``; a completion request's where ``fields``
    is theirs) or native (``spec.budget``) request spells it; a name already of the request (``messages.1``) stays."""
    if not param:
        return None
    head, dot, rest = param.partition(".")
    if chat and param in fields:  # (guided.regex: guided_regex)
        return fields[param]
    if chat and head in fields:
        return fields[head] + dot + rest
    if head in GenerationSpec.model_fields:
        return ("vlmguard." if chat else "spec.") + param
    return param


def _check_max_tokens(n: int, max_new_tokens_limit: int) -> None:
    if n > max_new_tokens_limit:
        raise InvalidInput(f"max tokens {n} exceeds this server's limit of {max_new_tokens_limit}",
                           param="max_new_tokens")


def _check_spec(spec: GenerationSpec, max_new_tokens_limit: int) -> GenerationSpec:
    if isinstance(spec.pruning_params.get("schedule"), str):  # checked before resolve() would open it
        raise InvalidInput("adaptinfer: 'schedule' names a file on the server, which remote requests may not read; "
                           "send the schedule itself (the JSON object `vlmguard prune analyze` writes)",
                           param="pruning_params.schedule")
    _check_max_tokens(spec.max_new_tokens, max_new_tokens_limit)
    if len(spec.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in spec.stop):
        raise InvalidInput(f"stop: this server accepts at most {MAX_STOP_STRINGS} stop strings of at most "
                           f"{MAX_STOP_CHARS} characters each", param="stop")
    spec.resolve()  # unknown methods / bad method parameters -> InvalidInput here, before any model work
    try:  # the worker batches by the spec's JSON and results carry its parameters (schedule objects nest freely)
        spec.model_dump_json()
    except PydanticSerializationError as e:
        raise InvalidInput(f"invalid generation spec: {e}") from None
    return spec


def chat_spec(req: SamplingRequest, max_new_tokens_limit: int) -> GenerationSpec:
    """OpenAI sampling fields + the ``vlmguard`` object -> GenerationSpec.

    Token selection follows the request: a positive ``temperature`` samples, ``temperature`` 0 or absent
    is greedy (deterministic) unless ``vlmguard.do_sample`` or ``vlmguard.decoding: sample`` says otherwise.
    """
    return chat_spec_and_format(req, max_new_tokens_limit)[0]


def chat_spec_and_format(req: SamplingRequest, max_new_tokens_limit: int) -> tuple[GenerationSpec, str | None]:
    """:func:`chat_spec`, and the request field its answer format came from (``guided_json``, ``tool_choice``...;
    None without one): an error about the spec's ``guided`` names that field."""
    guided, source = chat_guided(req)
    try:
        return _chat_spec(req, max_new_tokens_limit, guided), source
    except InvalidInput as e:
        if source is not None and (e.param or "").split(".")[0] == "guided":
            raise InvalidInput(str(e), param=source) from None
        raise


def _chat_spec(req: SamplingRequest, max_new_tokens_limit: int, guided: GuidedOutput | None
               ) -> GenerationSpec:
    o = req.vlmguard
    do_sample = o.do_sample
    if do_sample is None and req.temperature is not None and o.decoding != "sample":
        do_sample = req.temperature > 0
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_new = req.spec_max_tokens or min(DEFAULT_CHAT_MAX_TOKENS, max_new_tokens_limit)
    _check_max_tokens(max_new, max_new_tokens_limit)  # before GenerationSpec's own bound, which names its field
    spec = GenerationSpec.build(
        pruning=o.pruning, budget=o.budget, pruning_params=o.pruning_params, decoding=o.decoding,
        decoding_params=o.decoding_params, max_new_tokens=max_new,
        do_sample=do_sample, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.spec_top_k, min_p=req.min_p or 0.0,
        seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids or [], diagnostics=o.diagnostics,
        logprobs=req.spec_logprobs, prompt_logprobs=req.spec_prompt_logprobs,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_new_tokens=req.min_tokens or 0, ignore_eos=bool(req.ignore_eos), image_aspect=o.image_aspect,
        logit_bias=req.logit_bias or {}, choices=req.guided_choice or [], guided=guided,
    )
    return _check_spec(spec, max_new_tokens_limit)


def chat_guided(req: SamplingRequest) -> tuple[GuidedOutput | None, str | None]:
    """The format a chat request holds its answer to, and the field it came from: ``response_format`` JSON
    (OpenAI's), vLLM's ``guided_json`` / ``guided_regex`` / ``guided_grammar``, or a forced tool call's grammar
    (``tool_choice``); at most one of them. (None, None): free text."""
    given: dict[str, dict[str, Any]] = {}
    rf = req.response_format
    if rf is not None and rf.type != "text":  # json_schema without a schema: any JSON object
        schema = rf.json_schema.json_schema if rf.json_schema is not None else None
        # OpenAI's strict (default false): keywords the grammar cannot hold are an error only when it is true
        given["response_format"] = {"json_object": True} if schema is None else {
            "json_schema": schema, "strict": bool(rf.json_schema.strict)}
    if req.guided_json is not None:
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidInput(f"guided_json is not JSON: {e}", param="guided_json") from None
        if not isinstance(schema, dict):
            raise InvalidInput("guided_json must be a JSON schema (an object)", param="guided_json")
        given["guided_json"] = {"json_schema": schema}
    for name in ("guided_regex", "guided_grammar"):
        if getattr(req, name) is not None:
            given[name] = {name.removeprefix("guided_"): getattr(req, name)}
    if len(given) > 1:
        raise InvalidInput(f"give one answer format, not {' and '.join(given)}", param=list(given)[1])
    use = tool_use(req)
    if use is not None and (given or req.guided_choice):
        other = next(iter(given), "guided_choice")
        raise InvalidInput(f"give tools or an answer format ({other}), not both (or tool_choice 'none')", param=other)
    if use is not None and use.constrained and req.min_tokens:
        raise InvalidInput("min_tokens does not go with calls held to their schemas (tool_choice required or a "
                           "named function, or a strict function)", param="min_tokens")
    if use is not None and use.constrained:  # calls in the format the prompt asks for, arguments per the schema
        for i, fn in enumerate(use.functions):
            error = schema_error(fn) if fn in use.callable else None
            if error:
                raise InvalidInput(f"tools[{i}].function.parameters: the schema cannot hold a call: {error}",
                                   param=f"tools.{i}.function.parameters")
        given["tool_choice" if use.forced else "tools"] = {"grammar": use.grammar(req.vlmguard.json_whitespace)}
    if not given:
        return None, None
    (source, fields), = given.items()
    try:
        return GuidedOutput(**fields, whitespace=req.vlmguard.json_whitespace), source
    except ValidationError as e:
        raise InvalidInput(format_validation_error(e, source), param=source) from None


def tool_use(req: ChatCompletionRequest) -> ToolUse | None:
    """What the request asks of tools (None: it offers none, or ``tool_choice`` is "none")."""
    mode = req.tool_mode
    if mode is None:
        return None
    functions = tuple(Function(name=t.function.name, description=t.function.description,
                               parameters=t.function.parameters, strict=bool(t.function.strict))
                      for t in req.tools or [])
    return ToolUse(functions=functions, choice=mode, parallel=req.parallel_tool_calls is not False)


def _history_calls(m: Any, i: int) -> str:
    """An assistant message's earlier calls written as the prompt has them (their arguments must be JSON objects)."""
    texts = []
    for j, call in enumerate(m.tool_calls or []):
        try:
            args = json.loads(call.function.arguments or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise InvalidInput(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object (as text)",
                               param=f"messages.{i}.tool_calls.{j}.function.arguments")
        texts.append(call_text(call.function.name, args))
    return "\n".join(texts)


def _parts(content: Any) -> list[TextPart | ImagePart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(type="text", text=content)]
    return list(content)


def _within_pixel_budget(images: list[Image.Image], max_pixels: int | None) -> None:
    """All of a request's images so far within ``max_pixels`` (checked as each is decoded, so the decoding
    stops at the first image past it)."""
    total = sum(im.width * im.height for im in images)
    if max_pixels is not None and total > max_pixels:
        raise InvalidInput(f"the request's images add up to {total / 1e6:.3g} MP, over this server's limit of "
                           f"{max_pixels / 1e6:.3g} MP per request", param="images")


def _laid_out(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A turn's parts as a one-message request's prompt has them: its images, then its text parts in one."""
    texts = [c["text"] for c in content if c["type"] == "text"]
    text = [{"type": "text", "text": "\n".join(texts)}] if texts else []
    return [c for c in content if c["type"] == "image"] + text


def chat_item(req: ChatCompletionRequest, resolve_image: ImageResolver, *, max_images: int,
              max_new_tokens_limit: int, request_id: str, max_pixels: int | None = None) -> WorkItem:
    """Validate a chat request and turn it into a WorkItem (images decoded)."""
    spec, format_param = chat_spec_and_format(req, max_new_tokens_limit)
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    calls: set[str] = set()  # the ids of the last assistant turn's calls, which tool messages answer
    for i, m in enumerate(req.messages):
        parts = _parts(m.content)
        if m.role in ("system", "developer", "tool") and any(isinstance(p, ImagePart) for p in parts):
            raise InvalidInput(f"messages[{i}]: images are only accepted in user messages", param=f"messages.{i}")
        if m.role in ("system", "developer"):
            system.append("\n".join(p.text for p in parts if isinstance(p, TextPart)))
            continue
        if m.role == "tool":  # a result: a user turn (one for consecutive results)
            if m.tool_call_id not in calls:
                raise InvalidInput(f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no call of the assistant "
                                   "message before it", param=f"messages.{i}.tool_call_id")
            text = response_text("\n".join(p.text for p in parts if isinstance(p, TextPart)))
            if turns and turns[-1].get("tool"):
                turns[-1]["content"].append({"type": "text", "text": text})
            else:
                turns.append({"role": "user", "content": [{"type": "text", "text": text}], "tool": True})
            continue
        calls = {c.id for c in m.tool_calls or []}
        content: list[dict[str, Any]] = []
        for j, p in enumerate(parts):
            if isinstance(p, ImagePart):
                if m.role != "user":
                    raise InvalidInput(f"messages[{i}]: images are only accepted in user messages",
                                       param=f"messages.{i}")
                if len(images) >= max_images:
                    raise InvalidInput(f"too many images: this server accepts at most {max_images} per request",
                                       param="images")
                images.append(resolve_image_part(p, resolve_image, f"messages[{i}].content[{j}]",
                                                 f"messages.{i}.content.{j}"))
                _within_pixel_budget(images, max_pixels)
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": p.text})
        if m.tool_calls:
            content.append({"type": "text", "text": _history_calls(m, i)})
        turns.append({"role": m.role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise InvalidInput("the last message must be a user message (or a tool's result)", param="messages")
    sys_text = "\n".join(s for s in system if s) or None
    tools = tool_use(req)
    if len(turns) == 1:
        text = "\n".join(c["text"] for c in turns[0]["content"] if c["type"] == "text")
        return WorkItem(prompt=text, spec=spec, images=images, system=sys_text, request_id=request_id, tools=tools,
                        format_param=format_param)
    # every turn laid out as a one-message request is (``ModelAdapter.format_prompt``): its images, then its text
    # parts joined by newlines. So a conversation's first turn reads as it did when it was asked alone, and the
    # next turn's prompt begins with the same tokens (the prefix cache's image prefix).
    turns = [{"role": t["role"], "content": _laid_out(t["content"])} for t in turns]
    messages = ([{"role": "system", "content": [{"type": "text", "text": sys_text}]}] if sys_text else []) + turns
    return WorkItem(prompt="", spec=spec, images=images, messages=messages, request_id=request_id, tools=tools,
                    format_param=format_param)


def choice_items(item: WorkItem, n: int) -> list[WorkItem]:
    """The work of a request with ``n`` choices: the item ``n`` times, each with its own request id, and choice k
    seeded ``seed + k`` when the request has a seed (else each sampling choice draws its own seed). They share
    the batch (one pruner and decoder), so a server runs them together; greedy choices are alike."""
    if n == 1:
        return [item]
    out = []
    for k in range(n):
        spec = item.spec
        if spec.seed is not None:
            spec = spec.model_copy(update={"seed": (spec.seed + k) % 2**63})
        out.append(dataclasses.replace(item, spec=spec, request_id=f"{item.request_id}-{k}"))
    return out


def resolve_image_part(part: ImagePart, resolve_image: ImageResolver, where: str, param: str) -> Image.Image:
    """An image part's picture, fitted within 512 x 512 when its ``detail`` is ``low``."""
    try:
        image = resolve_image(part.image_url.url)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}", param=param) from None
    return low_detail(image) if part.image_url.detail == "low" else image


def native_spec(fields: dict[str, Any], max_new_tokens_limit: int) -> GenerationSpec:
    """A native request's ``spec`` object -> GenerationSpec. Its keys are checked before they become keyword
    arguments (``self`` or ``cls`` clashed with the constructor's own: a TypeError, a 500), and an absent
    ``max_new_tokens`` is the spec's default within this server's limit, as a chat request's default is."""
    unknown = [k for k in fields if k not in GenerationSpec.model_fields]
    if unknown:
        raise InvalidInput("invalid generation spec: " + "; ".join(
            f"{k or repr(k)}: Extra inputs are not permitted" for k in unknown), param=f"spec.{unknown[0]}")
    default_max = min(GenerationSpec.model_fields["max_new_tokens"].default, max_new_tokens_limit)
    return _check_spec(GenerationSpec(**{"max_new_tokens": default_max, **fields}), max_new_tokens_limit)


def generate_item(req: GenerateRequest, resolve_image: ImageResolver, *, max_images: int,
                  max_new_tokens_limit: int, request_id: str, max_pixels: int | None = None) -> WorkItem:
    spec = native_spec(req.spec, max_new_tokens_limit)
    if len(req.images) > max_images:
        raise InvalidInput(f"too many images: this server accepts at most {max_images} per request", param="images")
    images = []
    for j, url in enumerate(req.images):
        try:
            image = resolve_image(url)
        except InvalidInput as e:
            raise InvalidInput(f"images[{j}]: {e}", param=f"images.{j}") from None
        images.append(low_detail(image) if req.image_detail == "low" else image)
        _within_pixel_budget(images, max_pixels)
    return WorkItem(prompt=req.prompt, spec=spec, images=images, system=req.system, request_id=request_id)


# ---- responses ----------------------------------------------------------------------------------------

PLAIN_DECODERS = ("greedy", "sample")  # the same decoder (decoding/plain.py); only the default selection differs


def vlmguard_info(result: dict[str, Any], with_steps: bool) -> VlmguardInfo:
    decoding = result.get("decoding") or {}
    sampled = bool(decoding.get("sampled", False))
    name = str(decoding.get("name", "greedy"))
    if name in PLAIN_DECODERS:  # "greedy" with do_sample draws its tokens; "sample" at temperature 0 does not
        name = "sample" if sampled else "greedy"
    return VlmguardInfo(
        pruning=str((result.get("pruning") or {}).get("name", "none")),
        decoding=name,
        sampled=sampled,
        visual_tokens=result["visual_tokens"],
        visual_tokens_kept=result["visual_tokens_kept"],
        kept_indices=result.get("kept_indices"),
        timings=result["timings"],
        steps=result.get("steps") if with_steps else None,
        prefill_flops=result.get("prefill_flops"),
    )


def usage(result: dict[str, Any] | list[dict[str, Any]], per_prompt: int | None = None) -> Usage:
    """One result's usage, or a request's with several choices: each prompt once, every choice's tokens. The choices
    answer one prompt, or (a text completion's) ``per_prompt`` each of several, in order."""
    results = result if isinstance(result, list) else [result]
    firsts = results[::per_prompt] if per_prompt else results[:1]
    done = sum(len(r.get("token_ids") or []) for r in results)
    prompt = sum(r["prompt_tokens"] for r in firsts)
    cached = sum((r.get("timings") or {}).get("prompt_cached_tokens", 0) for r in firsts)
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def chat_logprobs(entries: list[dict[str, Any]] | None) -> ChoiceLogprobs | None:
    """``TokenLogprob`` dicts (a result's or a stream event's) -> OpenAI's ``logprobs`` object."""
    if entries is None:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprobModel(token=e["token"], logprob=e["logprob"], bytes=e.get("bytes"),
                          top_logprobs=[TopLogprobModel(token=t["token"], logprob=t["logprob"], bytes=t.get("bytes"))
                                        for t in e.get("top", [])])
        for e in entries])


def tool_call_models(calls: list[ToolCall]) -> list[ToolCallModel]:
    return [ToolCallModel(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def chunk_tool_calls(pieces: list[CallDelta]) -> list[ChunkToolCall]:
    """A stream's pieces of calls as delta entries: a call's first with its id, type and name."""
    return [ChunkToolCall(index=p.index, id=p.id, type="function" if p.id else None,
                          function=ChunkFunctionCall(name=p.name, arguments=p.arguments)) for p in pieces]


def _choice(k: int, r: dict[str, Any], tools: ToolUse | None) -> Choice:
    """One choice of a chat answer: its text, or the calls it holds (``finish_reason`` "tool_calls")."""
    answer = tools.read(r["text"], r["finish_reason"]) if tools is not None else None
    if answer is None:
        message, finish = AssistantMessage(content=r["text"]), r["finish_reason"]
    else:
        message, finish = AssistantMessage(content=answer.content, tool_calls=tool_call_models(answer.calls)), \
            answer.finish_reason(r["finish_reason"])
    return Choice(index=k, message=message, finish_reason=finish, logprobs=chat_logprobs(r.get("logprobs")))


def chat_response(request_id: str, model: str, result: dict[str, Any] | list[dict[str, Any]],
                  with_steps: bool, tools: ToolUse | None = None, prompt_logprobs: int | None = None
                  ) -> ChatCompletionResponse:
    """A chat answer from one result or one per choice (the ``vlmguard`` object is the first choice's); with
    ``tools``, an answer that is calls comes back as the message's ``tool_calls``; with ``prompt_logprobs`` (vLLM's
    count), the prompt's entries (the first choice's: every choice has the same prompt)."""
    results = result if isinstance(result, list) else [result]
    return ChatCompletionResponse(
        id=request_id, created=int(time.time()), model=model,
        choices=[_choice(k, r, tools) for k, r in enumerate(results)],
        usage=usage(results), vlmguard=vlmguard_info(results[0], with_steps),
        prompt_logprobs=vllm_prompt_logprobs(results[0].get("prompt_logprobs"), prompt_logprobs),
    )


def vllm_prompt_logprobs(entries: list[dict[str, Any]] | None, k: int | None) -> PromptLogprobs | None:
    """A result's prompt entries (``TokenLogprob`` dicts) as vLLM's ``prompt_logprobs``: per position None (nothing
    predicts it) or {token id: {logprob, rank, decoded_token}} for the prompt's token and its ``k`` most likely."""
    if entries is None or k is None:
        return None
    out: PromptLogprobs = []
    for e in entries:
        if e["logprob"] is None:
            out.append(None)
            continue
        place = {str(e["token_id"]): PromptLogprob(logprob=e["logprob"], rank=e.get("rank"), decoded_token=e["token"])}
        for rank, t in enumerate(e.get("top", [])[:k], start=1):
            place.setdefault(str(t["token_id"]), PromptLogprob(logprob=t["logprob"], rank=rank,
                                                               decoded_token=t["token"]))
        out.append(place)
    return out


def chat_chunk(request_id: str, model: str, created: int, *, content: str | None = None, role: str | None = None,
               finish_reason: str | None = None, result: dict[str, Any] | None = None, with_steps: bool = False,
               usage_only: bool = False, logprobs: list[dict[str, Any]] | None = None, index: int = 0,
               results: list[dict[str, Any]] | None = None, tool_calls: list[CallDelta] | None = None
               ) -> ChatCompletionChunk:
    if usage_only and (result is not None or results):
        return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                   usage=usage(results or result))
    delta = ChunkDelta(role=role, content=content, tool_calls=chunk_tool_calls(tool_calls) if tool_calls else None)
    return ChatCompletionChunk(
        id=request_id, created=created, model=model,
        choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                             logprobs=chat_logprobs(logprobs) if logprobs else None)],
        vlmguard=vlmguard_info(result, with_steps) if result is not None else None,
    )


def generate_response(request_id: str, model: str, result: dict[str, Any]) -> GenerateResponse:
    return GenerateResponse(id=request_id, model=model, **result)
