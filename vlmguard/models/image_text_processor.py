"""A minimal image+text processor for Qwen2-VL-style models when the full HF processor is unavailable.

transformers' ``Qwen2VLProcessor`` insists on a video processor, which needs torchvision; the CPU builds
of torch on our machines cannot load PyPI's torchvision. Image-only serving needs none of it: this class
applies the chat template, runs the (PIL-backend) image processor and expands each image placeholder to
``prod(grid_thw) / merge_size**2`` tokens, exactly as ``Qwen2VLProcessor.replace_image_token`` does.
``AutoProcessor`` is used instead whenever it loads.
"""
from __future__ import annotations

from typing import Any

from transformers import BatchFeature


class ImageTextProcessor:
    def __init__(self, tokenizer, image_processor, chat_template: str | None = None,
                 image_token: str = "<|image_pad|>"):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)

    def __call__(self, text: list[str] | str, images: list | None = None, return_tensors: str = "pt",
                 padding: bool = True, **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images:
            img = self.image_processor(images=images, return_tensors="pt")
            data.update(img)
            grid = img["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            counts = (grid.prod(-1) // merge).tolist()
            k = 0
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                out = parts[0]
                for p in parts[1:]:
                    if k >= len(counts):
                        raise ValueError("more image placeholders than images")
                    out += "<|placeholder|>" * counts[k] + p
                    k += 1
                expanded.append(out.replace("<|placeholder|>", self.image_token))
            if k != len(counts):
                raise ValueError(f"{len(counts)} images but {k} image placeholders in the text")
            texts = expanded
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding)
        data["input_ids"] = enc["input_ids"]
        data["attention_mask"] = enc["attention_mask"]
        data["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        return BatchFeature(data=data)

    def batch_decode(self, *args: Any, **kwargs: Any):
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_processor(path, trust_remote_code: bool = False):
    """AutoProcessor, falling back to ImageTextProcessor for Qwen2-VL without torchvision."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        return ImageTextProcessor(tok, ip)
