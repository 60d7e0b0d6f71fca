"""Audit of ``GenerationSpec.image_aspect`` across its paths.

Defect fixed here (its test fails before the fix):

1. ``vlmguard report`` (text table and CSV) and the dashboard's leaderboard showed no sign of a run's
   ``image_aspect``, and no method label shows it either (a baseline stays ``base``): a database with a run on the
   processor's cropped images (every run made before the option) and one on padded images (the benchmarks'
   default since) listed two rows that differed only in their numbers. Both now show an ``image_aspect`` column
   (``native`` for a run that recorded none).

The other tests pin what the audit found right, with exact token ids: ``pad`` on a non-square image equals
``native`` on the image padded by hand under every decoder and pruner and every family, in batches that mix
the settings, and in a POPE / CHAIR run on non-square images.
"""
from __future__ import annotations

import csv
import shutil

import pytest

from vlmguard.images import pad_to_square, to_rgb
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

WIDE, TALL = (60, 24), (20, 50)
METHODS = [{}, *({"decoding": d} for d in ("vcd", "m3id", "vista", "iava", "lqcd")),
           *({"pruning": p, "budget": 4} for p in ("flowcut", "adaptinfer", "fastv", "random"))]


def _tokens(engine, images, aspects, **method) -> list[list[int]]:
    """Token ids of one batch: request k asks about ``images[k]`` with ``image_aspect`` ``aspects[k]``."""
    reqs = [Request(f"describe the photo {k}", [im]) for k, im in enumerate(images)]
    specs = [GenerationSpec(max_new_tokens=5, image_aspect=a, **method) for a in aspects]
    return [r.token_ids for r in engine.generate(reqs, specs)]


def _padded(engine, img):
    return pad_to_square(to_rgb(img), engine.adapter.pad_colour())


# ---- 1. the report and the leaderboard show each run's image_aspect ------------------------------------


def _runs_of_both_aspects(tmp_path):
    from test_bench_runner import SYNTH, FakeEngine
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.runner import default_spec, run_benchmark

    db = tmp_path / "r.sqlite"
    ids = {}
    for aspect in ("native", "reference"):
        spec = default_spec("pope", image_aspect=aspect)
        ids[aspect] = run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), spec, db, split="random",
                                    progress=False, limit=3).run_id
    return db, ids


def test_the_report_and_the_leaderboard_show_each_runs_image_aspect(tmp_path):
    from vlmguard.bench.db import list_runs
    from vlmguard.bench.report import build_report, flatten, method_label, text_report
    from vlmguard.dashboard import data

    db, ids = _runs_of_both_aspects(tmp_path)
    runs = {r["run_id"]: r for r in list_runs(db)}
    assert {method_label(r) for r in runs.values()} == {"base"}  # the label cannot tell them apart
    assert {a: flatten(runs[i])["image_aspect"] for a, i in ids.items()} == {"native": "native",
                                                                            "reference": "reference"}
    lines = [line for line in text_report([flatten(r) for r in runs.values()]).splitlines() if line]
    assert lines[1].split()[:5] == ["run_id", "model", "split", "method", "image_aspect"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert {a: rows[i][4] for a, i in ids.items()} == {"native": "native", "reference": "reference"}

    build_report(db, tmp_path / "rep")
    with open(tmp_path / "rep" / "runs.csv", newline="") as f:
        csv_rows = {r["run_id"]: r["image_aspect"] for r in csv.DictReader(f)}
    assert csv_rows == {ids["native"]: "native", ids["reference"]: "reference"}

    board = data.load_runs(db)
    assert "image_aspect" in data.visible_columns(board)
    assert dict(zip(board["run_id"], board["image_aspect"])) == csv_rows


# ---- pad equals native on the image padded by hand, on every path --------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(map(str, m.values())) or "plain")
def test_pad_is_native_on_the_hand_padded_image_under_every_decoder_and_pruner(method):
    engine = tiny_engine("llava")
    wide, tall = random_image(3, WIDE), random_image(4, TALL)
    got = _tokens(engine, [wide, tall], ["pad", "reference"], **method)
    want = _tokens(engine, [_padded(engine, wide), _padded(engine, tall)], ["native", "native"], **method)
    assert got == want
    if not method:  # the padding is seen: the cropped images give other tokens
        assert got != _tokens(engine, [wide, tall], ["native", "native"])


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method", [{}, {"decoding": "vcd"}, {"pruning": "flowcut", "budget": 4}],
                         ids=["plain", "vcd", "flowcut"])
