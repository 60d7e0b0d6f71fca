"""``image_aspect``: LLaVA-1.5's pad-to-square preprocessing (benchmarks.md 1.3) next to the processor's own crop.

LLaVA-1.5 trains and evaluates on images padded to a square with the processor's mean colour (``expand2square``);
llava-hf's processor resizes the shortest side and crops the centre instead. ``pad`` must give exactly the pixels
of transformers' ``LlavaImageProcessor(do_pad=True)``, ``reference`` must pad on LLaVA-1.5 only, and the
benchmarks must use and record it.
"""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, LlavaImageProcessor

from vlmguard.bench.runner import default_spec, spec_knobs
from vlmguard.errors import InvalidInput
from vlmguard.images import pad_to_square
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

WIDE = (60, 20)


def test_pad_to_square_centres_the_image_on_the_background():
    img = random_image(1, WIDE)
    out = pad_to_square(img, (10, 20, 30))
    assert out.size == (60, 60)
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((59, 59)) == (10, 20, 30)
    assert list(out.crop((0, 20, 60, 40)).getdata()) == list(img.getdata())  # (60 - 20) // 2 rows above
    tall = random_image(2, (7, 12))
    out = pad_to_square(tall, (0, 0, 0))
    assert out.size == (12, 12) and list(out.crop((2, 0, 9, 12)).getdata()) == list(tall.getdata())
    square = random_image(3, (16, 16))
    assert pad_to_square(square, (0, 0, 0)) is square


def test_pad_then_clip_processor_equals_transformers_llava_processor_with_do_pad():
    kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip, llava = CLIPImageProcessor(**kw), LlavaImageProcessor(do_pad=True, **kw)
    img = random_image(4, WIDE)
    colour = tuple(int(x * 255) for x in clip.image_mean)
    ours = clip(images=[pad_to_square(img, colour)], return_tensors="pt")["pixel_values"]
    theirs = llava(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, theirs)
    cropped = clip(images=[img], return_tensors="pt")["pixel_values"]
    assert not torch.equal(ours, cropped)


@pytest.mark.parametrize("family,reference", [("llava", "pad"), ("llava_next", "native"), ("qwen2_vl", "native")])
def test_reference_is_the_familys_own_preprocessing(family, reference):
    adapter = tiny_engine(family).adapter
    assert adapter.image_aspect("reference") == reference
    assert adapter.image_aspect("pad") == "pad" and adapter.image_aspect("native") == "native"


@pytest.mark.parametrize("declared,resolved", [("pad", "pad"), ("square", "native"), ("anyres", "native")])
def test_a_configs_llava_style_image_aspect_ratio_decides_reference(declared, resolved):
    from vlmguard.models.families import adapter_for
    from vlmguard.testing import tiny_llava

    model, processor = tiny_llava()
    model.config.image_aspect_ratio = declared
    assert adapter_for(model, processor).image_aspect("reference") == resolved


def test_pad_colour_is_the_processors_mean():
    adapter = tiny_engine("llava").adapter
    mean = adapter.processor.image_processor.image_mean
    assert adapter.pad_colour() == tuple(int(x * 255) for x in mean)


def _answer(engine, image, aspect, **kw):
    spec = GenerationSpec(max_new_tokens=6, logprobs=0, image_aspect=aspect, **kw)
    return engine.generate([Request("describe the photo", [image])], spec)[0]


def test_a_padded_request_is_the_request_with_the_padded_image():
    engine = tiny_engine("llava")
    img = random_image(5, WIDE)
    padded = pad_to_square(img, engine.adapter.pad_colour())
    prompt, = engine._prompts([Request("describe the photo", [img])], specs=[GenerationSpec(image_aspect="pad")])
    assert list(prompt.images[0].getdata()) == list(padded.getdata())
    for aspect in ("pad", "reference"):
        got, want = _answer(engine, img, aspect), _answer(engine, padded, "native")
        assert got.token_ids == want.token_ids
        assert [t.logprob for t in got.logprobs] == [t.logprob for t in want.logprobs]
    native, = engine._prompts([Request("describe the photo", [img])], specs=[GenerationSpec()])
    assert native.images[0] is img  # the default leaves images to the processor


def test_reference_leaves_qwen2_vl_images_as_they_are():
    engine = tiny_engine("qwen2_vl")
    img = random_image(6, (56, 28))
    prompt, = engine._prompts([Request("describe the photo", [img])], specs=[GenerationSpec(image_aspect="reference")])
    assert prompt.images[0] is img


