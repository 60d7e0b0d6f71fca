"""Typed results of the engine."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Request:
    """One generation request: the user's text and its images (the engine applies the chat template)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    request_id: str | None = None
    system: str | None = None
    raw_prompt: bool = False  # prompt is already templated, with the model's image placeholders
    # the prompt as token ids, fed as they are (no chat template, no special token added, no image); ``prompt`` is
    # then ignored (their text stands for it where a decoder reads the prompt's words)
    prompt_token_ids: list[int] | None = None


@dataclass
class Timings:
    vision_s: float = 0.0  # vision tower + projector (incl. vision-side pruning)
    prefill_s: float = 0.0  # LLM prefill (incl. LLM-side pruning)
    decode_s: float = 0.0  # all decode steps
    ttft_s: float = 0.0  # request start to the first generated token
    total_s: float = 0.0
    per_token_s: list[float] = field(default_factory=list)
    setup_s: float = 0.0  # decoder pre-passes (e.g. VISTA's steering vector)
    batch_size: int = 1  # the most requests decoded together with this one (in-flight joins raise it)
    prefill_batch: int = 1  # the requests prefilled together with this one (itself included)
    prefill_tokens: int = 0  # the tokens its rows (decoder branches included) feed the LLM's first layer
    # of those, the ones another row of the prefill computed for them: a prefix they share (vlmguard/prefix_sharing.py)
    prefill_shared_tokens: int = 0
    # of those, the ones taken from the prefix cache: an earlier prefill computed them (vlmguard/prefix_cache.py)
    prefill_cached_tokens: int = 0
    # of the request's own prompt (its main row), the tokens taken from the prefix cache: what OpenAI's usage reports
    # as prompt_tokens_details.cached_tokens
    prompt_cached_tokens: int = 0


@dataclass
class StepDiagnostic:
    token_id: int
    token: str
    main_prob: float  # probability of the chosen token under the main branch
    contrast_prob: float | None  # ... under the contrast branch/distribution, when the decoder has one
    score: float  # the decoder's final score of the chosen token
    main_top_id: int  # the main branch's own argmax: != token_id where the decoder changed the choice


@dataclass
class TopLogprob:
    token_id: int
    token: str  # its text inside a text (leading space included; ``vlmguard.token_text``)
    logprob: float
    bytes: list[int] = field(default_factory=list)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the decoder's final scores (``GenerationSpec.logprobs``),
    with the most likely tokens at that step (as many as asked for, most likely first); or a prompt token's under the
    model (``GenerationSpec.prompt_logprobs``), None where nothing predicts it (the first token, an image's)."""

    token_id: int
    token: str
    logprob: float | None
    bytes: list[int] = field(default_factory=list)
    top: list[TopLogprob] = field(default_factory=list)
    rank: int | None = None  # a prompt token's: 1 + the tokens more likely at its place (vLLM's rank)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error" (then ``error`` says what went wrong)
    prompt_tokens: int
    visual_tokens: int
    visual_tokens_kept: list[int]  # visual tokens fed to each LLM layer
    kept_indices: list[int] | None
    timings: Timings
    steps: list[StepDiagnostic] = field(default_factory=list)
    pruning: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when the spec asks for them
    # one per prompt token (the ids the model was fed, from the first; visual tokens included), when the spec's
    # ``prompt_logprobs`` asks for them
    prompt_logprobs: list[TokenLogprob] | None = None
    # with ``logprobs``: the entry of the token that ended the answer (an end of sequence or a stop token id), which
    # the answer and ``logprobs`` leave out (the legacy completions list it last, as vLLM does)
    end_logprob: TokenLogprob | None = None
    # why the request stopped early with finish_reason "error" (its scores became NaN: a float16 model
    # overflowing mid-answer; its guided format ran into a dead end); its text is what it generated before. The
    # other requests of its batch go on.
    error: str | None = None
    # what kind of error: "NonFiniteLogits" (the model's fault), "FormatDeadEnd" (a ``guided`` format this model's
    # vocabulary cannot go on writing: the request's)
    error_code: str | None = None
    # analytic FLOPs of this request's prefill on the tokens each layer was actually fed ({"vision", "projector",
    # "llm", "total"}; one multiply-accumulate = one FLOP, full attention: the papers' convention,
    # ``vlmguard.flops.result_flops``, formula in docs/pruning.md)
    prefill_flops: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    index: int  # request index in the batch
    token_id: int | None
    text: str  # text delta since the previous event of this request
    done: bool = False
    result: GenerationResult | None = None
    # with ``GenerationSpec.logprobs``: the entries of the tokens since this request's previous event (a token
    # whose text is held back, an incomplete character or a possible stop string, comes with the event that
    # sends its text)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # with ``GenerationSpec.prompt_logprobs``: the prompt's entries, on this request's first event
    prompt_logprobs: list[TokenLogprob] | None = None
