"""Structured output: an answer held to a JSON schema, any JSON object, a regular expression or a Lark grammar
(``GenerationSpec.guided``; OpenAI's ``response_format``, vLLM's ``guided_json`` / ``guided_regex`` /
``guided_grammar``).

The grammar work is llguidance's (the engine behind vLLM's ``guidance`` backend): a request's format becomes an
llguidance grammar, and a matcher per request says at every step which tokens keep the answer inside it. Its
tokenizer is built once per model tokenizer: straight from the fast tokenizer where llguidance reads it (byte-level
BPE, SentencePiece), otherwise from each token's bytes (``vlmguard.token_text``: word-level vocabularies such as the
bundled model's).

At every step a guided request's final scores (what the decoder combined, after the penalties) keep only the
tokens its matcher allows, end-of-sequence only once the answer is complete, and the row is renormalised
(``penalties.keep_only``): token selection, sampling and log-probabilities read the restricted distribution, and a
contrastive decoder still decides among the allowed tokens. Where its plausible set holds none of them, the row
takes the main branch's scores, restricted alike, as guided choice does. The chosen token then advances the
matcher. An answer cut by ``max_new_tokens`` (or a stop string) ends where it was cut, as OpenAI's does: check
``finish_reason``.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from vlmguard.errors import InvalidInput
from vlmguard.penalties import keep_only
from vlmguard.spec import GuidedOutput
from vlmguard.token_text import token_pieces

_MAX_TEMPLATES = 64  # compiled formats kept per tokenizer
_LOCK = threading.Lock()


@dataclass
class Compiled:
    """llguidance's tokenizer for one model tokenizer (and logits width, end-of-sequence ids), and the formats
    compiled for it: grammar -> a fresh matcher, the most recently used last."""

    tokenizer: Any
    templates: "OrderedDict[str, Any]" = field(default_factory=OrderedDict)


_COMPILED: "weakref.WeakKeyDictionary[Any, dict[tuple, Compiled]]" = weakref.WeakKeyDictionary()


def schema_options(whitespace: str, strict: bool) -> dict[str, bool]:
    """llguidance's options for a JSON schema (``overrides``, or a schema's ``x-guidance``): any whitespace JSON
    allows or none, and whether keywords it does not implement are an error (strict) or left out."""
    return {"whitespace_flexible": whitespace == "flexible", "lenient": not strict}


def schema_error(schema: dict[str, Any], strict: bool) -> str | None:
    """Why llguidance cannot compile ``schema`` (a keyword it lacks, when ``strict``; a schema that is not one), or
    None. No tokenizer needed."""
    from llguidance import LLMatcher

    try:
        text = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides={"lenient": not strict})
    except ValueError as e:
        return str(e)
    return LLMatcher.validate_grammar(text) or None


def grammar(guided: GuidedOutput) -> str:
    """The llguidance grammar (its JSON text) of a request's format, with one space allowed before the answer: the
    space SentencePiece and word-level vocabularies write before a word (LLaVA-1.5's first token is "▁Yes"). The
    answer's text is stripped, so what a user reads is held to the format either way."""
    from llguidance import LLMatcher

    if guided.regex is not None:
        inner = LLMatcher.grammar_from_regex(guided.regex)
    elif guided.grammar is not None:
        inner = LLMatcher.grammar_from_lark(guided.grammar)
    else:
        schema = guided.json_schema if guided.json_schema is not None else {"type": "object"}
        try:
            inner = LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                       overrides=schema_options(guided.whitespace, guided.strict))
        except ValueError as e:
            raise InvalidInput(f"guided: the JSON schema is not usable: {e}", param="guided.json_schema") from None
    # llguidance gives a grammar as its JSON (a regex, a schema) or as Lark text (a Lark grammar)
    answer = json.loads(inner)["grammars"][0] if inner.lstrip().startswith("{") else {"lark_grammar": inner}
    top = {"lark_grammar": 'start: LEADING_SPACE? @answer\nLEADING_SPACE: " "'}
    return json.dumps({"grammars": [top, {**answer, "name": "answer"}]})


def _one_line(error: str) -> str:
    """llguidance's error on one line: its lines joined, without the source excerpts and carets it draws and the
    parser state it dumps."""
    lines = [ln.strip() for ln in error.split("<state>")[0].splitlines()]
    return "; ".join(ln for ln in lines if ln and not set(ln) <= set("^ ~") and not re.match(r"\d+ \|", ln))


