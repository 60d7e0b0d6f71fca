"""Images are preprocessed with transformers' PIL backend on every machine. Where torchvision is installed (most
GPU machines) transformers picks its torchvision backend by default, which resizes differently, so the bundled
model (trained on PIL-processed images) and every benchmark figure would move with the environment. A
checkpoint's processor is asked for the PIL backend, and the processors vlmguard builds itself are the PIL
classes."""
from __future__ import annotations

import pytest
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmguard.models import image_text_processor
from vlmguard.models.image_text_processor import load_processor
from vlmguard.models.shapes import build_processor
from vlmguard.synth.processor import image_processor

BUNDLED = image_text_processor.__file__.rsplit("/models/", 1)[0] + "/assets/tiny-llava"


def _record(monkeypatch, cls_name: str, fail: bool = False) -> list[dict]:
    import transformers

    calls: list[dict] = []
    cls = getattr(transformers, cls_name)
    real = cls.from_pretrained.__func__

    def spy(klass, *args, **kwargs):
        calls.append(kwargs)
        if fail:
            raise ImportError("Qwen2VLVideoProcessor requires torchvision")
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_a_checkpoints_processor_is_asked_for_the_pil_backend(monkeypatch):
    calls = _record(monkeypatch, "AutoProcessor")
    proc = load_processor(BUNDLED)
    assert [c.get("backend") for c in calls] == ["pil"]
    assert isinstance(proc.image_processor, CLIPImageProcessorPil)


def test_the_image_only_fallback_asks_for_it_too(monkeypatch):
    _record(monkeypatch, "AutoProcessor", fail=True)  # Qwen2-VL's processor without torchvision
    calls = _record(monkeypatch, "AutoImageProcessor")
    proc = load_processor(BUNDLED)
    assert [c.get("backend") for c in calls] == ["pil"]
    assert isinstance(proc.image_processor, CLIPImageProcessorPil)


def test_remote_code_processors_choose_for_themselves(monkeypatch):
    calls = _record(monkeypatch, "AutoProcessor")
    load_processor(BUNDLED, trust_remote_code=True)
    assert "backend" not in calls[0]


@pytest.mark.parametrize("shape,cls", [("llava-1.5-7b-cpu", CLIPImageProcessorPil),
                                       ("llava-next-7b", LlavaNextImageProcessorPil),
                                       ("qwen2-vl-7b", Qwen2VLImageProcessorPil)])
def test_built_processors_are_the_pil_classes(shape, cls):
    assert type(build_processor(shape).image_processor) is cls
    assert type(image_processor()) is CLIPImageProcessorPil  # what `vlmguard synth train` saves with a model
