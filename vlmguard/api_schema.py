"""Wire format of the HTTP API, shared by the server (``vlmguard.workers``) and the client (``vlmguard.client``).

Two families of endpoints:

* OpenAI-compatible ``POST /v1/chat/completions`` (+ ``GET /v1/models``; ``POST /v1/responses``, OpenAI's Responses
  API, is turned into a chat request: ``vlmguard/responses_schema.py``; ``POST /v1/completions``, OpenAI's legacy text
  completions, shares its sampling fields: :class:`SamplingRequest`). vlmguard options travel in a
  top-level ``vlmguard`` object (:class:`VlmguardOptions`), so the OpenAI SDK's ``extra_body={"vlmguard":
  {...}}`` works unchanged. Responses carry the usual OpenAI fields plus a ``vlmguard`` object with visual
  token counts and timings (the SDK keeps unknown fields in ``model_extra``).
* Native ``POST /v1/generate``: one prompt + images + a full :class:`~vlmguard.spec.GenerationSpec`,
  answering the whole :class:`~vlmguard.results.GenerationResult` (timings, kept indices, per-step
  diagnostics). With ``stream: true`` it answers server-sent events of :class:`GenerateStreamEvent`.

Errors are always ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` (:class:`ErrorResponse`),
as OpenAI sends them. ``tools`` / ``tool_choice`` offer functions the answer may (or must) call, in the Hermes format
(``vlmguard/tool_calls.py``); calls come back as the message's ``tool_calls``. ``n`` > 1 (up to ``MAX_CHOICES``) runs
the request that many times in one batch (choice k seeded ``seed + k`` when a seed is given).
``frequency_penalty`` / ``presence_penalty`` (and vLLM's ``repetition_penalty``) act on the tokens a request
has generated, and ``logit_bias`` ({token id: bias in [-100, 100]}) on the tokens it names, at every step
(``vlmguard/penalties.py``). vLLM's ``guided_choice`` (a list of texts) makes the answer one of them
(``vlmguard/choices.py``). ``response_format`` ``json_object`` / ``json_schema`` and vLLM's ``guided_json``,
``guided_regex`` and ``guided_grammar`` hold the answer to a format (``vlmguard/guided.py``).
vLLM's ``POST /tokenize`` and ``POST /detokenize`` turn text into a model's token ids and back (the ids
``logit_bias`` names); ``/tokenize`` with ``messages`` gives the ids a chat request with them is fed.
``logprobs`` / ``top_logprobs`` are honoured: log-probabilities under the decoder's final scores (what token
selection reads, before temperature, top-k and top-p), so a contrastive decoder's entries show what it did.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StrictBool, StrictInt,
                      ValidationError, ValidationInfo, field_validator, model_serializer, model_validator)
from pydantic_core import PydanticCustomError

from vlmguard.spec import MAX_TOP_LOGPROBS, ImageAspect, NumbersNotBooleans

MAX_CHOICES = 16  # the most choices (``n``) of one chat request
MAX_TOKENIZE_CHARS = 1 << 20  # the longest text (and the most ids) one /tokenize (/detokenize) request takes

# ---- errors -----------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None  # the request field at fault, when there is one
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- vlmguard options -------------------------------------------------------------------------------


class VlmguardOptions(NumbersNotBooleans):
    """The ``vlmguard`` object of a chat request: pruning x decoding, as in :class:`GenerationSpec`."""

    model_config = ConfigDict(extra="forbid")

    pruning: str = "none"
    budget: Optional[Union[int, float]] = None
    pruning_params: dict[str, Any] = Field(default_factory=dict)
    decoding: str = "greedy"
    # ``params`` is accepted as an alias of ``decoding_params`` (the wording).
    decoding_params: dict[str, Any] = Field(default_factory=dict)
    params: Optional[dict[str, Any]] = None
    do_sample: Optional[StrictBool] = None  # "yes" or 1 is refused, not read as true
    top_k: Optional[int] = None
    diagnostics: StrictBool = False  # include per-step diagnostics in the response's vlmguard object
    image_aspect: ImageAspect = "native"  # as GenerationSpec.image_aspect: native | pad | reference
    # JSON output (response_format / guided_json): "flexible" any whitespace JSON allows, "compact" none
    json_whitespace: Literal["flexible", "compact"] = "flexible"

    @model_validator(mode="after")
    def _merge_params(self) -> "VlmguardOptions":
        if self.params:
            self.decoding_params = {**self.params, **self.decoding_params}
            self.params = None
        return self


# ---- OpenAI-compatible chat -------------------------------------------------------------------------


def unsupported(reason: str) -> PydanticCustomError:
    """A validation error for an OpenAI parameter value this server cannot honour (HTTP 400, code
    ``unsupported_value``)."""
    return PydanticCustomError("unsupported_value", "{reason}", {"reason": reason})


class ImageURL(BaseModel):
    url: str
    # "low": the image is fitted within 512 x 512 first (images.low_detail: fewer visual tokens on Qwen2-VL, whose
    # number grows with the image); "auto" / "high": as it is, the model's image processor sizing it
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v  # {"type": "image_url", "image_url": "data:..."}


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
PART_TYPES: dict[str, type[BaseModel]] = {"text": TextPart, "image_url": ImagePart}


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text (as OpenAI sends and returns them)."""

    name: str
    arguments: str


