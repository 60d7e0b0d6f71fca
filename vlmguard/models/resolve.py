"""Resolve a model reference to a local directory, offline.

* ``"tiny"`` -> the bundled SynthCOCO LLaVA in ``vlmguard/assets/tiny-llava/``;
* an existing local directory (with a ``config.json``) -> itself;
* a Hugging Face id (``org/name``, optional ``@revision``) -> its snapshot in the local HF cache,
  looked up with ``huggingface_hub`` and ``local_files_only=True`` (never downloads).

Anything else raises :class:`vlmguard.errors.ModelLoadError` with a message saying what was tried. A resolved
directory is checked cheaply (:func:`check_checkpoint`: JSON files, a supported model type, whole weight files)
so a broken copy is one line naming the file, not a traceback from safetensors or torch.
"""
from __future__ import annotations

import os
from pathlib import Path

from vlmguard.errors import ModelLoadError, first_line

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_DIR = ASSETS / "tiny-llava"
ALIASES = {"tiny": TINY_DIR, "tiny-llava": TINY_DIR, "vlmguard/tiny-llava": TINY_DIR}


def tiny_model_path() -> Path:
    return resolve_model_path("tiny")


def _check_dir(p: Path, ref: str) -> Path:
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model {ref!r}: directory {p} has no config.json (not a saved model)")
    check_checkpoint(p, ref)
    return p


# model types vlmguard has an adapter for (vlmguard.models.families.ADAPTERS; kept here so resolving a path
# does not import torch)
SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl")
# the small JSON files of a checkpoint that transformers reads (a broken one otherwise fails with a message
# that does not name the file)
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "preprocessor_config.json", "processor_config.json", "chat_template.json", "tokenizer.json",
              "added_tokens.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_json(f: Path, ref: str) -> object:
    import json

    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"model {ref!r}: {f} is not a text (UTF-8 JSON) file") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model {ref!r}: {f} is not valid JSON ({e.msg}: line {e.lineno}, "
                             f"column {e.colno})") from None


