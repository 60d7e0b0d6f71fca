"""A tiny name -> class registry; each method module registers itself with one decorator line."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from vlmguard.errors import InvalidInput, UnknownMethod

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str, *aliases: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            for key in (name, *aliases):
                if key in self._items and self._items[key] is not cls:
                    raise ValueError(f"{self.kind} {key!r} registered twice")
                self._items[key] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UnknownMethod(f"unknown {self.kind} method {name!r} (known: {known})", param=self.kind) from None

    def names(self) -> list[str]:
        return sorted({cls.name for cls in self._items.values()})  # type: ignore[attr-defined]

    def __contains__(self, name: str) -> bool:
        return name in self._items


def import_methods(package: str, modules: list[str]) -> None:
    """Import each method module of ``package`` so that it registers itself."""
    for name in modules:
        importlib.import_module(f"{package}.{name}")


def build_params(cls: Any, params: dict[str, Any] | None, kind: str) -> BaseModel:
    """Validate a method's parameters with its pydantic ``Params`` model; one clear message on error."""
    try:
        return cls.Params(**(params or {}))
    except ValidationError as e:
        from vlmguard.spec import first_error_field, format_validation_error

        raise InvalidInput(format_validation_error(e, f"parameters for {kind} method {cls.name!r}"),
                           param=first_error_field(e, f"{kind}_params")) from None
