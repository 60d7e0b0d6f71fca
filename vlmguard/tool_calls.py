"""Tool calling (OpenAI's ``tools`` / ``tool_choice``) in the Hermes format: how a chat request's functions, its
earlier calls and their results are written into the prompt, the grammar that forces a call, and how calls are read
back out of an answer.

None of the supported families' chat templates renders tools, so vlmguard writes them itself, the same way for
every family, in the format of Hermes-style tool models (Qwen2.5 and its VL models among them):

* the system turn gets a "# Tools" block listing each function's JSON signature inside ``<tools></tools>`` and
  asking for each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* an assistant turn's earlier calls are written back in that form after its text;
* a ``tool`` message (a call's result) is a user turn ``<tool_response>\\n...\\n</tool_response>`` (consecutive
  results share one turn).

``tool_choice`` "auto" lets the model choose: an answer whose ``<tool_call>`` blocks each hold a known function's
name and an arguments object is read as those calls (any text before the first block is the message's content);
any other answer is plain text. "required" and a named function force calls: the answer is held to a grammar
(``GenerationSpec.guided``, llguidance) of one ``<tool_call>`` block per call whose JSON follows the function's
``parameters`` schema (one call for a named function or without ``parallel_tool_calls``, else one or more). Under
"auto" with a ``strict`` function, the calls of an answer (after any text) are held to that grammar too.

A held answer's calls stream as they are written (:class:`CallStream`): a call's id and name once its name is
whole, then its arguments' text piece by piece, as OpenAI streams them. Every call's ``arguments`` is the text the
model wrote for them, streamed or not.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from vlmguard.guided import schema_error as guided_schema_error, schema_options

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # the arguments of a function that gives no ``parameters``
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Function:
    """One function a request offers (OpenAI's ``tools[].function``)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # true: a schema keyword the grammar cannot hold is refused (false, OpenAI's default: left out), and under "auto"
    # an answer's calls are held to the schemas
    strict: bool = False

    def signature(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters if self.parameters is not None else ANY_OBJECT
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    """A call read from an answer: the function's name and its arguments as JSON text (as OpenAI sends them)."""

    name: str
    arguments: str
    id: str


@dataclass(frozen=True)
class ToolAnswer:
    """An answer as the chat API returns it: its text content (None when it is only calls) and its calls; not
    ``whole`` when the last call was cut (a held answer that ran out of tokens: its arguments end where it did)."""

    content: str | None
    calls: list[ToolCall]
    whole: bool = True

    def finish_reason(self, engine_reason: str) -> str:
        return calls_finish_reason(self.whole, engine_reason)


def calls_finish_reason(whole: bool, engine_reason: str) -> str:
    """The ``finish_reason`` of an answer that is calls: "tool_calls" for ``whole`` calls the answer ended after,
    else the engine's ("length": the last call cut)."""
    return "tool_calls" if whole and engine_reason == "stop" else engine_reason


@dataclass(frozen=True)
class CallDelta:
    """A piece of a streamed call: its first (``id`` and ``name`` set, the arguments' text so far, perhaps "") or
    a later one (the arguments' next text)."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ToolUse:
    """What a chat request asks of tools: the functions offered, ``choice`` ("auto", "required", or the name of
    the one function to call) and whether an answer may hold several calls."""

    functions: tuple[Function, ...]
    choice: str
    parallel: bool = True

    @property
    def forced(self) -> bool:
        """The answer must be calls ("required" or a named function): its text is held to :meth:`grammar`."""
        return self.choice != "auto"

    @property
    def constrained(self) -> bool:
        """The answer is held to :meth:`grammar`: a forced call, or "auto" with a ``strict`` function (OpenAI's
        promise: a strict function's calls follow its schema)."""
        return self.forced or any(f.strict for f in self.functions)

    @property
    def callable(self) -> tuple[Function, ...]:
        """The functions an answer may call: all of them, or the one ``choice`` names."""
        return tuple(f for f in self.functions if self.choice in ("auto", "required", f.name))

    def names(self) -> set[str]:
        return {f.name for f in self.callable}

    def prompt_block(self) -> str:
        return tools_block(self.functions)

    def grammar(self, whitespace: Literal["flexible", "compact"] = "flexible") -> str:
        """The Lark grammar (llguidance's dialect) a constrained answer follows: the calls a forced choice allows;
        under "auto", text without a call's tag, or text and then calls (the tag begins them wherever it comes)."""
        several = self.parallel and self.choice in ("auto", "required")  # (a named function: one call)
        return calls_grammar(self.callable, several=several, whitespace=whitespace, after_text=not self.forced)

    def holds(self, text: str) -> bool:
        """Whether an answer's calls were held to :meth:`grammar`: a forced choice's, or under "auto" with a strict
        function those of an answer that holds a call's tag (the grammar's TEXT cannot)."""
        return self.forced or (self.constrained and CALL_OPEN in text)

    def read(self, text: str, finish_reason: str = "stop") -> ToolAnswer | None:
        """The calls in an answer (None: the answer is no well-formed call of an offered function, or it did not
        end by itself: ``finish_reason`` "length", say, whose last call may be cut); without ``parallel``, the
        first call only. A held answer (:meth:`holds`) is calls whatever ended it: those whose name was written,
        the last perhaps cut (not ``whole``)."""
        if self.holds(text):
            at = max(text.find(CALL_OPEN), 0)  # (a forced answer cut before its tag was whole: no call)
            reader = CallReader(self.names())
            reader.feed(text[at:])
            calls = [ToolCall(name, arguments, new_call_id()) for name, arguments in reader.named()]
            return ToolAnswer(text[:at].strip() or None, calls, whole=reader.whole()) if calls else None
        if finish_reason != "stop":
            return None
        answer = parse_calls(text, self.names())
        if answer is not None and not self.parallel:
            answer = ToolAnswer(answer.content, answer.calls[:1])
        return answer


def tools_block(functions: Sequence[Function]) -> str:
    """The system text that offers ``functions`` and says how to call them."""
    signatures = "\n".join(json.dumps(f.signature(), ensure_ascii=False) for f in functions)
    return (f"# Tools\n\nYou may call these functions (signatures in <tools></tools>):\n<tools>\n{signatures}\n"
            "</tools>\n\nTo call them, answer with one block per call:\n"
            f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}')


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """An earlier call as the assistant turn that made it is written."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def response_text(content: str) -> str:
    """A call's result as the user turn that brings it is written."""
    return f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}"


def _call_schema(fn: Function, whitespace: str) -> dict[str, Any]:
    """The JSON of one call to ``fn``: its name, then arguments following its parameters (llguidance writes
    required properties in the order given). A non-strict function's keywords that llguidance lacks are left out."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": fn.name},
                           "arguments": fn.parameters if fn.parameters is not None else ANY_OBJECT},
            "x-guidance": schema_options(whitespace, fn.strict)}


def schema_error(fn: Function) -> str | None:
    """Why llguidance cannot compile ``fn``'s parameters schema (:func:`vlmguard.guided.schema_error`), or None."""
    return None if fn.parameters is None else guided_schema_error(fn.parameters, fn.strict)


def calls_grammar(functions: Sequence[Function], *, several: bool, whitespace: str = "flexible",
                  after_text: bool = False) -> str:
    """A Lark grammar of one ``<tool_call>`` block (or, ``several``, one or more, a newline apart) calling one of
    ``functions`` with arguments that follow its schema. ``after_text``: text that holds no call's tag, or text and
    then the calls (a lazy lexeme reads the text up to the first tag, which the calls go on from)."""
    if not functions:
        raise ValueError("no function to call")
    rules = [f"fn_{i}: %json {json.dumps(_call_schema(f, whitespace))}" for i, f in enumerate(functions)]
    more = ' ("\\n" call)*' if several else ""
    tag = re.escape(CALL_OPEN)
    start = [f'start: TEXT | head "\\n" body{more}', f"TEXT: /(?s:.*)/ & ~/(?s:.*{tag}.*)/",
             f"head[lazy]: /(?s:.*){tag}/"] if after_text else [f"start: call{more}"]
    opening, closing = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)  # Lark string literals
    body = " | ".join(f"fn_{i}" for i in range(len(functions)))
    return "\n".join([*start, f"call: {opening} body", f"body: ({body}) {closing}", *rules])


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


