"""An audit of valid but unusual images through the engine's Python API and `vlmguard generate`, on the tiny
models of every family: extreme aspect ratios, images smaller than one patch, very large images, modes other
than RGB, EXIF-rotated JPEGs, animated GIFs, the same image twice, images of different sizes in one batch. Each
must give what transformers' own processor + model compute, the same in a batch as alone.

Defects found: transparent pixels (RGBA, LA; an alpha band) kept whatever colour they held, often black, where
transformers' processors composite them onto white, so such an image gave other tokens than transformers; a
premultiplied-alpha image (mode La) raised PIL's ValueError; an EXIF-rotated JPEG given as a file or data URL was
read sideways (transformers' load_image turns it upright; LLaVA-NeXT counted the tokens of the wrong shape); and
the text ``<|placeholder|>`` in a Qwen2-VL prompt with an image became image tokens in the fallback processor
("image features (4) and image tokens (5) do not match"); a data URL whose base64 payload is wrapped in lines
(``base64`` without -w0, Python's ``encodebytes``; browsers drop the whitespace) was "not valid base64"."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmguard.engine import Request
from vlmguard.models.base import Prompt
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
SPEC = GenerationSpec(max_new_tokens=3)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared 2-core machine


def hf_greedy(engine, images: list, n: int = 3) -> tuple[list[int], int]:
    """transformers' own processor and generate on ``images`` as given: (new token ids, image tokens)."""
    text = engine.adapter.format_prompt(Prompt("describe", images))
    inputs = engine.processor(images=images, text=[text], return_tensors="pt")
    out = engine.model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    n_image = int((inputs["input_ids"] == engine.adapter.image_token_id).sum())
    return out[0, inputs["input_ids"].shape[1]:].tolist(), n_image


def half_transparent(mode: str) -> Image.Image:
    """A 40x32 image whose left half is fully transparent (and black under the alpha)."""
    a = np.asarray(random_image(7, (40, 32)).convert("RGBA")).copy()
    a[:, :20] = 0
    return Image.fromarray(a, "RGBA").convert(mode)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_seen_as_transformers_processor_sees_them(family, mode):
    engine = tiny_engine(family)
    ours = engine.generate([Request("describe", [half_transparent(mode)])], SPEC)[0]
    assert (ours.token_ids, ours.visual_tokens) == hf_greedy(engine, [half_transparent(mode)])


def test_transparent_pixels_are_white_in_files_and_data_urls():
    from transformers.image_transforms import convert_to_rgb

    from vlmguard.images import check_image, image_from_data_url, image_to_data_url

    img = half_transparent("RGBA")
    url = image_to_data_url(img)  # a PNG keeping the alpha
    for out in (image_from_data_url(url), check_image(img)):
        assert out.mode == "RGB"
        assert np.array_equal(np.asarray(out), convert_to_rgb(img, return_numpy=True))
        assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_a_premultiplied_alpha_image_is_read():
    """Mode La raised PIL's 'conversion from La to L not supported' from the engine."""
    la = half_transparent("LA")
    premultiplied = la.convert("La")
    engine = tiny_engine("llava")
    ours = engine.generate([Request("describe", [premultiplied])], SPEC)[0]
    assert ours.token_ids == engine.generate([Request("describe", [la])], SPEC)[0].token_ids


def exif_rotated_jpeg(path) -> Image.Image:
    """Save a 64x32 image as a JPEG tagged 'rotate 90 degrees clockwise to view' (EXIF Orientation 6); return
    the upright image transformers reads from that file."""
    from transformers.image_utils import load_image as hf_load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    random_image(4, (64, 32)).save(path, format="JPEG", exif=exif)
    return hf_load_image(str(path))


def test_an_exif_rotated_jpeg_is_read_upright_as_transformers_reads_it(tmp_path):
    import base64

    from vlmguard.images import image_from_data_url, load_image

    upright = exif_rotated_jpeg(tmp_path / "phone.jpg")
    assert upright.size == (32, 64)
    ours = load_image(tmp_path / "phone.jpg")
    assert ours.size == (32, 64) and np.array_equal(np.asarray(ours), np.asarray(upright))
    raw = base64.b64encode((tmp_path / "phone.jpg").read_bytes()).decode()
    assert np.array_equal(np.asarray(image_from_data_url("data:image/jpeg;base64," + raw)), np.asarray(upright))


