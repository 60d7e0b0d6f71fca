"""CHAIR: vocabulary, extraction == refdata examples, offline NLTK data, ground truth, scores on a
COCO-format fixture, truncation preset, malformed caption files, `vlmguard score chair`."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from vlmguard.bench import nltk_setup
from vlmguard.bench.chair_extract import default_extractor
from vlmguard.bench.chair_gt import load_ground_truth, load_gt_table, save_gt_table
from vlmguard.bench.chair_score import (
    drop_incomplete_sentence,
    load_captions,
    read_image_ids,
    score_captions,
)
from vlmguard.bench.chair_vocab import SYNONYMS_FILE, load_vocabulary
from vlmguard.cli import main
from vlmguard.errors import InvalidInput, VlmguardError

SHARED = Path(os.environ.get("VLMGUARD_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
REF = SHARED / "refdata"
FIX = Path(__file__).resolve().parent / "fixtures" / "bench"
COCO_MINI = FIX / "coco_mini"


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    import nltk

    def refuse(*a, **k):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", refuse)


def test_synonym_table():
    v = load_vocabulary()
    assert len(v.categories) == 80 and len(v.to_category) == 403
    assert (REF / "chair_synonyms.txt").read_bytes() == SYNONYMS_FILE.read_bytes()  # packaged copy is verbatim
    assert " motor bike" in v.to_category and "motor bike" not in v.to_category
    assert " cheesecake" in v.to_category and "iPhone" in v.to_category and "iphone" not in v.to_category
    assert v.to_category["televison"] == "tv" and v.to_category["bow"] == "tie" and v.to_category["seat"] == "chair"
    assert v.double_words["baby dog"] == "dog" and v.double_words["passenger jet"] == "jet"
    assert v.double_words["toilet seat"] == "toilet" and v.double_words["wine glas"] == "wine glass"
    assert len(v.double_words) == 55  # 25 distinct compounds + 2 x 12 animals + 2 vehicles + 4 special (bow tie overrides)


def test_extraction_matches_refdata_examples():
    ext = default_extractor()
    lines = (REF / "chair_extraction_examples.jsonl").read_text().splitlines()
    assert len(lines) == 10
    for line in lines:
        ex = json.loads(line)
        got = ext.extract(ex["caption"])
        assert got.words == ex["words"], ex["caption"]
        assert got.categories == ex["node_words"], ex["caption"]
        assert len(got.tokens) == ex["n_tokens_after_merge"], ex["caption"]


def test_lemmatiser_quirks():
    ext = default_extractor()
    assert ext.extract("Two men near vases.").words == []  # "men" stays, "vases" -> "vas"
    assert ext.extract("The children are skiing.").categories == ["person", "skis"]
    assert ext.extract("glasses on a toilet seat").words == ["toilet"]


def test_nltk_data_is_project_owned_and_registered():
    import nltk

    root = nltk_setup.ensure_nltk_data()
    assert str(root) == nltk.data.path[0]
    assert nltk_setup.tagger_installed(root) and nltk_setup.wordnet_installed(root)
    lex = (nltk_setup.wordnet_dir(root) / "lexnames").read_text().splitlines()
    assert len(lex) == 45 and lex[0] == "00\tadj.all\t3" and lex[44] == "44\tadj.ppl\t3"


def test_tagger_conversion_and_restricted_unpickler(tmp_path):
    zip_path = REF / "nltk_data" / "averaged_perceptron_tagger.zip"
    dest = nltk_setup.install_tagger(zip_path, tmp_path)
    files = sorted(p.name for p in dest.iterdir())
    assert files == sorted(nltk_setup.TAGGER_FILES)
    classes = json.loads((dest / "averaged_perceptron_tagger_eng.classes.json").read_text())
    assert "NN" in classes and len(classes) == 45
    # the tagger the package ships (benchmarks.md decision 1: data installed by the setup, not read from the
    # reference data beside the repository) is exactly this conversion, byte for byte
    assert nltk_setup.tagger_from_bundle() == nltk_setup.tagger_from_zip(zip_path)
    rebuilt = nltk_setup.write_tagger_bundle(zip_path, tmp_path / "bundle.json.gz")
    assert rebuilt.read_bytes() == nltk_setup.TAGGER_BUNDLE.read_bytes()
    shipped = nltk_setup.install_tagger(None, tmp_path / "from-bundle")
    for name in nltk_setup.TAGGER_FILES:
        assert (shipped / name).read_bytes() == (dest / name).read_bytes()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(nltk_setup.TAGGER_PICKLE_IN_ZIP, pickle.dumps(({}, {}, Evil()), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        nltk_setup.install_tagger(bad, tmp_path / "x")


def test_missing_data_gives_setup_hint(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    monkeypatch.setenv("VLMGUARD_NLTK_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("VLMGUARD_SHARED", str(tmp_path / "noshared"))
    monkeypatch.setattr(nltk_setup, "DEBIAN_WORDNET_DIR", tmp_path / "nowordnet")
    with pytest.raises(VlmguardError, match="20-nltk-data.sh"):  # (WordNet: the Debian packages)
        nltk_setup.ensure_nltk_data()
    # the tagger needs nothing beside the repository: it comes from the package
    assert nltk_setup.tagger_installed(tmp_path / "empty")


def test_gt_table_from_refdata():
    gt = load_gt_table(REF / "chair_gt_objects_coco2014_trainval.json.gz")
    assert len(gt) == 123_287
    assert sum(1 for v in gt.values() if not v) == 723
    ids = read_image_ids(REF / "chair_image_ids_coco_val2014_500.txt")
    assert len(ids) == 500 and all(i in gt for i in ids)


def test_gt_from_coco_fixture_is_instances_union_captions(tmp_path):
    gt = load_ground_truth(COCO_MINI / "annotations")
    assert gt == {
        1: frozenset({"dog", "person", "bicycle"}),
        2: frozenset({"car", "bicycle", "person"}),
        3: frozenset({"cat", "chair", "dining table"}),
        4: frozenset({"cup", "fork", "knife", "bottle"}),  # bottle only from a reference caption
    }
    assert load_ground_truth(COCO_MINI / "annotations", image_ids=[4]) == {4: gt[4]}
    cache = tmp_path / "gt.json.gz"
    assert load_ground_truth(COCO_MINI / "annotations", cache=cache) == gt and cache.is_file()
    assert load_ground_truth(COCO_MINI / "annotations", cache=cache) == gt
    save_gt_table(gt, tmp_path / "t.json")
    assert load_ground_truth(tmp_path / "t.json") == gt


def test_chair_on_coco_fixture():
    caps = load_captions(COCO_MINI / "captions_generated.jsonl")
    gt = load_ground_truth(COCO_MINI / "annotations")
    m, recs = score_captions(caps, gt)
    # mentions: 3 (0 halluc.), 3 (truck, bus), 2 (sofa), 4 (spoon); GT sizes 3, 3, 3, 4; recalled 3, 1, 1, 3
    assert m["n"] == 4 and m["chair_s"] == 75.0
    assert m["chair_i"] == pytest.approx(100 * 4 / 12) and m["recall"] == pytest.approx(100 * 8 / 13)
    assert m["len"] == pytest.approx((10 + 11 + 7 + 14) / 4)
    assert [r["metrics"]["CHAIRs"] for r in recs] == [0, 1, 1, 1]
    assert recs[1]["mscoco_hallucinated_words"] == [["truck", "truck"], ["bus", "bus"]]
    assert recs[2]["mscoco_words"] == ["kitten", "sofa"] and recs[2]["mscoco_generated_words"] == ["cat", "couch"]
    assert recs[2]["metrics"]["CHAIRi"] == 0.5 and recs[3]["metrics"]["Recall"] == 0.75
    m64, recs64 = score_captions(caps, gt, drop_incomplete=True)
    assert recs64[3]["caption"] == "A fork, a knife and a spoon next to a bottle." and m64["len"] == pytest.approx(41 / 4)


def test_no_mentions_gives_null_chair_i():
    m, _ = score_captions([type("C", (), {"image_id": 1, "caption": "Nothing here.", "line": 1})()],
                          {1: frozenset({"dog"})})
    assert m["chair_s"] == 0.0 and m["chair_i"] is None and any("CHAIR_i" in f for f in m["flags"])


@pytest.mark.parametrize("text,expected", [
    ("A dog. A cat on a", "A dog."),
    ("A dog. A cat!", "A dog. A cat!"),
    ("A dog on a", ""),
    ("A dog? Yes. and", "A dog? Yes."),
    ("", ""),
])
def test_drop_incomplete_sentence(text, expected):
    assert drop_incomplete_sentence(text) == expected


def test_malformed_caption_files(tmp_path):
    gt = load_ground_truth(COCO_MINI / "annotations")
    p = tmp_path / "c.jsonl"
    p.write_text('{"image_id": 1, "caption": "a dog"}\n{"image_id": 2 "caption": "x"}\n')
    with pytest.raises(InvalidInput, match=r"c\.jsonl:2: bad JSON line"):
        load_captions(p)
    p.write_text('{"image_id": 1, "caption": "a dog"}\n{"image_id": 2}\n')
    with pytest.raises(InvalidInput, match=r"c\.jsonl:2: missing field 'caption'"):
        load_captions(p)
    p.write_text('[{"image_id": 1, "caption": "a dog"},\n {"image_id": 99, "caption": "a cat"}]\n')
    with pytest.raises(InvalidInput, match=r"c\.jsonl:2: unknown image id 99"):
        score_captions(load_captions(p), gt, p)


def test_score_chair_cli(tmp_path, capsys):
    caps = tmp_path / "caps.json"  # JSON array, custom keys
    caps.write_text(json.dumps([{"id": "3", "text": "A cat on a chair at a dining table with a dog."}]))
    records = tmp_path / "rec.jsonl"
    rc = main(["score", "chair", "--captions", str(caps), "--gt", str(COCO_MINI / "annotations"), "--image-id-key", "id",
               "--caption-key", "text", "--records", str(records), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["chair_s"] == 100.0 and out["chair_i"] == 25.0 and out["recall"] == 100.0
    rec = json.loads(records.read_text().splitlines()[0])
    assert rec["mscoco_hallucinated_words"] == [["dog", "dog"]] and rec["image_id"] == 3


def test_score_chair_reads_openai_batch_output(tmp_path, capsys):
    caption = "A cat on a chair at a dining table with a dog."
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"id": "batch_req_1", "custom_id": "3", "error": None, "response": {
        "status_code": 200, "request_id": "r", "body": {"choices": [{"message": {"content": caption}}]}}}) + "\n"
        + json.dumps({"id": "batch_req_2", "custom_id": "4", "response": None,
                      "error": {"code": "no_answer", "message": "unreachable"}}) + "\n")
    rc = main(["score", "chair", "--captions", str(batch), "--gt", str(COCO_MINI / "annotations"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["n"], out["chair_s"], out["chair_i"], out["recall"]) == (1, 100.0, 25.0, 100.0)  # image 3's caption
    assert any("1 batch record(s) without an answer" in f for f in out["flags"])


def test_score_chair_cli_with_refdata_table(tmp_path, capsys):
    ids = read_image_ids(REF / "chair_image_ids_coco_val2014_500.txt")[:3]
    gt = load_gt_table(REF / "chair_gt_objects_coco2014_trainval.json.gz")
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image_id": i, "caption": "There is " + " and ".join(sorted(gt[i])) + " and a giraffe."}) + "\n" for i in ids))
    rc = main(["score", "chair", "--captions", str(caps), "--gt", str(REF / "chair_gt_objects_coco2014_trainval.json.gz"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 3 and out["hallucinated_mentions"] == sum("giraffe" not in gt[i] for i in ids)


def test_malformed_coco_annotation_file(tmp_path):
    ann = tmp_path / "annotations"
    shutil.copytree(COCO_MINI / "annotations", ann)
    text = (ann / "captions_val2014.json").read_text().splitlines()
    text[3] = text[3] + ","  # a stray comma inside the JSON
    (ann / "captions_val2014.json").write_text("\n".join(text))
    with pytest.raises(InvalidInput, match=r"captions_val2014\.json:\d+: bad JSON"):
        load_ground_truth(ann)


def test_fresh_data_dir_is_filled_from_local_sources(tmp_path, monkeypatch):
    if not all((nltk_setup.DEBIAN_WORDNET_DIR / f).is_file() for f in nltk_setup.WORDNET_REQUIRED):
        pytest.fail("WordNet from Debian is missing: run scripts/setup.d/20-nltk-data.sh")
    import nltk

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    monkeypatch.setenv("VLMGUARD_NLTK_DATA", str(tmp_path / "nltk"))
    root = nltk_setup.ensure_nltk_data()
    assert root == (tmp_path / "nltk").resolve() and nltk.data.path[0] == str(root)
    assert nltk_setup.tagger_installed(root) and nltk_setup.wordnet_installed(root)
    assert nltk_setup.main(["--check", "--dest", str(root)]) == 0


def test_caption_file_lines_split_on_newlines_only(tmp_path):
    """JSON Lines ends a record at "\\n" only: a raw U+2028 / U+2029 / U+0085 inside a caption (valid JSON)
    used to split the line (str.splitlines) and the file was refused as bad JSON; CRLF files still read."""
    p = tmp_path / "caps.jsonl"
    caps = ["A dog\u2028on a sofa.", "A cat\u2029and a\x85bird."]
    p.write_text("\r\n".join(json.dumps({"image_id": i, "caption": c}, ensure_ascii=False) for i, c in enumerate(caps)),
                 encoding="utf-8")
    got = load_captions(p)
    assert [c.caption for c in got] == caps and [c.line for c in got] == [1, 2]
    p.write_text("\r".join(json.dumps({"image_id": i, "caption": c}) for i, c in enumerate(caps)), encoding="utf-8")
    assert [c.caption for c in load_captions(p)] == caps  # bare CR line ends (JSON escapes a CR in a string)