def test_other_families_pad_when_asked_and_keep_the_image_for_reference(family, method):
    engine = tiny_engine(family)
    wide, tall = random_image(3, WIDE), random_image(4, TALL)
    padded = _tokens(engine, [wide, tall], ["pad", "pad"], **method)
    assert padded == _tokens(engine, [_padded(engine, wide), _padded(engine, tall)], ["native"] * 2, **method)
    assert _tokens(engine, [wide, tall], ["reference"] * 2, **method) == _tokens(engine, [wide, tall], ["native"] * 2,
                                                                                  **method)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", [{}, {"decoding": "vista"}, {"pruning": "fastv", "budget": 4}],
                         ids=["plain", "vista", "fastv"])
def test_a_batch_mixing_image_aspects_gives_each_request_its_tokens_alone(family, method):
    engine = tiny_engine(family)
    wide, tall = random_image(3, WIDE), random_image(4, TALL)
    # one image object under two settings: never taken for copies of one request
    mixed = _tokens(engine, [wide, tall, wide], ["pad", "native", "native"], **method)
    assert mixed == _tokens(engine, [_padded(engine, wide), tall, wide], ["native"] * 3, **method)
    if family == "llava":  # (LLaVA-NeXT under FastV: a batch of these images differs from alone, padded or not)
        aspects = ["pad", "native", "native"]
        alone = [_tokens(engine, [im], [a], **method)[0] for im, a in zip([wide, tall, wide], aspects)]
        assert mixed == alone


def test_alpha_palette_grayscale_and_one_pixel_wide_images_are_padded_in_rgb():
    engine = tiny_engine("llava")
    base = random_image(11, (64, 30))
    images = [base.convert("RGBA"), base.convert("P"), base.convert("L"), base.convert("LA"),
              random_image(12, (1, 60)), random_image(13, (60, 1))]
    for im in images:
        assert _tokens(engine, [im], ["pad"]) == _tokens(engine, [_padded(engine, im)], ["native"]), im.mode


def test_an_exif_rotated_upload_is_padded_upright():
    import io

    from PIL import Image

    from vlmguard.images import image_from_bytes

    upright = random_image(30, (20, 60))
    buf, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: a viewer turns it back
    upright.rotate(90, expand=True).save(buf, "PNG", exif=exif)
    received = image_from_bytes(buf.getvalue())
    assert received.size == (20, 60)
    engine = tiny_engine("llava")
    assert _tokens(engine, [received], ["pad"]) == _tokens(engine, [_padded(engine, upright)], ["native"])


def test_pope_and_chair_runs_on_non_square_images_pad_by_default(tmp_path):
    from test_bench_runner import SYNTH
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.db import get_run, run_samples
    from vlmguard.bench.runner import default_spec, run_benchmark

    engine = tiny_engine("llava")
    wide, padded = tmp_path / "wide", tmp_path / "padded"
    shutil.copytree(SYNTH, wide)
    shutil.copytree(SYNTH, padded)
    for i, f in enumerate(sorted((wide / "images" / "test").glob("*.png"))):
        im = random_image(20 + i, WIDE if i % 2 else TALL)
        im.save(f)
        _padded(engine, im).save(padded / "images" / "test" / f.name)

    def answers(root, aspect, bench):
        db = tmp_path / f"{root.name}-{aspect}.sqlite"
        spec = default_spec(bench, image_aspect=aspect)
        out = run_benchmark(engine, bench, synth_dataset(root), spec, db, split="random" if bench == "pope" else None,
                            progress=False, limit=4)
        return get_run(db, out.run_id)["image_aspect"], [s["output_text"] for s in run_samples(db, out.run_id)]

    for bench in ("pope", "chair"):
        recorded, texts = answers(wide, "reference", bench)
        assert recorded == "reference"
        assert texts == answers(padded, "native", bench)[1]
        assert texts != answers(wide, "native", bench)[1]
