"""Random-weight models with the shapes of real LVLM checkpoints, for timing (never downloaded).

Speed does not depend on weight values, so prefill/decode timings of every pruning and decoding method
can be measured on realistic token counts and depths with random weights. ``SHAPES`` lists:

* ``llava-1.5-7b``   CLIP ViT-L/14 at 336 px (576 visual tokens, 24 layers) + Llama-2-7B (32 x 4096, 32 heads)
* ``llava-next-7b``  the same towers with LLaVA-NeXT anyres (5 grid pinpoints, up to 5 x 576 tokens)
* ``qwen2-vl-7b``    Qwen2-VL ViT (depth 32 x 1280, 2x2 merger) + Qwen2-7B (28 x 3584, GQA 28/4, M-RoPE)
* ``*-cpu``          the same depths, image sizes and visual-token counts with widths divided, so that a
                     2-core CPU prefill of one image takes seconds.

Configs are JSON files in ``vlmguard/configs/shapes/``. Processors are assembled locally: the bundled tiny
model's word-level tokenizer (plus the family's special tokens) with the family's image processor set to
the real sizes, so ``processor(images=..., text=...)`` gives valid inputs for the model.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, processors

from vlmguard.errors import InvalidInput

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "shapes"
BASE_SHAPES = ("llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b")

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The checkpoints' own chat templates (llava-hf/llava-1.5-7b-hf and llava-v1.6-vicuna-7b-hf chat_template.json;
# Qwen/Qwen2-VL-7B-Instruct chat_template.json, with its default system turn), so a shape sees the real prompt
LLAVA_HF_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _deep_update(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@lru_cache(maxsize=None)
def _load_specs() -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for name in BASE_SHAPES:
        specs[name] = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    scaled = json.loads((CONFIG_DIR / "scaled.json").read_text())
    for name, upd in scaled.items():
        if name == "comment":
            continue
        base = specs[upd["base"]]
        spec = copy.deepcopy(base)
        spec["name"] = name
        spec["source"] = f"{base['source']}; widths scaled for CPU (same depths and token counts)"
        for part in ("vision_config", "text_config"):
            if part in upd:
                spec["config"][part] = _deep_update(spec["config"][part], upd[part])
        specs[name] = spec
    return specs


SHAPES: tuple[str, ...] = tuple(sorted(_load_specs()))


def shape_spec(name: str) -> dict[str, Any]:
    specs = _load_specs()
    if name not in specs:
        raise InvalidInput(f"unknown model shape {name!r} (known: {', '.join(sorted(specs))})")
    return copy.deepcopy(specs[name])


def _base_tokenizer() -> Tokenizer:
    """The bundled tiny model's tokenizer; if it is absent, the same recipe on the fixed base corpus."""
    from vlmguard.synth.processor import train_tokenizer

    path = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava" / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else train_tokenizer([])


def _llava_processor(spec: dict, family: str):
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlmguard.synth.processor import CLIP_MEAN, CLIP_STD, IMAGE, wrap_tokenizer

    p = spec["processor"]
    s = p["image_size"]
    common = dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=CLIP_MEAN,
                  image_std=CLIP_STD, do_convert_rgb=True)
    tok = wrap_tokenizer(_base_tokenizer(), model_max_length=32768)
    tok.chat_template = LLAVA_HF_VICUNA_TEMPLATE
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**common), tokenizer=tok,
                              patch_size=p["patch_size"],
                              vision_feature_select_strategy=p["vision_feature_select_strategy"],
                              chat_template=LLAVA_HF_VICUNA_TEMPLATE, image_token=IMAGE,
                              num_additional_image_tokens=p["num_additional_image_tokens"])
    ip = LlavaNextImageProcessorPil(image_grid_pinpoints=p["image_grid_pinpoints"], **common)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=p["patch_size"],
                              vision_feature_select_strategy=p["vision_feature_select_strategy"],
                              chat_template=LLAVA_HF_VICUNA_TEMPLATE, image_token=IMAGE,
                              num_additional_image_tokens=p["num_additional_image_tokens"])


def _qwen_processor(spec: dict):
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmguard.synth.processor import BOS, PAD, UNK

    raw = _base_tokenizer()
    raw.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # Qwen2 adds no BOS
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token="<|im_end|>", unk_token=UNK,
                                  pad_token=PAD, padding_side="left", model_max_length=32768,
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    p = spec["processor"]
    ip = Qwen2VLImageProcessorPil(min_pixels=p["min_pixels"], max_pixels=p["max_pixels"], patch_size=p["patch_size"],
                                  merge_size=p["merge_size"], temporal_patch_size=p["temporal_patch_size"])
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor()  # needs torchvision
    except ImportError:
        return _image_only_qwen_processor_class()(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=video, chat_template=QWEN_CHAT_TEMPLATE)


@lru_cache(maxsize=1)
def _image_only_qwen_processor_class():
    """Qwen2VLProcessor without the video processor (which needs torchvision, absent on CPU installs)."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.video_processor = None

    return Qwen2VLImageOnlyProcessor


def build_processor(name: str):
    """The locally assembled processor of shape ``name`` (no model weights)."""
    spec = shape_spec(name)
    if spec["family"] == "qwen2_vl":
        return _qwen_processor(spec)
    return _llava_processor(spec, spec["family"])


def build_config(name: str, processor=None):
    """The HF config of shape ``name``, with special-token ids matched to the local processor's tokenizer."""
    from transformers import AutoConfig

    spec = shape_spec(name)
    processor = processor or build_processor(name)
    tok = processor.tokenizer
    cfg = dict(spec["config"])
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg["text_config"] = {**cfg["text_config"], **ids}
    if spec["family"] == "qwen2_vl":
        for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                           ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
            cfg[key] = tok.convert_tokens_to_ids(token)
    else:
        cfg["image_token_id"] = tok.convert_tokens_to_ids("<image>")
        cfg["pad_token_id"] = tok.pad_token_id
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = spec["config"].get("architectures")
    return config


def build_shape(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0):
    """``(model, processor)`` for shape ``name``: random weights (seeded) in ``dtype`` on ``device``, eval mode."""
    from transformers import (GenerationConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    spec = shape_spec(name)
    processor = build_processor(name)
    config = build_config(name, processor)
    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
           "qwen2_vl": Qwen2VLForConditionalGeneration}[spec["family"]]
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.config.name_or_path = f"vlmguard-shape:{name}"
    return model, processor
