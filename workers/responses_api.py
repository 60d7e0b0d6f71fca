"""OpenAI's Responses API (``POST /v1/responses``) over the chat machinery.

A Responses request is turned into the chat request it means (:func:`chat_request`): ``instructions`` a system
message, each ``input`` item a message (function calls joined to the assistant message before them, their outputs
``tool`` messages), ``max_output_tokens`` ``max_tokens``, ``text.format`` ``response_format``, the flat function
``tools`` the chat API's (``strict`` true unless set, the Responses API's default). It is then checked, run and read
exactly as a chat request (every pruner, decoder and parameter), and its answer written as a Response: a message
item with the answer's text and a ``function_call`` item per call (:func:`response_object`), or, streamed, the
Responses API's typed events (:class:`ResponseEvents`). An error names the field as the Responses request spells it
(:class:`ParamNames`).
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from vlmguard.api_schema import Usage, VlmguardInfo
from vlmguard.errors import InvalidInput
from vlmguard.responses_schema import ITEM_TYPES, InputImage, InputText, ResponsesRequest
from vlmguard.tool_calls import CallDelta
from vlmguard.workers.response_store import StoredResponse

LOGPROBS = "message.output_text.logprobs"  # the ``include`` value that adds something: the text's log-probabilities
# ``include`` values of OpenAI's that name outputs this server never makes (built-in tools' results, reasoning, input
# image URLs echoed back): accepted, with nothing to add (clients that keep no state send reasoning.encrypted_content)
INCLUDE_NOTHING = frozenset({"file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                             "message.input_image.image_url", "computer_call_output.output.image_url",
                             "code_interpreter_call.outputs", "reasoning.encrypted_content"})
PART_TYPES: dict[str, type[BaseModel]] = {"input_text": InputText, "output_text": InputText,
                                          "input_image": InputImage}


def _validated(cls: type[BaseModel], data: Any, path: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join([path, *(str(x) for x in err["loc"])])
        raise InvalidInput(f"{where}: {err['msg']}", param=where) from None


@dataclass
class ParamNames:
    """Where each message of the chat request came from in the Responses request (``instructions``, ``input``,
    ``input.3``), so that an error about the chat request names the field the Responses request has."""

    messages: list[str] = field(default_factory=list)

    def rename(self, param: Optional[str]) -> Optional[str]:
        if not param:
            return param
        head, _, rest = param.partition(".")
        if head == "messages":
            k, _, tail = rest.partition(".")
            base = self.messages[int(k)] if k.isdigit() and int(k) < len(self.messages) else "input"
            tail = tail.replace("image_url.url", "image_url")
            return base + ("." + tail if tail else "")
        if head in ("max_tokens", "max_completion_tokens"):
            return "max_output_tokens"
        if head == "response_format":
            return "text.format"
        if head == "tools":  # tools.N.function.X -> tools.N.X
            return re.sub(r"^tools\.(\d+)\.function\b", r"tools.\1", param)
        if head == "tool_choice":
            return param.replace("tool_choice.function.name", "tool_choice.name")
        return param

    def message(self, text: str) -> str:
        """An error message with the chat request's ``messages[K]`` said as the Responses request's field."""
        return re.sub(r"messages(?:\[(\d+)\]|\.(\d+))",
                      lambda m: self.rename(f"messages.{m.group(1) or m.group(2)}") or "input", text)


def _content(parts: Any, path: str) -> Any:
    """A message's content as the chat API's: its text, or its parts (input_text / output_text -> text,
    input_image -> image_url)."""
    if isinstance(parts, str):
        return parts
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in PART_TYPES:
            raise InvalidInput(f"{path}.content.{j}: part type {kind!r} is not supported (input_text, input_image, "
                               "output_text)", param=f"{path}.content.{j}.type")
        p = _validated(PART_TYPES[kind], part, f"{path}.content.{j}")
        if isinstance(p, InputText):
            out.append({"type": "text", "text": p.text})
        else:
            out.append({"type": "image_url", "image_url": {"url": p.image_url, **({"detail": p.detail} if p.detail
                                                                                 else {})}})
    return out


def _messages(req: ResponsesRequest, earlier: list[dict[str, Any]], earlier_param: str = "previous_response_id"
              ) -> tuple[list[dict[str, Any]], ParamNames]:
    messages: list[dict[str, Any]] = []
    names = ParamNames()

    def add(message: dict[str, Any], path: str) -> None:
        messages.append(message)
        names.messages.append(path)

    if req.instructions:
        add({"role": "system", "content": req.instructions}, "instructions")
    for message in earlier:
        add(message, earlier_param)
    first_new = len(messages)  # (a function call item joins an assistant message of this input only: those before
    # it stay as stored, and this input's messages are all after first_new)
    if isinstance(req.input, str):
        add({"role": "user", "content": req.input}, "input")
        return messages, names
    if not req.input:
        raise InvalidInput("input is an empty list: give a text or at least one item", param="input")
    for i, raw in enumerate(req.input):
        path = f"input.{i}"
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        if not isinstance(kind, str) or kind not in ITEM_TYPES:
            raise InvalidInput(f"{path}: item type {kind!r} is not supported (message, function_call, "
                               "function_call_output)", param=f"{path}.type")
        item = _validated(ITEM_TYPES[kind], raw, path)
        if kind == "message":
            content = _content(item.content, path)
            if item.role == "assistant" and not isinstance(content, str):  # an earlier answer: its text
                for j, part in enumerate(content):
                    if part["type"] != "text":
                        raise InvalidInput(f"{path}.content.{j}: an assistant message holds text only",
                                           param=f"{path}.content.{j}")
                content = "".join(part["text"] for part in content)
            add({"role": item.role, "content": content}, path)
        elif kind == "function_call":
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if len(messages) > first_new and messages[-1]["role"] == "assistant":  # the calls of the answer before
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                add({"role": "assistant", "content": None, "tool_calls": [call]}, path)
        else:
            add({"role": "tool", "tool_call_id": item.call_id, "content": item.output}, path)
    return messages, names


@dataclass
class ChatForm:
    """A Responses request as the chat request it means (``body``, the JSON a client would send), where that
    request's messages came from (``names``), and the messages of its own input (no instructions, no earlier
    response's), which a stored response keeps for the next one."""

    body: dict[str, Any]
    names: ParamNames
    new_messages: list[dict[str, Any]]


