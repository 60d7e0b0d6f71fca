"""Named POPE answer parsers (benchmarks.md 1.4). ``official`` is the default; the others exist so that
numbers from other toolkits can be reproduced, and are only ever used when asked for by name.

A parser maps (answer text, label) to ``"yes"``, ``"no"`` or ``None`` (unknown: neither a predicted yes
nor a predicted no; counted wrong). Only ``vcd_substring`` looks at the label, as its reference does.
``unknown_is_miss`` says how the parser's reference scores an unknown answer to a "yes" question:
VLMEvalKit (``yorn``) counts it as not-Yes, i.e. a false negative (in recall's denominator); lmms-eval
(``exact``) counts only an explicit "no" as a false negative, so recall = TP / (TP + FN) leaves it out.
"""
from __future__ import annotations

import re
from typing import ClassVar

from vlmguard.errors import InvalidInput
from vlmguard.registry import Registry


class AnswerParser:
    name: ClassVar[str]
    needs_label: ClassVar[bool] = False
    unknown_is_miss: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def parse(self, answer: str, label: str | None = None) -> str | None:
        raise NotImplementedError


PARSERS: Registry[AnswerParser] = Registry("POPE answer parser")
DEFAULT_PARSER = "official"


@PARSERS.register("official")
class OfficialParser(AnswerParser):
    description = "POPE evaluate.py / LLaVA eval_pope.py: before first '.', drop ',', split on ' ', no iff No/no/not"

    def parse(self, answer: str, label: str | None = None) -> str | None:
        text = answer
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


@PARSERS.register("opera")
class OperaParser(AnswerParser):
    description = "OPERA / HALC pope_eval.py: drop all '.' and ',', split on ' ', no iff No/no/not/NO or *n't"

    def parse(self, answer: str, label: str | None = None) -> str | None:
        words = answer.replace(".", "").replace(",", "").split(" ")
        if any(w in ("No", "no", "not", "NO") or w.endswith("n't") for w in words):
            return "no"
        return "yes"


@PARSERS.register("vcd_substring")
class VcdSubstringParser(AnswerParser):
    description = "VCD eval_pope.py: lower-case; label yes -> right iff 'yes' in answer; label no -> iff 'no' in answer"
    needs_label = True

    def parse(self, answer: str, label: str | None = None) -> str | None:
        if label not in ("yes", "no"):
            raise InvalidInput("parser 'vcd_substring' needs the label of every question")
        low = answer.lower()
        if label == "yes":
            return "yes" if "yes" in low else "no"
        return "no" if "no" in low else "yes"


@PARSERS.register("exact")
class ExactParser(AnswerParser):
    description = "lmms-eval: lower-cased, stripped answer must equal 'yes' or 'no'; else unknown (wrong)"
    # lmms-eval pope_aggregate_recall: FN = label yes & prediction "no"; other answers are not in the denominator
    unknown_is_miss = False

    def parse(self, answer: str, label: str | None = None) -> str | None:
        low = answer.strip().lower()
        return low if low in ("yes", "no") else None


# VLMEvalKit's process_punctuation (from the VQA evaluation): these 21 characters are deleted when any of
# them touches a space in the text (or the text has a digit,digit comma), else replaced by a space; then
# periods not before a digit are deleted. Other characters (':', "'", '*', '#', ...) stay part of words.
_YORN_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_YORN_COMMA = re.compile(r"(\d)(,)(\d)")
# the reference's pattern as written, "(?!<=\d)" included: a lookahead typo for a lookbehind, so a period right
# after a digit is deleted too (it matters when more than 32 periods compete for the 32 deletions)
_YORN_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _yorn_punctuation(text: str) -> str:
    out = text
    for p in _YORN_PUNCT:
        if (p + " " in text or " " + p in text) or _YORN_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the reference passes re.UNICODE (= 32) positionally, i.e. as ``count``: only 32 periods are removed
    return _YORN_PERIOD.sub("", out, count=32)


@PARSERS.register("yorn")
class YornParser(AnswerParser):
    description = "VLMEvalKit YOrN_Extraction: lower-case, process_punctuation, words; yes xor no, else unknown"

    def parse(self, answer: str, label: str | None = None) -> str | None:
        words = set(_yorn_punctuation(answer.lower()).split())
        has_yes, has_no = "yes" in words, "no" in words
        if has_yes and not has_no:
            return "yes"
        if has_no and not has_yes:
            return "no"
        return None


def get_parser(name: str | None = None) -> AnswerParser:
    return PARSERS.get(name or DEFAULT_PARSER)()


def unknown_is_miss(name: str | None = None) -> bool:
    """Whether the named parser's reference counts an unknown answer to a "yes" question as a false negative."""
    return PARSERS.get(name or DEFAULT_PARSER).unknown_is_miss
