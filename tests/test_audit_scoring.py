"""Audit of `vlmguard score pope|chair` and `vlmguard synth`: inputs that raised a traceback or gave a silent
result, and files a build overwrote. Each test failed before its fix."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from vlmguard.bench.chair_gt import load_ground_truth
from vlmguard.bench.chair_score import load_captions, read_image_ids
from vlmguard.bench.datasets import synth_dataset
from vlmguard.bench.jsonio import read_records
from vlmguard.bench.pope_data import load_pope_file, pope_set_path
from vlmguard.bench.pope_metrics import load_answers, score_answers
from vlmguard.cli import main
from vlmguard.errors import InvalidInput
from vlmguard.synth.build import build_dataset
from vlmguard.synth.hallucinations import load_scenes

SHARED = Path(os.environ.get("VLMGUARD_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
POPE = SHARED / "refdata" / "pope"
COCO_MINI = Path(__file__).resolve().parent / "fixtures" / "bench" / "coco_mini"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("qid", ["\u00b2", "1" * 5000])  # "²".isdigit() is True but int() refuses it
def test_answer_and_caption_ids_that_int_refuses_are_one_line_errors(tmp_path: Path, qid: str):
    ans = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": qid, "text": "Yes"}])
    with pytest.raises(InvalidInput, match=r"a\.jsonl:1: field 'question_id' must be int"):
        load_answers(ans)
    caps = _write_jsonl(tmp_path / "c.jsonl", [{"image_id": qid, "caption": "a dog"}])
    with pytest.raises(InvalidInput, match=r"c\.jsonl:1: field 'image_id' must be an integer image id"):
        load_captions(caps)
    # ids written as text still work
    assert [a.question_id for a in load_answers(_write_jsonl(tmp_path / "ok.jsonl", [
        {"question_id": " 12 ", "text": "Yes"}, {"question_id": "-3", "text": "No"}]))] == [12, -3]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_json_the_decoder_gives_up_on_is_a_one_line_error(tmp_path: Path, layout: str):
    """A number over Python's 4300-digit limit raises a plain ValueError, deep nesting a RecursionError:
    neither is a JSONDecodeError, so both escaped as tracebacks."""
    for name, value in (("long", "1" * 5000), ("deep", "[" * 100_000 + "]" * 100_000)):
        rec = '{"question_id": %s, "text": "Yes"}' % value
        p = tmp_path / f"{name}.{layout}"
        p.write_text(rec + "\n" if layout == "jsonl" else "[\n" + rec + "\n]\n")
        with pytest.raises(InvalidInput, match=rf"{name}\.{layout}:\d+: bad JSON"):
            read_records(p)
        assert main(["score", "pope", "--answers", str(p), "--questions", str(POPE / "coco_pope_random.json")]) == 2


def test_empty_answers_are_counted_and_flagged(tmp_path: Path):
    """benchmarks.md 1.4: the official parser counts an empty answer as yes; the score keeps that rule, but a file
    of empty answers (a failed generation) must not pass silently as 50 % accuracy."""
    questions = load_pope_file(pope_set_path(POPE, "head", "random"))
    recs = [{"question_id": q.question_id, "text": "" if i < 10 else ("Yes" if q.label == "yes" else "No")}
            for i, q in enumerate(questions.questions)]
    recs[10]["text"] = "   "
    m = score_answers(load_answers(_write_jsonl(tmp_path / "a.jsonl", recs)), questions)
    assert m["empty"] == 11 and m["tp"] + m["fp"] + m["tn"] + m["fn"] == 3000
    assert any("11 of 3000 answers are empty" in f and "as yes" in f for f in m["flags"])
    full = [{"question_id": q.question_id, "text": "Yes" if q.label == "yes" else "No."} for q in questions.questions]
    m = score_answers(load_answers(_write_jsonl(tmp_path / "b.jsonl", full)), questions)
    assert m["empty"] == 0 and m["flags"] == []


def test_image_id_list_that_is_not_utf8_is_a_one_line_error(tmp_path: Path):
    p = tmp_path / "ids.txt"
    p.write_bytes(b"30000001\n\xff\n")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        read_image_ids(p)
    with pytest.raises(InvalidInput, match="file not found"):
        read_image_ids(tmp_path / "none.txt")


def test_gt_cache_gets_the_images_a_later_caption_file_adds(tmp_path: Path):
    """The cache written by a run held only that run's images; a later run with more images was refused with
    "unknown image id ... (not in the ground truth)" although the COCO files have them."""
    cache = tmp_path / "gt.json.gz"
    full = load_ground_truth(COCO_MINI / "annotations")
    assert load_ground_truth(COCO_MINI / "annotations", image_ids=[4], cache=cache) == {4: full[4]}
    assert load_ground_truth(COCO_MINI / "annotations", image_ids=[1, 2, 3, 4], cache=cache) == full
    assert json.loads(gzip.decompress(cache.read_bytes())).keys() == {"1", "2", "3", "4"}


def _damaged(tmp_path: Path, text: bytes) -> Path:
    d = tmp_path / "w"
    (d / "annotations").mkdir(parents=True, exist_ok=True)
    (d / "annotations" / "instances_test.json").write_bytes(text)
    return d


@pytest.mark.parametrize("content", [
    b'{"images": [{"id": 1, "scene_type": "kitchen", "scene_objects": [{"category_id": 1}]}]}',  # no "visible"
    b'{"images": [{"id": 1, "scene_type": "kitchen", "scene_objects": [{"category_id": 999, "visible": true}]}]}',
    b'{"images": [{"id": 1',  # truncated
    b"\xff\xfe{}",  # not UTF-8
    b'{"info": {}}',  # no images
    b"[]",
])
def test_synth_hallucinations_with_a_damaged_instances_file_is_a_one_line_error(tmp_path: Path, content: bytes):
    with pytest.raises(InvalidInput, match="instances_test.json"):
        load_scenes(_damaged(tmp_path, content), "test")


def test_synth_dataset_with_a_manifest_that_is_not_utf8_is_a_one_line_error(tmp_path: Path):
    d = tmp_path / "w"
    for sub in ("images/test", "annotations", "pope"):
        (d / sub).mkdir(parents=True)
    (d / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(InvalidInput, match="manifest.json: not UTF-8"):
        synth_dataset(d)


def test_synth_build_into_a_folder_no_build_wrote_overwrites_nothing(tmp_path: Path):
    """A folder of someone else's keeps its files: a build that would replace one of them is refused."""
    d = tmp_path / "mine"
    (d / "annotations").mkdir(parents=True)
    (d / "manifest.json").write_text('{"my": "notes"}\n')
    (d / "annotations" / "instances_test.json").write_text("{}\n")
    with pytest.raises(InvalidInput, match="would overwrite 2 of its files"):
        build_dataset(d, seed=0, train=0, val=0, test=1)
    assert (d / "manifest.json").read_text() == '{"my": "notes"}\n'
    assert (d / "annotations" / "instances_test.json").read_text() == "{}\n"
    assert sorted(p.name for p in d.iterdir()) == ["annotations", "manifest.json"]  # no marker, nothing written
    assert main(["synth", "build", "--out", str(d), "--test", "1", "--json"]) == 2
    (d / "manifest.json").unlink()
    (d / "annotations" / "instances_test.json").unlink()
    (d / "notes.txt").write_text("mine\n")
    assert (build_dataset(d, seed=0, train=0, val=0, test=1) / "manifest.json").is_file()  # other files: fine
    assert (d / "notes.txt").read_text() == "mine\n"
