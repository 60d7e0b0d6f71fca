"""Images for the playground: the cached SynthCOCO test split, freshly rendered scenes, uploads."""
from __future__ import annotations

import io
import random
from functools import lru_cache
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_LISTED = 200


def synth_image_dir() -> Path:
    """The default SynthCOCO test images (built by ``vlmguard bench --dataset synthcoco`` and cached)."""
    from vlmguard.synth.build import default_dataset_dir

    return default_dataset_dir() / "images" / "test"


@lru_cache(maxsize=4)
def _listing(path: str, mtime_ns: int) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in Path(path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:MAX_LISTED])


def synth_sample_names() -> list[str]:
    """Up to :data:`MAX_LISTED` file names of the cached SynthCOCO test split (empty when not built yet)."""
    d = synth_image_dir()
    if not d.is_dir():
        return []
    return list(_listing(str(d), d.stat().st_mtime_ns))


def load_synth_sample(name: str) -> Image.Image:
    with Image.open(synth_image_dir() / Path(name).name) as im:
        return im.convert("RGB")


def render_synth_scene(seed: int) -> tuple[Image.Image, list[str]]:
    """A new SynthCOCO scene (deterministic per seed) and the names of its visible objects."""
    from vlmguard.synth.render import render_scene
    from vlmguard.synth.world import WorldParams, sample_scene

    params = WorldParams()
    scene = sample_scene(random.Random(seed), params)
    rendered = render_scene(scene, params)
    names = [o.category.name for o, vis in zip(scene.objects, rendered.visible) if vis]
    return rendered.image, sorted(set(names))


def load_upload(data: bytes) -> Image.Image:
    """An uploaded file as RGB (raises ``vlmguard.errors.BadImage``-style InvalidInput on garbage)."""
    from vlmguard.errors import InvalidInput

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:  # its message names an io.BytesIO object, which says nothing to the user
        raise InvalidInput("cannot read the uploaded image (not a PNG, JPEG, WebP or BMP file)") from None
    except Image.DecompressionBombError as e:  # not an OSError: a small file that decodes to too many pixels
        raise InvalidInput(f"cannot read the uploaded image ({e})") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read the uploaded image ({e})") from None
