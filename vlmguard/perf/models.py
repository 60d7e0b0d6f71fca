"""Engines and inputs for benchmarks: real-shape random-weight models, tiny test models, trained models.

``--shape`` accepts a name known to :mod:`vlmguard.models.shapes` (``llava-1.5-7b``, ``llava-1.5-7b-cpu``,
``llava-next-7b``, ``qwen2-vl-7b`` ...), ``random:<family>`` (the tiny random test models) or any model
``Engine.load`` accepts (``tiny``, a local path).
"""
from __future__ import annotations

import importlib
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from PIL import Image

from vlmguard.errors import InvalidInput
from vlmguard.results import Request


def known_shapes() -> list[str]:
    try:
        shapes = importlib.import_module("vlmguard.models.shapes")
    except ModuleNotFoundError:
        return []
    for attr in ("SHAPES", "SHAPE_NAMES"):
        names = getattr(shapes, attr, None)
        if names:
            return sorted(names)
    return []


def check_shape(shape: str) -> str:
    """What ``shape`` names: "model" (random:FAMILY, tiny, a local path) or "shape" (a named real-checkpoint shape);
    InvalidInput listing the known shapes for anything else (checked before any model work)."""
    if shape.startswith("random:") or shape == "tiny" or "/" in shape:
        return "model"
    names = known_shapes()
    if shape not in names:
        hint = f" (known shapes: {', '.join(names)})" if names else " (vlmguard.models.shapes is not available)"
        raise InvalidInput(f"unknown shape {shape!r}{hint}; or use random:llava, random:llava_next, "
                           "random:qwen2_vl, tiny or a local model path")
    return "shape"


def load_engine(shape: str, *, device: str = "auto", dtype: str = "auto", attn: str = "auto",
                seed: int = 0, quantization: str = "none") -> Any:
    """An Engine for ``shape`` (see module doc). ``quantization`` (``Engine.load``'s): a benchmark shape is saved to
    a temporary directory and loaded from there, quantized as it loads."""
    from vlmguard.attention import choose_attention, register_attention_functions
    from vlmguard.engine import Engine, pick_device, pick_dtype

    if check_shape(shape) != "shape":
        return Engine.load(shape, device=device, dtype=dtype, attn_implementation=attn, quantization=quantization)
    if quantization != "none":
        with servable_model(shape, device=device, dtype=dtype, seed=seed) as path:
            engine = Engine.load(path, device=device, dtype=dtype, attn_implementation=attn,
                                 quantization=quantization)
        engine.model_name = shape
    else:
        from vlmguard.models.shapes import build_shape

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        register_attention_functions()
        model, processor = build_shape(shape, dtype=dt, device=dev, seed=seed)
        engine = Engine(model, processor, name=shape, attn_implementation=choose_attention(attn, dev, dt))
    # the shape's output layer is the real checkpoint's vocabulary (not scaled), its tokenizer a small stand-in:
    # decoders and the sampler work on every id, as they do on the real model (ModelAdapter.logits would cut
    # them to the stand-in's ~100 ids and time a vocabulary-wide combine 300x too small)
    engine.adapter.n_tokens = None
    return engine


@contextmanager
def servable_model(shape: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0) -> Iterator[str]:
    """What a service's replicas load for ``--shape``: the name itself, or, for a benchmark shape (built in this
    process, unknown to ``Engine.load``), the random-weight model saved to a temporary directory for the length
    of the run (its weights in ``dtype``; removed afterwards). Loaded from there, the shape's output layer keeps
    the real vocabulary but decoders work on the stand-in tokenizer's ids, as with any local model."""
    if shape not in known_shapes():
        yield shape
        return
    from vlmguard.engine import pick_device, pick_dtype
    from vlmguard.models.shapes import build_shape

    dt = pick_dtype(dtype, pick_device(device))
    with tempfile.TemporaryDirectory(prefix=f"vlmguard-{shape}-") as tmp:
        model, processor = build_shape(shape, dtype=dt, device="cpu", seed=seed)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        del model
        yield tmp


def bench_image(engine: Any, seed: int) -> Image.Image:
    """A random RGB image at the vision tower's native resolution (LLaVA-NeXT: 2x, for several crops)."""
    from vlmguard.testing import random_image

    vc = getattr(engine.model.config, "vision_config", None)
    size = int(getattr(vc, "image_size", 0) or 0)
    if engine.family == "llava_next":
        size = size * 2 if size else 672
    elif engine.family == "qwen2_vl" or not size:
        size = 448 if not engine.model_name.startswith(("random:", "tiny")) else 64
    return random_image(seed, (size, size))


PROMPT = "Describe this image in detail. What objects are there, and what color is each one?"


def bench_encoding(engine: Any) -> Any:
    """The engine's encoding of one benchmark request (:data:`PROMPT` and ``bench_image(engine, 0)``): how many
    visual tokens and tower passes a request of this shape has."""
    from vlmguard.models.base import Prompt

    return engine.adapter.encode([Prompt(text=PROMPT, images=[bench_image(engine, 0)])])


def bench_requests(engine: Any, batch: int, seed: int = 0, prompt: str = PROMPT) -> list[Request]:
    return [Request(prompt=prompt, images=[bench_image(engine, seed + i)]) for i in range(batch)]


def warm_threads() -> None:
    """Touch the intra-op pool once so the first timed run does not pay for thread start-up."""
    torch.ones(64, 64) @ torch.ones(64, 64)