ARGUMENT_KEYS = ("arguments", "parameters")  # vLLM's Hermes reader also takes "parameters" for "arguments"


def _calls(text: str, names: set[str], *, listed: bool = False) -> list[ToolCall] | None:
    """The calls whose JSON ``text`` is (one object, or with ``listed`` also a list of them): each an object naming
    one of ``names`` with an object of arguments, whose text is kept as written; None when any is not."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    objs = obj if listed and isinstance(obj, list) and obj else [obj]
    reader = CallReader()  # (the list's objects are the runs of JSON objects it reads)
    reader.feed(text)
    calls = []
    for j, o in enumerate(objs):
        if not isinstance(o, dict) or o.get("name") not in names:
            return None
        args = next((o[k] for k in ARGUMENT_KEYS if k in o), {})
        if not isinstance(args, dict):
            return None
        written = reader.value(j, *ARGUMENT_KEYS) if j < len(reader.calls) else None
        calls.append(ToolCall(name=o["name"], arguments=written or "{}", id=new_call_id()))
    return calls


def _bare_calls(text: str, names: set[str]) -> ToolAnswer | None:
    """An answer that is nothing but a call's JSON, or a list of them (optionally in a ```json fence): what a model
    not trained on the tags writes when the prompt shows it the call format."""
    calls = _calls(re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip()), names, listed=True)
    return ToolAnswer(content=None, calls=calls) if calls else None


def parse_calls(text: str, names: set[str]) -> ToolAnswer | None:
    """The ``<tool_call>`` blocks of ``text`` (the last may lack its closing tag: the answer ended there) as calls,
    when every block is a call of one of ``names``; without blocks, an answer that is only a call's JSON (or a list
    of them). None when the answer is not calls."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return _bare_calls(text, names)
    calls = []
    for block in blocks:
        found = _calls(block.group(1), names)
        if found is None:
            return None
        calls += found
    content = text[:blocks[0].start()].strip()
    return ToolAnswer(content=content or None, calls=calls)


