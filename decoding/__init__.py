"""Hallucination-reducing decoding methods (``vlmguard.decoding``)."""
from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from vlmguard.decoding.base import Decoder
from vlmguard.decoding.registry import DECODERS
from vlmguard.errors import InvalidInput

# One line per method module; each registers itself with DECODERS.
METHOD_MODULES = ["plain", "vcd", "m3id", "vista", "iava", "lqcd"]

for _m in METHOD_MODULES:
    try:
        importlib.import_module(f"vlmguard.decoding.{_m}")
    except ModuleNotFoundError as e:  # a method module not written yet
        if e.name != f"vlmguard.decoding.{_m}":
            raise


def make_decoder(name: str, params: dict[str, Any] | None) -> Decoder:
    cls = DECODERS.get(name or "greedy")
    try:
        p = cls.Params(**(params or {}))
    except ValidationError as e:
        from vlmguard.spec import format_validation_error

        raise InvalidInput(format_validation_error(e, f"parameters for decoding method {cls.name!r}")) from None
    return cls(p)


__all__ = ["DECODERS", "Decoder", "make_decoder"]
