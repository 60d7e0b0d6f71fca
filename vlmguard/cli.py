"""The ``vlmguard`` command line. Each feature module contributes its subcommands via ``register``.

Errors a user can act on (:class:`VlmguardError`, missing or unwritable files, bad images) print as one line on
stderr with exit status 2, never a traceback. ``VLMGUARD_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import select
import signal
import sys

from vlmguard.errors import VlmguardError
from vlmguard.interrupts import Terminated, sigterm_unwinds

# Modules that provide ``register(subparsers)``; each adds its own subcommands.
COMMAND_MODULES = [
    "vlmguard.commands.generate",
    "vlmguard.synth.cli",
    "vlmguard.bench.cli",
    "vlmguard.pruning.cli",
    "vlmguard.workers.cli",
    "vlmguard.workers.run_batch_cli",
    "vlmguard.dashboard.cli",
    "vlmguard.perf.cli",
    "vlmguard.commands.demo",
    "vlmguard.commands.env",
]


DESCRIPTION = ("Host vision-language models faster (visual-token pruning) and more truthfully (hallucination-reducing "
               "decoding), and measure both (POPE, CHAIR, perf). `vlmguard COMMAND --help` gives a command's options; "
               "an error is one line on stderr with exit status 2 (VLMGUARD_DEBUG=1 shows its traceback).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmguard", description=DESCRIPTION)
    from vlmguard import __version__

    parser.add_argument("--version", action="version", version=f"vlmguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == name or name.startswith(e.name + ".")):
                continue  # feature not present in this build
            raise
        mod.register(sub)
    return parser


def _prepare_std_streams() -> None:
    """Make stdout and stderr safe to print anything to, whatever the environment gave the process.

    A stream started closed (``>&-``) is None in Python: it gets /dev/null, and so does its descriptor, which the
    next file opened (the results database, say) would otherwise take and child processes would write into. Text
    the stream's encoding cannot hold (``PYTHONIOENCODING=ascii``, a C locale without UTF-8 coercion) is escaped
    as stderr already does, instead of failing after the work is done (a model's answer, a table of model paths).
    The process's own stderr goes on through :class:`_StderrPipe`: its reader may leave (``2>&1 | head -1``).
    """
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is None:
            try:
                os.fstat(fd)
            except OSError:  # still closed: fill it
                _devnull_onto(fd)
            stream = open(os.devnull, "w")  # lives as long as the process
            setattr(sys, name, stream)
        elif fd == 2 and stream is sys.__stderr__ and isinstance(stream, io.TextIOWrapper):
            stream.flush()
            stream = io.TextIOWrapper(io.BufferedWriter(_StderrPipe(fd, "w", closefd=False)), encoding=stream.encoding,
                                      errors=stream.errors, line_buffering=True, write_through=True)
            sys.stderr = stream
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


class _StderrPipe(io.FileIO):
    """Descriptor 2 for sys.stderr. A reader that left (``vlmguard bench pope 2>&1 >out | head -1``) would make the
    next progress bar or log line raise BrokenPipeError in the middle of the work (a model load, a benchmark), and
    then the error line too: what is still to say goes to /dev/null instead, and the command goes on."""

    def write(self, b) -> int:
        try:
            return super().write(b)
        except BrokenPipeError:
            _devnull_onto(self.fileno())
            return len(b)


def _devnull_onto(fd: int) -> None:
    """Point descriptor ``fd`` at /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader went away (``vlmguard report | head -1``), not some other connection."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # not a real file (in-process callers)
        return False


def _end_quietly() -> int:
    """End as a command killed by SIGPIPE would, stdout pointed at /dev/null so that the interpreter's last flush
    does not fail again."""
    _devnull_onto(sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    if not os.environ.get("VLMGUARD_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _prepare_std_streams()
    try:  # Ctrl-C while the subcommands' modules import (a second or two) is an interruption like any other
        args = build_parser().parse_args(argv)
        if any(getattr(args, flag, False) for flag in ("json", "quiet", "no_progress")):
            # no progress bars at all, transformers' weight loading included (read when transformers is imported)
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            if "transformers" in sys.modules:  # imported already (some subcommands' modules do): switch it off
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
        with sigterm_unwinds():  # `kill`, a scheduler or a container stop: finally blocks run, as on Ctrl-C
            rc = args.func(args)
        sys.stdout.flush()  # a reader gone shows here, not in the interpreter's final flush
        return int(rc or 0)
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):  # SIGTERM where a command asked for it to unwind (vlmguard.interrupts)
            print("vlmguard: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("vlmguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return _end_quietly()
    except (VlmguardError, OSError) as e:
        # OSErrors about a named file (missing, a directory, not writable, ...) are the user's to fix; others
        # (a broken connection, say) keep their traceback
        user_os_error = isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)) or (
            isinstance(e, OSError) and e.filename is not None)
        if os.environ.get("VLMGUARD_DEBUG") or isinstance(e, OSError) and not user_os_error:
            raise
        if isinstance(e, VlmguardError):
            msg = str(e)
        else:
            msg = f"{e.strerror or e}: {e.filename}" if e.filename is not None else str(e.strerror or e)
        print(f"vlmguard: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