class CallStream:
    """A streamed answer's text as a chat stream sends it when the request offers tools. Text that cannot be the
    start of a call goes out as content as it comes. Calls held to the grammar (:meth:`ToolUse.holds`) go out as
    they are written (:class:`CallDelta`). Any other text from a ``<tool_call>`` tag on (or an answer that opens as
    JSON: from the start) is held, and at the end it is either calls, each whole in one piece, or, when it is none,
    the rest of the content."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.seen = ""  # all the text so far
        self.sent = 0  # how much of it went out as content
        self.holding = use.forced
        # a held answer's calls, read as they come
        self.reader: CallReader | None = CallReader(use.names()) if use.forced else None
        self.ids: list[str] = []  # the ids of the calls sent so far
        self.args_sent: list[int] = []  # how much of each one's arguments went out

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        """The content and the pieces of calls to send now for the answer's next ``text``."""
        self.seen += text
        if self.reader is not None:
            self.reader.feed(text)
            return "", self._pieces()
        if self.holding:
            return "", []
        if self.sent == 0:  # an answer that opens as JSON may be a bare call (:func:`parse_calls`): held whole
            head = self.seen.lstrip()
            if not head or head[0] in "{[`":
                self.holding = bool(head)
                return "", []
        at = self.seen.find(CALL_OPEN, self.sent)
        if at >= 0:
            self.holding = True
            if self.use.holds(self.seen):  # held to the calls' grammar: its calls go out as they are written
                self.reader = CallReader(self.use.names())
                self.reader.feed(self.seen[at:])
                out, self.sent = self.seen[self.sent:at], at
                return out, self._pieces()
            end = at
        else:  # keep back a tail that may be the start of the tag
            end = len(self.seen)
            for k in range(min(len(CALL_OPEN) - 1, len(self.seen) - self.sent), 0, -1):
                if CALL_OPEN.startswith(self.seen[-k:]):
                    end = len(self.seen) - k
                    break
        out, self.sent = self.seen[self.sent:end], max(self.sent, end)
        return out, []

    def finish(self, finish_reason: str) -> tuple[str, list[CallDelta], str]:
        """At the answer's end: the content and the pieces of calls still to send, and the choice's finish reason
        (:meth:`ToolAnswer.finish_reason`). An answer that is no calls (or was cut short before it was read as
        any: ``finish_reason`` "length") sends the rest of its text as content."""
        if self.reader is not None and self.reader.named():
            return "", self._pieces(), calls_finish_reason(self.reader.whole(), finish_reason)
        answer = None if self.reader is not None else self.use.read(self.seen, finish_reason)
        if answer is not None:
            return "", [CallDelta(j, c.arguments, c.id, c.name) for j, c in enumerate(answer.calls)], \
                answer.finish_reason(finish_reason)
        rest, self.sent = self.seen[self.sent:], len(self.seen)
        return rest, [], finish_reason

    def _pieces(self) -> list[CallDelta]:
        """What the held calls wrote since the last pieces: a new call's id and name once its name is whole, and
        each call's next arguments text."""
        pieces = []
        for j, (name, arguments) in enumerate(self.reader.named()):  # type: ignore[union-attr]
            first = j == len(self.ids)
            if first:
                self.ids.append(new_call_id())
                self.args_sent.append(0)
            if first or len(arguments) > self.args_sent[j]:
                pieces.append(CallDelta(j, arguments[self.args_sent[j]:], self.ids[j] if first else None,
                                        name if first else None))
                self.args_sent[j] = len(arguments)
        return pieces