def chat_request(req: ResponsesRequest, earlier: Optional[list[dict[str, Any]]] = None,
                 earlier_param: str = "previous_response_id") -> ChatForm:
    """The chat request a Responses request means: its ``instructions``, then ``earlier`` (the conversation of the
    response it continues, ``previous_response_id``), then its own input. Items that are not messages the chat API
    has are refused here, naming them."""
    earlier = earlier or []
    messages, names = _messages(req, earlier, earlier_param)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "vlmguard": req.vlmguard.model_dump()}
    for j, what in enumerate(req.include or []):
        if what != LOGPROBS and what not in INCLUDE_NOTHING:
            raise InvalidInput(f"include: {what!r} is no value of OpenAI's include ({LOGPROBS!r} adds the text's "
                               "log-probabilities)", param=f"include.{j}")
    if wants_logprobs(req):
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    if req.tools is not None:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters,
            "strict": True if t.strict is None else t.strict}} for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice if isinstance(req.tool_choice, str) else {
            "type": "function", "function": {"name": req.tool_choice.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.json_schema,
                                                   "description": fmt.description, "strict": fmt.strict}}
    return ChatForm(body, names, messages[(1 if req.instructions else 0) + len(earlier):])


def truncations(form: ChatForm) -> list[ChatForm]:
    """What ``truncation: auto`` may send instead of a conversation too long for the model's context, fewest
    messages left out first: the conversation without its oldest 1, 2, ... middle turns, then without its first turn
    too. A turn is a user message and the answers, function calls and their outputs after it; the first turn (which
    usually shows the image) and the last (the new question) stay while anything else can go, and system and
    developer messages (the instructions) always stay. The stored conversation (``new_messages``) is not cut: the
    next request is fitted again."""
    messages = form.body["messages"]
    turns: list[list[int]] = []
    for i, message in enumerate(messages):
        if message["role"] in ("system", "developer"):
            continue
        if message["role"] == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    if len(turns) < 2:
        return []
    middle = turns[1:-1]
    drops = [[i for turn in middle[:k] for i in turn] for k in range(1, len(middle) + 1)]
    drops.append([*turns[0], *(i for turn in middle for i in turn)])
    return [_without(form, set(drop)) for drop in drops]


def _without(form: ChatForm, drop: set[int]) -> ChatForm:
    kept = [i for i in range(len(form.body["messages"])) if i not in drop]
    body = {**form.body, "messages": [form.body["messages"][i] for i in kept]}
    return ChatForm(body, ParamNames([form.names.messages[i] for i in kept]), form.new_messages)


ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's ``input`` as the Responses API lists a response's input items: a text as a user message, each
    item as sent, with an id where it had none."""
    if isinstance(req.input, str):
        return [{"type": "message", "id": new_id("msg"), "role": "user",
                 "content": [{"type": "input_text", "text": req.input}]}]
    return with_ids(req.input)


def with_ids(raw_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items (checked) as the Responses API lists them: each with its type and an id where it had none."""
    items = []
    for raw in raw_items:
        item = {"type": "message", **raw}
        item["id"] = item.get("id") or new_id(ITEM_ID_PREFIX[item["type"]])
        items.append(item)
    return items


