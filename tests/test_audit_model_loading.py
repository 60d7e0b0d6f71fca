"""An audit of model loading with checkpoints that are subtly wrong: weights that lack tensors or have other shapes
than config.json says (transformers fills them with random values, or raises a RuntimeError pointing at a log the
CLI hides), config values transformers' validators refuse, safetensors headers that safetensors refuses, and HF
cache entries that are cached but unusable (an interrupted download, no 'main' ref). Each is one ModelLoadError line
naming the problem, never a model answering with noise or a traceback from transformers / safetensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmguard.errors import ModelLoadError
from vlmguard.models.resolve import resolve_model_path
from vlmguard.testing import tiny_llava

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit_models") / "llava"
    model, proc = tiny_llava(text_layers=2)
    model.save_pretrained(root)
    proc.save_pretrained(root)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("text_"):
            cfg["text_config"][key[len("text_"):]] = value
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))


def _load_error(ref, match: str) -> str:
    from vlmguard.engine import Engine

    with pytest.raises(ModelLoadError, match=match) as info:
        Engine.load(ref, device="cpu")
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_weights_missing_from_the_checkpoint_are_a_load_error_not_random(llava, tmp_path):
    """A safetensors file without lm_head loaded with a random lm_head: the model answered with noise, and the
    only sign was a transformers warning the CLI hides."""
    from safetensors.torch import load_file, save_file

    d = _copy(llava, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.endswith("lm_head.weight")}, d / "model.safetensors",
              metadata={"format": "pt"})  # (saved under the legacy name language_model.lm_head.weight)
    msg = _load_error(d, match="the checkpoint has no weight lm_head.weight")
    assert str(d) in msg


def test_weights_of_another_shape_than_the_config_name_the_tensor(llava, tmp_path):
    """transformers raised RuntimeError("You set `ignore_mismatched_sizes` to `False` ... look at the above report")
    with the report itself hidden by the CLI."""
    d = _copy(llava, tmp_path / "m")
    _edit_config(d, text_hidden_size=128)
    _load_error(d, match=r"weight \S+ has shape \[\d+, 64\] in the checkpoint but \[\d+, 128\] by its config.json")


def test_a_config_value_transformers_refuses_is_a_load_error(llava, tmp_path):
    """huggingface_hub's StrictDataclassFieldValidationError (neither OSError nor ValueError) escaped as a
    traceback; the field and what is wrong with it are on two lines of its message."""
    d = _copy(llava, tmp_path / "m")
    _edit_config(d, text_hidden_size="big")
    _load_error(d, match=r"config.json is not a valid model config: .*'hidden_size'.* expected int, got str")


def test_a_safetensors_header_safetensors_refuses_names_the_file(llava, tmp_path):
    """A header whose tensor shape does not fit its data_offsets (total size right) passed the checks, then
    safetensors' SafetensorError escaped from transformers as a traceback."""
    d = _copy(llava, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    rows, cols = header[key]["shape"]
    text = data[8:8 + n].decode()
    old = f'"shape":[{rows},{cols}]'
    assert old in text
    new = f'"shape":[{rows},{cols // 2}]'.ljust(len(old))  # same header length: only the shape is wrong
    f.write_bytes(data[:8] + text.replace(old, new, 1).encode() + data[8 + n:])
    with pytest.raises(ModelLoadError, match="corrupt or incomplete .*deserializing header") as info:
        resolve_model_path(d)
    assert str(f) in str(info.value)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_an_interrupted_download_in_the_cache_is_not_called_uncached(llava, hub):
    """A snapshot whose cached file listing names files the snapshot lacks (a download cut short) was reported as
    'not in the local Hugging Face cache'."""
    repo = hub / "models--myorg--tiny"
    shutil.copytree(llava, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    (repo / "trees").mkdir()
    files = {"config.json": {"size": 1, "blob_id": "a"}, "model-00002-of-00002.safetensors": {"size": 1, "blob_id": "b"}}
    (repo / "trees" / f"{REV}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    with pytest.raises(ModelLoadError, match="is incomplete: .*model-00002-of-00002.safetensors") as info:
        resolve_model_path("myorg/tiny")
    assert "not in the local" not in str(info.value)


def test_a_cached_repo_without_a_main_ref_lists_its_revisions(llava, hub):
    """A cache copied without refs/ has the snapshot but no 'main': it was reported as not cached at all, naming no
    revision to pass instead."""
    shutil.copytree(llava, hub / "models--myorg--tiny" / "snapshots" / REV)
    with pytest.raises(ModelLoadError, match=f"revision 'main' of myorg/tiny .*cached: {REV}"):
        resolve_model_path("myorg/tiny")
    assert resolve_model_path(f"myorg/tiny@{REV}") == hub / "models--myorg--tiny" / "snapshots" / REV


def test_config_depths_that_select_nothing_are_load_errors(llava, tmp_path):
    """num_hidden_layers -1 built a model without decoder layers and failed with a bare IndexError while the engine
    was set up; a vision_feature_layer beyond the tower loaded and then failed every request with a KeyError."""
    d = _copy(llava, tmp_path / "m")
    _edit_config(d, text_num_hidden_layers=-1)
    _load_error(d, match="has no decoder layers .its text_config.num_hidden_layers is -1")
    d = _copy(llava, tmp_path / "v")
    depth = json.loads((d / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    _edit_config(d, vision_feature_layer=-(depth + 2))
    _load_error(d, match=rf"vision_feature_layer {-(depth + 2)} selects no hidden state of the {depth}-layer vision")
