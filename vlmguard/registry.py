"""A tiny name -> class registry; each method module registers itself with one decorator line."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from vlmguard.errors import UnknownMethod

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
            raise UnknownMethod(f"unknown {self.kind} method {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted({cls.name for cls in self._items.values()})  # type: ignore[attr-defined]

    def __contains__(self, name: str) -> bool:
        return name in self._items