def answer_message(response: dict[str, Any]) -> dict[str, Any]:
    """A finished response's answer as the chat API's assistant message: its text, and its function calls."""
    text, calls = None, []
    for item in response["output"]:
        if item["type"] == "message":
            text = "".join(part["text"] for part in item["content"] if part["type"] == "output_text")
        elif item["type"] == "function_call":
            calls.append({"id": item["call_id"], "type": "function",
                          "function": {"name": item["name"], "arguments": item["arguments"]}})
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return message


def stored_response(response: dict[str, Any], form: ChatForm, earlier: Optional[StoredResponse],
                    own_items: list[dict[str, Any]]) -> StoredResponse:
    """What the store keeps of a finished ``response``: the conversation with its answer, and its input items (those
    of the response it continued, that response's output, then its own: ``own_items``, its ``input_items``)."""
    before = [] if earlier is None else earlier.messages
    items = [] if earlier is None else [*earlier.items, *earlier.response["output"]]
    return StoredResponse(response=response, messages=[*before, *form.new_messages, answer_message(response)],
                          items=[*items, *own_items])


def wants_logprobs(req: ResponsesRequest) -> bool:
    """The answer's text comes with its tokens' log-probabilities (``include``; ``top_logprobs`` alternatives)."""
    return LOGPROBS in (req.include or [])


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_id(response_id: str, prefix: str, index: int) -> str:
    """The id of a streamed Response's ``index``-th output item (``prefix`` ``call``: the call id of a function call
    item, OpenAI's 24 hex digits): the same each time the response is answered, so that a lost background response
    answered again repeats the events its readers already have."""
    digits = uuid.uuid5(uuid.NAMESPACE_URL, f"{response_id}/{index}/{prefix}").hex
    return f"{prefix}_{digits[:24] if prefix == 'call' else digits}"


@dataclass
class OutputCall:
    """A function call of the answer: its output item's id, the call's id and what it calls."""

    item_id: str
    call_id: str
    name: str
    arguments: str = ""


def _text_part(text: str, logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def _message_item(item_id: str, text: str, status: str,
                  logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)]}


def _call_item(call: OutputCall, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": call.item_id, "call_id": call.call_id, "name": call.name,
            "arguments": call.arguments, "status": status}


def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.prompt_tokens_details
                                                                      .cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


