"""Hallucination-reducing decoding methods (``vlmguard.decoding``)."""
from __future__ import annotations

from typing import Any

from vlmguard.decoding.base import Decoder
from vlmguard.decoding.registry import DECODERS
from vlmguard.registry import build_params, import_methods, import_plugins

# One line per method module; each registers itself with DECODERS.
METHOD_MODULES = ["plain", "vcd", "m3id", "vista", "iava", "lqcd"]

import_methods("vlmguard.decoding", METHOD_MODULES)
import_plugins()  # methods of modules outside vlmguard (vlmguard/registry.py)


def make_decoder(name: str, params: dict[str, Any] | None) -> Decoder:
    cls = DECODERS.get(name or "greedy")
    p = build_params(cls, params, "decoding")
    return cls(p)


__all__ = ["DECODERS", "Decoder", "make_decoder"]
