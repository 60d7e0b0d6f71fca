"""Building the extra views of a request that decoders contrast against.

- ``image_free_prompt``: the same templated prompt with every image placeholder removed and nothing else
  changed (M3ID's unconditioned input, VISTA's P-): system text, question and the newline that followed
  the image stay; the result is passed as a raw prompt so the template is not re-applied.
- ``diffusion_noise``: VCD's forward-diffusion noise (1000-step sigmoid schedule).
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch
from PIL import Image

from vlmguard.models.base import Prompt


def image_placeholders(adapter) -> list[str]:
    """Token strings that stand for images in a templated prompt (before processor expansion)."""
    tok = adapter.tokenizer
    ids = [adapter.image_token_id]
    for name in ("vision_start_token_id", "vision_end_token_id"):
        tid = getattr(adapter.config, name, None)
        if tid is not None:
            ids.append(int(tid))
    out = []
    for tid in ids:
        s = tok.convert_ids_to_tokens(tid)
        if isinstance(s, str) and s:
            out.append(s)
    # longest first, so composite markers go before their parts
    return sorted(set(out), key=len, reverse=True)


def image_free_prompt(adapter, prompt: Prompt) -> Prompt:
    """The prompt as the model would see it, minus every image placeholder (raw, no images)."""
    text = adapter.format_prompt(prompt)
    for ph in image_placeholders(adapter):
        text = text.replace(ph, "")
    return Prompt(text=text, images=[], system=None, raw=True)


# ---- VCD noise ---------------------------------------------------------------------------------
DIFFUSION_STEPS = 1000


@lru_cache(maxsize=1)
def _alpha_bar_table() -> torch.Tensor:
    u = torch.linspace(-6.0, 6.0, DIFFUSION_STEPS, dtype=torch.float64)
    betas = 1e-5 + (5e-3 - 1e-5) * torch.sigmoid(u)
    return torch.cumprod(1.0 - betas, dim=0)


def noise_coefficients(step: int) -> tuple[float, float]:
    """(sqrt(alpha_bar_T), sqrt(1 - alpha_bar_T)) of the forward process at ``step`` (0..999)."""
    if not 0 <= step < DIFFUSION_STEPS:
        raise ValueError(f"noise step must be in [0, {DIFFUSION_STEPS - 1}], got {step}")
    ab = float(_alpha_bar_table()[step])
    return math.sqrt(ab), math.sqrt(1.0 - ab)


def diffusion_noise(v: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """v' = sqrt(ab) v + sqrt(1 - ab) eps, float32, no clamping (vcd.md section 4)."""
    a, b = noise_coefficients(step)
    eps = torch.randn(v.shape, generator=generator, dtype=torch.float32)
    return a * v.float() + b * eps


def image_seed(image: Image.Image, seed: int, index: int = 0) -> int:
    """A per-image seed from the pixels and the user seed: reproducible and batch-independent."""
    h = hashlib.sha256()
    h.update(f"{seed}:{index}:{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)
