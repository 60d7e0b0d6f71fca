"""Weights quantized as they load (bitsandbytes), so that a model too large for a GPU in 16 bits fits.

``QUANTIZATIONS`` maps each ``quantization`` name (``Engine.load``, ``vlmguard generate --quantization``, a
served model's ``quantization``) to its transformers ``BitsAndBytesConfig``:

* ``none``      the weights in the engine's dtype;
* ``bnb-int8``  LLM.int8(): 8-bit weights, with the activations' outlier columns computed in 16 bits (Dettmers
                et al., 2022);
* ``bnb-nf4``   4-bit NormalFloat with double quantization (QLoRA; Dettmers et al., 2023), computed in the
                engine's dtype.

**What is quantized: the language model's linear layers only** (our choice; the LLaVA repository's own 4-bit loader
leaves its CLIP tower unquantized too). The vision tower, the projector and ``lm_head`` keep the engine's dtype:
FlowCut scores the vision tower's own attention and values, VISTA and the decoders read ``lm_head``'s logits, and
together they are a few percent of a 7B model's weights. Every pruner and decoder runs unchanged on a quantized
model: they read attention scores, hidden states and logits, never a layer's weights.

A checkpoint saved already quantized (its ``config.json`` has a ``quantization_config``, e.g. a ``*-bnb-4bit``
upload) loads as it was saved; asking for another quantization of it is an error. Adding a bitsandbytes variant
is one entry in ``QUANTIZATIONS``.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmguard.errors import InvalidInput, ModelLoadError

if TYPE_CHECKING:
    import torch

NONE = "none"


@dataclass(frozen=True)
class BnbQuantization:
    """A bitsandbytes setting: ``bits`` 8 (LLM.int8()) or 4 (``quant_type``, double quantization)."""

    bits: int
    quant_type: str = "nf4"

    def config(self, compute_dtype: torch.dtype, skip: list[str]) -> Any:
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)


QUANTIZATIONS = {"bnb-int8": BnbQuantization(8), "bnb-nf4": BnbQuantization(4, "nf4")}
CHOICES = (NONE, *QUANTIZATIONS)

# the modules left in the engine's dtype, per model type (transformers' module names: a name matches from the
# start up to a dot)
KEEP_UNQUANTIZED = {
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "llava_next": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "qwen2_vl": ["model.visual", "lm_head"],
}
PACKAGES = ("bitsandbytes", "accelerate")


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise InvalidInput(f"unknown quantization {name!r} (use {', '.join(CHOICES)})", param="quantization")
    return name


def checkpoint_quantization(config: Any) -> str | None:
    """How a checkpoint was saved quantized (its config's ``quantization_config``), as this module names it when
    it can (``bnb-nf4``, ``bnb-int8``), else the method's own name; None when it was not."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return "bnb-int8"
        if qc.get("load_in_4bit"):
            return "bnb-nf4" if qc.get("bnb_4bit_quant_type", "fp4") == "nf4" else "bnb-fp4"
    return str(qc.get("quant_method", "unknown"))


def load_kwargs(name: str, *, model_type: str, compute_dtype: torch.dtype, device: torch.device,
                saved: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a model of ``model_type`` quantized as ``name`` onto
    ``device`` ({} for ``none`` on a checkpoint saved unquantized). ``saved``: the checkpoint's own quantization
    (:func:`checkpoint_quantization`)."""
    check_name(name)
    if saved is not None and name not in (NONE, saved):
        raise InvalidInput(f"the checkpoint is saved quantized ({saved}); it loads only as it was saved, not as "
                           f"{name} (leave quantization at {NONE})", param="quantization")
    if name == NONE and saved is None:
        return {}
    # another method's checkpoint (AWQ, GPTQ, ...) needs its own packages too: transformers names them
    needs = PACKAGES if name != NONE or saved.startswith("bnb-") else ("accelerate",)
    missing = [p for p in needs if importlib.util.find_spec(p) is None]
    what = name if name != NONE else f"this checkpoint ({saved})"
    if missing:
        raise ModelLoadError(f"quantization {what} needs {' and '.join(missing)}: pip install 'vlmguard[quant]'")
    if device.type not in ("cuda", "cpu", "xpu"):
        raise InvalidInput(f"bitsandbytes quantization runs on CUDA, XPU or the CPU, not on {device.type}",
                           param="quantization")
    _quiet_bitsandbytes()
    if device.type != "cpu" and device.index is None:  # accelerate places on a numbered device
        import torch

        device = torch.device(device.type, getattr(torch, device.type).current_device())
    kwargs: dict[str, Any] = {"device_map": {"": device}}  # quantized as the weights are placed (accelerate)
    if saved is None:  # (a checkpoint saved quantized carries its own config)
        kwargs["quantization_config"] = QUANTIZATIONS[name].config(compute_dtype, KEEP_UNQUANTIZED[model_type])
    return kwargs


CPU_4BIT_BLOCK = 32  # bitsandbytes' CPU 4-bit kernel (AVX-512 BF16) packs output features in blocks of 32


def check_cpu_layout(model: Any) -> None:
    """A 4-bit model on a CPU whose bitsandbytes kernel packs weights in blocks (``support_avx512bf16_for_cpu``) fails
    at its first forward with an assertion if a layer's output width is not a multiple of the block: say so now, in
    one line, instead."""
    for name, module in model.named_modules():
        out = getattr(module, "out_features", None)
        if (getattr(module, "support_avx512bf16_for_cpu", False) and out is not None
                and out % CPU_4BIT_BLOCK and module.weight.device.type == "cpu"):
            raise InvalidInput(f"4-bit weights on this CPU need every quantized layer's output width to be a multiple "
                               f"of {CPU_4BIT_BLOCK} (bitsandbytes' AVX-512 BF16 kernel); {name} has {out}. Use "
                               f"bnb-int8, or a GPU", param="quantization")


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def _quiet_bitsandbytes() -> None:
    """Drop two bitsandbytes log lines that say nothing a user can act on (idempotent): LLM.int8()'s note that
    float32 inputs are cast to float16, logged at *every* layer call on the CPU, and, on a CPU with AVX-512 BF16,
    the failed download of an optional kernel, which asks for a package that is installed."""
    # (bitsandbytes 0.47 warned instead of logging the first one)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
    for name, start in (("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
                        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(start))
