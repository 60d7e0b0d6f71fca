"""Files named on the command line: checks made before any work starts, each failing with a one-line
:class:`~vlmguard.errors.InvalidInput` that names the option, so a bad output path never costs (or loses)
the results of a long run; and YAML config files read with a one-line error.

The output checks probe the file or folder for writing and leave nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from vlmguard.errors import InvalidInput


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


@contextmanager
def _folders(d: Path) -> Iterator[None]:
    """Create ``d`` and its missing parents for a probe, and remove the ones created afterwards: a check
    leaves nothing behind (the command creates them when it writes)."""
    missing = []
    q = d.absolute()
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    created = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        yield
    finally:
        for m in reversed(created):
            try:
                m.rmdir()
            except OSError:
                pass


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """A file the command will write (its folders created, an existing file overwritten), probed now by
    creating it (and its folders) and removing them again, so any reason it cannot be written shows before
    the work (``os.access`` says yes to root even for places like /proc)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidInput(f"{option} {p}: is a directory, expected a file path")
    try:
        with _folders(p.parent):
            existed = p.exists()
            with open(p, "a"):
                pass
            if not existed:
                p.unlink()
    except OSError as e:
        raise InvalidInput(f"{option} {p}: cannot write it ({_os_reason(e)})") from None
    return p


def write_output_file(path: str | os.PathLike, text: str, option: str) -> None:
    """Write ``text`` to the file ``path`` whole or not at all: into a temporary file beside it, renamed over it,
    so a failing write (a full disk) leaves an existing file as it was; a device or pipe (/dev/stdout) is written
    directly, and a link keeps pointing at the file it names. A failure is one line naming ``option``."""
    p = Path(path).expanduser()
    try:
        if p.exists() and not p.is_file():
            p.write_text(text)
            return
        target = p.resolve()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(text)
            if target.exists():
                shutil.copymode(target, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise InvalidInput(f"{option} {p}: cannot write it ({_os_reason(e)})") from None


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """A folder the command will write files into (created when missing), probed now for writing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InvalidInput(f"{option} {p}: exists and is not a directory, expected an output folder")
    try:
        with _folders(p):
            tempfile.TemporaryFile(dir=p).close()
    except OSError as e:
        raise InvalidInput(f"{option} {p}: cannot write files there ({_os_reason(e)})") from None
    return p


def plot_formats() -> list[str]:
    """File extensions matplotlib can save figures as (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_plot_path(path: str | os.PathLike, option: str = "--plot") -> Path:
    """A figure file: an output file whose extension matplotlib can write (it would otherwise append
    ``.png`` to a name without one, or fail after the work with an unsupported one)."""
    p = Path(path).expanduser()
    ext = p.suffix.lower().lstrip(".")
    formats = plot_formats()
    if p.is_dir():
        return check_output_file(p, option)  # says: a directory
    if ext not in formats:
        what = f"unsupported figure format {p.suffix!r}" if ext else "no file extension"
        raise InvalidInput(f"{option} {p}: {what} (use one of {', '.join('.' + f for f in formats)})")
    return check_output_file(p, option)


def _unique_key_loader() -> Any:
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so
    a second ``budgets:`` or ``methods:`` would drop the first). Keys merged in with ``<<`` may be
    overridden, as YAML says."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """Parse a YAML file; a missing file, bad YAML or a key given twice is one line naming the file (and the
    line)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"{p}: {what} not found" if not p.exists() else f"{p}: {what} is not a file")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise InvalidInput(f"{p}{where}: bad YAML ({problem})") from None
