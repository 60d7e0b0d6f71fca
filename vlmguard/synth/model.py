"""Configuration of the tiny LLaVA: CLIP-style ViT (CLS token, 96 px, 8 px patches = 144 visual tokens),
two-layer GELU projector, Llama decoder. Standard ``LlavaForConditionalGeneration``."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


@dataclass
class TinySize:
    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 5
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 3
    text_kv_heads: int = 3
    text_intermediate: int = 512
    max_positions: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_config(size: TinySize, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, image_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=size.image_size, patch_size=size.patch_size, projection_dim=size.vision_hidden,
                              hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
                       num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                       num_key_value_heads=size.text_kv_heads, max_position_embeddings=size.max_positions,
                       bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=True,
                       rms_norm_eps=1e-5)
    n_patches = (size.image_size // size.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=-2, image_seq_length=n_patches, tie_word_embeddings=True)
    cfg.pad_token_id = pad_id
    cfg.bos_token_id = bos_id
    cfg.eos_token_id = eos_id
    return cfg


def build_tiny_model(cfg: LlavaConfig) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id, do_sample=False, max_new_tokens=128)
    return model
