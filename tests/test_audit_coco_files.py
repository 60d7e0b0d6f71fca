"""Audit of what a user with a real COCO download gives `vlmguard bench|score pope|chair`: small COCO-format
fixtures with the real schema (instances / captions files, `COCO_val2014_%012d.jpg` images, official-layout POPE
files) probed with files of the wrong kind, ids the annotations lack, duplicate ids, a BOM, an unsuffixed gzip and
a missing POPE folder. Defects found (each fixed, one test each):

- `bench chair --gt DIR`: the help says "table .json(.gz) or COCO annotation folder", but a folder was read as a
  table ("cannot read CHAIR ground-truth table ([Errno 21] Is a directory)").
- `bench chair --coco-annotations DIR --image-ids FILE`: an id the annotation files do not list got an empty
  ground-truth set, so every object the model named counted as hallucinated: a silently wrong score.
- an image-id list naming an image twice: the run expected one sample more than it could ever store and stayed
  "running" on every rerun.
- a captions file where an instances file belongs (`instances_val2014.json` holding captions): a traceback
  (KeyError: 'categories' inside pycocotools).
- a question / answer / image-id file starting with a UTF-8 BOM was refused ("Unexpected UTF-8 BOM"), and a
  gzip'd answer file without the `.gz` suffix was "not UTF-8 text (invalid start byte at byte 1)".
- `bench pope --dataset coco --pope-dir DIR` with a wrong folder (or none of the set's files in it): "no POPE
  file for split 'random'" without naming the folder or the file looked for.
- a sweep's CHAIR runs on COCO parsed the annotation files (instances_train2014 alone ~330 MB) once per run: the
  ground truth built from them is now kept for the process, by the files' size and mtime and the image ids.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmguard.bench.chair_gt import load_ground_truth
from vlmguard.bench.chair_score import read_image_ids
from vlmguard.bench.datasets import coco_dataset
from vlmguard.bench.pope_data import load_pope_file
from vlmguard.bench.pope_metrics import load_answers, score_answers
from vlmguard.errors import InvalidInput

IDS = (139, 285, 632)
CATS = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 62, "name": "chair", "supercategory": "furniture"}]


def _ann(aid: int, imid: int, cat: int) -> dict:
    return {"id": aid, "image_id": imid, "category_id": cat, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 0,
            "segmentation": [[0, 0, 5, 0, 5, 5]]}


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    """A COCO-2014-style download: annotations/instances+captions_val2014.json, val2014/*.jpg, pope/, ids.txt."""
    ann_dir, img_dir, pope_dir = tmp_path / "annotations", tmp_path / "val2014", tmp_path / "pope"
    for d in (ann_dir, img_dir, pope_dir):
        d.mkdir()
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 32, "height": 24} for i in IDS]
    instances = {"info": {}, "licenses": [], "images": images, "categories": CATS,
                 "annotations": [_ann(1, 139, 1), _ann(2, 139, 62), _ann(3, 285, 18)]}
    captions = {"info": {}, "licenses": [], "images": images,
                "annotations": [{"id": 10, "image_id": 139, "caption": "A man sitting on a chair."},
                                {"id": 11, "image_id": 285, "caption": "A dog on the grass."},
                                {"id": 12, "image_id": 632, "caption": "An empty room with a bed."}]}
    (ann_dir / "instances_val2014.json").write_text(json.dumps(instances))
    (ann_dir / "captions_val2014.json").write_text(json.dumps(captions))
    for k, i in enumerate(IDS):
        Image.new("RGB", (32, 24), (40 * k, 90, 200)).save(img_dir / f"COCO_val2014_{i:012d}.jpg", format="JPEG")
    qs = [{"question_id": 2 * k + j + 1, "image": f"COCO_val2014_{i:012d}.jpg",
           "text": f"Is there a {obj} in the image?", "label": lab}
          for k, i in enumerate(IDS) for j, (obj, lab) in enumerate((("person", "yes"), ("car", "no")))]
    (pope_dir / "coco_pope_random.json").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in IDS))
    return tmp_path


EXPECTED_GT = {139: frozenset({"person", "chair"}), 285: frozenset({"dog"}), 632: frozenset({"bed"})}


def test_bench_chair_gt_folder_is_read_as_coco_annotations(coco):
    ds = coco_dataset(coco / "val2014", gt=coco / "annotations", image_ids=coco / "ids.txt")
    ids, _ = ds.chair_image_ids()
    assert ids == list(IDS)
    # instances (person, chair; dog) union caption objects ("man" -> person, "bed"), by hand
    assert ds.chair_ground_truth(ids) == EXPECTED_GT
    assert ds.chair_image_path(632).name == "COCO_val2014_000000000632.jpg"


def test_image_id_the_annotations_lack_is_refused_not_scored_against_nothing(coco):
    Image.new("RGB", (8, 8)).save(coco / "val2014" / "COCO_val2014_000000000999.jpg", format="JPEG")
    ds = coco_dataset(coco / "val2014", coco_annotations=coco / "annotations", image_ids=coco / "ids.txt")
    assert ds.chair_ground_truth([139, 632]) == {139: EXPECTED_GT[139], 632: EXPECTED_GT[632]}
    assert ds.chair_image_path(999).is_file()  # the image is there; only its annotations are not
    with pytest.raises(InvalidInput, match=r"annotations: 1 image ids .* no ground truth \(first: 999\)"):
        ds.chair_ground_truth([139, 999])


def test_an_image_id_listed_twice_is_refused_with_its_line(coco):
    f = coco / "ids_dup.txt"
    f.write_text("139\n285\n# comment\n139\n")
    with pytest.raises(InvalidInput, match=r"ids_dup\.txt:4: duplicate image id 139 \(first on line 1\)"):
        read_image_ids(f)


def test_a_captions_file_where_instances_belong_is_a_one_line_error(coco):
    swapped = coco / "swapped"
    swapped.mkdir()
    caps = (coco / "annotations" / "captions_val2014.json").read_text()
    (swapped / "instances_val2014.json").write_text(caps)
    (swapped / "captions_val2014.json").write_text(caps)
    with pytest.raises(InvalidInput, match=r"instances_val2014\.json: not an instances file"):
        load_ground_truth(swapped, image_ids=[139])


def test_bom_files_and_an_unsuffixed_gzip_read_like_plain_ones(coco):
    plain = coco / "pope" / "coco_pope_random.json"
    bom = coco / "bom_pope.json"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))  # Windows: BOM + CRLF
    ref = load_pope_file(plain)
    got = load_pope_file(bom)
    assert [q.to_record() for q in got.questions] == [q.to_record() for q in ref.questions]
    texts = ("Yes", "No.", "There is no person.", "yes", "Yes", "No")
    answers = "".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in enumerate(texts, start=1))
    (coco / "answers_bom.jsonl").write_text(answers, encoding="utf-8-sig")
    (coco / "answers.jsonl").write_bytes(gzip.compress(answers.encode()))  # gzip'd, no .gz suffix
    for name in ("answers_bom.jsonl", "answers.jsonl"):
        m = score_answers(load_answers(coco / name), got)
        # by hand (official parser): q1 yes/yes TP, q2 no/no TN, q3 yes/no FN, q4 no/yes FP, q5 TP, q6 TN
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1) and m["accuracy"] == pytest.approx(400 / 6)
    (coco / "ids_bom.txt").write_bytes(b"\xef\xbb\xbf139\r\n285\r\n")
    assert read_image_ids(coco / "ids_bom.txt") == [139, 285]


def test_a_missing_pope_folder_or_file_is_named(coco):
    ds = coco_dataset(coco / "val2014", pope_dir=coco / "no_such_dir")
    with pytest.raises(InvalidInput, match=r"no_such_dir: POPE directory not found"):
        ds.pope_file("random")
    ds = coco_dataset(coco / "val2014", pope_dir=coco / "pope", pope_set="llava15_e3e3926")
    with pytest.raises(InvalidInput, match=r"llava15_e3e3926/coco_pope_random\.json: file not found"):
        ds.pope_file("random")
    assert len(coco_dataset(coco / "val2014", pope_dir=coco / "pope").pope_file("random")) == 6


def test_coco_annotation_files_are_parsed_once_per_image_list_until_they_change(coco, monkeypatch):
    """A sweep's CHAIR runs rebuild the ground truth per run: COCO's annotation files (instances_train2014 alone
    is ~330 MB of JSON) were parsed again for every run. The result is kept by the files' size and mtime."""
    import os

    from vlmguard.bench import chair_gt

    parsed = []
    real = chair_gt.quiet_coco
    monkeypatch.setattr(chair_gt, "quiet_coco", lambda p: parsed.append(p.name) or real(p))
    ann = coco / "annotations"
    first = load_ground_truth(ann, IDS)
    assert first == EXPECTED_GT and len(parsed) == 2
    first[139] = frozenset()  # a caller's changes stay its own
    assert load_ground_truth(ann, IDS) == EXPECTED_GT and len(parsed) == 2  # nothing parsed again
    assert load_ground_truth(ann, IDS[:2]) == {i: EXPECTED_GT[i] for i in IDS[:2]} and len(parsed) == 4
    inst = ann / "instances_val2014.json"
    data = json.loads(inst.read_text())
    data["annotations"].append(_ann(4, 632, 3))  # a car in image 632
    inst.write_text(json.dumps(data))
    os.utime(inst, ns=(inst.stat().st_atime_ns, inst.stat().st_mtime_ns + 10**9))
    assert load_ground_truth(ann, IDS)[632] == frozenset({"bed", "car"}) and len(parsed) == 6
