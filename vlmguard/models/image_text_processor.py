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
                    out += self.image_token * counts[k] + p  # no stand-in token: the prompt may hold its text
                    k += 1
                expanded.append(out)
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


IMAGE_BACKEND = "pil"  # transformers' image-processor backend for every checkpoint (see load_processor)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
CHAT_TEMPLATE_HELP = ("chat_template.jinja, chat_template.json, or a chat_template entry in tokenizer_config.json "
                      "or processor_config.json")


def load_processor(path, trust_remote_code: bool = False):
    """AutoProcessor, falling back to ImageTextProcessor for Qwen2-VL without torchvision.

    A checkpoint without a tokenizer, an image processor or a chat template (vlmguard formats every prompt with
    the model's own template) is a :class:`ModelLoadError` naming what is missing, raised here rather than a
    transformers error at load time or at the first request."""
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from vlmguard.errors import ModelLoadError, first_line

    root = Path(path)
    if root.is_dir() and not trust_remote_code:  # remote code may keep its tokenizer under other names
        if not any((root / f).is_file() for f in TOKENIZER_FILES):
            raise ModelLoadError(f"model at {root} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                                 "copy the tokenizer files of the checkpoint into that directory")
        if not (root / "preprocessor_config.json").is_file() and "image_processor" not in _json_object(
                root / "processor_config.json"):
            raise ModelLoadError(f"model at {root} has no image processor config (preprocessor_config.json, or an "
                                 "image_processor entry in processor_config.json)")
    # transformers' PIL image backend whether or not torchvision is installed (where it is, transformers picks
    # its torchvision backend, which resizes differently): the same pixels on every machine, and the reference
    # implementations' preprocessing. A remote-code processor is left to its own choice.
    backend = {} if trust_remote_code else {"backend": IMAGE_BACKEND}
    try:
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                                      **backend)
        except (ImportError, AttributeError):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
            ip = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                                    **backend)
            processor = ImageTextProcessor(tok, ip, chat_template=_saved_chat_template(root))
    except ModelLoadError:
        raise
    except Exception as e:  # tokenizers/transformers raise many types; keep one line, the cause for VLMGUARD_DEBUG
        raise ModelLoadError(f"cannot load the processor (tokenizer / image processor) of the model at {root}: "
                             f"{first_line(e)}") from e
    template = chat_template_of(processor)
    if not template:
        raise ModelLoadError(f"model at {root} has no chat template ({CHAT_TEMPLATE_HELP}); vlmguard formats "
                             "prompts with the model's own template, so copy the checkpoint's template there")
    if not getattr(processor, "chat_template", None):
        # only in tokenizer_config.json: a transformers processor's apply_chat_template does not fall back to its
        # tokenizer's template, so it becomes the processor's own
        processor.chat_template = template
    return processor


def chat_template_of(processor) -> str | None:
    """The chat template ``processor.apply_chat_template`` would use (the processor's, else its tokenizer's)."""
    template = getattr(processor, "chat_template", None)
    if not template:
        template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    return template or None


def _json_object(f) -> dict:
    """A small JSON file's object, or {} when it is missing, unreadable or not an object (the checkpoint check
    names broken JSON files; here only what they hold is asked)."""
    import json

    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _saved_chat_template(root) -> str | None:
    """A processor-level chat template saved beside the checkpoint (chat_template.jinja, chat_template.json, or
    processor_config.json's chat_template), for the fallback processor: official Qwen2-VL repos keep theirs in
    chat_template.json, which the tokenizer alone does not read."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        template = _json_object(root / name).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None
