"""POPE metrics per split (benchmarks.md 1.5), answers joined to labels by question id.

"yes" is the positive class. TP = label yes & predicted yes, FP = label no & predicted yes,
TN = label no & predicted no, FN = label yes & predicted no. Predictions a parser leaves unknown
(``exact``, ``yorn``) are wrong, neither yes nor no. Recall follows the parser's reference
(``unknown_is_miss``): ``yorn`` (VLMEvalKit: unknown = not-Yes) counts them as misses (TP / #label yes);
``exact`` (lmms-eval) counts only explicit "no" answers as FN (TP / (TP + FN)).
Accuracy, precision, recall, F1 and yes-ratio (share of PREDICTIONS that are yes) are percentages;
an empty denominator gives ``None`` and a message in ``flags`` (the reference would crash).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vlmguard.bench.jsonio import from_batch_output, int_from_text, read_records
from vlmguard.bench.pope_data import PopeFile
from vlmguard.bench.pope_parsers import AnswerParser, get_parser
from vlmguard.errors import InvalidInput

ANSWER_TEXT_KEYS = ("text", "answer", "output", "response", "prediction")


def _ratio(num: int, den: int, what: str, flags: list[str]) -> float | None:
    if den == 0:
        flags.append(f"{what} undefined (empty denominator)")
        return None
    return 100.0 * num / den


def pope_metrics(pairs: Iterable[tuple[str | None, str]], unknown_is_miss: bool = True) -> dict[str, Any]:
    """Metrics from (prediction, label) pairs; prediction ``None`` = unknown.

    ``unknown_is_miss``: whether an unknown answer to a "yes" question is in recall's denominator
    (see :func:`vlmguard.bench.pope_parsers.unknown_is_miss`).
    """
    tp = fp = tn = fn = unk_yes = unk_no = 0
    for pred, label in pairs:
        if label == "yes":
            if pred == "yes":
                tp += 1
            elif pred == "no":
                fn += 1
            else:
                unk_yes += 1
        elif label == "no":
            if pred == "yes":
                fp += 1
            elif pred == "no":
                tn += 1
            else:
                unk_no += 1
        else:
            raise InvalidInput(f"label must be 'yes' or 'no', got {label!r}")
    n = tp + fp + tn + fn + unk_yes + unk_no
    flags: list[str] = []
    acc = _ratio(tp + tn, n, "accuracy", flags)
    precision = _ratio(tp, tp + fp, "precision", flags)
    recall = _ratio(tp, tp + fn + (unk_yes if unknown_is_miss else 0), "recall", flags)
    if precision is None or recall is None or precision + recall == 0:
        if precision is not None and recall is not None:
            flags.append("f1 undefined (precision + recall = 0)")
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall)
    yes_ratio = _ratio(tp + fp, n, "yes_ratio", flags)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": acc,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": yes_ratio,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unknown": unk_yes + unk_no,
        "flags": flags,
    }
    return out


@dataclass(frozen=True)
class Answer:
    question_id: int
    text: str
    line: int
    prompt: str | None = None  # the question the answer was generated for, where the record says (``prompt``)


def _words(text: str) -> str:
    """Lower-cased, single-spaced, and POPE's one known misspelling ("imange", in 246 questions of the version
    LLaVA-1.5 used; benchmarks.md 1.1) read as the word it stands for: the same question in either version."""
    return " ".join(text.lower().replace("imange", "image").split())


def check_same_question(a: Answer, question_text: str, answers_path: str | Path, questions_path: str | Path) -> None:
    """An answer whose record names its question (LLaVA's and cd_rethink's ``prompt`` field) must answer the
    question file's question of that id. POPE's versions number their questions 1..N alike, so answers to another
    version join by id to other questions (POPE issue #17, benchmarks.md 1.5): a wrong score, not an error,
    unless the texts are compared."""
    if a.prompt is None:
        return
    asked, question = _words(a.prompt), _words(question_text)
    if question in asked or asked in question:  # (with or without a format suffix)
        return
    raise InvalidInput(f"{answers_path}:{a.line}: the answer to question_id {a.question_id} was made for "
                       f"{a.prompt!r}, but that question in {questions_path} reads {question_text!r}: the answers "
                       f"come from another question file (POPE's versions differ; benchmarks.md 1.5)")


def load_answers(path: str | Path, text_key: str | None = None, notes: list[str] | None = None) -> list[Answer]:
    """An answer file: JSON Lines or array of objects with ``question_id`` and ``text``/``answer``/...

    Without ``text_key`` a record's answer is its first field of :data:`ANSWER_TEXT_KEYS`. A record with
    several of them whose values differ (a raw output beside a parsed answer, or a label) is refused: which
    one to score is the user's choice (``text_key``). When they agree, or records name the answer differently,
    one line saying which fields were scored is appended to ``notes``."""
    p = Path(path)
    records, _ = read_records(p)
    records = from_batch_output(records, "question_id", text_key or ANSWER_TEXT_KEYS[0], notes)
    out: list[Answer] = []
    seen: dict[int, int] = {}
    used: dict[str, int] = {}  # answer field -> records scored from it
    also: set[str] = set()  # other answer fields present beside the one scored (equal to it)
    for line, rec in records:
        qid = rec.get("question_id")
        if qid is None:
            raise InvalidInput(f"{p}:{line}: missing field 'question_id'")
        qid = int_from_text(qid)
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise InvalidInput(f"{p}:{line}: field 'question_id' must be int, got {qid!r}")
        keys = (text_key,) if text_key else ANSWER_TEXT_KEYS
        key = next((k for k in keys if k in rec), None)
        if key is None:
            raise InvalidInput(f"{p}:{line}: missing answer field (one of {', '.join(keys)})")
        text = rec[key]
        if not isinstance(text, str):
            raise InvalidInput(f"{p}:{line}: field {key!r} must be str, got {text!r}")
        for other in keys:
            if other != key and other in rec:
                if rec[other] != text:
                    raise InvalidInput(f"{p}:{line}: answer fields {key!r} and {other!r} differ ({text!r} vs "
                                       f"{rec[other]!r}); choose the one to score with --answer-key")
                also.add(other)
        used[key] = used.get(key, 0) + 1
        if qid in seen:
            raise InvalidInput(f"{p}:{line}: duplicate question_id {qid} (first on line {seen[qid]})")
        seen[qid] = line
        prompt = rec.get("prompt")
        out.append(Answer(qid, text, line, prompt if isinstance(prompt, str) else None))
    if not out:  # every question would be "missing": a wrong or truncated file, not a result
        raise InvalidInput(f"{p}: no answers in file")
    if notes is not None and (len(used) > 1 or also):
        scored = (f"fields {', '.join(f'{k!r} ({n} records)' for k, n in used.items())}" if len(used) > 1
                  else f"field {next(iter(used))!r}")
        extra = f"; the records also have {', '.join(repr(k) for k in sorted(also))}, equal to it" if also else ""
        notes.append(f"answers scored from {scored}{extra} (--answer-key picks one)")
    return out


def _flag_empty(metrics: dict[str, Any], answers: list[Answer], par: AnswerParser) -> None:
    """Count the empty (or blank) answers: a parser scores them by its rule (``official``: yes), but a file
    full of them is a failed generation, not a result, so the count is reported, never left silent."""
    empty = sum(1 for a in answers if not a.text.strip())
    metrics["empty"] = empty
    if empty:
        as_what = "wrong" if par.needs_label else (par.parse("") or "unknown")  # vcd_substring: wrong either way
        metrics["flags"].append(f"{empty} of {len(answers)} answers are empty (parser {par.name} counts them as "
                                f"{as_what})")


def score_answers(
    answers: list[Answer],
    questions: PopeFile,
    parser: str | None = None,
    answers_path: str | Path = "answers",
) -> dict[str, Any]:
    """Join answers to questions by question id and compute the metrics.

    An answer whose id is not in the question file raises (naming file and line); questions without
    an answer are reported as ``missing`` and flagged, never silently shifted.
    """
    par = get_parser(parser)
    by_id = questions.by_id()
    pairs: list[tuple[str | None, str]] = []
    for a in answers:
        q = by_id.get(a.question_id)
        if q is None:
            raise InvalidInput(
                f"{answers_path}:{a.line}: question_id {a.question_id} is not in {questions.path}"
            )
        if q.label is None:
            raise InvalidInput(f"{questions.path}:{q.line}: question {q.question_id} has no label")
        check_same_question(a, q.text, answers_path, questions.path)
        pairs.append((par.parse(a.text, q.label), q.label))
    metrics = pope_metrics(pairs, unknown_is_miss=par.unknown_is_miss)
    missing = len(questions) - len(answers)
    metrics["missing"] = missing
    if missing:
        metrics["flags"].append(f"{missing} of {len(questions)} questions have no answer")
    _flag_empty(metrics, answers, par)
    metrics["parser"] = par.name  # type: ignore[attr-defined]
    return metrics


def score_llava_answers(
    answers: list[Answer],
    llava_questions: PopeFile,
    split_files: dict[str, PopeFile],
    parser: str | None = None,
    answers_path: str | Path = "answers",
) -> dict[str, dict[str, Any]]:
    """Per-split metrics for answers to LLaVA's 8910-line file (``llava_pope_test.jsonl``).

    Labels come from the per-split files, aligned by category + order as LLaVA's ``eval_pope.py`` does
    (see :func:`vlmguard.bench.pope_data.llava_test_labels`); answers are joined by question id.
    """
    from vlmguard.bench.pope_data import llava_test_labels

    par = get_parser(parser)
    labels = llava_test_labels(llava_questions, split_files)
    texts = {q.question_id: q.text for q in llava_questions.questions}
    pairs: dict[str, list[tuple[str | None, str]]] = {s: [] for s in split_files}
    for a in answers:
        if a.question_id not in labels:
            raise InvalidInput(f"{answers_path}:{a.line}: question_id {a.question_id} is not in {llava_questions.path}")
        check_same_question(a, texts[a.question_id], answers_path, llava_questions.path)
        split, label = labels[a.question_id]
        pairs[split].append((par.parse(a.text, label), label))
    out = {}
    for split, ps in pairs.items():
        m = pope_metrics(ps, unknown_is_miss=par.unknown_is_miss)
        m["missing"] = sum(1 for s, _ in labels.values() if s == split) - len(ps)
        if m["missing"]:
            m["flags"].append(f"{m['missing']} questions of {split} have no answer")
        _flag_empty(m, [a for a in answers if labels[a.question_id][0] == split], par)
        m["parser"] = par.name  # type: ignore[attr-defined]
        out[split] = m
    return out
