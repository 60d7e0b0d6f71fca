"""``vlmguard env``: what this machine offers vlmguard, for a bug report or before serving a model.

The versions that decide behaviour (Python, torch, transformers, Ray), the accelerator (CUDA, its GPUs, their memory
and bfloat16 support), which optional paths can run (FlashAttention-2, quantized weights), CHAIR's offline NLTK data,
the bundled model and the SynthCOCO cache, and the models of a supported family in the local Hugging Face cache:
what ``--model`` can load here without a download. Nothing is downloaded or loaded.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any


def register(sub) -> None:
    p = sub.add_parser("env", help="what this machine offers: versions, GPUs, optional paths, cached models")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=run)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        with torch.cuda.device(i):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        out.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "bfloat16": bf16})
    return out


def cached_models(cache: str | os.PathLike) -> list[dict[str, Any]]:
    """The models of a supported family in a Hugging Face hub cache: per repo, its cached revisions (refs and
    snapshots) whose ``config.json`` names a supported model type."""
    from vlmguard.engine import MODEL_CLASSES

    root = Path(cache).expanduser()
    found = []
    for repo in sorted(root.glob("models--*")) if root.is_dir() else []:
        refs = {f.read_text().strip(): f.relative_to(repo / "refs").as_posix()  # (pull requests: refs/pr/N)
                for f in sorted((repo / "refs").rglob("*")) if f.is_file()}
        for snap in sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []:
            try:
                model_type = json.loads((snap / "config.json").read_text()).get("model_type")
            except (OSError, ValueError, AttributeError):
                continue
            if model_type in MODEL_CLASSES:
                found.append({"model": repo.name.removeprefix("models--").replace("--", "/"),
                              "revision": refs.get(snap.name, snap.name), "model_type": model_type})
    return found


def environment() -> dict[str, Any]:
    import torch

    from vlmguard import __version__
    from vlmguard.attention import flash_attention_available
    from vlmguard.decoding import DECODERS
    from vlmguard.pruning import PRUNERS
    from vlmguard.registry import plugin_modules
    from vlmguard.bench.nltk_setup import nltk_data_dir, tagger_installed, wordnet_installed
    from vlmguard.models.quantization import PACKAGES
    from vlmguard.models.resolve import hub_cache, tiny_model_path
    from vlmguard.synth.build import default_dataset_dir

    cache = hub_cache()
    synth = default_dataset_dir()
    return {
        "vlmguard": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None, "gpus": _gpus(),
        **{name: _version(name) for name in ("transformers", "ray", "fastapi", "streamlit", "llguidance")},
        "flash_attn": _version("flash-attn"), "flash_attention_usable": flash_attention_available(),
        "quantization": {name: _version(name) for name in PACKAGES},
        "quantization_usable": all(_version(name) for name in PACKAGES),
        "nltk_data": {"path": str(nltk_data_dir()), "wordnet": wordnet_installed(), "tagger": tagger_installed()},
        "tiny_model": str(tiny_model_path()) if tiny_model_path().is_dir() else None,
        "synthcoco": str(synth) if (synth / "manifest.json").exists() else None,
        "hf_cache": cache, "cached_models": cached_models(cache),
        # (importing the method packages imported the plug-ins: a broken one is the command's error)
        "methods": {"pruning": PRUNERS.names(), "decoding": DECODERS.names()},
        "plugins": [{"module": module, "from": origin} for module, origin in plugin_modules()],
    }


def _lines(env: dict[str, Any]) -> list[str]:
    gpus = "; ".join(f"{g['index']}: {g['name']}, {g['memory_gib']} GiB, compute {g['capability']}"
                     f"{', bf16' if g['bfloat16'] else ''}" for g in env["gpus"]) or "none (the CPU runs everything)"
    quant = ", ".join(f"{k} {v or 'missing'}" for k, v in env["quantization"].items())
    nltk = env["nltk_data"]
    models = [f"  {m['model']}@{m['revision']} ({m['model_type']})" for m in env["cached_models"]]
    plugins = ", ".join(f"{p['module']} (from {p['from']})" for p in env["plugins"]) or "none"
    return [
        f"vlmguard {env['vlmguard']}  python {env['python']}  {env['platform']}  cpus {env['cpus']}",
        f"torch {env['torch']} (threads {env['torch_threads']}, CUDA {env['cuda'] or 'no'})  transformers "
        f"{env['transformers']}  ray {env['ray']}  llguidance {env['llguidance']}",
        f"GPUs: {gpus}",
        f"FlashAttention-2: {'usable' if env['flash_attention_usable'] else 'not usable'}"
        f" (flash-attn {env['flash_attn'] or 'not installed'})",
        f"quantized weights (--quantization): {'usable' if env['quantization_usable'] else 'not usable'} ({quant})",
        f"CHAIR's NLTK data: {nltk['path']} (wordnet {'ok' if nltk['wordnet'] else 'MISSING'}, tagger "
        f"{'ok' if nltk['tagger'] else 'MISSING'})",
        f"methods: pruning {', '.join(env['methods']['pruning'])}; decoding {', '.join(env['methods']['decoding'])}",
        f"plug-in method modules: {plugins}",
        f"bundled model: {env['tiny_model'] or 'MISSING'}",
        f"SynthCOCO test split: {env['synthcoco'] or 'not built yet (built on first use)'}",
        f"Hugging Face cache: {env['hf_cache']}: {len(models)} revision(s) of a supported model"
        + (":" if models else " (--model takes a local directory too)"),
        *models,
    ]


def run(args: argparse.Namespace) -> int:
    env = environment()
    if args.json:
        print(json.dumps(env))
    else:
        print("\n".join(_lines(env)))
    return 0
