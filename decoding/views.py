"""Building the extra views of a request that decoders contrast against.

- ``image_free_prompt``: the same templated prompt with every image placeholder id removed and nothing else
  changed (M3ID's unconditioned input, VISTA's P-): system text, question and the newline that followed
  the image stay. The placeholders go from the token ids, not the text (m3id.md 5: "work on ids"), so the
  tokens on either side of the image are the request's own.
- ``diffusion_noise``: VCD's forward-diffusion noise (1000-step sigmoid schedule).
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch
from PIL import Image

from vlmguard.models.base import Prompt


def image_free_prompt(adapter, prompt: Prompt) -> Prompt:
    """The prompt as the model would see it, encoded without its images and with the ids of every image placeholder
    deleted (``Prompt.strip_image_tokens``): the request's ids minus the image span, no pixel values. A prompt given
    as token ids has no image: its view is those ids."""
    if prompt.token_ids is not None:
        return Prompt(text=prompt.text, raw=True, token_ids=list(prompt.token_ids))
    return Prompt(text=adapter.format_prompt(prompt), images=[], system=None, raw=True, strip_image_tokens=True)


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
