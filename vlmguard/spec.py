"""GenerationSpec: what one request asks of the engine (pruner, decoder, sampling, limits).

Method parameters are validated by the method's own ``Params`` model (see ``pruning/base.py`` and
``decoding/base.py``); ``GenerationSpec.resolve()`` turns names + dicts into typed, validated objects
and reports any problem as one clear :class:`~vlmguard.errors.InvalidInput` message.
"""
from __future__ import annotations

import math
import typing
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, StrictBool, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from vlmguard.errors import InvalidInput

Budget = Union[int, float]
ImageAspect = Literal["native", "pad", "reference"]  # GenerationSpec.image_aspect
IMAGE_ASPECTS: tuple[str, ...] = typing.get_args(ImageAspect)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs

# The fields each request of a batch has for itself: requests that differ only in these share a batch (a
# running one too). The rest (the pruner, the decoder, their parameters) is the batch's, the same for all.
PER_REQUEST_FIELDS = frozenset({"max_new_tokens", "min_new_tokens", "ignore_eos", "do_sample", "temperature", "top_p",
                                "top_k", "min_p", "seed", "stop", "stop_token_ids", "diagnostics", "logprobs",
                                "prompt_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                                "logit_bias", "choices", "guided", "image_aspect", "exact_text"})
MAX_LOGIT_BIAS = 1024  # the most tokens one request's logit_bias may name
MAX_STOP_TOKEN_IDS = 256  # the most tokens one request's stop_token_ids may name
MAX_GUIDED_CHOICES = 64  # the most choices one request's answer may be restricted to
MAX_CHOICE_CHARS = 512
MAX_GUIDE_CHARS = 65536  # the longest regular expression, Lark grammar or JSON schema (as JSON) of a request


def check_budget(v: int | float) -> int | float:
    """A budget, checked: visual tokens kept (a whole number >= 1) or the kept fraction (a float in (0, 1]; 1.0
    keeps every token, while the int 1 is one token). Raises ValueError with the rule."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"budget {v} is not a finite number")
    if isinstance(v, float) and not v.is_integer() or v == 1.0 and isinstance(v, float):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"budget {v} is neither a whole number of visual tokens nor a kept fraction in (0, 1]")
        return float(v)
    iv = int(v)
    if iv < 1:
        raise ValueError(f"budget must be >= 1 visual token or a ratio in (0, 1], got {v}")
    return iv


def parse_budget(text: str, check: bool = True) -> int | float:
    """A budget as typed (a command line, a dashboard form): ``"36"`` or ``"36.0"`` -> 36 visual tokens, ``"0.25"``
    -> a quarter of them, ``"1.0"`` -> all of them, ``"1"`` -> one. ValueError for text that is no number and,
    with ``check``, for a number that is no budget (:func:`check_budget`; the CLI leaves that to GenerationSpec,
    whose error is the command's one-line error)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {text!r}") from None
    budget = int(v) if v.is_integer() and not (v == 1.0 and "." in str(text)) else v
    return check_budget(budget) if check else budget


def _takes(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's type admits one of ``kinds``, alone or inside (``int | None``, ``list[float]``, ...)."""
    return annotation in kinds or any(_takes(a, kinds) for a in typing.get_args(annotation))


class NumbersNotBooleans(BaseModel):
    """A base for request models: JSON ``true`` / ``false`` given for a number field (alone, in a list or as a map's
    value) is refused, naming the field, where pydantic would read it as 1 / 0 (``max_new_tokens: true`` one
    token, FastV's ``K=true`` a K of 1). ``_boolean_hints``: a field's own message instead of the generic one."""

    _boolean_hints: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
        if isinstance(v, bool) or any(isinstance(x, bool) for x in items):
            annotation = cls.model_fields[info.field_name].annotation
            if _takes(annotation, (int, float)) and not _takes(annotation, (bool,)):
                raise PydanticCustomError("bool_for_number", cls._boolean_hints.get(
                    info.field_name, "must be a number, not a boolean"))
        return v


class MethodParams(NumbersNotBooleans):
    """The base of every pruning and decoding method's parameters: unknown keys are refused, and so are booleans
    for numbers (:class:`NumbersNotBooleans`)."""

    model_config = ConfigDict(extra="forbid")


def text_not_blank(v: Any) -> Any:
    """A ``mode="after"`` check for text fields of method parameters (and lists of texts, None entries allowed):
    an empty or all-whitespace text is no instruction or query, an empty list no text for any request."""
    if isinstance(v, list) and not v:
        raise ValueError("must not be an empty list")
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, str) and not x.strip():
            raise ValueError(f"must not be blank, got {x!r}")
    return v


def _fits_a_generator(v: int) -> int:
    if v > 2**64 - 1:
        raise ValueError(f"must be at most 2**64 - 1 (what a torch generator takes), got {v}")
    return v


# A method parameter that seeds a torch generator: >= 0 and at most 2**64 - 1, checked by a validator rather than a
# schema bound (the dashboard's number widgets refuse bounds past 2**53).
GeneratorSeed = Annotated[int, Field(ge=0), AfterValidator(_fits_a_generator)]


class GuidedOutput(BaseModel):
    """A format the answer is held to, token by token (``vlmguard/guided.py``): exactly one of a JSON schema,
    any JSON object, a regular expression (the whole answer matches it) or a Lark grammar (llguidance's dialect).
    ``whitespace`` (JSON): "flexible" allows any whitespace JSON allows (vLLM's and OpenAI's default); "compact"
    none outside strings (``{"a":1}``), which keeps a small model from spending its tokens on blank lines.
    ``strict`` (JSON schema): a keyword llguidance does not implement (``uniqueItems``, ``not``, an unknown
    ``format``) is an error; false: it is left out of the grammar (OpenAI's non-strict schemas)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None
    json_object: StrictBool = False
    regex: str | None = Field(None, min_length=1, max_length=MAX_GUIDE_CHARS)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GUIDE_CHARS)
    whitespace: Literal["flexible", "compact"] = "flexible"
    strict: StrictBool = True

    @field_validator("json_schema")
    @classmethod
    def _schema_within_limit(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        import json

        if v is not None and len(json.dumps(v, default=str)) > MAX_GUIDE_CHARS:
            raise PydanticCustomError("schema_too_long", "the schema is over {n} characters as JSON",
                                      {"n": MAX_GUIDE_CHARS})
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "GuidedOutput":
        given = [k for k in ("json_schema", "regex", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise PydanticCustomError("guided_one", "give exactly one of json_schema, json_object, regex and "
                                      "grammar (got {got})", {"got": ", ".join(given) or "none"})
        return self

    @property
    def kind(self) -> str:
        """Which format it is: "json_schema", "json_object", "regex" or "grammar"."""
        return next(k for k in ("json_schema", "regex", "grammar") if getattr(self, k) is not None) \
            if not self.json_object else "json_object"


class GenerationSpec(NumbersNotBooleans):
    model_config = ConfigDict(extra="forbid")
    _boolean_hints: ClassVar[dict[str, str]] = {
        "logprobs": "the number of most likely tokens to report (0-20) or null, not a boolean",
        "prompt_logprobs": "the number of most likely tokens to report (0-20) or null, not a boolean"}

    pruning: str = "none"
    # int >= 1: visual tokens kept per request row, shared by its images (LLaVA-1.5: 192/128/64 of 576);
    # float in (0, 1]: the kept fraction of the row's visual tokens.
    budget: Budget | None = None
    pruning_params: dict[str, Any] = Field(default_factory=dict)
    decoding: str = "greedy"
    decoding_params: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: int = Field(64, ge=1, le=8192)
    # End-of-sequence tokens are kept from being chosen until this many tokens are generated (transformers'
    # ``min_new_tokens``, vLLM's ``min_tokens``); stop strings still end an answer.
    min_new_tokens: int = Field(0, ge=0, le=8192)
    # vLLM's ignore_eos: end-of-sequence tokens are kept from being chosen at every step, so the answer runs to
    # max_new_tokens unless a stop string or a stop token id ends it (vLLM instead draws on past an end of sequence)
    ignore_eos: StrictBool = False
    # Token selection. None: sample only when decoding == "sample".
    do_sample: StrictBool | None = None  # "yes" or 1 is refused, not read as true
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    # min-p sampling (vLLM's and transformers' ``min_p``): tokens less likely than min_p x the most likely one's
    # probability are left out; 0 = off, 1 keeps only the most likely
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what a torch generator and a SQLite INTEGER hold
    stop: list[str] = Field(default_factory=list)
    # vLLM's stop_token_ids: drawing one of these ends the answer as the end of sequence does (left out of it;
    # held back by min_new_tokens as the end of sequence is); ids past the model's vocabulary are refused by the engine
    stop_token_ids: list[NonNegativeInt] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    # Penalties on tokens the request has generated so far, applied to the model's logits (every branch row)
    # before the decoder combines them (vlmguard/penalties.py): OpenAI's presence / frequency penalties (logit -
    # presence - frequency x count) and the multiplicative repetition penalty of transformers and vLLM (1 = off).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    # OpenAI's logit_bias: {token id: bias in [-100, 100]} added to the model's logits at every step, with the
    # penalties (every branch row; a contrastive decoder's combination keeps it once). -100 all but bans a token,
    # +100 all but forces it. JSON's string keys ("50256") are read as ids; ids past the model's vocabulary are
    # refused by the engine.
    logit_bias: dict[NonNegativeInt, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS)
    # vLLM's guided_choice: the answer is one of these texts, token by token (vlmguard/choices.py); empty: free
    choices: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_GUIDED_CHOICES)
    # structured output: the answer follows this format (vlmguard/guided.py); None: free
    guided: GuidedOutput | None = None
    # Keep per-step diagnostics (main/contrast probabilities) in results.
    diagnostics: StrictBool = True
    # Log-probabilities of the generated tokens under the decoder's final scores (what token selection reads,
    # before temperature / top-k / top-p): None = none; k = each token's own and the k most likely (0..20).
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # The answer's text exactly as its tokens write it after the prompt (OpenAI's and vLLM's text completions): not
    # stripped, and the first token's leading space kept, which a SentencePiece tokenizer drops when it decodes the
    # answer alone (" Paris", not "Paris"). False: stripped at both ends (a chat answer's text).
    exact_text: StrictBool = False
    # vLLM's prompt_logprobs: the log-probability of each prompt token given the tokens before it, under the model
    # itself (every image token seen, no pruner, no decoder, no penalty: vlmguard/prompt_logprobs.py), with the k
    # most likely tokens at each place (0..20); None = none. The first token and the image's tokens have none.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # How a request's images are fitted to the vision tower's square (see vlmguard.images.pad_to_square):
    # "native": the model's own processor as shipped (llava-hf's CLIP processor resizes the shortest side and crops
    # the centre, losing the sides of a wide image); "pad": padded to a square with the processor's mean colour
    # first (LLaVA's expand2square); "reference": what the family's reference code does (LLaVA-1.5 pads, LLaVA-NeXT
    # and Qwen2-VL take the image as it is; a config's own ``image_aspect_ratio`` decides where it has one).
    image_aspect: ImageAspect = "native"

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, v: Budget | None) -> Budget | None:
        return None if v is None else check_budget(v)

    @field_validator("choices")
    @classmethod
    def _choices_alone(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if v and info.data.get("min_new_tokens"):
            raise PydanticCustomError("choices_min_tokens", "choices and min_new_tokens cannot go together (a short "
                                      "choice ends before the minimum)", {})
        if v and info.data.get("ignore_eos"):
            raise PydanticCustomError("choices_ignore_eos", "choices and ignore_eos cannot go together (a choice "
                                      "ends with the end of sequence)", {})
        return v

    @field_validator("guided")
    @classmethod
    def _guided_alone(cls, v: GuidedOutput | None, info: ValidationInfo) -> GuidedOutput | None:
        if v is not None and info.data.get("choices"):
            raise PydanticCustomError("guided_choices", "guided and choices cannot go together (choices are a "
                                      "format of their own)", {})
        if v is not None and info.data.get("min_new_tokens"):
            raise PydanticCustomError("guided_min_tokens", "guided and min_new_tokens cannot go together (a "
                                      "complete answer may be shorter than the minimum)", {})
        if v is not None and info.data.get("ignore_eos"):
            raise PydanticCustomError("guided_ignore_eos", "guided and ignore_eos cannot go together (a complete "
                                      "answer ends with the end of sequence)", {})
        return v

    @field_validator("min_new_tokens")
    @classmethod
    def _within_max(cls, v: int, info: ValidationInfo) -> int:
        most = info.data.get("max_new_tokens")
        if most is not None and v > most:
            raise PydanticCustomError("min_over_max", "{v} is more than max_new_tokens {most}", {"v": v, "most": most})
        return v

    @property
    def sampling(self) -> bool:
        if self.do_sample is not None:
            return self.do_sample and self.temperature > 0
        return self.decoding == "sample" and self.temperature > 0

    def batch_key(self) -> str:
        """What requests sharing a batch must agree on (the pruner and decoder with their parameters), as JSON:
        requests whose keys are equal run in one batch, whatever their own ``PER_REQUEST_FIELDS``. Built from
        the validated methods, so ``{"alpha": 1, "beta": 0.1}`` and ``{"beta": 0.1, "alpha": 1.0}`` agree."""
        import json

        try:
            pruner, decoder = self.resolve()
            shared: Any = {"pruning": pruner.describe(), "decoding": decoder.describe()}
        except InvalidInput:  # a spec that cannot run: its own key (running it reports the error)
            shared = self.model_dump(mode="json", exclude=set(PER_REQUEST_FIELDS))
        return json.dumps(shared, sort_keys=True, default=str)

    def __init__(self, **data: Any) -> None:
        """Bad fields raise one InvalidInput line naming them, not a pydantic error dump."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise InvalidInput(format_validation_error(e, "generation spec"), param=first_error_field(e)) from None

    @classmethod
    def build(cls, **kwargs: Any) -> "GenerationSpec":
        """The same as ``GenerationSpec(**kwargs)`` (kept for callers that spell it so)."""
        return cls(**kwargs)

    def resolve(self) -> tuple[Any, Any]:
        """Instantiate (pruner, decoder) from the registries, validating their parameters."""
        from vlmguard.decoding import make_decoder
        from vlmguard.pruning import make_pruner

        return make_pruner(self.pruning, self.budget, self.pruning_params), make_decoder(
            self.decoding, self.decoding_params
        )


def format_validation_error(e: ValidationError, what: str) -> str:
    parts = []
    for err in e.errors():
        msg = str(err.get("msg")).removeprefix("Value error, ")  # our validators' own ValueErrors
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {msg}" if loc else msg)  # a model-level check names its fields itself
    return f"invalid {what}: " + "; ".join(parts)


def first_error_field(e: ValidationError, within: str = "") -> str | None:
    """The field of a validation error's first entry, under ``within`` (``decoding_params.alpha``); ``within``
    alone for a model-level check, None when neither names one."""
    loc = ".".join(str(x) for x in e.errors()[0].get("loc", ())) if e.errors() else ""
    return ".".join(p for p in (within, loc) if p) or None


def _param_names(kind: str, method: str) -> set[str]:
    """The parameter names (and aliases) of a registered method; empty for an unknown name (refused later)."""
    if kind == "pruning":
        from vlmguard.pruning import PRUNERS as registry
    else:
        from vlmguard.decoding import DECODERS as registry
    if method not in registry:
        return set()
    fields = registry.get(method).Params.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def route_params(items: list[str] | None, pruning: str, decoding: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Issue 2's ``--param key=value``: each pair to the method that has the parameter, (pruning params, decoding
    params). A key both methods have is refused (``--pruning-param`` / ``--decoding-param`` say which); a key
    neither has goes to the decoder, whose validation names it."""
    params = parse_params(items, "--param")
    theirs = {"pruning": _param_names("pruning", pruning or "none"),
              "decoding": _param_names("decoding", decoding or "greedy")}
    out: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    for key, value in params.items():
        if key in theirs["pruning"] and key in theirs["decoding"]:
            raise InvalidInput(f"--param {key}: both pruning method {pruning!r} and decoding method {decoding!r} "
                               "have it: use --pruning-param or --decoding-param")
        out[0 if key in theirs["pruning"] else 1][key] = value
    return out


def _merge_params(routed: dict[str, Any], explicit: dict[str, Any], option: str) -> dict[str, Any]:
    """Parameters from ``--param`` and from the method's own option together; a key given by both is refused."""
    both = sorted(set(routed) & set(explicit))
    if both:
        raise InvalidInput(f"{option} and --param both give {both[0]!r}")
    return {**routed, **explicit}


def cli_method_params(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pruning params, decoding params) of a CLI command's ``--param``, ``--pruning-param`` and
    ``--decoding-param`` (``generate``, ``bench``), for its ``--pruning`` and ``--decoding`` methods."""
    routed = route_params(args.param, args.pruning, args.decoding)
    return (_merge_params(routed[0], parse_params(args.pruning_param, "--pruning-param"), "--pruning-param"),
            _merge_params(routed[1], parse_params(args.decoding_param, "--decoding-param"), "--decoding-param"))


def parse_params(items: list[str] | None, option: str = "--param") -> dict[str, Any]:
    """Parse CLI ``key=value`` pairs; values are read as JSON when they parse, else as strings. ``option``
    names where they came from in error messages."""
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InvalidInput(f"{option} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise InvalidInput(f"{option} has an empty key in {item!r}")
        if k in out:  # the later one would silently win
            raise InvalidInput(f"{option} gives {k!r} twice")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
