"""POPE: loaders on every refdata file, parser behaviours, golden numbers, malformed files, `vlmguard score pope`."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from vlmguard.bench.pope_data import (
    POPE_SETS,
    SPLITS,
    build_llava_pope_test,
    dumps_jsonl,
    llava_test_labels,
    load_pope_file,
    pope_set_path,
)
from vlmguard.bench.pope_metrics import load_answers, pope_metrics, score_answers
from vlmguard.bench.pope_parsers import PARSERS, get_parser
from vlmguard.cli import main
from vlmguard.errors import InvalidInput

SHARED = Path(os.environ.get("VLMGUARD_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
REF = SHARED / "refdata"
POPE = REF / "pope"
OUTPUTS = REF / "pope_outputs"


def answers_path(split: str) -> Path:
    return OUTPUTS / f"cd_rethink_llava-v1.5-7b_coco_{split}_greedy.jsonl"


# ---- loaders ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", SPLITS)
def test_head_coco_files(split):
    f = load_pope_file(pope_set_path(POPE, "head", split))
    assert f.layout == "jsonl"
    assert len(f) == 3000
    assert f.label_counts() == {"yes": 1500, "no": 1500}
    assert len(f.images) == 500
    per_image: dict[str, list[str]] = {}
    for q in f.questions:
        per_image.setdefault(q.image, []).append(q.label)
    assert all(labels == ["yes", "no"] * 3 for labels in per_image.values())
    assert [q.question_id for q in f.questions] == list(range(1, 3001))
    assert not any("imange" in q.text for q in f.questions)


def test_splits_share_images_and_positives():
    files = {s: load_pope_file(pope_set_path(POPE, "head", s)) for s in SPLITS}
    pos = {s: [(q.image, q.text) for q in f.questions if q.label == "yes"] for s, f in files.items()}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
    assert files["random"].images == files["popular"].images == files["adversarial"].images


@pytest.mark.parametrize("dataset", ["aokvqa_seem", "gqa_seem"])
@pytest.mark.parametrize("split", SPLITS)
def test_seem_json_array_files(dataset, split):
    f = load_pope_file(pope_set_path(POPE, dataset, split))
    assert f.layout == "json_array"
    assert len(f) == 3000 and len(f.images) == 500
    assert f.label_counts() == {"yes": 1500, "no": 1500}
    # line numbers point into the pretty-printed array
    assert f.questions[0].line == 2 and f.questions[1].line > f.questions[0].line


def test_llava15_e3e3926_files():
    files = {s: load_pope_file(pope_set_path(POPE, "llava15_e3e3926", s)) for s in SPLITS}
    assert {s: len(f) for s, f in files.items()} == {"random": 2910, "popular": 3000, "adversarial": 3000}
    assert sum("imange" in q.text for f in files.values() for q in f.questions) == 246
    assert set(files["random"].images) == set(load_pope_file(pope_set_path(POPE, "head", "random")).images)
    sizes = {}
    for q in files["random"].questions:
        sizes[q.image] = sizes.get(q.image, 0) + 1
    assert set(sizes.values()) <= {4, 5, 6} and 4 in sizes.values()


def test_llava_8910_file_reconstructed_byte_for_byte():
    files = {s: load_pope_file(pope_set_path(POPE, "llava15_e3e3926", s)) for s in SPLITS}
    ref_path = POPE / "llava15_e3e3926" / "llava_pope_test.reconstructed.jsonl"
    assert dumps_jsonl(build_llava_pope_test(files)) == ref_path.read_text(encoding="utf-8")
    llava = load_pope_file(ref_path, require_label=False)
    assert len(llava) == 8910 and llava.questions[0].label is None
    ids = [q.question_id for q in llava.questions]
    assert ids[0] == 1 and ids[3000] == 10_000_001 and ids[5910] == 20_000_001
    labels = llava_test_labels(llava, files)
    assert labels[10_002_910] == ("random", files["random"].questions[-1].label)
    assert sum(1 for s, lab in labels.values() if lab == "yes") == 4500


# ---- parsers ---------------------------------------------------------------------------------------

OFFICIAL_CASES = [
    ("No.", "no"), ("Yes, there is.", "yes"), ("There is no dog", "no"), ("NO", "yes"), ("Not sure", "yes"),
    ("I don't see one", "yes"), ("", "yes"), ("No\nThere is a dog.", "yes"), ("no", "no"), ("Yes. No.", "yes"),
    ("It is not there", "no"), ("No, there is not.", "no"), ("Nope", "yes"),
]


@pytest.mark.parametrize("answer,expected", OFFICIAL_CASES)
def test_official_parser(answer, expected):
    assert get_parser().parse(answer) == expected
    assert get_parser("official").parse(answer) == expected


def test_other_parsers_are_named_and_differ():
    assert set(PARSERS.names()) == {"official", "opera", "vcd_substring", "exact", "yorn"}
    opera = get_parser("opera")
    assert opera.parse("I don't see one") == "no" and opera.parse("NO") == "no"
    assert opera.parse("Yes. No.") == "no"  # all periods removed, not just text before the first
    vcd = get_parser("vcd_substring")
    assert vcd.parse("I know there is snow", "no") == "no"  # "know"/"snow" count as no
    assert vcd.parse("Yes", "no") == "yes" and vcd.parse("yes!", "yes") == "yes" and vcd.parse("Nope", "yes") == "no"
    with pytest.raises(InvalidInput):
        vcd.parse("Yes")
    exact = get_parser("exact")
    assert exact.parse(" Yes ") == "yes" and exact.parse("No.") is None and exact.parse("no") == "no"
    yorn = get_parser("yorn")
    assert yorn.parse("Yes, it is.") == "yes" and yorn.parse("No!") == "no"
    assert yorn.parse("yes and no") is None and yorn.parse("maybe") is None


def test_unknown_parser_name():
    with pytest.raises(InvalidInput, match="unknown POPE answer parser"):
        get_parser("nope")


# ---- metrics ---------------------------------------------------------------------------------------

GOLDEN = {  # benchmarks.md 1.6, official parser on cd_rethink greedy answers vs HEAD labels
    "random": dict(tp=1150, fp=40, tn=1460, fn=350, accuracy=87.00, precision=96.64, recall=76.67, f1=85.50, yes_ratio=39.67),
    "popular": dict(tp=1150, fp=73, accuracy=85.90, f1=84.47),
    "adversarial": dict(tp=1148, fp=148, accuracy=83.33, f1=82.12),
}


@pytest.mark.parametrize("split", SPLITS)
def test_golden_pope_numbers(split):
    m = score_answers(load_answers(answers_path(split)), load_pope_file(pope_set_path(POPE, "head", split)))
    for key, want in GOLDEN[split].items():
        got = m[key]
        assert (round(got, 2) if isinstance(want, float) else got) == want, (split, key, got)
    assert m["n"] == 3000 and m["missing"] == 0 and m["flags"] == [] and m["unknown"] == 0


def test_greedy_positives_identical_across_random_and_popular():
    ms = {s: score_answers(load_answers(answers_path(s)), load_pope_file(pope_set_path(POPE, "head", s))) for s in ("random", "popular")}
    assert ms["random"]["tp"] == ms["popular"]["tp"] and ms["random"]["recall"] == ms["popular"]["recall"]


def test_metrics_empty_denominators_are_null_and_flagged():
    m = pope_metrics([("no", "no"), ("no", "no")])
    assert m["accuracy"] == 100.0 and m["precision"] is None and m["recall"] is None and m["f1"] is None
    assert m["yes_ratio"] == 0.0
    assert any("precision" in f for f in m["flags"]) and any("recall" in f for f in m["flags"])
    empty = pope_metrics([])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["yes_ratio"] is None


def test_unknown_predictions_are_wrong_and_not_yes():
    m = pope_metrics([("yes", "yes"), (None, "yes"), (None, "no"), ("no", "no")])
    assert m["accuracy"] == 50.0 and m["unknown"] == 2
    assert m["recall"] == 50.0 and m["precision"] == 100.0 and m["yes_ratio"] == 25.0


def test_join_by_question_id_not_order(tmp_path):
    q = load_pope_file(pope_set_path(POPE, "head", "random"))
    answers = load_answers(answers_path("random"))
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps({"question_id": a.question_id, "answer": a.text}) + "\n" for a in reversed(answers)))
    assert score_answers(load_answers(shuffled), q)["accuracy"] == pytest.approx(87.0)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps({"question_id": a.question_id, "text": a.text}) + "\n" for a in answers[:100]))
    m = score_answers(load_answers(partial), q)
    assert m["n"] == 100 and m["missing"] == 2900 and any("no answer" in f for f in m["flags"])


def test_answers_to_another_pope_version_are_refused(tmp_path, capsys):
    """POPE's versions number their questions 1..N alike: LLaVA-1.5's random file (2910 questions) joined by id
    to the current one (3000) pairs answers with other questions (POPE issue #17, benchmarks.md 1.5). Where the
    answer records say which question they answer (``prompt``), the texts are compared: the mismatch is an
    error naming the line, while the "imange" misspelling, the versions' only other difference, is no mismatch."""
    old = load_pope_file(POPE / "llava15_e3e3926" / "coco_pope_random.json")
    perfect = tmp_path / "old_version_answers.jsonl"
    perfect.write_text("".join(json.dumps({"question_id": q.question_id, "prompt": q.text, "text": q.label}) + "\n"
                               for q in old.questions))
    head = load_pope_file(pope_set_path(POPE, "head", "random"))
    with pytest.raises(InvalidInput, match=r"old_version_answers.jsonl:\d+: .*another question file"):
        score_answers(load_answers(perfect), head, answers_path=perfect)
    assert score_answers(load_answers(perfect), old)["accuracy"] == 100.0
    head_file = str(pope_set_path(POPE, "head", "random"))
    assert main(["score", "pope", "--answers", str(perfect), "--questions", head_file]) == 2
    assert "another question file" in capsys.readouterr().err
    # cd_rethink's adversarial answers were asked with the misspelled questions: still the same questions
    adversarial = score_answers(load_answers(answers_path("adversarial")), load_pope_file(pope_set_path(POPE, "head",
                                                                                                      "adversarial")))
    assert round(adversarial["accuracy"], 2) == 83.33


# ---- malformed files -------------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_bad_json_line_names_file_and_line(tmp_path):
    p = _write(tmp_path, "q.json", '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(InvalidInput, match=r"q\.json:2: bad JSON line"):
        load_pope_file(p)


def test_missing_field_names_file_and_line(tmp_path):
    p = _write(tmp_path, "q.json", '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}\n\n{"question_id": 2, "image": "a.jpg", "text": "x"}\n')
    with pytest.raises(InvalidInput, match=r"q\.json:3: missing field 'label'"):
        load_pope_file(p)


def test_bad_label_and_duplicate_id(tmp_path):
    p = _write(tmp_path, "q.json", '{"question_id": 1, "image": "a.jpg", "text": "t", "label": "maybe"}\n')
    with pytest.raises(InvalidInput, match=r"q\.json:1: field 'label'"):
        load_pope_file(p)
    p = _write(tmp_path, "d.json", '[\n {"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"},\n {"question_id": 1, "image": "a.jpg", "text": "t", "label": "no"}\n]\n')
    with pytest.raises(InvalidInput, match=r"d\.json:3: duplicate question_id 1"):
        load_pope_file(p)


def test_bad_json_array_names_line(tmp_path):
    p = _write(tmp_path, "arr.json", '[\n {"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"},\n {"question_id": 2, "image": \n]\n')
    with pytest.raises(InvalidInput, match=r"arr\.json:4: bad JSON"):
        load_pope_file(p)


def test_answer_for_unknown_question_names_answer_line(tmp_path):
    q = load_pope_file(pope_set_path(POPE, "llava15_e3e3926", "random"))
    # (without the records' question texts, which would show the mismatch on line 18 already)
    bare = tmp_path / "random_greedy.jsonl"
    bare.write_text("".join(json.dumps({"question_id": a.question_id, "text": a.text}) + "\n"
                            for a in load_answers(answers_path("random"))))
    with pytest.raises(InvalidInput, match=r"random_greedy\.jsonl:2911: question_id 2911 is not in"):
        score_answers(load_answers(bare), q, answers_path=bare)
    with pytest.raises(InvalidInput, match=r"random_greedy\.jsonl:18: the answer to question_id 18 was made for"):
        score_answers(load_answers(answers_path("random")), q, answers_path=answers_path("random"))


# ---- CLI -------------------------------------------------------------------------------------------

def test_score_pope_cli_json(capsys):
    rc = main(["score", "pope", "--answers", str(answers_path("adversarial")), "--questions",
               str(pope_set_path(POPE, "head", "adversarial")), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tp"] == 1148 and out["fp"] == 148 and round(out["accuracy"], 2) == 83.33 and out["parser"] == "official"


def test_score_pope_reads_openai_batch_output(tmp_path, capsys):
    """An OpenAI batch output file (OpenAI's Batch API's or ``vlmguard run-batch``'s): ``custom_id`` the question id,
    the answer a chat completion's message, a Response's output text or the native API's text; a request that got
    no answer is left out (so counted missing) and said."""
    answers = load_answers(answers_path("adversarial"))
    bodies = [lambda t: {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": t}}]},
              lambda t: {"object": "response", "output": [{"type": "message", "content": [
                  {"type": "output_text", "text": t}]}]},
              lambda t: {"text": t}]
    records = [{"id": f"batch_req_{k}", "custom_id": str(a.question_id), "error": None,
                "response": {"status_code": 200, "request_id": "r", "body": bodies[k % 3](a.text)}}
               for k, a in enumerate(answers)]
    records[5] = {**records[5], "response": {"status_code": 500, "request_id": "r", "body": {"error": {}}}}
    batch = tmp_path / "batch_output.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in records))
    questions = str(pope_set_path(POPE, "head", "adversarial"))
    assert main(["score", "pope", "--answers", str(batch), "--questions", questions, "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = [a for k, a in enumerate(answers) if k != 5]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"question_id": a.question_id, "text": a.text}) + "\n" for a in kept))
    assert main(["score", "pope", "--answers", str(plain), "--questions", questions, "--json"]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: got[k] for k in ("tp", "fp", "tn", "fn", "missing", "accuracy")} == \
        {k: want[k] for k in ("tp", "fp", "tn", "fn", "missing", "accuracy")} and got["missing"] == 1
    assert any("1 batch record(s) without an answer" in f for f in got["flags"])


def test_score_pope_cli_error_is_one_line(tmp_path, capsys):
    bad = _write(tmp_path, "ans.jsonl", '{"question_id": 1}\n')
    rc = main(["score", "pope", "--answers", str(bad), "--questions", str(pope_set_path(POPE, "head", "random"))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("vlmguard: error:") and "ans.jsonl:1" in err and "\n" not in err


def test_named_sets_cover_refdata():
    for name in POPE_SETS:
        for split in SPLITS:
            assert pope_set_path(POPE, name, split).is_file()


def test_llava_8910_answers_scored_by_category_and_order(tmp_path, capsys):
    e3 = POPE / "llava15_e3e3926"
    llava = load_pope_file(e3 / "llava_pope_test.reconstructed.jsonl", require_label=False)
    files = {s: load_pope_file(e3 / f"coco_pope_{s}.json") for s in SPLITS}
    labels = llava_test_labels(llava, files)
    # an oracle that is right except on the first 10 random questions
    ans = tmp_path / "llava_answers.jsonl"
    ans.write_text("".join(
        json.dumps({"question_id": q.question_id,
                    "text": ("No" if labels[q.question_id][1] == "yes" else "Yes") if 10_000_001 <= q.question_id <= 10_000_010
                    else labels[q.question_id][1].capitalize()}) + "\n"
        for q in llava.questions))
    assert main(["score", "pope", "--answers", str(ans), "--questions", str(e3 / "llava_pope_test.reconstructed.jsonl"),
                 "--label-dir", str(e3), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"]
    assert out["adversarial"]["accuracy"] == 100.0 and out["popular"]["n"] == 3000
    assert out["random"]["n"] == 2910 and out["random"]["tp"] + out["random"]["tn"] == 2900
    # the text form shows each split's notes too (it showed the missing count only)
    recs = [json.loads(line) for line in ans.read_text().splitlines()]
    recs[0]["text"] = ""
    ans.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["score", "pope", "--answers", str(ans), "--questions", str(e3 / "llava_pope_test.reconstructed.jsonl"),
                 "--label-dir", str(e3)]) == 0
    assert re.search(r"\n  note: 1 of 3000 answers are empty", capsys.readouterr().out)  # (the first is adversarial)


# ---- regression: parser-specific handling of unknown answers (reviewed against the references) --------

def _exact_unknown_answers(tmp_path):
    """Three yes-questions and one no-question; one yes-answer is not a bare yes/no (unknown for `exact`)."""
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog in the image?", "label": lab}) + "\n"
                         for i, lab in enumerate(["yes", "yes", "yes", "no"], start=1)))
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                         for i, t in enumerate(["Yes", "Yes, there is a dog.", "No", "No"], start=1)))
    return load_pope_file(q), load_answers(a)


def test_exact_parser_recall_leaves_unknowns_out_as_lmms_eval(tmp_path):
    # lmms-eval pope_aggregate_recall: FN = label yes & prediction "no"; the unknown answer is in neither
    # TP nor FN, so recall = 1 / (1 + 1) = 50 (the old code gave 1 / 3 = 33.33)
    questions, answers = _exact_unknown_answers(tmp_path)
    m = score_answers(answers, questions, "exact")
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["unknown"]) == (1, 1, 1, 0, 1)
    assert m["recall"] == 50.0 and m["precision"] == 100.0
    assert m["f1"] == pytest.approx(2 * 100 * 50 / 150) and m["accuracy"] == 50.0 and m["yes_ratio"] == 25.0
    # VLMEvalKit (yorn) counts an unknown as not-Yes, i.e. a miss: recall = 1 / 3
    yorn = score_answers(answers, questions, "yorn")
    assert yorn["unknown"] == 0  # "Yes, there is a dog." is a yes for yorn
    assert pope_metrics([("yes", "yes"), (None, "yes"), ("no", "yes")])["recall"] == pytest.approx(100 / 3)
    assert pope_metrics([("yes", "yes"), (None, "yes"), ("no", "yes")], unknown_is_miss=False)["recall"] == 50.0


def test_stored_run_metrics_follow_the_run_parser():
    import sqlite3

    from vlmguard.bench.metrics import metrics_for_run

    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    conn.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY, run_id TEXT, sample_key TEXT, label TEXT, prediction TEXT,"
                 " record TEXT, visual_tokens REAL, visual_tokens_kept REAL, prefill_s REAL, ttft_s REAL, total_s REAL,"
                 " generated_tokens INT, prefill_flops REAL)")
    for i, (lab, pred) in enumerate([("yes", "yes"), ("yes", None), ("yes", "no"), ("no", "no")]):
        conn.execute("INSERT INTO samples (run_id, sample_key, label, prediction) VALUES ('r', ?, ?, ?)", (f"q:{i}", lab, pred))
    exact = metrics_for_run(conn, {"run_id": "r", "benchmark": "pope", "parser": "exact", "n_expected": 4})
    yorn = metrics_for_run(conn, {"run_id": "r", "benchmark": "pope", "parser": "yorn", "n_expected": 4})
    assert exact["recall"] == 50.0 and yorn["recall"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("answer,expected", [
    # VLMEvalKit YOrN_Extraction -> process_punctuation: only 21 characters are punctuation; ':' '*' "'" stay in words
    ("**Yes**, there is a dog.", None),
    ("Yes:", None),
    ("Answer: yes", "yes"),
    ("Yes, it is.", "yes"),
    ("No!", "no"),
    ("(no)", "no"),
    ("yes-or-no", None),
    ("No. " * 40 + "yes.", "no"),  # only the first 32 periods are stripped (re.UNICODE passed as count)
    # the reference's "(?!<=\d)" is no lookbehind: periods after digits are stripped too, and use up the 32
    (" ".join(f"{i}." for i in range(1, 34)) + " Yes.", None),
])
def test_yorn_parser_matches_vlmevalkit_punctuation(answer, expected):
    assert get_parser("yorn").parse(answer) == expected