def test_one_image_object_prepared_two_ways_in_one_batch_is_not_a_copy():
    """Requests with the very same image objects share one prefill as copies; a different ``image_aspect`` makes
    them different requests."""
    engine = tiny_engine("llava")
    img = random_image(7, WIDE)
    reqs = [Request("describe the photo", [img]), Request("describe the photo", [img])]
    specs = [GenerationSpec(max_new_tokens=6, logprobs=0, image_aspect=a) for a in ("native", "pad")]
    both = engine.generate(reqs, specs)
    for res, aspect in zip(both, ("native", "pad")):
        alone = _answer(engine, img, aspect)
        assert res.token_ids == alone.token_ids
        assert [t.logprob for t in res.logprobs] == pytest.approx([t.logprob for t in alone.logprobs], abs=1e-5)
    assert [t.logprob for t in both[0].logprobs] != [t.logprob for t in both[1].logprobs]


def test_image_aspect_is_a_per_request_field_and_refuses_unknown_values():
    base = GenerationSpec(decoding="vcd")
    assert base.batch_key() == GenerationSpec(decoding="vcd", image_aspect="pad").batch_key()
    with pytest.raises(InvalidInput, match="image_aspect"):
        GenerationSpec(image_aspect="letterbox")


def test_benchmarks_default_to_reference_and_record_it_in_the_run():
    for benchmark in ("pope", "chair"):
        spec = default_spec(benchmark)
        assert spec.image_aspect == "reference"
        assert spec_knobs(spec)["image_aspect"] == "reference"
    assert default_spec("pope", image_aspect="native").image_aspect == "native"
    # a run on the processor's own images keeps the id it had before the option existed
    assert "image_aspect" not in spec_knobs(default_spec("pope", image_aspect="native"))


def test_bench_and_generate_command_lines_take_image_aspect(tmp_path, capsys):
    from vlmguard.bench.cli import _spec_from_args
    from vlmguard.cli import build_parser
    from vlmguard.commands.generate import spec_from_args

    parser = build_parser()
    args = parser.parse_args(["bench", "pope", "--split", "random", "--image-aspect", "native"])
    assert _spec_from_args(args).image_aspect == "native"
    args = parser.parse_args(["bench", "chair"])
    assert _spec_from_args(args).image_aspect == "reference"
    args = parser.parse_args(["generate", "--prompt", "hi", "--image-aspect", "pad"])
    assert spec_from_args(args).image_aspect == "pad"
    assert spec_from_args(parser.parse_args(["generate", "--prompt", "hi"])).image_aspect == "native"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "hi", "--image-aspect", "letterbox"])
    assert "invalid choice: 'letterbox'" in capsys.readouterr().err


def test_the_chat_api_takes_image_aspect_in_its_vlmguard_object():
    import asyncio

    from test_client import _inprocess_app

    from vlmguard.images import image_to_data_url

    img = random_image(8, WIDE)
    message = [{"role": "user", "content": [
        {"type": "text", "text": "describe the photo"},
        {"type": "image_url", "image_url": {"url": image_to_data_url(img)}}]}]

    async def post(body):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_inprocess_app()), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json=body)

    def chat(**options):
        body = {"messages": message, "max_tokens": 6, "logprobs": True, "vlmguard": options}
        return asyncio.run(post(body))

    padded = _answer(tiny_engine("llava"), img, "pad")
    r = chat(image_aspect="pad")
    assert r.status_code == 200
    assert [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]] == pytest.approx(
        [t.logprob for t in padded.logprobs], abs=1e-5)
    bad = chat(image_aspect="letterbox")
    assert bad.status_code == 400 and "image_aspect" in json.dumps(bad.json())


def test_runs_on_other_image_preprocessing_are_other_runs_migrated_and_never_compared(tmp_path):
    import sqlite3

    from test_bench_runner import SYNTH, FakeEngine
    from vlmguard.bench import db as dbm
    from vlmguard.bench.compare import _task
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.runner import run_benchmark

    old = tmp_path / "old.sqlite"  # a database of the version before: no image_aspect column
    conn = dbm.connect(old)
    conn.execute("ALTER TABLE runs DROP COLUMN image_aspect")
    conn.close()
    assert "image_aspect" not in {r[1] for r in sqlite3.connect(old).execute("PRAGMA table_info(runs)")}
    ids = {}
    for aspect in ("reference", "pad", "native"):
        spec = default_spec("pope", image_aspect=aspect)
        ids[aspect] = run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), spec, old, split="random",
                                    progress=False, limit=3).run_id
    assert len(set(ids.values())) == 3
    runs = {r["run_id"]: r for r in dbm.list_runs(old)}
    assert [runs[ids[a]]["image_aspect"] for a in ("reference", "pad", "native")] == ["reference", "pad", None]
    assert len({_task(runs[i]) for i in ids.values()}) == 3  # `vlmguard compare` keeps them in their own groups


