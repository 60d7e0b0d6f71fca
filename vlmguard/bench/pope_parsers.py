"""Named POPE answer parsers (benchmarks.md 1.4). ``official`` is the default; the others exist so that
numbers from other toolkits can be reproduced, and are only ever used when asked for by name.

A parser maps (answer text, label) to ``"yes"``, ``"no"`` or ``None`` (unknown: neither a predicted yes
nor a predicted no; counted wrong). Only ``vcd_substring`` looks at the label, as its reference does.
"""
from __future__ import annotations

import re
import string
from typing import ClassVar

from vlmguard.errors import InvalidInput
from vlmguard.registry import Registry


class AnswerParser:
    name: ClassVar[str]
    needs_label: ClassVar[bool] = False
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

    def parse(self, answer: str, label: str | None = None) -> str | None:
        low = answer.strip().lower()
        return low if low in ("yes", "no") else None


_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


@PARSERS.register("yorn")
class YornParser(AnswerParser):
    description = "VLMEvalKit yorn: lower-case, strip punctuation, words; yes xor no, else unknown"

    def parse(self, answer: str, label: str | None = None) -> str | None:
        words = set(_PUNCT.sub(" ", answer.lower()).split())
        has_yes, has_no = "yes" in words, "no" in words
        if has_yes and not has_no:
            return "yes"
        if has_no and not has_yes:
            return "no"
        return None


def get_parser(name: str | None = None) -> AnswerParser:
    return PARSERS.get(name or DEFAULT_PARSER)()
