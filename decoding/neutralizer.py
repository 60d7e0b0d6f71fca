"""Rule-based query neutralizer and leading-cue synthesis for LQCD (``shared/methods/lqcd.md`` 4.2-4.3).

``neutralize(text)`` strips leading cues (sentences before or after a question) line by line: the
"pope-leading v1" template bank (weak "It seems like there is(n't).", strong "I'm sure there is ...",
deceptive "There is (no) X in the image.") plus a small lexicon ("I think/believe/feel ...", "It seems /
looks like ...", "Obviously/Clearly ...", tag questions "right?", "isn't it?"). A cue is only removed
from a line that keeps a question, so plain statements and instructions are never touched.

``leading_variants(text)`` builds the synthetic amateurs for a neutral query: a polar question (a sentence of
the text, whatever follows it on its line) gets a yes-cue and a no-cue right after it (the POPE weak cues for
POPE-form questions), an open-ended request gets the "expectation" cue that invites prior-driven objects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

POLAR_RE = re.compile(r"^(Is|Are|Do|Does|Did|Can|Could|Was|Were|Has|Have|Will|Would)\b.*\?$")
POPE_RE = re.compile(r"^Is there (a|an) (.+) in the (image|imange)\?$")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
TAG_SUFFIX = re.compile(r",\s*(right|isn't it|is it not|correct|don't you think)\?$", re.IGNORECASE)

# (pattern over one sentence, cue strength sigma in [0, 1]). A statement's final "." or "!" may be missing (the
# paper's own example: "Is there a dog in the image? It seems like there isn't"); a sentence without one can
# only be a line's last, and a cue is only ever removed from a line that keeps a question.
CUE_PATTERNS: list[tuple[re.Pattern[str], float]] = [
    (re.compile(r"^It (seems|looks|appears)( like| as if| as though| that)?\b.*[^?]$", re.IGNORECASE), 0.5),
    (re.compile(r"^(I'm|I am|I’m) (sure|certain|confident|positive)\b.*[^?]$", re.IGNORECASE), 1.0),
    (re.compile(r"^I (think|believe|feel|guess|suppose|expect)\b.*[^?]$", re.IGNORECASE), 0.5),
    (re.compile(r"^(Obviously|Clearly|Surely|Definitely|Of course)\b.*[^?]$", re.IGNORECASE), 1.0),
    (re.compile(r"^There (is|are)( no| not)?\b.*\bin the (image|imange|picture|photo)[.!]?$", re.IGNORECASE), 1.0),
    (re.compile(r"^(right|isn't it|is it not|correct|am I right|don't you think)\?$", re.IGNORECASE), 0.5),
]

WEAK_AFFIRM = "It seems like there is."
WEAK_DENY = "It seems like there isn't."
GENERIC_AFFIRM = "I think the answer is yes."
GENERIC_DENY = "I think the answer is no."
EXPECTATION_CUE = "I expect it shows a typical scene with all the objects that usually appear in one."


@dataclass
class Neutralized:
    text: str  # the neutral query (equal to the input when nothing was stripped)
    changed: bool
    strength: float  # strongest stripped cue (0 when nothing was stripped)
    removed: list[str]


def _cue_strength(sentence: str) -> float | None:
    for pat, sigma in CUE_PATTERNS:
        if pat.match(sentence):
            return sigma
    return None


def _neutralize_line(line: str) -> tuple[str, float, list[str]]:
    stripped = line.strip()
    if not stripped:
        return line, 0.0, []
    sentences = SENTENCE_SPLIT.split(stripped)
    kept: list[str] = []
    removed: list[str] = []
    strength = 0.0
    for s in sentences:
        sigma = _cue_strength(s)
        if sigma is not None:
            removed.append(s)
            strength = max(strength, sigma)
        else:
            kept.append(s)
    questions = [s for s in kept if s.endswith("?")]
    if removed and not questions:  # never strip a line that would keep no question
        return line, 0.0, []
    if kept and TAG_SUFFIX.search(kept[-1]) and kept[-1].endswith("?"):
        tag = TAG_SUFFIX.search(kept[-1]).group(0)
        kept[-1] = kept[-1][: -len(tag)] + "?"
        removed.append(tag.strip(", "))
        strength = max(strength, 0.5)
    if not removed:
        return line, 0.0, []
    return " ".join(kept), strength, removed


def neutralize(text: str) -> Neutralized:
    """Strip leading cues from every line of ``text`` (only the user's text; no template)."""
    out_lines: list[str] = []
    removed: list[str] = []
    strength = 0.0
    for line in text.split("\n"):
        new, sigma, rem = _neutralize_line(line)
        out_lines.append(new)
        removed.extend(rem)
        strength = max(strength, sigma)
    out = "\n".join(out_lines)
    return Neutralized(text=out, changed=bool(removed), strength=strength, removed=removed)


def _sentence_ends(line: str) -> list[int]:
    """End offset in ``line`` of each of its sentences, split as the neutralizer splits them."""
    return [m.start() for m in SENTENCE_SPLIT.finditer(line)] + [len(line.rstrip())]


def polar_question(text: str) -> tuple[int, int, str] | None:
    """The first polar (yes/no) question sentence of ``text``: (its line, its end offset in the line, the
    sentence), else None. A sentence, not a whole line: a format instruction on the question's line ("Is there a
    dog in the image? Answer the question using a single word or phrase.", the space-joined POPE presets) leaves
    it a polar question."""
    for i, line in enumerate(text.split("\n")):
        start = len(line) - len(line.lstrip())
        for end in _sentence_ends(line):
            sentence = line[start:end].strip()
            if POLAR_RE.match(sentence):
                return i, end, sentence
            start = end
    return None


def with_cue_after(text: str, line_index: int, end: int, cue: str) -> str:
    """``text`` with ``cue`` right after the sentence that ends at offset ``end`` of line ``line_index`` (before
    whatever follows it on the line, a format instruction say)."""
    lines = text.split("\n")
    line = lines[line_index]
    lines[line_index] = line[:end].rstrip() + " " + cue + line[end:]
    return "\n".join(lines)


def leading_variants(text: str, mode: str, expectation_cue: str = EXPECTATION_CUE) -> tuple[str, list[str]]:
    """(resolved mode, amateur texts) for a neutral query. ``mode``: auto | symmetric | expectation | off;
    ``expectation_cue``: what an open-ended query's amateur appends."""
    if mode == "off":
        return "off", []
    polar = polar_question(text)
    if mode in ("auto", "symmetric") and polar is not None:
        li, end, q = polar
        pos, neg = (WEAK_AFFIRM, WEAK_DENY) if POPE_RE.match(q) else (GENERIC_AFFIRM, GENERIC_DENY)
        return "symmetric", [with_cue_after(text, li, end, pos), with_cue_after(text, li, end, neg)]
    if mode in ("auto", "expectation"):
        return "expectation", [text.rstrip() + " " + expectation_cue]
    return "off", []
