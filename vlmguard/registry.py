"""A tiny name -> class registry; each method module registers itself with one decorator line.

Methods may also live outside vlmguard, in *plug-in* modules that register themselves the same way on import
(:func:`import_plugins`): those named by the ``vlmguard.methods`` entry points of installed distributions (a
plug-in package's ``[project.entry-points."vlmguard.methods"] my_method = "my_package.my_method"``) and those listed
in ``$VLMGUARD_PLUGINS`` (module names, comma-separated), so a method can be tried without packaging it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
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


class PluginError(InvalidInput):
    """A plug-in method module that cannot be imported."""


PLUGINS_ENV = "VLMGUARD_PLUGINS"  # plug-in method modules, comma-separated
ENTRY_POINTS = "vlmguard.methods"  # the entry-point group of installed plug-ins (each value: a module)


def plugin_modules() -> list[tuple[str, str]]:
    """The plug-in method modules to import, each with where it was named: entry points first, then
    ``$VLMGUARD_PLUGINS``."""
    found = [(ep.value.partition(":")[0].strip(), f"entry point {ep.name!r} of group {ENTRY_POINTS!r}")
             for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)]
    listed = os.environ.get(PLUGINS_ENV, "")
    return found + [(m.strip(), f"${PLUGINS_ENV}") for m in listed.split(",") if m.strip()]


def import_plugins() -> None:
    """Import every plug-in method module (:func:`plugin_modules`), each once, so that it registers its methods; one
    that cannot be imported, or whose method takes a name already taken, is one error naming it and where it was
    named."""
    for module, origin in plugin_modules():
        try:
            importlib.import_module(module)
        except PluginError:  # (another plug-in's, imported on the way: a plug-in imports vlmguard's packages)
            raise
        except Exception as e:  # (any error of a user's module: not found, a syntax error, a name taken twice)
            raise PluginError(f"plug-in method module {module!r} (from {origin}) cannot be imported: "
                              f"{type(e).__name__}: {e}") from e


def build_params(cls: Any, params: dict[str, Any] | None, kind: str) -> BaseModel:
    """Validate a method's parameters with its pydantic ``Params`` model; one clear message on error."""
    try:
        return cls.Params(**(params or {}))
    except ValidationError as e:
        from vlmguard.spec import first_error_field, format_validation_error

        raise InvalidInput(format_validation_error(e, f"parameters for {kind} method {cls.name!r}"),
                           param=first_error_field(e, f"{kind}_params")) from None
