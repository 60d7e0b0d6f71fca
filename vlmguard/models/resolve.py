"""Resolve a model reference to a local directory, offline.

* ``"tiny"`` -> the bundled SynthCOCO LLaVA in ``vlmguard/assets/tiny-llava/``;
* an existing local directory (with a ``config.json``) -> itself;
* a Hugging Face id (``org/name``, optional ``@revision``) -> its snapshot in the local HF cache,
  looked up with ``huggingface_hub`` and ``local_files_only=True`` (never downloads).

Anything else raises :class:`vlmguard.errors.ModelLoadError` with a message saying what was tried.
"""
from __future__ import annotations

import os
from pathlib import Path

from vlmguard.errors import ModelLoadError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_DIR = ASSETS / "tiny-llava"
ALIASES = {"tiny": TINY_DIR, "tiny-llava": TINY_DIR, "vlmguard/tiny-llava": TINY_DIR}


def tiny_model_path() -> Path:
    return resolve_model_path("tiny")


def _check_dir(p: Path, ref: str) -> Path:
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model {ref!r}: directory {p} has no config.json (not a saved model)")
    return p


def resolve_model_path(ref: str | os.PathLike) -> Path:
    """The local directory holding model ``ref`` (see module docstring); never touches the network."""
    text = str(ref).strip()
    if not text:
        raise ModelLoadError("empty model reference")
    if text in ALIASES:
        p = ALIASES[text]
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"the bundled tiny model is missing from {p}; train it with "
                                 "`vlmguard synth build` + `vlmguard synth train` (see MODEL_CARD.md)")
        return p
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model {text!r}: {p} is a file, expected a model directory")
        return _check_dir(p.resolve(), text)
    repo_id, _, revision = text.partition("@")
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {text!r}: not a local directory, not 'tiny', and not a Hugging Face id "
                             "of the form org/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelLoadError(f"model {text!r}: huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelLoadError(f"model {text!r} is not in the local Hugging Face cache ({cache}); downloads are "
                             f"disabled, so copy it there or pass a local directory ({type(e).__name__})") from None
    return _check_dir(Path(path), text)


def weights_fingerprint(path: str | os.PathLike, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A short, cheap identity of a checkpoint directory's weights: SHA-256 over config.json and, per weight
    file, its name, size, the safetensors header and ``samples`` evenly spaced chunks of its bytes. Reads about
    1 MB per file whatever the model size, and changes when a model is retrained (results databases key their
    runs by it, so samples of two different models with one name never mix)."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    cfg = root / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors" and size >= 8:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 24)))
            for k in range(samples):  # first and last chunk included
                fh.seek(max(size - chunk, 0) * k // max(samples - 1, 1))
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]
