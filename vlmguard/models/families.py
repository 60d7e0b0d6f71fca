"""Adapters for the three supported families: LLaVA-1.5, LLaVA-NeXT (anyres) and Qwen2-VL (M-RoPE)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from vlmguard.models.base import EncodedBatch, ModelAdapter
from vlmguard.models.image_text_processor import chat_template_of
from vlmguard.models.vision_tower import is_clip_like, select_features

# LLaVA's conversation template "vicuna_v1" (haotian-liu/LLaVA llava/conversation.py, conv_vicuna_v1), which
# LLaVA-1.5's and LLaVA-NeXT-Vicuna's own evaluation (model_vqa_loader, --conv-mode vicuna_v1) puts before
# "USER: <image>\n... ASSISTANT:"
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
# what marks llava-hf's Vicuna chat template (llava-1.5-*-hf, llava-v1.6-vicuna-*-hf chat_template.json):
# roles rendered as message['role'].upper() + ': ', generation prompt 'ASSISTANT:', and no system text of its own
# (a system turn renders as its text + ' ', so passing vicuna_v1's gives exactly the reference prompt)
_HF_VICUNA_MARKS = ("message['role'].upper() + ': '", "'ASSISTANT:'")


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT with CLS token, MLP projector, Llama."""

    family = "llava"

    def default_system(self) -> str | None:
        """vicuna_v1's system prompt under llava-hf's Vicuna template, which (unlike LLaVA's own evaluation) leaves
        it out; other templates (llava-v1.6-mistral's [INST], whose reference system is empty, or a model's own
        template such as vlmguard's synthetic models') are left as they are."""
        template = chat_template_of(self.processor) or ""
        if all(m in template for m in _HF_VICUNA_MARKS) and "A chat between" not in template:
            return VICUNA_V1_SYSTEM
        return None

    @property
    def vision_feature_layer(self) -> int | list[int]:
        return self.config.vision_feature_layer

    @property
    def vision_feature_select_strategy(self) -> str:
        return self.config.vision_feature_select_strategy

    def selected_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The vision features LLaVA projects, from only the tower layers they need (None: not a CLIP
        tower, use transformers' ``get_image_features``)."""
        if not is_clip_like(self.vision_tower):
            return None
        return select_features(self.vision_tower, pixel_values, self.vision_feature_layer,
                               self.vision_feature_select_strategy)

    def encode_images(self, batch: EncodedBatch) -> Any:
        pv = batch.vision_inputs["pixel_values"].to(self.model.device, self.model.dtype)
        selected = self.selected_features(pv)
        if selected is not None:
            return list(self.project(selected))
        out = self.model.model.get_image_features(
            pixel_values=pv,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output

    def project(self, selected: torch.Tensor) -> torch.Tensor:
        """Vision hidden states (already layer-selected, CLS dropped) -> LLM embedding space."""
        return self.model.model.multi_modal_projector(selected)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres crops, unpadding, image_newline tokens."""

    family = "llava_next"

    def crops(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[int]]:
        """The batch's anyres crops as one (crops, C, H, W) tensor on the model's device and dtype, and how
        many crops each image has (the processor pads every image to the largest count)."""
        pv = batch.vision_inputs["pixel_values"]
        n_crops = self.crops_per_image(batch)
        if pv.dim() == 5:
            pv = torch.cat([p[:n] for p, n in zip(pv, n_crops)], dim=0)
        return pv.to(self.model.device, self.model.dtype), n_crops

    def vision_work(self, batch: EncodedBatch) -> dict[str, list[int]]:
        """Each image's anyres crops, its tower passes (unpadding and newline tokens hide them in the visual
        tokens)."""
        return {"vision_crops": self.crops_per_image(batch)}

    def crops_per_image(self, batch: EncodedBatch) -> list[int]:
        """How many anyres crops (vision tower passes) each image of the batch has: base crop + grid."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=self.config.vision_config.image_size)
                for s in batch.vision_inputs["image_sizes"]]

    def encode_images(self, batch: EncodedBatch) -> Any:
        model = self.model.model
        sizes = batch.vision_inputs["image_sizes"]
        crops, n_crops = self.crops(batch)
        selected = self.selected_features(crops)
        if selected is not None:  # the steps of get_image_features after the tower
            per_image = torch.split(self.project(selected), n_crops, dim=0)
            packed, _ = model.pack_image_features(per_image, sizes,
                                                  vision_feature_select_strategy=self.vision_feature_select_strategy,
                                                  image_newline=model.image_newline)
            return packed
        out = model.get_image_features(
            pixel_values=crops,
            image_sizes=sizes,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`): native-resolution ViT with 2x2 merge, M-RoPE."""

    family = "qwen2_vl"

    @property
    def vision_tower(self):
        return self.model.model.visual

    def attention_module(self, layer_idx: int):
        return self.layers[layer_idx].self_attn

    def image_pixels(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """Per image, its rows of the flattened patch tensor (T * H * W patches each)."""
        return list(torch.split(batch.vision_inputs["pixel_values"], self.patches_per_image(batch), dim=0))

    def vision_work(self, batch: EncodedBatch) -> dict[str, list[int]]:
        """Each image's raw patches: the tower attends within each image, so images of different sizes are no even
        split of a request's total."""
        return {"vision_patches": self.patches_per_image(batch)}

    def patches_per_image(self, batch: EncodedBatch) -> list[int]:
        """Raw (unmerged) patches of each image of the batch, in the order of ``rows_with_images``."""
        return [int(t * h * w) for t, h, w in batch.vision_inputs["image_grid_thw"].tolist()]

    def encode_images(self, batch: EncodedBatch) -> Any:
        return self.encode_pixels(batch.vision_inputs["pixel_values"], batch.vision_inputs["image_grid_thw"])

    def vision_subset(self, batch: EncodedBatch, images: Sequence[int]) -> dict[str, Any] | None:
        """Qwen2-VL's pixel values are every image's patch rows in one (patches, D) tensor: take these images'."""
        pixels = list(torch.split(batch.vision_inputs["pixel_values"], self.patches_per_image(batch), dim=0))
        grid = batch.vision_inputs["image_grid_thw"]
        rest = {k: v for k, v in batch.vision_inputs.items() if k not in ("pixel_values", "image_grid_thw")}
        index = torch.tensor(list(images), dtype=torch.long, device=grid.device)
        return {**rest, "pixel_values": torch.cat([pixels[j] for j in images], dim=0),
                "image_grid_thw": grid.index_select(0, index)}

    def encode_pixels(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Any:
        """The merged tokens of the images whose patch rows and grids these are (the tower's own output)."""
        out = self.model.model.get_image_features(pixel_values.to(self.model.device),
                                                  grid_thw.to(self.model.device), return_dict=True)
        return out.pooler_output

    def positions(self, batch: EncodedBatch) -> torch.Tensor:
        if not batch.rows_with_images:
            pos = super().positions(batch)
            return pos[None].expand(3, -1, -1).contiguous()
        mm = batch.vision_inputs.get("mm_token_type_ids")
        if mm is None:
            mm = batch.image_token_mask.int()
        pos, _ = self.model.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=mm,
            image_grid_thw=batch.vision_inputs.get("image_grid_thw"),
            attention_mask=batch.attention_mask.long(),
        )
        return pos.masked_fill(~batch.attention_mask[None], 0)

    def image_grid(self, n_tokens: int) -> tuple[int, int] | None:
        return None  # native resolution: grids come from image_grid_thw

    def grid_side(self) -> int | None:
        return None  # native resolution: each image's grid follows its size


ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
}


def adapter_for(model, processor) -> ModelAdapter:
    from vlmguard.errors import ModelLoadError

    model_type = getattr(model.config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise ModelLoadError(
            f"unsupported model type {model_type!r}; vlmguard supports {', '.join(sorted(ADAPTERS))}"
        )
    adapter = cls(model, processor)
    if not adapter.num_layers:
        raise ModelLoadError(f"the {model_type} model has no decoder layers (its text_config.num_hidden_layers is "
                             f"{getattr(adapter.text_config, 'num_hidden_layers', None)!r})")
    feature_layer = getattr(adapter, "vision_feature_layer", None)
    depth = getattr(getattr(adapter.vision_tower, "config", None), "num_hidden_layers", None)
    if feature_layer is not None and isinstance(depth, int):
        wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        if not wanted or any(not isinstance(i, int) or not -(depth + 1) <= i <= depth for i in wanted):
            raise ModelLoadError(f"vision_feature_layer {feature_layer!r} selects no hidden state of the "
                                 f"{depth}-layer vision tower (indices -{depth + 1}..{depth})")
    return adapter