def check_checkpoint(path: str | os.PathLike, ref: str | None = None) -> None:
    """Cheap checks of a checkpoint directory before transformers reads it, so that each common way a copy goes
    wrong is one clear :class:`ModelLoadError` naming the file: broken JSON, a config of a model family vlmguard
    has no adapter for, safetensors files that are truncated or not safetensors at all, shards that the index
    lists but the directory lacks, truncated PyTorch ``.bin`` archives. Reads only headers (a few KB per weight
    file), never the weights."""
    root = Path(path)
    ref = str(path) if ref is None else ref
    parsed: dict[str, dict] = {}  # each small JSON file read once
    for name in JSON_FILES:
        if (root / name).is_file():
            data = _read_json(root / name, ref)
            if not isinstance(data, dict):
                raise ModelLoadError(f"model {ref!r}: {root / name} is not a JSON object")
            parsed[name] = data
    config = parsed["config.json"] if "config.json" in parsed else _read_json(root / "config.json", ref)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelLoadError(f"model {ref!r}: {root / 'config.json'} has no model_type (not a transformers "
                             "model config)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = config.get("architectures") or []
        what = f" ({', '.join(map(str, archs))})" if isinstance(archs, list) and archs else ""
        raise ModelLoadError(f"model {ref!r}: unsupported model type {model_type!r}{what}; vlmguard serves "
                             f"vision-language models of type {', '.join(SUPPORTED_MODEL_TYPES)}")
    for f in _weight_files(root, ref, parsed):  # the files transformers will read (stray ones are not checked)
        if not f.exists():  # a dangling link: an HF cache snapshot whose blob never finished downloading
            raise ModelLoadError(f"model {ref!r}: weight file {f} is a link to a missing file "
                                 f"({os.readlink(f) if f.is_symlink() else '?'}); an incomplete cache or copy?")
        if f.suffix == ".safetensors":
            _check_safetensors(f, ref)
        else:
            _check_torch_archive(f, ref)


def _weight_files(root: Path, ref: str, parsed: dict[str, dict]) -> list[Path]:
    """The weight files transformers loads from ``root``, chosen as it chooses: a single safetensors file, else
    the safetensors index's shards, else a single ``pytorch_model.bin``, else the ``.bin`` index's shards (a
    repo shipping both formats, copied with only one, keeps the other's index: it is not read). A shard an
    index lists but the directory lacks is an error."""
    for single, index_name in (("model.safetensors", "model.safetensors.index.json"),
                               ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (root / single).exists() or (root / single).is_symlink():
            return [root / single]
        index = root / index_name
        if index_name in parsed:  # (JSON_FILES: read and checked above)
            weight_map = parsed[index_name].get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"model {ref!r}: {index} has no weight_map")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [v for v in shards if not ((root / v).exists() or (root / v).is_symlink())]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise ModelLoadError(f"model {ref!r}: weight shard {root / missing[0]}{more} listed in {index_name} "
                                     "is missing (an interrupted copy or download?)")
            return [root / v for v in shards]
    return []


def _check_safetensors(f: Path, ref: str) -> None:
    """The file is a whole safetensors file: an 8-byte header length, a JSON header, and exactly the data the
    header's offsets cover (what the safetensors loader itself insists on)."""
    import json

    size = f.stat().st_size
    bad = f"model {ref!r}: weight file {f} is corrupt or incomplete"
    if size < 8:
        raise ModelLoadError(f"{bad} ({size} bytes; an interrupted copy or download?)")
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8 or n > 100_000_000:
            raise ModelLoadError(f"{bad} (not a safetensors file, or truncated in its header)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{bad} (its safetensors header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{bad} (its safetensors header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ModelLoadError(f"{bad} (tensor {key!r} has no valid data_offsets)") from None
    if 8 + n + end != size:
        raise ModelLoadError(f"{bad} ({size} bytes where its header describes {8 + n + end}"
                             f"{'; an interrupted copy or download?' if size < 8 + n + end else ''})")
    _check_safetensors_header(f, bad)


def _check_safetensors_header(f: Path, bad: str) -> None:
    """What safetensors itself checks when transformers opens the file (each tensor's dtype, and a shape that fits its
    data_offsets): reads the header only, and imports no torch."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # pragma: no cover - safetensors ships with transformers
        return
    try:
        with safe_open(str(f), framework="numpy"):
            pass
    except SafetensorError as e:
        raise ModelLoadError(f"{bad} ({first_line(e)})") from None


def _check_torch_archive(f: Path, ref: str) -> None:
    """A PyTorch ``.bin`` saved by ``torch.save`` (a zip archive) must have its central directory (a truncated
    copy lacks it); legacy pickle files (not zips) are left to torch."""
    import zipfile

    with open(f, "rb") as fh:
        magic = fh.read(4)
    if not magic:
        raise ModelLoadError(f"model {ref!r}: weight file {f} is empty")
    if magic.startswith(b"PK") and not zipfile.is_zipfile(f):
        raise ModelLoadError(f"model {ref!r}: weight file {f} is corrupt or incomplete (a truncated PyTorch "
                             "archive; an interrupted copy or download?)")


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
    if _looks_like_path(text):
        raise ModelLoadError(f"model {text!r}: no such directory {p.absolute()}")
    if repo_id.count("/") != 1:
        raise ModelLoadError(f"model {text!r}: not a local directory, not 'tiny', and not a Hugging Face id "
                             "of the form org/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelLoadError(f"model {text!r}: huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except IncompleteSnapshotError as e:  # cached, but a download was interrupted (its message names the files)
        raise ModelLoadError(f"model {text!r}: {first_line(e)}") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        cache = hub_cache()
        cached = _cached_revisions(cache, repo_id)
        if cached:  # no revision: the 'main' ref huggingface_hub looks for (a cache copied without refs/ lacks it)
            raise ModelLoadError(f"model {text!r}: revision {revision or 'main'!r} of {repo_id} is not in the local "
                                 f"Hugging Face cache ({cache}; cached: {', '.join(cached)}); downloads are disabled"
                                 ) from None
        raise ModelLoadError(f"model {text!r} is not in the local Hugging Face cache ({cache}); downloads are "
                             f"disabled, so copy it there or pass a local directory ({type(e).__name__})") from None
    return _check_dir(Path(path), text)


def _looks_like_path(text: str) -> bool:
    """A reference that can only mean a local directory (an HF id is exactly ``org/name[@revision]``)."""
    return (text.startswith((".", "/", "~")) or text.endswith(("/", os.sep)) or os.sep != "/" and os.sep in text
            or text.partition("@")[0].count("/") > 1)


def hub_cache() -> str:
    """The hub cache directory huggingface_hub looks in (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # pragma: no cover
        return os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"),
                                                              "hub")


def _cached_revisions(cache: str, repo_id: str) -> list[str]:
    """Branch/tag names and snapshot hashes cached for ``repo_id`` (empty when the repo is not cached at all)."""
    repo = Path(cache).expanduser() / ("models--" + repo_id.replace("/", "--"))
    refs, snaps = repo / "refs", repo / "snapshots"
    names = sorted(f.relative_to(refs).as_posix() for f in refs.rglob("*") if f.is_file()) if refs.is_dir() else []
    return names + (sorted(d.name for d in snaps.iterdir() if d.is_dir()) if snaps.is_dir() else [])


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
