"""Tiny randomly initialised models of each supported family, with real processors, built offline.

Used by the test suite (and handy for method developers): every adapter, pruner and decoder is exercised
on these through exactly the transformers classes used for real checkpoints.
"""
from __future__ import annotations

import string
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% elif message['role'] == 'assistant' %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ("a an the is there in image dog cat car person yes no of on with and red blue green what color "
         "describe this picture photo table kitchen street USER ASSISTANT user assistant system").split()


def make_tokenizer(extra_special: list[str], words: Sequence[str] = WORDS):
    """A small word-piece-free tokenizer: whole words from ``words``, else single characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_special]
    vocab: dict[str, int] = {}
    for t in specials + list(words) + list(string.ascii_letters + string.digits + string.punctuation) + ["\n", " "]:
        vocab.setdefault(t, len(vocab))
    for w in words:
        vocab.setdefault(" " + w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # whole known words (with their leading space), else single characters
    known = "|".join(sorted(words, key=len, reverse=True))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(rf" ?(?:{known})\b|[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=extra_special)
    tok.padding_side = "left"
    return tok


def _llava_parts(image_size: int, patch: int, vision_layers: int, text_layers: int, hidden: int, vocab: int,
                 context: int = 512):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=context, tie_word_embeddings=False)
    return vision, text


def tiny_llava(seed: int = 0, attn: str = "sdpa", text_layers: int = 4, context: int = 512):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor

    tok = make_tokenizer(["<image>"])
    vision, text = _llava_parts(32, 8, 3, text_layers, 64, len(tok), context)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE, image_token="<image>")
    model.set_attn_implementation(attn)
    return model, proc


def tiny_llava_next(seed: int = 0, attn: str = "sdpa", context: int = 512):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil as LlavaNextImageProcessor,
    )

    tok = make_tokenizer(["<image>"])
    vision, text = _llava_parts(32, 8, 3, 4, 64, len(tok), context)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE, image_token="<image>")
    model.set_attn_implementation(attn)
    return model, proc


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa", vision_depth: int = 2, max_side: int = 64,
                  context: int = 512):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmguard.models.image_text_processor import ImageTextProcessor

    specials = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>",
                "<|im_end|>"]
    tok = make_tokenizer(specials)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=vision_depth, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                  max_pixels=max_side * max_side)
    proc = ImageTextProcessor(tok, ip, chat_template=QWEN_TEMPLATE)
    model.set_attn_implementation(attn)
    return model, proc


FAMILIES = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl}


def random_family(model: str):
    """The builder of a ``random:FAMILY`` model name (a tiny random-weight model of the family), or a
    :class:`ModelLoadError` naming the families there are."""
    from vlmguard.errors import ModelLoadError

    family = model.split(":", 1)[1]
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown family {family!r} in {model!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[family]


def random_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@lru_cache(maxsize=8)
def tiny_engine(family: str = "llava", attn: str = "sdpa", seed: int = 0, context: int = 512):
    """A tiny random-weight engine of ``family``; ``context``: its LLM's context in tokens (RoPE: the weights are
    the same for any)."""
    from vlmguard.engine import Engine

    model, proc = FAMILIES[family](seed=seed, attn=attn, context=context)
    return Engine(model, proc, name=f"tiny-{family}")