class _TokenBytes:
    """What llguidance's ``TokenizerWrapper`` reads of a tokenizer it cannot load itself: each token's bytes
    (special tokens as 0xFF + their name, llguidance's convention), the end-of-sequence id and a text encoder."""

    def __init__(self, tokenizer: Any, width: int, eos: Sequence[int]):
        pieces, n = token_pieces(tokenizer), len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []))
        self.eos_token_id, self.bos_token_id = list(eos)[0], getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(t for t in special if t < width)
        self.tokens = [(b"\xff" + str(tokenizer.convert_ids_to_tokens(i)).encode() if i in special
                        else bytes(pieces.bytes(i))) if i < n else b"" for i in range(width)]
        # one token per byte past the model's ids, which the model never gives (their mask bits are not read):
        # llguidance tokenizes the bytes a format forces (the space before " dog") and needs every byte to have one
        self.tokens += [bytes([b]) for b in range(256)]
        self._tok = tokenizer
        self._ids: dict[bytes, int] = {}  # (the model's own tokens before the byte tokens)
        for i, b in enumerate(self.tokens):
            if b and i not in special:
                self._ids.setdefault(b, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        """``text``'s ids: the tokenizer's own where their bytes give the text back, else the longest tokens first,
        byte tokens where no other fits (a word-level tokenizer drops the whitespace it splits on)."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        ids = list(self._tok(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"])
        if b"".join(self.tokens[i] for i in ids if i < len(self.tokens)) == data:
            return ids
        ids, at = [], 0
        while at < len(data):
            end = next(e for e in range(min(len(data), at + self._longest), at, -1) if data[at:e] in self._ids)
            ids.append(self._ids[data[at:end]])
            at = end
        return ids


def compiled_for(tokenizer: Any, width: int, eos: Sequence[int]) -> Compiled:
    """What is built once per model tokenizer, with ``width`` output ids (the model's logits) and these
    end-of-sequence ids: llguidance's tokenizer (about a second for a 150k vocabulary) and a cache of formats."""
    import llguidance
    import llguidance.hf

    key = (width, tuple(sorted(eos)))
    with _LOCK:
        built = _COMPILED.setdefault(tokenizer, {})
        if key not in built:
            try:
                lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width, eos_token=list(key[1]))
            except ValueError:  # a vocabulary llguidance cannot read (word-level): from each token's bytes
                wrapped = llguidance.TokenizerWrapper(_TokenBytes(tokenizer, width, eos))
                lltok = llguidance.LLTokenizer(wrapped, eos_token=list(key[1]))
            built[key] = Compiled(lltok)
        return built[key]


def compile_format(tokenizer: Any, width: int, eos: Sequence[int], guided: GuidedOutput) -> Any:
    """``guided``'s format compiled for ``tokenizer`` (once; later calls take the cached one): a matcher in its
    start state, to copy, never to advance. InvalidInput for a format llguidance refuses (a bad regex, a grammar
    that does not parse, a schema it cannot compile) or one this model's vocabulary cannot begin to write (JSON for
    a model without a ``{`` in any token). What the engine checks a request with."""
    from llguidance import LLMatcher

    compiled, text = compiled_for(tokenizer, width, eos), grammar(guided)
    with _LOCK:
        template = compiled.templates.get(text)
        if template is not None:
            compiled.templates.move_to_end(text)
            return template
    template = LLMatcher(compiled.tokenizer, text, log_level=0)
    if template.is_error():
        raise InvalidInput(f"guided: {_one_line(template.get_error())}", param=f"guided.{guided.kind}")
    if not _can_begin(template.deep_copy(), compiled.tokenizer, width):
        raise InvalidInput(f"guided: this model's vocabulary has no token that begins an answer in the requested "
                           f"{guided.kind.replace('_', ' ')} format", param=f"guided.{guided.kind}")
    with _LOCK:
        compiled.templates[text] = template
        while len(compiled.templates) > _MAX_TEMPLATES:
            compiled.templates.popitem(last=False)
    return template


def new_matcher(tokenizer: Any, width: int, eos: Sequence[int], guided: GuidedOutput) -> Any:
    """A fresh matcher for one answer in ``guided``'s format: a copy of :func:`compile_format`'s."""
    return compile_format(tokenizer, width, eos, guided).deep_copy()


def _can_begin(probe: Any, lltok: Any, width: int) -> bool:
    """Whether one of the model's tokens begins an answer, past the one space allowed first. (``probe`` is used up:
    a matcher with no token to give enters an error state and stays there.)"""
    first = allowed_mask(probe, width).nonzero().flatten().tolist()
    if first and all(lltok.decode_bytes([t]) == b" " for t in first):
        probe.consume_token(first[0])
        first = allowed_mask(probe, width).nonzero().flatten().tolist()
    return bool(first) and not probe.is_error()


def dead_end(matcher: Any) -> str | None:
    """Why ``matcher`` cannot go on (no token of the vocabulary continues the answer, or a token it was given did
    not fit), None while it can."""
    return f"no token continues the answer in its format ({_one_line(matcher.get_error())})" \
        if matcher.is_error() else None


def allowed_mask(matcher: Any, width: int) -> torch.Tensor:
    """(width,) bool: the tokens ``matcher`` allows next (end-of-sequence where the answer may end)."""
    return allowed_masks([matcher], width)[0]


def allowed_masks(matchers: Sequence[Any], width: int) -> torch.Tensor:
    """(len(matchers), width) bool: each matcher's :func:`allowed_mask`, unpacked in one pass."""
    data = np.frombuffer(b"".join(m.compute_bitmask() for m in matchers), dtype=np.uint8)
    bits = np.unpackbits(data.reshape(len(matchers), -1), axis=1, bitorder="little")
    if bits.shape[1] < width:  # (ids past the matchers' vocabulary: never allowed)
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    return torch.from_numpy(bits[:, :width].view(np.bool_))  # (unpackbits gives 0 / 1 bytes: bools as they are)


def restrict_to_guides(scores: torch.Tensor, matchers: Sequence[Any], eos: Sequence[int],
                       fallback: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, str]]:
    """Final scores (B, V) with each row that has a matcher restricted to the tokens it allows, renormalised (a row
    that keeps no finite score takes ``fallback``'s, restricted alike); rows without one unchanged. Also the rows
    that cannot go on, with why: their matcher failed, or allows no token of the model's (a word-level vocabulary
    without the token the format needs next); they keep the end-of-sequence tokens only."""
    rows = [j for j, m in enumerate(matchers) if m is not None]
    if not rows:
        return scores, {}
    width = scores.shape[-1]
    allowed = allowed_masks([matchers[j] for j in rows], width)
    any_allowed = allowed.any(dim=1).tolist()
    stuck: dict[int, str] = {}
    for i, j in enumerate(rows):
        why = dead_end(matchers[j]) or (None if any_allowed[i] else
                                        "no token of this model's vocabulary continues the answer in its format")
        if why:
            stuck[j] = why
            allowed[i, [t for t in eos if t < width]] = True
    return keep_only(scores, rows, allowed.to(scores.device), fallback), stuck