class CallReader:
    """Calls' JSON read as it comes, a character at a time: a run of JSON objects, anything between them skipped
    (the Hermes format's tags, a list's brackets and commas, a code fence: none of them holds a brace). For each
    object it keeps where each top-level value begins and, once whole, ends, so that a call's name is known as soon
    as its string is written and its arguments' text can go out as far as it has come."""

    def __init__(self, names: set[str] | None = None) -> None:
        self.names = names  # the functions a call may name (:meth:`named`)
        self.text = ""
        self.calls: list[dict[str, list[int]]] = []  # per object: key -> [start, end] of its value (end -1: open)
        self.closed = 0  # objects whose closing brace has come
        self._depth = 0  # open braces and brackets
        self._string: str | None = None  # inside a string: "key", "value" (a top-level string value) or "inner"
        self._escape = False
        self._phase = "key"  # inside an object, at its top level: key, colon, value, literal, after
        self._key = ""
        self._start = 0

    def feed(self, text: str) -> None:
        begin = len(self.text)
        self.text += text
        for i in range(begin, len(self.text)):
            self._step(i, self.text[i])

    def value(self, j: int, *keys: str) -> str | None:
        """The text of object ``j``'s value under the first of ``keys`` it has, as far as it has come."""
        for key in keys:
            if key in self.calls[j]:
                start, end = self.calls[j][key]
                return self.text[start:end if end >= 0 else len(self.text)]
        return None

    def name(self, j: int) -> str | None:
        """Object ``j``'s "name", once its string is whole."""
        span = self.calls[j].get("name")
        if span is None or span[1] < 0:
            return None
        return _json_string(self.text[span[0]:span[1]])

    def named(self) -> list[tuple[str, str]]:
        """The calls whose name is whole (and, given ``names``, one of them), in order up to the first that has
        none yet: each one's name and its arguments' text so far ("" before they begin)."""
        out = []
        for j in range(len(self.calls)):
            name = self.name(j)
            if name is None or (self.names is not None and name not in self.names):
                break
            out.append((name, self.value(j, *ARGUMENT_KEYS) or ""))
        return out

    def whole(self) -> bool:
        """Every object read has closed, and each named a function."""
        return self.closed == len(self.calls) == len(self.named())

    def _step(self, i: int, c: str) -> None:
        if self._string is not None:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                role, self._string = self._string, None
                if role == "key":
                    self._key, self._phase = _json_string(self.text[self._start:i + 1]) or "", "colon"
                elif role == "value":
                    self._end_value(i + 1)
            return
        if self._depth == 0:  # between objects
            if c == "{":
                self._depth, self._phase = 1, "key"
                self.calls.append({})
            return
        if self._depth > 1:  # inside a nested value
            if c == '"':
                self._string = "inner"
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 1:
                    self._end_value(i + 1)
            return
        if self._phase == "literal":  # a number, true, false or null ends at what follows it
            if c not in ",}" and not c.isspace():
                return
            self._end_value(i)
        if c.isspace():
            return
        if self._phase == "key" and c == '"':
            self._string, self._start = "key", i
        elif self._phase == "colon" and c == ":":
            self._phase = "value"
        elif self._phase == "value":
            self.calls[-1][self._key] = [i, -1]
            if c == '"':
                self._string, self._phase = "value", "string"
            elif c in "{[":
                self._depth, self._phase = 2, "nested"
            else:
                self._phase = "literal"
        elif self._phase in ("key", "after") and c == "}":
            self._depth, self.closed = 0, self.closed + 1
        elif self._phase == "after" and c == ",":
            self._phase = "key"

    def _end_value(self, end: int) -> None:
        self.calls[-1][self._key][1] = end
        self._phase = "after"


def _json_string(text: str) -> str | None:
    """A JSON string literal's value (None: not one)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
