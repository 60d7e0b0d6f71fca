"""Visual-token pruning methods (``vlmguard.pruning``)."""
from __future__ import annotations

from typing import Any

from vlmguard.errors import InvalidInput
from vlmguard.registry import build_params, import_methods, import_plugins
from vlmguard.pruning.base import Pruner
from vlmguard.pruning.registry import PRUNERS

# One line per method module; each registers itself with PRUNERS.
METHOD_MODULES = ["none", "random", "fastv", "adaptinfer", "flowcut"]

import_methods("vlmguard.pruning", METHOD_MODULES)
import_plugins()  # methods of modules outside vlmguard (vlmguard/registry.py)


def make_pruner(name: str, budget: int | float | None, params: dict[str, Any] | None) -> Pruner:
    cls = PRUNERS.get(name or "none")
    p = build_params(cls, params, "pruning")
    if budget is None:
        budget = cls.default_budget
    if cls.name != "none" and budget is None:
        raise InvalidInput(f"pruning method {cls.name!r} needs a budget (visual tokens kept, or a ratio)",
                           param="budget")
    if cls.name == "none" and budget is not None:
        raise InvalidInput(f"budget {budget} needs a pruning method (pruning is 'none')", param="budget")
    return cls(p, budget)


__all__ = ["PRUNERS", "Pruner", "make_pruner"]
