"""Wire format of OpenAI's Responses API (``POST /v1/responses``), the subset vlmguard answers: a request in, one
response out, whole or streamed as typed events.

The request's ``input`` is a text or a list of items: messages (``role`` user / system / developer / assistant, a
text or parts ``input_text``, ``input_image``, ``output_text``), earlier function calls and their outputs. Its
items are read one by one when the request is turned into a chat request (``workers/responses_api.py``), so that an
error names the item (``input.2.content.0``). A finished response is kept (``store``, true unless set false) by the
service, so that ``previous_response_id`` continues it (workers/response_store.py); ``conversation`` names a
conversation of the Conversations API instead (workers/conversations.py).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from vlmguard.api_schema import OpenAIHints, VlmguardOptions, unsupported
from vlmguard.spec import MAX_TOP_LOGPROBS


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]  # (output_text: an earlier answer's text, sent back)
    text: str
    annotations: Optional[list[Any]] = None  # (an earlier answer's, ignored)


class InputImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_image"]
    image_url: str  # a data URL, or a URL the server's image rules allow
    detail: Optional[Literal["auto", "low", "high"]] = None  # as the chat API's ("low": fitted within 512 x 512)


class InputItem(BaseModel):
    """An item of ``input``; an earlier response's items may be sent back as they came (``id``, ``status``)."""

    model_config = ConfigDict(extra="forbid")

    id: Optional[str] = None
    status: Optional[str] = None


class InputMessage(InputItem):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[dict[str, Any]]]  # parts: InputText | InputImage, read one by one


class FunctionCallItem(InputItem):
    """An earlier answer's function call, sent back before its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(InputItem):
    """What a function call returned (its ``call_id``), as text."""

    type: Literal["function_call_output"]
    call_id: str
    output: str


ITEM_TYPES: dict[str, type[BaseModel]] = {"message": InputMessage, "function_call": FunctionCallItem,
                                          "function_call_output": FunctionCallOutputItem}


class FunctionTool(BaseModel):
    """A function the answer may call (the Responses API's flat form of the chat API's ``tools[].function``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None  # the Responses API's default is true


class NamedFunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON following a schema (``name``, ``schema``,
    ``strict``, as the chat API's ``response_format.json_schema``, flat)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[StrictBool] = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["medium"]] = None  # (the only one a model without the setting gives)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: Optional[StrictBool] = None  # (no event here carries OpenAI's padding: nothing to leave out)


class Reasoning(BaseModel):
    """``reasoning``: accepted when it asks for nothing (these models do not reason), as ``null`` or without an
    effort or a summary."""

    model_config = ConfigDict(extra="forbid")

    effort: Optional[str] = None
    summary: Optional[str] = None
    generate_summary: Optional[str] = None

    @model_validator(mode="after")
    def _nothing_asked(self) -> "Reasoning":
        asked = {k: v for k, v in self.model_dump().items() if v is not None}
        if asked:
            raise unsupported(f"reasoning {asked}: this server's models do not reason")
        return self


class ConversationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str


class ResponsesRequest(OpenAIHints):
    """The subset of OpenAI's Responses request vlmguard honours; unknown fields are refused, naming them."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]  # items read one by one (ITEM_TYPES)
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: StrictBool = False
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunctionChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None
    text: Optional[TextConfig] = None
    previous_response_id: Optional[str] = None  # a stored response this one continues (its conversation first)
    # a conversation this one continues and is added to (workers/conversations.py): its id, or {"id": ...}
    conversation: Union[str, ConversationRef, None] = None
    store: Optional[StrictBool] = None  # keep the finished response (null: true, OpenAI's default)
    # answer later: the response comes back queued and is polled (GET /v1/responses/ID) or cancelled
    background: Optional[StrictBool] = None
    metadata: Optional[dict[str, str]] = None  # echoed in the response
    user: Optional[str] = None  # accepted and ignored
    stream_options: Optional[StreamOptions] = None
    reasoning: Optional[Reasoning] = None
    # a stored prompt template (OpenAI's dashboard prompts): none here, so only null
    prompt: Optional[dict[str, Any]] = None
    # the most calls of built-in tools (web search, file search, ...): there are none here, so it limits nothing
    max_tool_calls: Optional[int] = Field(None, ge=1)
    # "auto": a conversation longer than the context loses turns from its middle (workers/responses_api.py truncations)
    truncation: Optional[Literal["disabled", "auto"]] = None
    include: Optional[list[str]] = None  # "message.output_text.logprobs" (the only one there is here)
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token, with include
    vlmguard: VlmguardOptions = Field(default_factory=VlmguardOptions)

    @field_validator("prompt")
    @classmethod
    def _no_prompt_template(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if v is not None:
            raise unsupported("prompt: this server keeps no prompt templates; send the instructions and input")
        return v

    @property
    def conversation_id(self) -> Optional[str]:
        """The id of the conversation it continues (``conversation``, given as the id or as ``{"id": ...}``)."""
        return self.conversation if self.conversation is None or isinstance(self.conversation, str) \
            else self.conversation.id
