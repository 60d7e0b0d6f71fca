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
"auto" with a ``strict`` function, an answer that opens with a call is held to that grammar too.
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
    # an answer that opens with a call is held to the schemas
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
    """An answer as the chat API returns it: its text content (None when it is only calls) and its calls."""

    content: str | None
    calls: list[ToolCall]


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

    def prompt_block(self) -> str:
        return tools_block(self.functions)

    def grammar(self, whitespace: Literal["flexible", "compact"] = "flexible") -> str:
        """The Lark grammar (llguidance's dialect) a constrained answer follows: the calls a forced choice allows;
        under "auto", text that does not begin with a call's tag, or calls (text before a call is text)."""
        several = self.parallel and self.choice in ("auto", "required")  # (a named function: one call)
        if self.forced:
            return calls_grammar(self.callable, several=several, whitespace=whitespace)
        # llguidance's lexer reads TEXT and a call's opening tag side by side from the first byte: an answer that
        # opens with the tag is calls (held to the schemas), any other is text
        text = f"TEXT: /(?s:.+)/ & ~/(?s:{re.escape(CALL_OPEN)}.*)/"
        calls = calls_grammar(self.callable, several=several, whitespace=whitespace, rule="calls")
        return "\n".join(["start: (TEXT | calls)?", text, calls])

    def read(self, text: str, finish_reason: str = "stop") -> ToolAnswer | None:
        """The calls in an answer (None: the answer is no well-formed call of an offered function, or it did not
        end by itself: ``finish_reason`` "length", say, whose last call may be cut); without ``parallel``, the
        first call only."""
        if finish_reason != "stop":
            return None
        answer = parse_calls(text, {f.name for f in self.callable})
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
                  rule: str = "start") -> str:
    """A Lark grammar whose ``rule`` is one ``<tool_call>`` block (or, ``several``, one or more, a newline apart)
    calling one of ``functions`` with arguments that follow its schema."""
    if not functions:
        raise ValueError("no function to call")
    rules = [f"fn_{i}: %json {json.dumps(_call_schema(f, whitespace))}" for i, f in enumerate(functions)]
    body = " | ".join(f"fn_{i}" for i in range(len(functions)))
    start = f'{rule}: call ("\\n" call)*' if several else f"{rule}: call"
    opening, closing = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)  # Lark string literals
    return "\n".join([start, f"call: {opening} ({body}) {closing}", *rules])


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(obj: Any, names: set[str]) -> ToolCall | None:
    """A call from its JSON: an object naming one of ``names`` with an object of arguments (vLLM's Hermes reader
    also takes "parameters" for "arguments"), else None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False), id=new_call_id())


def _bare_calls(text: str, names: set[str]) -> ToolAnswer | None:
    """An answer that is nothing but a call's JSON, or a list of them (optionally in a ```json fence): what a model
    not trained on the tags writes when the prompt shows it the call format."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    calls = [_call(o, names) for o in (obj if isinstance(obj, list) and obj else [obj])]
    return ToolAnswer(content=None, calls=calls) if all(calls) else None  # type: ignore[arg-type]


def parse_calls(text: str, names: set[str]) -> ToolAnswer | None:
    """The ``<tool_call>`` blocks of ``text`` (the last may lack its closing tag: the answer ended there) as calls,
    when every block is a call of one of ``names``; without blocks, an answer that is only a call's JSON (or a list
    of them). None when the answer is not calls."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return _bare_calls(text, names)
    calls = []
    for block in blocks:
        try:
            call = _call(json.loads(block.group(1)), names)
        except ValueError:
            return None
        if call is None:
            return None
        calls.append(call)
    content = text[:blocks[0].start()].strip()
    return ToolAnswer(content=content or None, calls=calls)


class CallStream:
    """A streamed answer's text as a chat stream sends it when the request offers tools: text that cannot be the
    start of a call goes out as content as it comes; from a ``<tool_call>`` tag on (a forced call, or an answer that
    opens as JSON: from the start) the text is held, and at the end it is either calls or, when it is none, the rest
    of the content."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.seen = ""  # all the text so far
        self.sent = 0  # how much of it went out as content
        self.holding = use.forced

    def feed(self, text: str) -> str:
        """The content to send now for the answer's next ``text``."""
        self.seen += text
        if self.holding:
            return ""
        if self.sent == 0:  # an answer that opens as JSON may be a bare call (:func:`parse_calls`): held whole
            head = self.seen.lstrip()
            if not head or head[0] in "{[`":
                self.holding = bool(head)
                return ""
        at = self.seen.find(CALL_OPEN, self.sent)
        if at >= 0:
            self.holding = True
            end = at
        else:  # keep back a tail that may be the start of the tag
            end = len(self.seen)
            for k in range(min(len(CALL_OPEN) - 1, len(self.seen) - self.sent), 0, -1):
                if CALL_OPEN.startswith(self.seen[-k:]):
                    end = len(self.seen) - k
                    break
        out, self.sent = self.seen[self.sent:end], max(self.sent, end)
        return out

    def finish(self, finish_reason: str) -> tuple[str, list[ToolCall]]:
        """At the answer's end: the content still to send and the calls (none when the answer is not calls, or
        was cut short: ``finish_reason`` "length")."""
        answer = self.use.read(self.seen, finish_reason)
        if answer is not None:
            return "", answer.calls
        rest, self.sent = self.seen[self.sent:], len(self.seen)
        return rest, []
