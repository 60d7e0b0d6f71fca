"""The text and bytes of one token, as log-probability entries show it (OpenAI's ``token`` and ``bytes``).

A token's text is what it adds inside a text, its leading space included (`` spoon``, not ``spoon``): decoded
alone, SentencePiece tokenizers drop that space, so a token is decoded after a fixed one-character anchor and
the anchor's own text is cut off. Its bytes are its exact bytes where the tokenizer has them: a byte-fallback
token (``<0xE2>``) is that one byte, a byte-level BPE token (GPT-2, Qwen2) the bytes its characters stand for;
otherwise the UTF-8 of its text. A token that is part of a multi-byte character thus has its true bytes,
though its text is U+FFFD. Each token id is worked out once per tokenizer.
"""
from __future__ import annotations

import re
import weakref
from functools import lru_cache
from typing import Any, Sequence

import torch

from vlmguard.results import TokenLogprob, TopLogprob

# what a log-probability of -inf (a token the decoder ruled out: VCD's plausibility cut) is reported as: JSON has
# no infinity, and OpenAI's API reports such tokens so
LOGPROB_FLOOR = -9999.0

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class TokenPieces:
    """``text(id)`` and ``bytes(id)`` of single tokens of one tokenizer (cached)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self._anchor = list(anchor[-1:])
        self._anchor_text = self._decode(self._anchor)
        self._byte_level = _is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False) if ids else ""

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        both = self._decode(self._anchor + [token_id])
        text = both[len(self._anchor_text):] if both.startswith(self._anchor_text) else self._decode([token_id])
        raw = self.tok.convert_ids_to_tokens(token_id)
        raw = raw if isinstance(raw, str) else ""
        byte = _BYTE_TOKEN.fullmatch(raw)
        alphabet = _byte_level_alphabet()
        if byte:
            data = [int(byte.group(1), 16)]
        elif self._byte_level and raw and all(ch in alphabet for ch in raw):
            data = [alphabet[ch] for ch in raw]
        else:
            data = list(text.encode("utf-8"))
        self._cache[token_id] = (text, data)
        return text, data

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]


_PIECES: "weakref.WeakKeyDictionary[Any, TokenPieces]" = weakref.WeakKeyDictionary()


def token_pieces(tokenizer: Any) -> TokenPieces:
    """The :class:`TokenPieces` of ``tokenizer``, one per tokenizer (its cache outlives a batch)."""
    pieces = _PIECES.get(tokenizer)
    if pieces is None:
        pieces = _PIECES[tokenizer] = TokenPieces(tokenizer)
    return pieces


def entry_log_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``scores`` (.., V) as entries report them: fp32, -inf and NaN at ``LOGPROB_FLOOR``."""
    lp = torch.log_softmax(scores.float(), dim=-1)
    return torch.nan_to_num(lp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)


def logprob_entry(pieces: TokenPieces, token_id: int, logprob: float | None, top_ids: Sequence[int] = (),
                  top_logprobs: Sequence[float] = ()) -> TokenLogprob:
    """A token's log-probability entry (``vlmguard.results.TokenLogprob``): its text and bytes, its log-probability
    and the most likely tokens at its place (``top_ids`` with ``top_logprobs``, most likely first)."""
    top = [TopLogprob(token_id=i, token=pieces.text(i), logprob=v, bytes=pieces.bytes(i))
           for i, v in zip(top_ids, top_logprobs)]
    return TokenLogprob(token_id=token_id, token=pieces.text(token_id), logprob=logprob,
                        bytes=pieces.bytes(token_id), top=top)
