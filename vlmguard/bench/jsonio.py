"""Reading records from JSON Lines or JSON-array files, with errors that name the file and line.

Benchmark files come in two layouts (benchmarks.md 1.1): JSON Lines (official POPE COCO files, answer
files) and one pretty-printed JSON array (POPE's SEEM files, many caption dumps). The layout is detected
from the content, not the extension; gzip files (``.gz``, or by their magic bytes) are read transparently,
and a leading UTF-8 byte-order mark is dropped.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any, Iterator

from vlmguard.errors import InvalidInput

_WS = " \t\r\n"


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise InvalidInput(f"{p}: file not found")
    if p.is_dir():
        raise InvalidInput(f"{p}: is a directory, expected a file")
    data = p.read_bytes()
    if p.suffix == ".gz" or data[:2] == b"\x1f\x8b":  # gzip magic: a compressed file without the suffix
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt
            raise InvalidInput(f"{p}: not a valid gzip file ({e})") from None
    try:
        return data.decode("utf-8-sig")  # a leading BOM (Windows editors, PowerShell) is not part of the text
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def detect_layout(text: str) -> str:
    """``"json_array"`` when the first non-blank character is ``[``, else ``"jsonl"``."""
    stripped = text.lstrip(_WS)
    return "json_array" if stripped.startswith("[") else "jsonl"


# a JSON Lines record ends at \n, \r\n or a bare \r (JSON strings cannot hold a raw CR), never at the other
# characters str.splitlines() breaks at (U+2028 / U+2029 / U+0085 are valid inside a JSON string)
_LINE_END = re.compile(r"\r\n|\r|\n")


def _decode_failure(e: ValueError | RecursionError) -> str:
    """What went wrong when the JSON decoder gave up with something other than a syntax error: a number
    longer than Python's integer-conversion limit (ValueError) or nesting deeper than the recursion limit."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return "a number with too many digits" if "digits" in str(e) else str(e)


def _iter_jsonl(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(_LINE_END.split(text), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}:{lineno}: bad JSON line ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"{path}:{lineno}: bad JSON line ({_decode_failure(e)})") from None


def _iter_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    n = len(text)
    i = text.index("[") + 1
    line = 1 + text.count("\n", 0, i)

    def skip(j: int) -> int:
        nonlocal line
        k = j
        while k < n and text[k] in _WS:
            k += 1
        line += text.count("\n", j, k)
        return k

    i = skip(i)
    if i < n and text[i] == "]":
        return
    while True:
        if i >= n:
            raise InvalidInput(f"{path}:{line}: bad JSON array (unexpected end of file)")
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"{path}:{line}: bad JSON ({_decode_failure(e)})") from None
        yield line, obj
        line += text.count("\n", i, end)
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            rest = text[i + 1 :].strip(_WS)
            if rest:
                raise InvalidInput(f"{path}:{line}: unexpected content after the JSON array")
            return
        raise InvalidInput(f"{path}:{line}: bad JSON array (expected ',' or ']')")


def read_records(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """All records of a JSON Lines or JSON-array file as ``(line, object)`` plus the layout name.

    Every record must be a JSON object; anything else raises :class:`InvalidInput` naming file and line.
    """
    p = Path(path)
    text = read_text(p)
    layout = detect_layout(text)
    it = _iter_array(text, p) if layout == "json_array" else _iter_jsonl(text, p)
    out: list[tuple[int, dict[str, Any]]] = []
    for lineno, obj in it:
        if not isinstance(obj, dict):
            raise InvalidInput(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out, layout


def _answer_text(body: Any) -> str | None:
    """The answer's text in an API answer: a chat completion's first message, a Response's output text, or the
    native API's ``text``; None when the body holds none."""
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if isinstance(choices, list):
        message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else None
    output = body.get("output")
    if isinstance(output, list):
        texts = [part.get("text") for item in output if isinstance(item, dict) and item.get("type") == "message"
                 for part in item.get("content") or [] if isinstance(part, dict) and part.get("type") == "output_text"]
        return "".join(t for t in texts if isinstance(t, str)) if texts else None
    text = body.get("text")
    return text if isinstance(text, str) else None


def from_batch_output(records: list[tuple[int, dict[str, Any]]], id_key: str, text_key: str,
                      notes: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """The records of an OpenAI batch output file (OpenAI's Batch API's, or ``vlmguard run-batch``'s) as plain
    answer records: ``custom_id`` under ``id_key`` and the answer's text under ``text_key``. A request that got no
    answer (an error, a status other than 200) is left out and counted in ``notes``. Other files' records come
    back as they are."""
    if not records or not all(isinstance(r, dict) and "custom_id" in r and ("response" in r or "error" in r)
                              for _, r in records):
        return records
    out, failed = [], 0
    for line, rec in records:
        response = rec.get("response") if isinstance(rec.get("response"), dict) else {}
        text = _answer_text(response.get("body")) if response.get("status_code") == 200 else None
        if text is None:
            failed += 1
            continue
        out.append((line, {id_key: rec["custom_id"], text_key: text}))
    if failed and notes is not None:
        notes.append(f"{failed} batch record(s) without an answer (an error, or no text) left out")
    return out


def require(record: dict[str, Any], key: str, types: type | tuple[type, ...], path: Path | str, line: int) -> Any:
    """``record[key]`` checked for presence and type, else InvalidInput naming file and line."""
    if key not in record:
        raise InvalidInput(f"{path}:{line}: missing field {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise InvalidInput(f"{path}:{line}: field {key!r} must be {names}, got {value!r}")
    return value


# an integer written as text ("12", " -3 "): ASCII digits only (str.isdigit() also passes "²", which int() refuses),
# at most Python's integer-conversion limit of 4300 digits
_INT_TEXT = re.compile(r"-?[0-9]{1,4300}")


def int_from_text(value: Any) -> Any:
    """``value`` as an int when it is a string holding an integer (an id written as ``"12"``), else unchanged."""
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return value


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