@dataclass
class ResponseHead:
    """What every state of one response shares: its id, model, creation time and the request's settings it
    echoes."""

    id: str
    model: str
    req: ResponsesRequest
    stored: bool = False  # the finished response will be kept (its previous_response_id for the next request)
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], usage: Optional[Usage] = None,
                 info: Optional[VlmguardInfo] = None) -> dict[str, Any]:
        req = self.req
        incomplete = status == "incomplete"
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": self.model, "output": output, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "tool_choice": (req.tool_choice.model_dump() if req.tool_choice is not None
                            and not isinstance(req.tool_choice, str) else req.tool_choice or "auto"),
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "text": {"format": (req.text.format.model_dump(by_alias=True, exclude_none=True)
                                if req.text is not None and req.text.format is not None else {"type": "text"})},
            "previous_response_id": req.previous_response_id, "store": self.stored, "background": bool(req.background),
            "conversation": {"id": req.conversation_id} if req.conversation is not None else None,
            "truncation": req.truncation or "disabled",
            "user": req.user, "service_tier": "default", "reasoning": {"effort": None, "summary": None},
            "max_tool_calls": req.max_tool_calls, "prompt_cache_key": req.prompt_cache_key,
            "safety_identifier": req.safety_identifier,
            "metadata": req.metadata or {}, "usage": _usage(usage) if usage is not None else None,
        }
        if info is not None:
            body["vlmguard"] = info.model_dump(exclude_none=True)
        return body

    def final(self, finish_reason: str, text_item: Optional[tuple[str, str]], calls: list[OutputCall],
              usage: Usage, info: Optional[VlmguardInfo],
              logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        """The finished response: ``completed``, or ``incomplete`` when the answer ran out of tokens. ``logprobs``:
        the text's tokens' entries (when asked for)."""
        done = "incomplete" if finish_reason == "length" else "completed"
        output = [] if text_item is None else [_message_item(text_item[0], text_item[1], done, logprobs)]
        output += [_call_item(c, done) for c in calls]
        return self.response(done, output, usage, info)


def response_object(head: ResponseHead, content: Optional[str], calls: list[tuple[str, str, str]],
                    finish_reason: str, usage: Usage, info: Optional[VlmguardInfo],
                    logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """A whole answer as a Response: its text as a message item (an answer of calls alone has none; with
    ``logprobs``, its tokens' entries) and each call (``(call id, name, arguments)``) as a function_call item."""
    out_calls = [OutputCall(new_id("fc"), cid, name, args) for cid, name, args in calls]
    text_item = None if content is None and out_calls else (new_id("msg"), content or "")
    return head.final(finish_reason, text_item, out_calls, usage, info, logprobs)


class ResponseEvents:
    """The typed events of one streamed Response (``response.created``, ``response.output_text.delta``,
    ``response.function_call_arguments.delta``, ... ``response.completed``), each numbered, from the chat stream's
    text pieces and call pieces (:class:`~vlmguard.tool_calls.CallDelta`) and its end."""

    def __init__(self, head: ResponseHead, logprobs: bool = False):
        self.head = head
        self.logprobs: Optional[list[dict[str, Any]]] = [] if logprobs else None  # the text's entries so far
        self.seq = 0
        self.outputs = 0  # output items opened
        self.text_item: Optional[tuple[str, int]] = None  # the open message item: its id and output index
        self.text = ""
        self.message: Optional[tuple[str, str]] = None  # the message item once closed: id and text
        self.calls: list[OutputCall] = []
        self.call_index: list[int] = []  # each call's output index

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self, queued: bool = False) -> list[dict[str, Any]]:
        """The opening events (``queued``: of a background response, created queued)."""
        opening = self.head.response("in_progress", [])
        if not queued:
            return [self._event("response.created", response=opening),
                    self._event("response.in_progress", response=opening)]
        waiting = self.head.response("queued", [])
        return [self._event("response.created", response=waiting), self._event("response.queued", response=waiting),
                self._event("response.in_progress", response=opening)]

    def _open_text(self) -> list[dict[str, Any]]:
        item_id = output_id(self.head.id, "msg", self.outputs)
        self.text_item = (item_id, self.outputs)
        self.outputs += 1
        item = {**_message_item(item_id, "", "in_progress"), "content": []}
        return [self._event("response.output_item.added", output_index=self.text_item[1], item=item),
                self._event("response.content_part.added", item_id=item_id, output_index=self.text_item[1],
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def text_delta(self, delta: str, logprobs: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
        """A piece of the text, with the entries of the tokens that wrote it (when asked for)."""
        if not delta:
            return []
        out = self._open_text() if self.text_item is None and self.message is None else []
        if self.text_item is None:  # (text after a call: not written by the Hermes format, never sent)
            return out
        self.text += delta
        entries = logprobs or []
        if self.logprobs is not None:
            self.logprobs += entries
        out.append(self._event("response.output_text.delta", item_id=self.text_item[0],
                               output_index=self.text_item[1], content_index=0, delta=delta, logprobs=entries))
        return out

    def _close_text(self, status: str) -> list[dict[str, Any]]:
        if self.text_item is None:
            return []
        item_id, index = self.text_item
        self.text_item, self.message = None, (item_id, self.text)
        return [self._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                            text=self.text, logprobs=self.logprobs or []),
                self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                            part=_text_part(self.text, self.logprobs)),
                self._event("response.output_item.done", output_index=index,
                            item=_message_item(item_id, self.text, status, self.logprobs))]

    def call_pieces(self, pieces: list[CallDelta]) -> list[dict[str, Any]]:
        out = self._close_text("completed") if pieces else []
        for p in pieces:
            if p.id is not None:  # a call's first piece: its item opens
                self.calls.append(OutputCall(output_id(self.head.id, "fc", self.outputs),
                                             output_id(self.head.id, "call", self.outputs), p.name or ""))
                self.call_index.append(self.outputs)
                self.outputs += 1
                out.append(self._event("response.output_item.added", output_index=self.call_index[-1],
                                       item=_call_item(self.calls[-1], "in_progress")))
            call, index = self.calls[p.index], self.call_index[p.index]
            if p.arguments:
                call.arguments += p.arguments
                out.append(self._event("response.function_call_arguments.delta", item_id=call.item_id,
                                       output_index=index, delta=p.arguments))
        return out

    def finish(self, finish_reason: str, usage: Usage, info: Optional[VlmguardInfo]) -> list[dict[str, Any]]:
        status = "incomplete" if finish_reason == "length" else "completed"
        empty = self.text_item is None and self.message is None and not self.calls  # an answer of no text
        out = (self._open_text() if empty else []) + self._close_text(status)
        for call, index in zip(self.calls, self.call_index):
            out += [self._event("response.function_call_arguments.done", item_id=call.item_id, output_index=index,
                                name=call.name, arguments=call.arguments),
                    self._event("response.output_item.done", output_index=index, item=_call_item(call, status))]
        final = self.head.final(finish_reason, self.message, self.calls, usage, info, self.logprobs)
        return out + [self._event(f"response.{final['status']}", response=final)]

    def error(self, error: dict[str, Any]) -> dict[str, Any]:
        return self._event("error", code=error.get("code") or error.get("type"), message=error.get("message"),
                           param=None)
