"""Image intake with clear errors: files, bytes, data URLs. Shared by the CLI, the API and benchmarks."""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmguard.errors import InvalidInput, first_line

MAX_PIXELS = int(os.environ.get("VLMGUARD_MAX_IMAGE_PIXELS", 25_000_000))
# longest side / shortest side: processors that resize the shortest side to the model's size blow a thin strip up
# (a 20000x1 image took 2 GB under VCD on the tiny LLaVA); Qwen2-VL's processor refuses more than 200 itself
MAX_ASPECT_RATIO = 200
SUPPORTED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}


def image_from_bytes(data: bytes, what: str = "image") -> Image.Image:
    if not data:
        raise InvalidInput(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            w, h = probe.size
    except UnidentifiedImageError:
        raise InvalidInput(f"{what} is not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"{what} cannot be decoded: {e}") from None
    if fmt not in SUPPORTED_FORMATS:
        raise InvalidInput(f"{what} has unsupported format {fmt} (supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
    if w < 1 or h < 1:
        raise InvalidInput(f"{what} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InvalidInput(f"{what} is too large: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the {MAX_PIXELS / 1e6:.0f} MP limit")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        # upright as a viewer shows it (a phone's JPEG is stored sideways with an EXIF Orientation tag), as
        # transformers' load_image reads files and URLs
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"{what} cannot be decoded: {e}") from None
    return to_rgb(img, what)


def to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """The image as 8-bit RGB. 16-bit grayscale (PNG, TIFF: modes I;16*) is scaled from 0..65535 to 0..255:
    PIL's own ``convert`` clips it at 255 instead (a 16-bit image turns almost white). The 32-bit modes are read
    by their values: integers (I) within 0..255 as they are, within 0..65535 as 16-bit; floats (F) within 0..1
    as fractions of white, within 0..255 as they are; other ranges are refused rather than clipped. Transparent
    pixels (an alpha band, or a transparent colour: P, L, RGB with ``transparency``) are composited onto white,
    as transformers' processors do (``convert_to_rgb``): PIL's ``convert`` drops the alpha, showing whatever
    colour the transparent pixels hold, often black."""
    if img.mode.startswith("I;16"):
        return _gray8(np.asarray(img).astype(np.float32) / 257.0)
    if img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and img.mode == "F" and hi <= 1:
            return _gray8(a * 255)
        if lo >= 0 and hi <= 255:
            return _gray8(a)
        if lo >= 0 and img.mode == "I" and hi <= 65535:
            return _gray8(a / 257.0)
        raise InvalidInput(f"{what} (mode {img.mode}) holds values in [{lo:g}, {hi:g}], which is no 8-bit, 16-bit or "
                           "0..1 range: convert it to 8-bit RGB first")
    if img.mode == "La":  # premultiplied; PIL converts it to LA only
        img = img.convert("LA")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _gray8(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(values).astype(np.uint8)).convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise InvalidInput(f"image file not found: {p}")
    if p.is_dir():
        raise InvalidInput(f"image path is a directory: {p}")
    return image_from_bytes(p.read_bytes(), what=f"image {p}")


_ASCII_WHITESPACE = str.maketrans("", "", " \t\n\f\r")


def image_from_data_url(url: str) -> Image.Image:
    if not url.startswith("data:"):
        raise InvalidInput("expected a data URL (data:image/...;base64,...)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise InvalidInput("data URL must be base64-encoded")
    try:
        # ASCII whitespace is dropped first, as browsers decode data URLs (WHATWG's forgiving-base64): a payload
        # wrapped at 76 columns (`base64` without -w0, Python's encodebytes) is the same image
        data = base64.b64decode(payload.translate(_ASCII_WHITESPACE), validate=True)
    except (ValueError, base64.binascii.Error):
        raise InvalidInput("data URL payload is not valid base64") from None
    return image_from_bytes(data, what="image data URL")


def image_to_data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def check_image(img: object, what: str = "image") -> Image.Image:
    if not isinstance(img, Image.Image):
        raise InvalidInput(f"{what} must be a PIL image, got {type(img).__name__}")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidInput(f"{what} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InvalidInput(f"{what} is too large: {w}x{h} exceeds the {MAX_PIXELS / 1e6:.0f} MP limit")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise InvalidInput(f"{what} is too thin: {w}x{h}, an aspect ratio over {MAX_ASPECT_RATIO}:1")
    try:  # a closed image, or one opened lazily from a file since closed, truncated or gone
        img.load()
    except (OSError, ValueError, EOFError) as e:
        raise InvalidInput(f"{what} cannot be read: {first_line(e)}") from None
    return img if img.mode == "RGB" else to_rgb(img, what)


LOW_DETAIL_SIDE = 512  # OpenAI's image detail "low": the model is shown the image within a 512 x 512 box


def low_detail(img: Image.Image) -> Image.Image:
    """``img`` fitted within ``LOW_DETAIL_SIDE`` x ``LOW_DETAIL_SIDE``, its aspect kept (a smaller one as it is):
    what an image part with ``detail: "low"`` is read as. A model whose visual tokens grow with the image (Qwen2-VL)
    is then fed fewer of them; LLaVA-1.5 fits every image to 336 px, and LLaVA-NeXT picks the tile grid with the
    largest effective resolution, which a 512-px image mostly still fills (672 x 672 for 4:3; a 16:9 one drops from
    672 x 672 to 336 x 672), so for them it mostly lowers the resolution only."""
    scale = LOW_DETAIL_SIDE / max(img.size)
    if scale >= 1:
        return img
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


# GenerationSpec.image_aspect "reference" by model family, for a config that does not say (ModelAdapter.image_aspect):
# LLaVA-1.5 pads (image_aspect_ratio: pad in llava-v1.5-7b's config.json, which llava-hf's conversion leaves out);
# LLaVA-NeXT's anyres tiles the whole image itself and Qwen2-VL reads it at its own resolution
REFERENCE_IMAGE_ASPECT = {"llava": "pad", "llava_next": "native", "qwen2_vl": "native"}


def pad_to_square(img: Image.Image, background: tuple[int, int, int], max_pixels: int | None = None) -> Image.Image:
    """``img`` centred on a square of its longer side filled with ``background`` (LLaVA's ``expand2square``, which
    LLaVA-1.5 trains and evaluates with, ``image_aspect_ratio: pad``; transformers' ``LlavaImageProcessor`` with
    ``do_pad``): the processor's resize and centre crop then keep the whole image. A square image is returned
    as it is. A square over ``max_pixels`` (default ``MAX_PIXELS``; a 25 MP strip of 200:1 would make a 5 GP
    square) is made of the image scaled down first (bicubic), so that it fits: the processor scales it down to
    a few hundred pixels anyway."""
    w, h = img.size
    if w == h:
        return img
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if max(w, h) ** 2 > limit:
        scale = (limit ** 0.5) / max(w, h)
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out