def test_generate_cli_reads_an_exif_rotated_jpeg_upright(capsys, tmp_path):
    """LLaVA-NeXT's token count depends on the shape: the sideways 64x32 image gave 52 visual tokens."""
    from vlmguard.cli import main

    upright = exif_rotated_jpeg(tmp_path / "phone.jpg")
    rc = main(["generate", "--model", "random:llava_next", "--image", str(tmp_path / "phone.jpg"), "--prompt",
               "describe", "--max-new-tokens", "3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    alone = tiny_engine("llava_next").generate([Request("describe", [upright])], SPEC)[0]
    assert alone.visual_tokens == 56
    assert (out["tokens"], out["visual_tokens"]) == (alone.token_ids, alone.visual_tokens)


def test_placeholder_text_in_a_qwen2_vl_prompt_is_plain_text():
    """'<|placeholder|>' in the prompt became image tokens: 'image features (4) and image tokens (5) do not
    match', naming no request."""
    engine = tiny_engine("qwen2_vl")
    req = Request("what is <|placeholder|> here", [random_image(0)])
    ours = engine.generate([req], SPEC)[0]
    assert ours.visual_tokens == 4
    text = engine.adapter.format_prompt(Prompt(req.prompt, req.images))
    ids = engine.processor(text=[text], images=req.images)["input_ids"][0].tolist()
    assert "<|placeholder|>" in engine.processor.tokenizer.decode(ids)


UNUSUAL = {
    "2000x20": lambda: random_image(1, (2000, 20)),
    "20x2000": lambda: random_image(2, (20, 2000)),
    "1x1": lambda: random_image(3, (1, 1)),
    "5x5": lambda: random_image(4, (5, 5)),
    "3000x2000": lambda: random_image(5, (3000, 2000)),
    "CMYK": lambda: random_image(6, (40, 32)).convert("CMYK"),
    "1-bit": lambda: random_image(6, (40, 32)).convert("1"),
    "P+transparency": lambda: _p_with_transparency(),
}


def _p_with_transparency() -> Image.Image:
    p = random_image(8, (40, 32)).convert("P", palette=Image.ADAPTIVE, colors=16)
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    return p


@pytest.mark.parametrize("family", FAMILIES)
def test_unusual_images_match_transformers_and_batch_as_alone(family):
    """Not defects (guards): thin, sub-patch, large and non-RGB images give transformers' tokens and token counts
    (LLaVA-NeXT's and Qwen2-VL's depend on the size), alone and in one batch with the same image twice in a
    request, under pruning counted on each image's own visual tokens."""
    engine = tiny_engine(family)
    for name, make in UNUSUAL.items():
        ours = engine.generate([Request("describe", [make()])], SPEC)[0]
        assert (ours.token_ids, ours.visual_tokens) == hf_greedy(engine, [make()]), name
    twice = random_image(9, (64, 40))
    reqs = [Request("describe", [make()]) for make in UNUSUAL.values()] + [Request("describe", [twice, twice])]
    spec = GenerationSpec(pruning="fastv", budget=0.5, max_new_tokens=3)
    batched = engine.generate(reqs, spec)
    for r, b in zip(reqs, batched):
        alone = engine.generate([r], spec)[0]
        assert (b.token_ids, b.visual_tokens, b.kept_indices) == (alone.token_ids, alone.visual_tokens,
                                                                   alone.kept_indices)
        assert b.visual_tokens_kept[-1] == max(1, round(b.visual_tokens * 0.5))  # each image's own count


def test_an_animated_gif_is_read_as_its_first_frame():
    import io

    from vlmguard.images import image_from_bytes

    buf = io.BytesIO()
    red, blue = Image.new("RGB", (40, 32), (255, 0, 0)), Image.new("RGB", (40, 32), (0, 0, 255))
    red.save(buf, format="GIF", save_all=True, append_images=[blue], duration=100)
    assert {tuple(c) for c in np.asarray(image_from_bytes(buf.getvalue())).reshape(-1, 3).tolist()} == {(255, 0, 0)}


def test_a_data_url_with_a_line_wrapped_payload_is_the_same_image():
    import base64
    import io

    from vlmguard.images import image_from_data_url

    buf = io.BytesIO()
    random_image(4, (40, 32)).save(buf, format="PNG")
    raw = buf.getvalue()
    flat = image_from_data_url("data:image/png;base64," + base64.b64encode(raw).decode())
    wrapped = image_from_data_url("data:image/png;base64," + base64.encodebytes(raw).decode())  # 76 columns
    assert "\n" in base64.encodebytes(raw).decode()
    assert np.array_equal(np.asarray(wrapped), np.asarray(flat))  # was: "payload is not valid base64"
