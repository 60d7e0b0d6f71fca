"""Errors a user can act on. The CLI prints them as one line; the HTTP API maps them to 4xx."""
from __future__ import annotations

from typing import Any


class VlmguardError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback.

    ``param`` names the input at fault when one is: a :class:`~vlmguard.spec.GenerationSpec` field (``budget``,
    ``decoding``, ``decoding_params.alpha``, ...) or ``prompt`` / ``images``; the HTTP API reports it as the
    error's ``param``, written as the request spells it (``vlmguard.budget`` in a chat request)."""

    http_status = 400

    def __init__(self, *args: Any, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class InvalidInput(VlmguardError):
    """A request, parameter or file is malformed."""


class UnknownMethod(InvalidInput):
    """A pruning or decoding method name is not registered."""


class ModelLoadError(VlmguardError):
    """The model or processor cannot be loaded from the given path or cache."""

    http_status = 404


class ContextTooLong(InvalidInput):
    """The prompt plus image tokens plus max_new_tokens exceed the model's context."""


class NonFiniteLogits(VlmguardError):
    """The model's own logits are NaN or infinite (typically float16 overflowing): nothing a decoder or sampler
    can choose from; the answer would be the same garbage token over and over."""

    http_status = 500


def non_finite_cause(dtype: Any) -> str:
    """What NaN / infinite logits of a model with ``dtype`` weights most likely mean, and the fix."""
    name = str(dtype).replace("torch.", "")
    if name == "float16":
        return f"({name} weights): float16 overflows in this model; load it in bfloat16 or float32 (--dtype)"
    return f"({name} weights): the weights or the input are broken"


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none): libraries'
    messages can run to several lines, an error line must be one."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
