"""Signals for long-running commands: SIGTERM unwinds like Ctrl-C, and Ctrl-C is noted where Python may drop it.

``kill``, a job scheduler or a container stop sends SIGTERM, which by default ends a Python process on the spot:
no ``finally`` runs, so a benchmark's open batch, or a service's own Ray cluster, is left as it was.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM inside :func:`sigterm_unwinds`: it unwinds like Ctrl-C, ``finally`` blocks included."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it may set handlers; Python runs them there


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM instead of dying without cleaning up; the previous handler is restored
    after. A library call that installs its own SIGTERM handler (``ray.init``) goes inside :func:`sigterm_kept`."""
    if not _in_main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """Keep this process's own SIGTERM handler through a call that installs another: ``ray.init`` sets a Python one
    that exits with status 15 and a native one that dumps a stack and aborts, so a SIGTERM would no longer unwind
    as :func:`sigterm_unwinds` arranged (the CLI shuts the cluster it started down itself)."""
    if not _in_main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before):  # a handler of this program's; with none (the default), Ray's stays
            signal.signal(signal.SIGTERM, before)


@contextmanager
def ctrl_c_noted() -> Iterator[threading.Event]:
    """An Event set by Ctrl-C, which still raises KeyboardInterrupt as usual: a polling loop that checks it ends even
    when the exception struck where Python ignores exceptions (a finalizer or weakref callback, e.g. of an HTTP
    connection being collected, prints "Exception ignored" and goes on). Only in the main thread, and only where
    Ctrl-C has Python's default handler."""
    noted = threading.Event()
    if not _in_main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield noted
        return

    def handler(signum: int, frame: Any) -> None:
        noted.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
