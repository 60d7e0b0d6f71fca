"""An audit of the engine's Python API with unusual inputs: images that cannot be read, prompts the tokenizer
cannot take or the processor would misread, start_batch's indices, and budgets one request of a batch cannot meet.
Each is a one-line InvalidInput naming the request (and image), never an error from PIL or the tokenizer."""
from __future__ import annotations

import pytest

from vlmguard.engine import Request
from vlmguard.errors import InvalidInput
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
SPEC = GenerationSpec(max_new_tokens=2)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_closed_image_is_refused_naming_it(mode):
    """A closed image raised PIL's ValueError (non-RGB modes) or a processor error naming no image (RGB)."""
    engine = tiny_engine("llava")
    closed = random_image(0).convert(mode)
    closed.close()
    with pytest.raises(InvalidInput, match=r"^request 1 image 0 cannot be read: Operation on closed image"):
        engine.generate([Request("describe", [random_image(1)]), Request("describe", [closed])], SPEC)


def test_an_image_whose_file_was_truncated_is_refused_naming_it(tmp_path):
    """A lazily opened image whose file was cut short before generating raised PIL's OSError (non-RGB modes)."""
    path = tmp_path / "img.png"
    random_image(0).convert("RGBA").save(path)
    from PIL import Image

    img = Image.open(path)  # lazy: the pixels are read at load()
    path.write_bytes(path.read_bytes()[:120])
    img.fp.close()
    img = Image.open(path)
    with pytest.raises(InvalidInput, match=r"^request 0 image 0 cannot be read: "):
        tiny_engine("llava").generate([Request("describe", [img])], SPEC)


def test_a_lazy_image_whose_file_was_deleted_still_works(tmp_path):
    """Valid input: the open file keeps the pixels readable after the name is gone."""
    from PIL import Image

    engine = tiny_engine("llava")
    path = tmp_path / "img.png"
    random_image(0).save(path)
    img = Image.open(path)
    path.unlink()
    lazy = engine.generate([Request("describe", [img])], SPEC)[0]
    assert lazy.text == engine.generate([Request("describe", [random_image(0)])], SPEC)[0].text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lone_surrogate_in_the_prompt_is_refused_naming_it(family):
    """The tokenizer raised 'TextEncodeInput must be Union[...]' for text that is no valid Unicode."""
    with pytest.raises(InvalidInput, match=r"^request 0: prompt is not valid Unicode text: '\\ud800' at character 3"):
        tiny_engine(family).generate([Request("hi \ud800", [random_image(0)])], SPEC)


def test_a_lone_surrogate_in_the_system_text_is_refused_naming_it():
    with pytest.raises(InvalidInput, match=r"^request 1: system is not valid Unicode text"):
        tiny_engine("qwen2_vl").generate([Request("hi", []), Request("hi", [], system="x\udfff")], SPEC)


@pytest.mark.parametrize("family,placeholder", [("llava", "<image>"), ("llava_next", "<image>"),
                                                ("qwen2_vl", "<|image_pad|>")])
def test_the_image_placeholder_in_a_templated_prompt_is_refused_naming_the_request(family, placeholder):
    """The processor counted the user's own placeholder as an image: 'Found total 2 <image> tokens and 1 images'
    (or 'more image placeholders than images'), naming no request."""
    engine = tiny_engine(family)
    reqs = [Request("describe", [random_image(0)]), Request(f"what is {placeholder} here", [random_image(1)])]
    with pytest.raises(InvalidInput, match=rf"^request 1: prompt contains the model's image placeholder "
                                           rf"'{placeholder.replace('|', '[|]')}'"):
        engine.generate(reqs, SPEC)


@pytest.mark.parametrize("family,placeholder", [("llava", "<image>"), ("llava_next", "<image>"),
                                                ("qwen2_vl", "<|image_pad|>")])
@pytest.mark.parametrize("times,images", [(1, 0), (2, 1), (0, 1)])
def test_a_raw_prompt_holds_one_placeholder_per_image(family, placeholder, times, images):
    """A raw prompt (a benchmark's, a text completion's) with more or fewer placeholders than images: the processor
    raised a KeyError ('image_grid_thw') or a ValueError naming no request, a 500 over HTTP."""
    engine = tiny_engine(family)
    prompt = "USER: " + placeholder * times + "\nhi ASSISTANT:"
    reqs = [Request("describe", [random_image(0)]), Request(prompt, [random_image(j) for j in range(images)],
                                                            raw_prompt=True)]
    with pytest.raises(InvalidInput, match=rf"^request 1: the prompt holds the model's image placeholder "
                                           rf"'{placeholder.replace('|', '[|]')}' {times} time\(s\) for {images}"):
        engine.generate(reqs, SPEC)


