"""``vlmguard env``: this machine's versions, accelerator, optional paths and the cached models ``--model`` can load
offline (vlmguard/commands/env.py)."""
from __future__ import annotations

import json
import shutil

import torch

from cli_support import run_json
from vlmguard.cli import main
from vlmguard.commands.env import cached_models
from vlmguard.engine import Engine
from vlmguard.models.resolve import tiny_model_path


def test_env_reports_what_this_machine_offers(capsys):
    env = run_json(["env", "--json"])
    assert env["torch"] == torch.__version__ and env["cpus"] >= 1
    assert env["gpus"] == [] if not torch.cuda.is_available() else len(env["gpus"]) == torch.cuda.device_count()
    assert env["tiny_model"] == str(tiny_model_path())
    # what the setup installs: the quant extra and CHAIR's offline NLTK data
    assert env["quantization_usable"] and env["nltk_data"]["wordnet"] and env["nltk_data"]["tagger"]
    assert env["flash_attention_usable"] is False or torch.cuda.is_available()
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "quantized weights (--quantization): usable" in text and f"torch {torch.__version__}" in text


def test_env_lists_the_cached_models_of_a_supported_family(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--myorg--tiny-llava"
    shutil.copytree(tiny_model_path(), repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (repo / "refs" / "pr").mkdir()
    (repo / "refs" / "pr" / "1").write_text("fedcba9876")
    (repo / "snapshots" / "fedcba9876").mkdir()  # a second snapshot, no ref, whose download never finished
    other = hub / "models--someorg--bert" / "snapshots" / "abc"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))  # not a family vlmguard serves
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cached_models(hub) == [{"model": "myorg/tiny-llava", "revision": "main", "model_type": "llava"}]
    assert cached_models(tmp_path / "nowhere") == []
    env = run_json(["env", "--json"])
    assert env["hf_cache"] == str(hub) and env["cached_models"] == cached_models(hub)
    assert main(["env"]) == 0
    assert "  myorg/tiny-llava@main (llava)" in capsys.readouterr().out
    assert Engine.load("myorg/tiny-llava").family == "llava"  # what it lists, --model loads
