"""The model-family interface: everything the engine needs to know about one LVLM family.

An adapter turns requests into model inputs with the family's own processor and chat template, locates
visual tokens from the input ids (never hard-coded offsets), runs the vision tower + projector, builds the
LLM's input sequence (embeddings with image features scattered in, RoPE positions, visual indices) and
exposes the language model's pieces (embedding, decoder layers, rotary embedding, final norm, lm_head)
so the engine can drive prefill layer by layer (for LLM-side pruning) and decode with its own cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from vlmguard.errors import InvalidInput, ModelLoadError
from vlmguard.images import REFERENCE_IMAGE_ASPECT
from vlmguard.models.image_text_processor import CHAT_TEMPLATE_HELP, chat_template_of
from vlmguard.models.lm_head import HeadLayout
from vlmguard.sequence import Seq


@dataclass
class Prompt:
    """One row to encode: user text plus 0..n images (a request or one of a decoder's branches)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    system: str | None = None
    raw: bool = False  # text is already templated and contains the image placeholders
    # a raw prompt encoded without images whose placeholders (image token, Qwen2-VL's vision start / end) are
    # deleted from its token ids, not from its text: the ids are those of the prompt with its images minus the
    # image span (M3ID's and VISTA's image-free views, m3id.md 5). Re-tokenizing the text without the placeholders
    # could merge the pieces on either side of them into other tokens.
    strip_image_tokens: bool = False
    # a prompt given as token ids (``Request.prompt_token_ids``): encoded as exactly these (no image; ``text`` is
    # their decoded text, for what reads the prompt's words)
    token_ids: list[int] | None = None


# processor outputs with one entry per token, laid out like the ids (0 = text)
PER_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


@dataclass
class EncodedBatch:
    """Processor output for a batch of prompts (left-padded)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    image_token_mask: torch.Tensor  # (B, L) bool
    vision_inputs: dict[str, Any]  # pixel_values, image_sizes / image_grid_thw, ...
    rows_with_images: list[int]  # batch rows that carry images, in the order of the vision batch
    extra: dict[str, Any] = field(default_factory=dict)


def decodable_ids(tokenizer: Any) -> int | None:
    """1 + the largest id the tokenizer knows (its length, or past it where an added token's id leaves a gap);
    None when it does not say."""
    if not hasattr(tokenizer, "__len__"):
        return None
    added = getattr(tokenizer, "get_added_vocab", None)
    top = max(added().values(), default=-1) if callable(added) else -1
    return max(len(tokenizer), top + 1)


class ModelAdapter:
    """Base class; subclasses implement one model family."""

    family: str = "base"

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = model.config
        self.text_config = model.config.get_text_config()
        # ids the tokenizer can decode; checkpoints pad the output layer beyond them (llava-hf 1.5: 32064 rows for
        # 32002 tokens, Qwen2-VL ~280 unused ids), and those rows must never be chosen: see logits()
        self.n_tokens = decodable_ids(self.tokenizer)
        self.head_layout = HeadLayout()  # the lm_head's product on few CPU rows (vlmguard/models/lm_head.py)

    # ---- language-model pieces -------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the lm_head over the ids the tokenizer has (the padding rows of a larger output layer are
        cut off, as serving engines do: an id the tokenizer cannot decode would be an empty piece of text)."""
        out = self.head_layout(self.lm_head, hidden).float()
        n = self.n_tokens
        return out[..., :n].contiguous() if n is not None and n < out.shape[-1] else out

    @property
    def logits_width(self) -> int:
        """How many token ids ``logits`` scores: the ids a logit bias may name."""
        rows = int(self.lm_head.weight.shape[0])
        return rows if self.n_tokens is None else min(rows, self.n_tokens)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def attention_module(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, positions)

    @property
    def context_length(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 4096))

    @property
    def image_token_id(self) -> int:
        tid = getattr(self.config, "image_token_id", None)
        if tid is None:
            tid = getattr(self.config, "image_token_index")
        return int(tid)

    @property
    def image_placeholder(self) -> str | None:
        """The text of the image token in a prompt (``<image>``, Qwen2-VL's ``<|image_pad|>``), None when unknown."""
        text = getattr(self.processor, "image_token", None)
        if not isinstance(text, str) or not text:
            try:
                text = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            except (AttributeError, TypeError, ValueError, IndexError):
                return None
        return text if isinstance(text, str) and text else None

    @property
    def image_placeholder_ids(self) -> list[int]:
        """Every token id that stands for an image in a templated prompt: the image token and, where the family has
        them, the markers around it (Qwen2-VL's vision start / end)."""
        ids = [self.image_token_id]
        for name in ("vision_start_token_id", "vision_end_token_id"):
            tid = getattr(self.config, name, None)
            if tid is not None:
                ids.append(int(tid))
        return ids

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        gc = getattr(self.model, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            ids.extend(src if isinstance(src, (list, tuple)) else [src])
        return sorted(set(int(i) for i in ids))

    @property
    def pad_token_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None)
        if pid is None:
            eos = self.eos_token_ids
            pid = eos[0] if eos else 0
        return int(pid)

    # ---- prompts ---------------------------------------------------------------------------
    def default_system(self) -> str | None:
        """The system text the family's reference evaluation sends when a request names none (None: whatever the
        model's own chat template does, e.g. Qwen2-VL's template adds its default system turn itself)."""
        return None

    def template_system(self) -> str | None:
        """The system text the model's chat template writes itself when a conversation has no system turn (Qwen2-VL:
        "You are a helpful assistant."), read off the template: a conversation without a system turn renders as
        one whose system turn holds that text. None when the template writes none (or no text fits)."""
        mark = "\x00system\x00"
        user = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        try:
            bare = self._apply_chat_template([user])
            marked = self._apply_chat_template([{"role": "system", "content": [{"type": "text", "text": mark}]},
                                                user])
        except (InvalidInput, ModelLoadError):
            return None
        if marked.count(mark) != 1:
            return None
        before, after = marked.split(mark)
        if not (bare.startswith(before) and bare.endswith(after)) or len(bare) < len(before) + len(after):
            return None
        return bare[len(before):len(bare) - len(after)] or None

    def image_aspect(self, requested: str) -> str:
        """``"pad"`` or ``"native"`` for a request's ``GenerationSpec.image_aspect``. ``"reference"`` is what the
        family's reference code does: a config's LLaVA-style ``image_aspect_ratio`` when it has one (``pad`` pads;
        ``square``, ``anyres`` and the rest leave images to the processor), else the family's
        (``images.REFERENCE_IMAGE_ASPECT``)."""
        if requested != "reference":
            return requested
        declared = getattr(self.config, "image_aspect_ratio", None)
        if isinstance(declared, str):
            return "pad" if declared == "pad" else "native"
        return REFERENCE_IMAGE_ASPECT.get(self.family, "native")

    def pad_colour(self) -> tuple[int, int, int]:
        """What a padded image is filled with: the image processor's mean colour in 0..255, as LLaVA pads (black
        when the processor names no mean)."""
        mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None)
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if not isinstance(mean, (list, tuple)) or len(mean) != 3:
            return (0, 0, 0)
        return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]

    def format_prompt(self, prompt: Prompt) -> str:
        if prompt.raw:
            return prompt.text
        content: list[dict[str, Any]] = [{"type": "image"} for _ in prompt.images]
        content.append({"type": "text", "text": prompt.text})
        messages = []
        system = prompt.system if prompt.system is not None else self.default_system()
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append({"role": "user", "content": content})
        return self._apply_chat_template(messages)

    def format_messages(self, messages: Sequence[dict[str, Any]]) -> str:
        """A conversation (chat-template messages, images as ``{"type": "image"}`` parts) as the model's prompt,
        ready for the answer: without a system turn it gets the family's default system text first, as a
        one-message request does (:meth:`format_prompt`)."""
        system = self.default_system()
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]
        return self._apply_chat_template(list(messages))

    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The model's own chat template; a conversation the template refuses (say, roles that must alternate)
        is the request's error."""
        from jinja2 import TemplateError

        if not chat_template_of(self.processor):
            raise ModelLoadError(f"the model's processor has no chat template ({CHAT_TEMPLATE_HELP}); "
                                 "vlmguard formats prompts with the model's own template")
        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            raise InvalidInput(f"the model's chat template refuses these messages: {e}", param="messages") from None

    def adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS in front of every text it encodes (Llama: yes; Qwen2: none)."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            return False
        try:
            ids = tok("a")["input_ids"]
        except (TypeError, ValueError, KeyError):
            return False
        return bool(ids) and ids[0] == bos

    def encode(self, prompts: Sequence[Prompt]) -> EncodedBatch:
        texts = [self.format_prompt(p) for p in prompts]
        bos = getattr(self.tokenizer, "bos_token", None)
        if isinstance(bos, str) and bos and any(t.startswith(bos) for t in texts) and self.adds_bos():
            # a template or raw prompt that writes BOS itself: the tokenizer adds one too, so drop the written one
            # (transformers' apply_chat_template(tokenize=True) turns add_special_tokens off for the same reason)
            texts = [t[len(bos):] if t.startswith(bos) else t for t in texts]
        given = {i: (torch.tensor(p.token_ids, dtype=torch.long) if p.token_ids is not None
                     else self._ids_without_images(texts[i]))
                 for i, p in enumerate(prompts) if p.strip_image_tokens or p.token_ids is not None}
        if not given:
            return self._process(texts, prompts)
        if any(prompts[i].images for i in given):
            raise ValueError("a prompt given as token ids or with its image tokens stripped is encoded without images")
        others = [i for i in range(len(prompts)) if i not in given]
        part = self._process([texts[i] for i in others], [prompts[i] for i in others]) if others else None
        return self._with_rows(part, others, given)

    def _process(self, texts: list[str], prompts: Sequence[Prompt]) -> EncodedBatch:
        """The family's processor on templated texts and the prompts' images, left-padded."""
        images = [img for p in prompts for img in p.images]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        tok = self.tokenizer
        old_side = getattr(tok, "padding_side", "left")
        tok.padding_side = "left"
        try:
            out = self.processor(**kwargs)
        except (ValueError, TypeError, OSError) as e:
            raise InvalidInput(f"the processor rejected the input: {e}") from None
        finally:
            tok.padding_side = old_side
        input_ids = out["input_ids"]
        attention_mask = out["attention_mask"].bool()
        vision = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        rows = [i for i, p in enumerate(prompts) for _ in p.images]
        return EncodedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_token_mask=(input_ids == self.image_token_id) & attention_mask,
            vision_inputs=vision,
            rows_with_images=rows,
        )

    def _ids_without_images(self, text: str) -> torch.Tensor:
        """The token ids of a templated text, as the processor tokenizes it, minus every image placeholder id.

        The processor only repeats a placeholder before it tokenizes, and a tokenizer splits its input at special
        tokens first, so these are the ids of the same prompt with its images minus the image span."""
        ids = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
        return ids[~torch.isin(ids, torch.tensor(self.image_placeholder_ids))]

    def _with_rows(self, part: EncodedBatch | None, at: list[int], extra: dict[int, torch.Tensor]) -> EncodedBatch:
        """``part`` (rows ``at`` of the whole batch) with the text-only rows ``extra`` (row -> ids) put in their
        places, every row left-padded to the longest. A per-token input of the processor (``PER_TOKEN_INPUTS``) is 0
        on the added rows and on the new padding."""
        n = len(at) + len(extra)
        width = max([len(x) for x in extra.values()] + ([part.input_ids.shape[1]] if part is not None else []))
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.bool)
        vision: dict[str, Any] = {}
        per_token: list[str] = []
        if part is not None:
            shape = tuple(part.input_ids.shape)
            for key, value in part.vision_inputs.items():
                if key in PER_TOKEN_INPUTS and torch.is_tensor(value) and tuple(value.shape) == shape:
                    per_token.append(key)
                    vision[key] = value.new_zeros((n, width))
                else:
                    vision[key] = value
            w = shape[1]
            index = torch.tensor(at, dtype=torch.long)
            input_ids[index, width - w:] = part.input_ids
            attention_mask[index, width - w:] = part.attention_mask
            for key in per_token:
                vision[key][index, width - w:] = part.vision_inputs[key]
        for row, ids in extra.items():
            input_ids[row, width - len(ids):] = ids
            attention_mask[row, width - len(ids):] = True
        return EncodedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_token_mask=(input_ids == self.image_token_id) & attention_mask,
            vision_inputs=vision,
            rows_with_images=[at[r] for r in part.rows_with_images] if part is not None else [],
        )

    # ---- vision ----------------------------------------------------------------------------
    def image_pixels(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """Per image of the batch (the order of ``rows_with_images``), a view of its processed pixel values
        (LLaVA: (C, H, W); LLaVA-NeXT: all its crops), for transforms in the processor's output space."""
        return list(batch.vision_inputs["pixel_values"].unbind(0))

    def encode_images(self, batch: EncodedBatch) -> Any:
        """Run vision tower + projector; return the family's raw feature output (list or tensor)."""
        raise NotImplementedError

    def image_features(self, batch: EncodedBatch, same_as: dict[int, int] | None = None,
                       known: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Projected visual tokens per batch row, each (V_row, D) or None for rows without images.

        ``same_as``: rows whose images are those of another row (row -> that row, which is not itself in
        ``same_as``): the tower runs on the other row's images only and the row gets its features (a decoder's
        branch rows with the request's own image: LQCD's, IAVA's, M3ID's ``mask``). ``known``: rows whose features
        are given (the prefix cache's, of the same images): the tower does not run on their images."""
        if not batch.rows_with_images:
            return [None] * batch.input_ids.shape[0]
        known = known or {}
        same_as = {row: src for row, src in (same_as or {}).items() if row not in known}
        skip = set(same_as) | set(known)
        shared: dict[int, int] = {}
        rows = batch.input_ids.shape[0]
        if skip:
            rest = self.without_images(batch, skip)
            if rest is None:  # inputs laid out in a way it does not know: every row its own pass
                skip = set()
            else:
                shared = same_as
                batch = rest
        if batch.rows_with_images:
            feats = self.encode_images(batch)
            flat = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
            out = self.split_by_row(batch, flat)
        else:  # every row's features are known
            out = [None] * rows
        for row in skip & set(known):
            out[row] = known[row]
        for row, src in shared.items():
            out[row] = out[src]
        return out

    def without_images(self, batch: EncodedBatch, rows) -> EncodedBatch | None:
        """``batch`` with the images of these rows taken out (their image tokens no longer marked, their vision
        inputs dropped), for a tower pass over the other rows' images; None when the adapter cannot cut its vision
        inputs (``vision_subset``)."""
        rows = set(rows)
        images = [j for j, row in enumerate(batch.rows_with_images) if row not in rows]
        subset = self.vision_subset(batch, images) if images else {}
        if subset is None:
            return None
        mask = batch.image_token_mask.clone()
        mask[sorted(rows)] = False
        return replace(batch, image_token_mask=mask, vision_inputs=subset,
                       rows_with_images=[batch.rows_with_images[j] for j in images])

    def vision_subset(self, batch: EncodedBatch, images: Sequence[int]) -> dict[str, Any] | None:
        """The batch's vision inputs for only these of its images (indices in the order of ``rows_with_images``):
        every input with one entry per image (pixel values, image sizes) indexed; None when an input has no entry
        per image (a processor's output this adapter does not know how to cut)."""
        n = len(batch.rows_with_images)
        index = torch.tensor(list(images), dtype=torch.long)
        out: dict[str, Any] = {}
        for key, value in batch.vision_inputs.items():
            if torch.is_tensor(value) and value.dim() and value.shape[0] == n:
                out[key] = value.index_select(0, index.to(value.device))
            elif isinstance(value, (list, tuple)) and len(value) == n:
                out[key] = [value[j] for j in images]
            else:
                return None
        return out

    @staticmethod
    def split_by_row(batch: EncodedBatch, flat: torch.Tensor) -> list[torch.Tensor | None]:
        counts = batch.image_token_mask.sum(dim=1).tolist()
        if sum(counts) != flat.shape[0]:
            raise InvalidInput(f"image features ({flat.shape[0]}) and image tokens ({sum(counts)}) do not match")
        out: list[torch.Tensor | None] = []
        start = 0
        for c in counts:
            out.append(flat[start:start + c] if c else None)
            start += c
        return out

    def positions(self, batch: EncodedBatch) -> torch.Tensor:
        """RoPE positions of the full (unpruned) batch: (B, L) or (3, B, L)."""
        pos = batch.attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0).masked_fill(~batch.attention_mask, 0)

    def build_sequence(self, batch: EncodedBatch, features: list[torch.Tensor | None] | None,
                       dtype: torch.dtype, device: torch.device) -> Seq:
        """Embeddings with image features scattered into the image-token positions."""
        input_ids = batch.input_ids.to(device)
        embeds = self.embed_tokens(input_ids)
        mask = batch.image_token_mask.to(device)
        visual = torch.full_like(input_ids, -1)
        features = [f for f in (features or []) if f is not None]
        if features:
            flat = torch.cat(features, dim=0).to(device=device, dtype=embeds.dtype)
            n_tokens = int(mask.sum())
            if n_tokens != flat.shape[0]:
                raise InvalidInput(
                    f"image features ({flat.shape[0]}) and image tokens ({n_tokens}) do not match"
                )
            embeds = embeds.masked_scatter(mask[..., None], flat)
            # visual index restarts for every request (all images of a row count together)
            visual = torch.where(mask, mask.long().cumsum(dim=1) - 1, visual)
        elif bool(mask.any()):
            raise InvalidInput("the prompt contains image tokens but no image was given")
        return Seq(hidden=embeds.to(dtype), valid=batch.attention_mask.to(device),
                   positions=self.positions(batch).to(device), visual=visual)

    # ---- vision tower access for vision-side pruners ---------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vision_work(self, batch: EncodedBatch) -> dict[str, list[int]]:
        """Per image of the batch (the order of ``rows_with_images``), what the FLOP count of its vision tower needs
        and cannot tell from its visual tokens, by report key (``flops.result_flops`` reads it). None here."""
        return {}

    def grid_side(self) -> int | None:
        """Visual tokens per side of one image's grid (LLaVA-NeXT: its base grid, before the crops), None where it
        follows the image (Qwen2-VL) or is not known."""
        vc = getattr(self.config, "vision_config", None)
        size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
        return size // patch if isinstance(size, int) and isinstance(patch, int) and patch > 0 else None

    def image_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """(rows, cols) of the visual token grid for one image/crop, when it is square."""
        side = int(round(n_tokens ** 0.5))
        return (side, side) if side * side == n_tokens else None