def test_a_sweep_sets_image_aspect_per_method_or_for_all(tmp_path):
    from test_bench_runner import SYNTH, FakeEngine
    from vlmguard.bench import db as dbm
    from vlmguard.bench.sweep import run_sweep

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"model: fake\ndataset: {SYNTH}\nlimit: 3\nimage_aspect: pad\nbenchmarks:\n"
                   "  - pope: {splits: [random]}\nmethods:\n  - {name: base}\n"
                   "  - {name: cropped, image_aspect: native}\n")
    run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=lambda name: FakeEngine(), progress=False)
    assert sorted(str(r["image_aspect"]) for r in dbm.list_runs(tmp_path / "s.sqlite")) == ["None", "pad"]
    cfg.write_text(cfg.read_text().replace("image_aspect: native", "image_aspect: letterbox"))
    with pytest.raises(InvalidInput, match="image_aspect"):
        run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=lambda name: FakeEngine(), progress=False)


def test_the_dashboard_draws_a_padded_request_on_the_padded_square():
    from vlmguard.dashboard import drawing

    wide = random_image(9, WIDE)
    for family, aspect in (("llava", "pad"), ("llava", "reference"), ("qwen2_vl", "pad")):
        shown = drawing.model_view(wide, family, aspect)
        assert shown.size == (60, 60) and shown.getpixel((0, 0)) == drawing.CLIP_MEAN_RGB
    unpadded = (("llava", "native"), ("llava", None), ("qwen2_vl", "reference"), ("llava_next", "reference"))
    for family, aspect in unpadded:
        assert drawing.model_view(wide, family, aspect) is wide
    padded = drawing.model_view(wide, "llava", "pad")
    # the padded square is what the tokens cover: no part of it is shaded as unseen, the grey bars included
    overlay = np.asarray(drawing.kept_overlay(padded, None, 16, "llava"))
    plain = np.asarray(drawing.display_image(padded))
    assert overlay.shape == plain.shape and (overlay[5, 5] == plain[5, 5]).all()


def test_padding_a_long_strip_is_bounded_by_the_pixel_limit():
    """A strip within the pixel and aspect limits would make a square hundreds of times larger (a 25 MP strip of
    200:1, 5 GP): it is scaled down first, keeping its aspect, and the square stays within the limit."""
    strip = random_image(10, (3000, 20))
    out = pad_to_square(strip, (1, 2, 3), max_pixels=1000 * 1000)
    assert out.size[0] == out.size[1] <= 1000
    assert out.getpixel((0, 0)) == (1, 2, 3)
    assert pad_to_square(strip, (1, 2, 3), max_pixels=3000 * 3000).size == (3000, 3000)  # within it: full size


def test_compare_names_what_tells_apart_groups_of_one_benchmark_and_split(tmp_path):
    """Runs on padded and on cropped images are compared within their own groups; their rows, which show the same
    benchmark, split and method, say which images each group ran on (NULL: the processor's own)."""
    from test_bench_compare import _store, pope_samples

    from vlmguard.bench.compare import compare_runs, format_comparisons
    from vlmguard.bench.db import connect

    conn = connect(tmp_path / "r.sqlite")
    pope = dict(benchmark="pope", model="tiny", dataset="synthcoco", dataset_version="v1", split="random",
                question_sha256="abc")
    for aspect, right in ((None, 5), ("reference", 4)):
        _store(conn, {**pope, "image_aspect": aspect}, pope_samples([[True] * 6] * 10))
        _store(conn, {**pope, "image_aspect": aspect, "pruning": "fastv", "budget": 16},
               pope_samples([[True] * right + [False] * (6 - right)] * 10))
    conn.close()
    rows = {(r.task, r.metric): r for r in compare_runs(tmp_path / "r.sqlite", n_boot=200)}
    assert set(rows) == {(f"image_aspect={a}", m) for a in ("native", "reference")
                         for m in ("accuracy", "accuracy_retained")}
    assert rows[("image_aspect=reference", "accuracy_retained")].value == pytest.approx(100 * 4 / 6)
    table = format_comparisons(list(rows.values()))
    assert "| pope | random | task | method |" not in table and "| benchmark | split | task | method |" in table
    assert "| pope | random | image_aspect=native | fastv@16 | accuracy |" in table
