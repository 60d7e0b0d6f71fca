"""Forward-compatibility audit: pyproject's ``filterwarnings`` turns a deprecation that OUR code triggers into an
error, while deprecations raised inside third-party libraries by their own code stay ignored.

A library deprecates an API with ``warnings.warn(msg, DeprecationWarning, stacklevel=2)``, so the warning is
attributed to the module of the caller's frame (its ``__name__``). Our modules are ``vlmguard.*`` (``pruning/``,
``decoding/``, ``workers/`` and ``dashboard/`` install as ``vlmguard.pruning`` ...); a dashboard page script runs under
Streamlit as ``__main__``. The tests re-apply the configured filters (the command line's ``-W`` options, applied after
the ini ones, may override them in a given run) and check who gets an error.
"""
from __future__ import annotations

import builtins
import warnings

import pytest
import torch

from vlmguard.engine import pick_dtype

CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
LIBRARY = ("import warnings\n\n"
           "def old_api(category):\n"
           "    warnings.warn('old_api() is deprecated', category, stacklevel=2)\n")
CALLER = "def call(old_api, category):\n    old_api(category)\n"


def _module(source: str, name: str) -> dict:
    """A throwaway module's namespace: code run with ``__name__ = name`` is attributed to that module."""
    ns = {"__name__": name}
    exec(compile(source, name.replace(".", "/") + ".py", "exec"), ns)
    return ns


def _apply(entries: list[str]) -> None:
    """Apply pytest ini ``filterwarnings`` entries (``action:message:category:module:lineno``) in order, as pytest does
    (each ``warnings.filterwarnings`` goes in front, so later entries take precedence)."""
    for entry in entries:
        action, message, category, module, lineno = (entry.split(":") + [""] * 5)[:5]
        warnings.filterwarnings(action, message=message, category=getattr(builtins, category or "Warning"),
                                module=module, lineno=int(lineno or 0))


def _trigger(config: list[str], caller_module: str, category: type[Warning]) -> list[warnings.WarningMessage]:
    """A library's deprecated API called from ``caller_module``, under the filters ``config``."""
    lib = _module(LIBRARY, "somelib.api")
    caller = _module(CALLER, caller_module)
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        _apply(config)
        caller["call"](lib["old_api"], category)
    return seen


@pytest.fixture
def config(pytestconfig) -> list[str]:
    return list(pytestconfig.getini("filterwarnings"))


def test_the_blanket_ignore_comes_first_so_our_errors_take_precedence(config):
    assert config[0] == "ignore::DeprecationWarning"
    assert "error::DeprecationWarning:vlmguard" in config[1:]


@pytest.mark.parametrize("category", CATEGORIES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("caller", ["vlmguard.engine", "vlmguard.pruning.flowcut", "vlmguard.dashboard.data",
                                    "__main__"])
def test_a_deprecated_api_called_from_our_code_is_an_error(config, caller, category):
    with pytest.raises(category, match="deprecated"):
        _trigger(config, caller, category)


@pytest.mark.parametrize("caller", ["somelib.core", "ray.serve._private.config", "pycocotools.mask", "vlmguar"])
def test_a_library_internal_deprecation_stays_ignored(config, caller):
    assert _trigger(config, caller, DeprecationWarning) == []


def test_before_this_audit_the_blanket_ignore_hid_our_deprecations():
    assert _trigger(["ignore::DeprecationWarning"], "vlmguard.engine", DeprecationWarning) == []


def test_a_real_module_calling_a_deprecated_torch_api_fails(config, monkeypatch):
    """``pick_dtype`` (vlmguard/engine.py) asks torch whether the GPU computes bf16; were that torch API deprecated the
    way torch deprecates (``stacklevel=2``), the warning names vlmguard.engine and the suite fails."""
    for category in (DeprecationWarning, FutureWarning):
        def patched(including_emulation: bool = True, category=category) -> bool:
            warnings.warn("torch.cuda.is_bf16_supported() is deprecated", category, stacklevel=2)
            return True

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", patched)
        with warnings.catch_warnings():
            warnings.resetwarnings()
            _apply(config)
            with pytest.raises(category, match="is_bf16_supported"):
                pick_dtype("auto", torch.device("cuda"))
    # the same call without a deprecation is untouched by the filters
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        _apply(config)
        assert pick_dtype("auto", torch.device("cuda")) is torch.bfloat16
