"""Visual-token pruning methods (``vlmguard.pruning``)."""
from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from vlmguard.errors import InvalidInput
from vlmguard.pruning.base import Pruner
from vlmguard.pruning.registry import PRUNERS

# One line per method module; each registers itself with PRUNERS.
METHOD_MODULES = ["none", "random", "fastv", "adaptinfer", "flowcut"]

for _m in METHOD_MODULES:
    try:
        importlib.import_module(f"vlmguard.pruning.{_m}")
    except ModuleNotFoundError as e:  # a method module not written yet
        if e.name != f"vlmguard.pruning.{_m}":
            raise


def make_pruner(name: str, budget: int | float | None, params: dict[str, Any] | None) -> Pruner:
    cls = PRUNERS.get(name or "none")
    try:
        p = cls.Params(**(params or {}))
    except ValidationError as e:
        from vlmguard.spec import format_validation_error

        raise InvalidInput(format_validation_error(e, f"parameters for pruning method {cls.name!r}")) from None
    if cls.name != "none" and budget is None:
        raise InvalidInput(f"pruning method {cls.name!r} needs a budget (visual tokens kept, or a ratio)")
    return cls(p, budget)


__all__ = ["PRUNERS", "Pruner", "make_pruner"]
