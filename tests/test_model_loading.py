"""Model loading and selection from disk: checkpoints saved with ``save_pretrained`` load by path and from an
HF-cache snapshot; each common way a checkpoint copy goes wrong is one clear ``ModelLoadError`` (one line, naming
the file) before transformers reads it, never a traceback from safetensors/torch/tokenizers or a template error
at the first request."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vlmguard.errors import ModelLoadError
from vlmguard.models.image_text_processor import load_processor
from vlmguard.models.resolve import SUPPORTED_MODEL_TYPES, resolve_model_path
from vlmguard.testing import QWEN_TEMPLATE, random_image, tiny_llava, tiny_qwen2_vl



@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny LLaVA (processor with its chat template) and tiny Qwen2-VL (tokenizer + image processor, no template),
    each saved with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    model, proc = tiny_llava(text_layers=2)
    model.save_pretrained(root / "llava")
    proc.save_pretrained(root / "llava")
    model, proc = tiny_qwen2_vl()
    model.save_pretrained(root / "qwen2_vl")
    proc.tokenizer.save_pretrained(root / "qwen2_vl")
    proc.image_processor.save_pretrained(root / "qwen2_vl")
    return {"llava": root / "llava", "qwen2_vl": root / "qwen2_vl"}


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ---- what works ------------------------------------------------------------------------------------------------

def test_supported_model_types_match_the_adapters():
    from vlmguard.engine import MODEL_CLASSES
    from vlmguard.models.families import ADAPTERS

    assert set(SUPPORTED_MODEL_TYPES) == set(ADAPTERS) == set(MODEL_CLASSES)


def test_saved_checkpoints_pass_the_checks(saved, tmp_path):
    assert resolve_model_path(saved["llava"]) == saved["llava"].resolve()
    assert resolve_model_path("tiny").is_dir()
    model, _ = tiny_llava(text_layers=2)  # sharded safetensors and a PyTorch .bin pass too
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shutil.copy(saved["llava"] / "tokenizer.json", tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    resolve_model_path(tmp_path / "sharded")
    binary = _copy(saved["llava"], tmp_path / "bin", drop=("model.safetensors",))
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    resolve_model_path(binary)


def test_engine_loads_saved_llava_by_path(saved):
    from vlmguard.engine import Engine, Request
    from vlmguard.spec import GenerationSpec

    engine = Engine.load(saved["llava"], device="cpu")  # a path object, as a string
    assert engine.family == "llava" and engine.revision and engine.model_name == str(saved["llava"])
    out = engine.generate([Request("Is there a dog?", [random_image(0)])], GenerationSpec(max_new_tokens=1))[0]
    assert len(out.token_ids) == 1


def test_bench_takes_the_weights_dtype(saved, tmp_path, capsys):
    """`vlmguard bench --dtype` loads the model in that dtype, and the run records it (a bf16 run is not the
    fp32 run of the same settings)."""
    import json

    from vlmguard.cli import main

    db = tmp_path / "r.sqlite"
    base = ["bench", "pope", "--model", str(saved["llava"]), "--limit", "2", "--db", str(db), "--no-progress", "--json"]
    runs = []
    for extra in ([], ["--dtype", "bfloat16"]):
        assert main(base + extra) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0])
    assert runs[0]["run_id"] != runs[1]["run_id"]


@pytest.mark.parametrize("where", ["chat_template.json", "chat_template.jinja", "tokenizer_config.json"])
def test_qwen_fallback_processor_finds_the_saved_chat_template(saved, tmp_path, where):
    """Official Qwen2-VL repos keep the template in chat_template.json, which the tokenizer alone does not read;
    the torchvision-free fallback processor used to lose it (and fail at the first request)."""
    d = _copy(saved["qwen2_vl"], tmp_path / "qwen")
    if where == "chat_template.json":
        (d / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    elif where == "chat_template.jinja":
        (d / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    else:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = QWEN_TEMPLATE
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = load_processor(d)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
    assert "<|image_pad|>" in text and text.endswith("<|im_start|>assistant\n")


def test_hf_cache_snapshot_and_revisions(saved, tmp_path, monkeypatch):
    from huggingface_hub import constants

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--myorg--tiny"
    shutil.copytree(saved["llava"], repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = repo / "snapshots" / rev
    assert resolve_model_path("myorg/tiny") == snap
    assert resolve_model_path(f"myorg/tiny@{rev}") == snap
    msg = _one_line_error(resolve_model_path, "myorg/tiny@v2", match="revision 'v2' of myorg/tiny")
    assert "cached: main" in msg and str(tmp_path / "hub") in msg
    _one_line_error(resolve_model_path, "myorg/other", match=f"not in the local Hugging Face cache \\({tmp_path}")


# ---- what fails, and how ---------------------------------------------------------------------------------------

def test_a_path_that_does_not_exist_says_so(tmp_path):
    _one_line_error(resolve_model_path, str(tmp_path / "nope"), match="no such directory")
    _one_line_error(resolve_model_path, "some/where/deeper", match="no such directory")
    _one_line_error(resolve_model_path, "org/name/", match="no such directory")


@pytest.mark.parametrize("config, match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported model type 'llama'"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, "unsupported model type 'bert' \\(BertModel\\)"),
    ({"model_type": "frobnicator"}, "unsupported model type 'frobnicator'"),
    ({"hidden_size": 8}, "has no model_type"),
    ("{not json", "config.json is not valid JSON"),
    ([1, 2], "config.json is not a JSON object"),
])
def test_configs_that_are_not_a_supported_vlm(tmp_path, config, match):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    _one_line_error(resolve_model_path, tmp_path, match=match)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "corrupt or incomplete .*interrupted"),  # truncated copy
    (lambda b: b + b"xxxx", "corrupt or incomplete"),  # trailing bytes (safetensors refuses them)
    (lambda b: b"garbage" * 10, "not a safetensors file"),
    (lambda b: b"", "0 bytes"),
    (lambda b: (12).to_bytes(8, "little") + b"{not json}!!", "header is not valid JSON"),
])
def test_corrupt_safetensors(saved, tmp_path, damage, match):
    d = _copy(saved["llava"], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    msg = _one_line_error(resolve_model_path, d, match=match)
    assert str(f) in msg


def test_missing_shard_truncated_bin_and_dangling_link(saved, tmp_path):
    model, _ = tiny_llava(text_layers=2)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    _one_line_error(resolve_model_path, sharded, match=f"weight shard {shard} .*is missing")

    binary = _copy(saved["llava"], tmp_path / "bin", drop=("model.safetensors",))
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    data = (binary / "pytorch_model.bin").read_bytes()
    (binary / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    _one_line_error(resolve_model_path, binary, match="truncated PyTorch archive")

    linked = _copy(saved["llava"], tmp_path / "linked", drop=("model.safetensors",))
    os.symlink("../blobs/0123abcd", linked / "model.safetensors")  # an HF cache blob that never arrived
    _one_line_error(resolve_model_path, linked, match="link to a missing file")


def test_weight_files_transformers_does_not_read_are_not_checked(saved, tmp_path):
    """Only the files transformers loads are checked: a repo shipping both formats copied with its safetensors
    alone keeps the .bin index (JSON) without its shards; a stray truncated .bin or an unreferenced extra
    safetensors file beside the real weights is never read."""
    import json

    both = _copy(saved["llava"], tmp_path / "both")
    (both / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "pytorch_model-00001-of-00002.bin"}}))
    (both / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    (both / "model_projector_only.safetensors").write_bytes(b"not safetensors")
    assert resolve_model_path(both) == both.resolve()
    sharded = tmp_path / "sharded"
    tiny_llava(text_layers=2)[0].save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "pytorch_model.bin").write_bytes(b"")  # a safetensors index is read first (as transformers)
    resolve_model_path(sharded)


def test_a_template_kept_only_in_tokenizer_config_serves_requests(saved, tmp_path):
    """transformers processors do not fall back to their tokenizer's template in apply_chat_template: a template
    found only in tokenizer_config.json passed the load check, then every request failed."""
    import json

    from vlmguard.engine import Engine, Request
    from vlmguard.spec import GenerationSpec

    d = _copy(saved["llava"], tmp_path / "tok_template", drop=("chat_template.jinja",))
    template = (saved["llava"] / "chat_template.jinja").read_text()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    engine = Engine.load(d, device="cpu")
    out = engine.generate([Request("Is there a dog?", [random_image(0)])], GenerationSpec(max_new_tokens=1))[0]
    assert len(out.token_ids) == 1


def test_broken_tokenizer_json_names_the_file(saved, tmp_path):
    d = _copy(saved["llava"], tmp_path / "m")
    (d / "tokenizer.json").write_text('{"broken')
    _one_line_error(resolve_model_path, d, match="tokenizer.json is not valid JSON")


@pytest.mark.parametrize("drop, match", [
    (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
    (("processor_config.json",), "has no image processor config"),
    (("chat_template.jinja",), "has no chat template"),
])
def test_missing_processor_parts_fail_at_load(saved, tmp_path, drop, match):
    d = _copy(saved["llava"], tmp_path / "m", drop=drop)
    _one_line_error(load_processor, d, match=match)


def test_a_missing_chat_template_is_reported_before_the_weights_are_read(saved, tmp_path, monkeypatch):
    import transformers

    from vlmguard.engine import Engine

    d = _copy(saved["llava"], tmp_path / "m", drop=("chat_template.jinja",))
    read = []
    original = transformers.LlavaForConditionalGeneration.from_pretrained
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: read.append(a) or original.__func__(cls, *a, **k)))
    _one_line_error(lambda p: Engine.load(p, device="cpu"), d, match="has no chat template")
    assert read == []  # the weights were never loaded


def test_qwen_without_any_chat_template_fails_at_load(saved):
    _one_line_error(load_processor, saved["qwen2_vl"], match="has no chat template")


def test_processor_without_template_is_a_load_error_not_a_traceback():
    """An Engine built in Python from a processor without a chat template: the first request says what is
    missing (a ModelLoadError the CLI and HTTP API report) instead of transformers' ValueError."""
    from vlmguard.models.base import Prompt
    from vlmguard.models.families import LlavaAdapter

    model, proc = tiny_llava(text_layers=2)
    proc.chat_template = None
    proc.tokenizer.chat_template = None
    adapter = LlavaAdapter(model, proc)
    with pytest.raises(ModelLoadError, match="no chat template"):
        adapter.format_prompt(Prompt("hi", [random_image(0)]))
    # a raw prompt needs no template: it is used verbatim
    raw = "USER: <image>\nhi ASSISTANT:"
    assert adapter.format_prompt(Prompt(raw, [random_image(0)], raw=True)) == raw


def test_cli_reports_a_corrupt_checkpoint_in_one_line(saved, tmp_path, capsys):
    from vlmguard.cli import main

    d = _copy(saved["llava"], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    image = tmp_path / "img.png"
    random_image(0).save(image)
    rc = main(["generate", "--model", str(d), "--image", str(image), "--prompt", "hi", "--json"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("vlmguard: error: model ") and "\n" not in err and "corrupt or incomplete" in err