def test_other_families_placeholders_are_plain_text():
    """Valid input: LLaVA's <image> means nothing to Qwen2-VL, and a raw prompt keeps its placeholders."""
    engine = tiny_engine("qwen2_vl")
    assert engine.generate([Request("what is <image> here", [random_image(0)])], SPEC)[0].finish_reason
    llava = tiny_engine("llava")
    raw = llava.generate([Request("USER: <image>\nhi ASSISTANT:", [random_image(0)], raw_prompt=True)], SPEC)[0]
    assert raw.visual_tokens == 16


@pytest.mark.parametrize("indices,message", [
    (5, r"^indices must be a list of ints, one per request, got int"),
    ([0, 0], r"^indices must be distinct"),
    (["a", "b"], r"^indices must be ints"),
])
def test_start_batch_refuses_bad_indices(indices, message):
    """An int raised TypeError from list(); duplicates or strings were taken (events of two requests shared an
    index)."""
    with pytest.raises(InvalidInput, match=message):
        tiny_engine("llava").start_batch([Request("hi", [random_image(0)])] * 2, SPEC, indices=indices)


def test_start_batch_takes_any_distinct_ints():
    batch = tiny_engine("llava").start_batch([Request("hi", [random_image(0)])] * 2, SPEC, indices=(7, 3))
    try:
        events = []
        while batch.active:
            events += batch.advance()
    finally:
        batch.close()
    assert sorted({e.index for e in events if e.done}) == [3, 7]


def test_a_budget_one_request_cannot_meet_names_that_request():
    """In a batch of Qwen2-VL requests with images of different sizes, 'budget 10 exceeds the 4 visual tokens of
    the image' named no request."""
    engine = tiny_engine("qwen2_vl")
    reqs = [Request("describe", [random_image(5, (200, 180))]), Request("describe", [random_image(0, (40, 32))])]
    spec = GenerationSpec(pruning="fastv", budget=10, max_new_tokens=2)
    with pytest.raises(InvalidInput, match=r"^request 1: budget 10 exceeds the 4 visual tokens of the image"):
        engine.generate(reqs, spec)
    assert [r.visual_tokens for r in engine.generate(reqs[:1], spec)] == [12]


def test_a_multi_turn_chat_with_the_placeholder_in_its_text_is_refused_naming_the_message():
    # chats of several turns are templated by the replica (raw prompt): "<image>" typed in a turn was counted as
    # one more image by the processor ("Found total 2 <image> tokens and 1 images")
    from vlmguard.workers.engine_worker import EngineWorker, WorkItem

    worker = EngineWorker("random:llava", name="tiny-llava", engine=tiny_engine("llava"))
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
             {"role": "user", "content": [{"type": "text", "text": "And what does <image> mean in HTML?"}]}]
    item = WorkItem(prompt="", spec=GenerationSpec.build(max_new_tokens=2), images=[random_image(0)], messages=turns)
    out = worker.generate_many([item])[0]
    assert out["error"]["status"] == 400, out
    assert "messages[2] contains the model's image placeholder '<image>'" in out["error"]["message"]
    turns[2]["content"][0]["text"] = "And what colour is it?"
    assert "result" in worker.generate_many([item])[0]


@pytest.mark.parametrize("mode,values,expected", [
    ("I", [0, 32896, 65535], [0, 128, 255]),  # 16-bit values in a 32-bit image: scaled, not clipped to white
    ("I", [0, 100, 255], [0, 100, 255]),  # 8-bit values: as they are
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # fractions of white: scaled, not black
    ("F", [0.0, 100.0, 255.0], [0, 100, 255]),
])
def test_32_bit_images_are_read_by_their_value_range(mode, values, expected):
    import numpy as np
    from PIL import Image

    from vlmguard.images import check_image

    img = Image.fromarray(np.array([values] * 3, dtype=np.int32 if mode == "I" else np.float32), mode=mode)
    out = check_image(img.resize((30, 30), Image.NEAREST))
    assert out.mode == "RGB"
    row = np.asarray(out)[15]
    assert [int(row[x, 0]) for x in (0, 15, 29)] == expected


def test_32_bit_images_outside_the_known_ranges_are_refused():
    import numpy as np
    from PIL import Image

    from vlmguard.images import check_image

    img = Image.fromarray(np.full((8, 8), -5.0, dtype=np.float32), mode="F")
    with pytest.raises(InvalidInput, match=r"request 0 image 0 \(mode F\) holds values in \[-5, -5\].*8-bit RGB"):
        check_image(img, "request 0 image 0")