class ToolCallModel(BaseModel):
    """OpenAI's ``tool_calls[]`` entry, in an assistant message of the history and in an answer."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallModel]] = None  # (assistant) the calls it made
    tool_call_id: Optional[str] = None  # (tool) the call whose result this is

    @model_validator(mode="after")
    def _tool_fields_on_their_roles(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("invalid_request", "tool_calls belong to assistant messages", {})
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("invalid_request", "a tool message needs the tool_call_id of the call it "
                                                         "answers", {})
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, v: Any) -> Any:
        """Each part validated as its own type, so an error names the part and its field (the union of a string
        and a list of parts reported a bad part as "content.str: Input should be a valid string" first)."""
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise PydanticCustomError("invalid_request", "must be a string, a list of content parts or null, got "
                                                         "{kind}", {"kind": type(v).__name__})
        parts = []
        for j, part in enumerate(v):
            if isinstance(part, (TextPart, ImagePart)):
                parts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in PART_TYPES:  # (a list or an object: unhashable)
                raise unsupported(f"content[{j}]: part type {kind!r} is not supported (only 'text' and 'image_url')")
            try:
                parts.append(PART_TYPES[kind].model_validate(part))
            except ValidationError as e:
                raise PydanticCustomError("invalid_request", "{detail}", {"detail": "; ".join(
                    f"content[{j}].{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())})
        return parts


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema the answer follows (``name`` and ``description`` are
    accepted; ``strict`` true makes a keyword the grammar cannot hold an error, else it is left out)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (free), ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("invalid_request", "response_format: json_schema goes with type "
                                      "'json_schema', and that type needs it", {})
        return self


MAX_TOOLS = 128  # the most functions one chat request offers


def check_unique_functions(tools: Optional[list["ToolDefinition"]]) -> Optional[list["ToolDefinition"]]:
    names = [t.function.name for t in tools or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PydanticCustomError("invalid_request", "function names must be unique ({names} repeated)",
                                  {"names": ", ".join(repeated)})
    return tools


def tool_choice_form(v: Any) -> Any:
    """``tool_choice`` is "none", "auto", "required" or a named function, each error said once (the union's own
    errors name both of its branches)."""
    if v is None or v in ("none", "auto", "required") or isinstance(v, NamedToolChoice):
        return v
    if not isinstance(v, dict):
        raise PydanticCustomError("invalid_request", "must be 'none', 'auto', 'required' or {named}, got {v}", {
            "named": '{"type": "function", "function": {"name": ...}}', "v": repr(v)})
    try:
        return NamedToolChoice.model_validate(v)
    except ValidationError as e:
        raise PydanticCustomError("invalid_request", "{detail}", {"detail": "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())}) from None


def check_tool_choice(choice: Any, tools: Optional[list["ToolDefinition"]]) -> Any:
    """``tool_choice`` other than "none" needs ``tools``, and a named function must be one of them."""
    names = [t.function.name for t in tools or []]
    if choice not in (None, "none") and not names:
        raise PydanticCustomError("invalid_request", "{choice} needs tools", {"choice": repr(
            choice if isinstance(choice, str) else choice.function.name)})
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise PydanticCustomError("invalid_request", "names function {name}, which tools do not offer",
                                  {"name": repr(choice.function.name)})
    return choice


class FunctionDefinition(BaseModel):
    """OpenAI's ``tools[].function``: a name, what it does and the JSON schema of its arguments. ``strict`` true
    makes a schema keyword the grammar cannot hold an error (else it is left out of a forced call's grammar)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """A call's arguments are a JSON object: a schema of another type could never be one."""
        kind = (v or {}).get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise PydanticCustomError("invalid_request", "must be a JSON schema of an object (type {kind})",
                                      {"kind": repr(kind)})
        return v


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the function the answer must call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class OpenAIHints(NumbersNotBooleans):
    """OpenAI request parameters that clients send and that ask nothing this server does differently: accepted, and
    a value that would ask for something it does not do is a 400 (``unsupported_value``) naming the parameter.

    ``service_tier`` "auto" or "default" (the one tier there is; echoed as "default"); ``prompt_cache_key`` (OpenAI's
    routing hint for its prompt cache: the prefix cache here matches prompts by their tokens, and image-affinity
    routing by their images); ``safety_identifier`` (and ``user``): ignored."""

    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = Field(None, max_length=1024)
    safety_identifier: Optional[str] = Field(None, max_length=1024)

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, v: Optional[str]) -> Optional[str]:
        if v not in (None, "auto", "default"):
            raise unsupported(f"service_tier {v!r}: this server has one tier, 'default' ('auto' chooses it)")
        return v


class SamplingRequest(OpenAIHints):
    """What a chat and a (legacy) completion request share: the model, the answer's length and token selection, stop
    conditions, penalties, answer formats, choices, streaming and the ``vlmguard`` object. ``repetition_penalty``,
    ``min_tokens``, ``top_k``, ``min_p``, ``ignore_eos``, ``stop_token_ids``, ``guided_choice``, ``guided_json``,
    ``guided_regex`` and ``guided_grammar`` are vLLM's extensions (top level, as the OpenAI SDK's ``extra_body`` sends
    them); ``user`` is accepted and ignored; unknown fields are refused with a message naming them."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=10.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1)  # choices: the request run n times, in one batch (null = 1)
    stream: StrictBool = False  # "yes" or 1 is refused, not read as true
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10.0)
    min_tokens: Optional[int] = Field(None, ge=0)  # vLLM's: no end of sequence before this many tokens
    # vLLM's sampling extensions: top-k (0 or -1: off; ``vlmguard.top_k`` is the same), min-p, and ``ignore_eos``
    # (GenerationSpec.ignore_eos: the end of sequence is held back, so the answer runs to max_tokens unless a stop
    # string or a stop token id ends it)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    ignore_eos: Optional[StrictBool] = None
    stop_token_ids: Optional[list[int]] = None  # vLLM's: drawing one of these ends the answer, as the end of sequence
    logit_bias: Optional[dict[str, float]] = None  # {token id: bias in [-100, 100]}, read by GenerationSpec
    guided_choice: Optional[list[str]] = None  # vLLM's: the answer is one of these (GenerationSpec.choices)
    # vLLM's structured output (GenerationSpec.guided; one of them, or response_format's JSON): a JSON schema (an
    # object or its JSON text), a regular expression the whole answer matches, a Lark grammar
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_grammar: Optional[str] = None
    # vLLM's: each prompt token's log-probability under the model and the N most likely tokens at its place
    # (vlmguard/prompt_logprobs.py), answered whole only (as vLLM: not with ``stream``)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    vlmguard: VlmguardOptions = Field(default_factory=VlmguardOptions)

    @field_validator("n")
    @classmethod
    def _choices_within_limit(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v > MAX_CHOICES:
            raise unsupported(f"n={v}: this server returns at most {MAX_CHOICES} choices per request")
        return v

    @model_validator(mode="after")
    def _one_top_k(self) -> "SamplingRequest":
        if self.top_k is not None and self.vlmguard.top_k is not None and self.spec_top_k != self.vlmguard.top_k:
            raise PydanticCustomError("invalid_request", "top_k {a} and vlmguard.top_k {b} disagree: give one",
                                      {"a": self.top_k, "b": self.vlmguard.top_k})
        return self

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_whole(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        if v is not None and info.data.get("stream"):  # (stream: a field before)
            raise unsupported("prompt_logprobs with stream: a streamed answer does not carry them (as vLLM's)")
        return v

    @property
    def spec_prompt_logprobs(self) -> Optional[int]:
        """``GenerationSpec.prompt_logprobs``: None without them, else the number of alternatives."""
        return self.prompt_logprobs

    @property
    def spec_top_k(self) -> int:
        """``GenerationSpec.top_k``: the top-level ``top_k`` (vLLM's -1 is off, as 0) or ``vlmguard.top_k``."""
        return max(0, self.top_k) if self.top_k is not None else (self.vlmguard.top_k or 0)

    @property
    def spec_max_tokens(self) -> Optional[int]:
        """``GenerationSpec.max_new_tokens`` as asked (None: the server's default)."""
        return self.max_tokens

    @property
    def spec_logprobs(self) -> Optional[int]:
        """``GenerationSpec.logprobs``: None without log-probabilities, else the number of alternatives."""
        return None

    @property
    def tool_mode(self) -> Optional[str]:
        """How the answer may use tools: "auto", "required", a function's name, or None (not offered)."""
        return None


class ChatCompletionRequest(SamplingRequest):
    """The subset of OpenAI's chat completion request vlmguard honours (:class:`SamplingRequest`, and the messages,
    log-probabilities, tools and OpenAI's chat-only hints).

    ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (default true) are OpenAI's tool calling
    (``vlmguard/tool_calls.py``); anything else is refused with a message naming the parameter.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    # OpenAI's stored chat completions: false (or null) only, none are kept here (the Responses API keeps responses);
    # metadata, which tags a stored completion, is accepted and ignored
    store: Optional[StrictBool] = None
    metadata: Optional[dict[str, str]] = None
    # for a reasoning model, or a model that speaks: none here, so only what asks for nothing is accepted
    reasoning_effort: Optional[str] = None
    modalities: Optional[list[str]] = None
    verbosity: Optional[Literal["medium"]] = None  # (the only one a model without the setting gives)
    logprobs: Optional[StrictBool] = None  # 1 (the legacy completions' count) or "yes" is refused
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[ToolDefinition]] = Field(None, max_length=MAX_TOOLS)
    # "auto" (the default with tools): the model may call them; "required": it calls one or more; a named function:
    # it calls that one; "none" (the default without): it answers in text and is not shown the tools
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, v: Optional[bool]) -> Optional[bool]:
        if v:
            raise unsupported("store true: this server does not keep chat completions (the Responses API, POST "
                              "/v1/responses, keeps responses)")
        return v

    @field_validator("reasoning_effort")
    @classmethod
    def _no_reasoning(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            raise unsupported(f"reasoning_effort {v!r}: this server's models do not reason")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and set(v) != {"text"}:
            raise unsupported(f"modalities {v}: this server's models answer in text only (['text'])")
        return v

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("invalid_request", "top_logprobs requires logprobs: true", {})
        return self

    @property
    def spec_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    @property
    def spec_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _unique_function_names(cls, v: Optional[list[ToolDefinition]]) -> Optional[list[ToolDefinition]]:
        return check_unique_functions(v)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_form(cls, v: Any) -> Any:
        return tool_choice_form(v)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_among_tools(cls, v: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data:  # tools failed validation: that error alone is reported
            return v
        return check_tool_choice(v, info.data["tools"])

    @property
    def tool_mode(self) -> Optional[str]:
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None  # None: the answer is only tool calls
    tool_calls: Optional[list[ToolCallModel]] = None

    @model_serializer(mode="wrap")
    def _content_even_when_null(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``content`` is always in the message, null beside tool calls, as OpenAI sends it (responses are dumped
        without their None fields)."""
        out = handler(self)
        return {"role": out.pop("role", "assistant"), "content": out.pop("content", None), **out}


class TopLogprobModel(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprobModel(TopLogprobModel):
    top_logprobs: list[TopLogprobModel] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """OpenAI's ``choices[].logprobs``: one entry per generated token (in a stream chunk, its tokens')."""

    content: Optional[list[TokenLogprobModel]] = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: Optional[ChoiceLogprobs] = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TimingsModel(BaseModel):
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    per_token_s: list[float] = Field(default_factory=list)
    setup_s: float = 0.0
    batch_size: int = 1
    prefill_batch: int = 1
    prefill_tokens: int = 0
    prefill_shared_tokens: int = 0
    prefill_cached_tokens: int = 0
    prompt_cached_tokens: int = 0


class StepModel(BaseModel):
    token_id: int
    token: str
    main_prob: float
    contrast_prob: Optional[float] = None
    score: float
    main_top_id: int


class VlmguardInfo(BaseModel):
    """vlmguard's extension of a chat completion: what pruning did and where the time went."""

    pruning: str
    decoding: str  # the decoder; a plain one is named by how its tokens were chosen (greedy | sample)
    sampled: bool = False  # the tokens were drawn (do_sample with a temperature above 0), not the argmax
    visual_tokens: int
    visual_tokens_kept: list[int]
    kept_indices: Optional[list[int]] = None
    timings: TimingsModel
    steps: Optional[list[StepModel]] = None
    prefill_flops: Optional[dict[str, float]] = None  # GenerationResult.prefill_flops


class PromptLogprob(BaseModel):
    """vLLM's entry of a token at a prompt position: its log-probability, rank (1: the most likely) and text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# vLLM's ``prompt_logprobs``: per prompt position, {token id: entry} for the prompt's token and the most likely ones;
# None where nothing predicts it (the first token; here also an image's tokens, which are features)
PromptLogprobs = list[Optional[dict[str, PromptLogprob]]]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    service_tier: Optional[str] = None  # "default" when the request named a tier (OpenAI echoes the one used)
    vlmguard: Optional[VlmguardInfo] = None
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM's, when the request asks for them


class ChunkFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: str = ""


class ChunkToolCall(BaseModel):
    """A piece of a streamed call: the first with its ``id``, ``type`` and ``function.name``, each with the next text
    of its arguments (a held call's as it is written; a call read at the end is one piece)."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: ChunkFunctionCall


class ChunkDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ChunkToolCall]] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    service_tier: Optional[str] = None
    vlmguard: Optional[VlmguardInfo] = None


# ---- completions (OpenAI's legacy text completions) ------------------------------------------------------

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for a completion


TokenIds = list[Annotated[StrictInt, Field(ge=0)]]  # a prompt given as token ids


def prompt_list(prompt: Any) -> list[Any]:
    """A completion request's ``prompt`` as its list of prompts (each a text or a list of token ids)."""
    if not isinstance(prompt, list):
        return [prompt]
    return [prompt] if prompt and all(isinstance(x, int) for x in prompt) else list(prompt)


class CompletionRequest(SamplingRequest):
    """OpenAI's (legacy) ``POST /v1/completions``: ``prompt`` continued as it is (no chat template, no image): one text,
    a list of texts, one prompt of token ids, or a list of them (ids fed as they are, no special token added), each
    answered ``n`` times, choice ``p * n + k`` (at most ``MAX_CHOICES`` answers in all). ``echo`` puts the prompt
    before the answer's text; ``logprobs`` N (0-20) gives each token's log-probability and its N most likely
    alternatives, with ``echo`` the prompt's tokens' too (their first has none: ``vlmguard/prompt_logprobs.py``) and,
    last, the token that ended the answer; ``max_tokens`` 0 with ``echo`` scores the prompt alone. Refused with a 400 naming the field: ``suffix`` (insertion), ``best_of``
    other than ``n``."""

    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    # 0 with ``echo``: the prompt scored, no answer (OpenAI's legacy scoring request; one token is drawn and left out)
    max_tokens: Optional[int] = Field(None, ge=0)
    suffix: Optional[str] = None
    echo: StrictBool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts_given(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise PydanticCustomError("invalid_request", "give at least one prompt", {})
        if isinstance(v, list) and any(isinstance(x, list) and not x for x in v):
            raise PydanticCustomError("invalid_request", "a prompt of token ids holds at least one id", {})

        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)

        if not isinstance(v, (str, list)) or (
                isinstance(v, list) and not (all(isinstance(x, str) for x in v) or ids(v) or all(ids(x) for x in v))):
            raise PydanticCustomError("invalid_request", "prompt must be a text, a list of texts, a list of token ids "
                                      "(ints >= 0) or a list of such lists", {})
        return v

    @field_validator("prompt")
    @classmethod
    def _answers_within_limit(cls, v: Any, info: ValidationInfo) -> Any:
        n, count = info.data.get("n") or 1, len(prompt_list(v))  # (n validated before: a base field)
        if count * n > MAX_CHOICES:
            raise unsupported(f"{count} prompts x n={n}: this server makes at most {MAX_CHOICES} answers per request")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Optional[str]) -> Optional[str]:
        if v:
            raise unsupported(f"suffix {v[:40]!r}: this server does not insert text (its models have no "
                              "fill-in-the-middle format)")
        return v

    @field_validator("best_of")
    @classmethod
    def _every_answer_returned(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        if v is not None and v != (info.data.get("n") or 1):
            raise unsupported(f"best_of {v}: this server returns every answer it makes (best_of equal to n, or left "
                              "out)")
        return v

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        return prompt_list(self.prompt)

    @property
    def scores_only(self) -> bool:
        """``max_tokens: 0``: the prompt is echoed (and scored, with ``logprobs``), nothing written after it."""
        return self.max_tokens == 0

    @property
    def spec_max_tokens(self) -> Optional[int]:
        return COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else max(1, self.max_tokens)

    @property
    def spec_logprobs(self) -> Optional[int]:
        return self.logprobs

    @property
    def spec_prompt_logprobs(self) -> Optional[int]:
        """The prompt's entries ``echo`` with ``logprobs`` and vLLM's ``prompt_logprobs`` read (the larger count)."""
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(wanted) if wanted else None


class CompletionLogprobs(BaseModel):
    """The legacy completions' ``logprobs``: per token, its text, log-probability, its most likely alternatives
    ({token: log-probability}) and the character where it begins in the choice's ``text``."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)  # None: the prompt's first token
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM's, when the request asks for them


class CompletionResponse(BaseModel):
    """A completion, and (``object`` the same) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    service_tier: Optional[str] = None
    vlmguard: Optional[VlmguardInfo] = None


# ---- native generate --------------------------------------------------------------------------------


class GenerateRequest(NumbersNotBooleans):
    """Native request: ``images`` are data URLs (or http(s) URLs when the server allows them)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: str
    images: list[str] = Field(default_factory=list)
    # OpenAI's image detail for every image: "low" fits each within 512 x 512 first (images.low_detail)
    image_detail: Optional[Literal["auto", "low", "high"]] = None
    system: Optional[str] = None
    # GenerationSpec fields (pruning, budget, decoding, decoding_params, max_new_tokens, ...); validated
    # server-side by GenerationSpec.build so the message names the bad field.
    spec: dict[str, Any] = Field(default_factory=dict)
    stream: StrictBool = False  # "yes" or 1 is refused, not read as true


class TopLogprobEntry(BaseModel):
    token_id: int
    token: str
    logprob: float
    bytes: list[int] = Field(default_factory=list)


class TokenLogprobEntry(TopLogprobEntry):
    """:class:`~vlmguard.results.TokenLogprob`: a generated token's log-probability and the top alternatives."""

    top: list[TopLogprobEntry] = Field(default_factory=list)


class PromptLogprobEntry(TokenLogprobEntry):
    """A prompt token's :class:`~vlmguard.results.TokenLogprob`: None where nothing predicts it (the first token, an
    image's; a stream's events leave out the null)."""

    logprob: Optional[float] = None


class GenerateResponse(BaseModel):
    """A :class:`~vlmguard.results.GenerationResult` plus the serving model and request id."""

    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    visual_tokens: int
    visual_tokens_kept: list[int]
    kept_indices: Optional[list[int]] = None
    timings: TimingsModel
    steps: list[StepModel] = Field(default_factory=list)
    pruning: dict[str, Any] = Field(default_factory=dict)
    decoding: dict[str, Any] = Field(default_factory=dict)
    request_id: Optional[str] = None
    logprobs: Optional[list[TokenLogprobEntry]] = None  # with spec ``logprobs``: one per generated token
    # with spec ``prompt_logprobs``: one per prompt token (vlmguard/prompt_logprobs.py)
    prompt_logprobs: Optional[list[PromptLogprobEntry]] = None
    end_logprob: Optional[TokenLogprobEntry] = None  # with spec ``logprobs``: the token that ended the answer's
    prefill_flops: Optional[dict[str, float]] = None  # analytic prefill FLOPs on the tokens each layer was fed


class GenerateStreamEvent(BaseModel):
    """One SSE event of a streaming native request: a text delta, and the full result when done."""

    id: str
    token_id: Optional[int] = None
    text: str = ""
    done: bool = False
    result: Optional[GenerateResponse] = None
    logprobs: list[TokenLogprobEntry] = Field(default_factory=list)  # the entries of this event's tokens
    # with spec ``prompt_logprobs``, on the first event: the prompt's entries
    prompt_logprobs: Optional[list[PromptLogprobEntry]] = None


# ---- tokens (vLLM's /tokenize and /detokenize) ---------------------------------------------------------


class TokenizeRequest(NumbersNotBooleans):
    """vLLM's: a text's token ids under a model's tokenizer (``prompt``: no chat template, no image; what
    ``logit_bias`` names), or a chat's (``messages``, as ``/v1/chat/completions`` takes them: the model's chat template
    with its generation prompt, each image's visual tokens: what a chat request's prompt is fed, its
    ``usage.prompt_tokens``). One of the two."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: Optional[str] = Field(None, max_length=MAX_TOKENIZE_CHARS)
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    # (messages) the functions and the choice a chat request offers: with them its prompt holds the tools' block
    tools: Optional[list[ToolDefinition]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    add_generation_prompt: StrictBool = True  # (messages) vLLM's default; a chat request always ends with it
    add_special_tokens: StrictBool = True  # (prompt) vLLM's default: the tokenizer's own (e.g. a leading <s>)
    return_token_strs: StrictBool = False

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_form(cls, v: Any) -> Any:
        return tool_choice_form(v)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("invalid_request", "give prompt (a text) or messages (a chat), one of them", {})
        if self.messages is None and (self.tools is not None or self.tool_choice is not None):
            raise PydanticCustomError("invalid_request", "tools and tool_choice go with messages (a chat)", {})
        if self.messages is not None and not self.add_generation_prompt:
            raise unsupported("add_generation_prompt false: a chat is tokenized as a chat request's prompt is, with "
                              "the generation prompt")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(NumbersNotBooleans):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_TOKENIZE_CHARS)


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- service info -----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vlmguard"
    family: Optional[str] = None
    context_length: Optional[int] = None
    # the weights' precision: their dtype (``bfloat16``, ...) and how the language model's layers were quantized as
    # they loaded (``none``, ``bnb-int8``, ``bnb-nf4``; a checkpoint saved quantized says how it was saved)
    dtype: Optional[str] = None
    quantization: Optional[str] = None
    # visual tokens per side of one image's grid (LLaVA-NeXT: the base grid before its crops); None where the grid
    # follows the image (Qwen2-VL): what a client needs to draw kept tokens over an image
    grid_side: Optional[int] = None
    # what a request's image_aspect "reference" does on this model (GenerationSpec.image_aspect): pad its images to a
    # square, or leave them to the processor; decided by the family or the checkpoint config's image_aspect_ratio
    reference_image_aspect: Optional[Literal["pad", "native"]] = None
    # the replica's prefix cache (image prefixes of earlier prefills): entries, bytes, max_bytes, hits, misses,
    # stored, evicted, and its images' visual tokens as the tower gave them (image_entries, image_hits) and as a
    # vision-side pruner kept them (pruned_entries, pruned_hits); None when it is off (the model's prefix_cache_mb: 0)
    prefix_cache: Optional[dict[str, int]] = None
    # how Serve picks the replica of a request: by its first image, so a replica's prefix cache sees its images
    # again (``image_affinity``), or by load alone (``power_of_two``); None where the backend has no replicas
    routing: Optional[Literal["image_affinity", "power_of_two"]] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    models: dict[str, str]  # model name -> "ok" | error text
