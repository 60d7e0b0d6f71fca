"""Weights quantized as they load (``quantization``: bitsandbytes LLM.int8() and NF4; vlmguard/models/quantization.py).

What must hold: the language model's linear layers are quantized and the vision tower, projector and lm_head are
not; every pruner and decoder runs on a quantized model; its POPE answers are the full-precision model's but for a
few; NF4 answers a request the same in a batch as alone; a checkpoint saved quantized loads as saved; a benchmark
run on quantized weights is a run of its own; bad settings are one clear error. On the bundled tiny model, on the CPU.
"""
from __future__ import annotations

import shutil
import sqlite3

import pytest
import torch

from vlmguard.decoding import DECODERS
from vlmguard.engine import Engine
from vlmguard.errors import InvalidInput, ModelLoadError
from vlmguard.models import quantization as quant
from vlmguard.models.resolve import resolve_model_path
from vlmguard.pruning import PRUNERS
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image

pytestmark = pytest.mark.usefixtures("one_thread")

QUANTIZED = ("bnb-int8", "bnb-nf4")


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    return {q: Engine.load("tiny", quantization=q) for q in ("none", *QUANTIZED)}


@pytest.fixture(scope="module")
def synth_images():
    from vlmguard.bench.datasets import resolve_dataset

    dataset = resolve_dataset("synthcoco")  # as `vlmguard bench` and a sweep name it: the same run ids
    return dataset, [dataset.chair_image_path(i) for i in dataset.chair_image_ids()[0][:4]]


def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    kinds = (torch.nn.Linear, bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return {name: m for name, m in module.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("name", QUANTIZED)
def test_the_language_models_linear_layers_are_quantized_and_the_rest_kept(engines, name):
    import bitsandbytes as bnb

    full, q = engines["none"].model, engines[name].model
    assert engines[name].quantization == name and engines["none"].quantization == "none"
    kind = bnb.nn.Linear8bitLt if name == "bnb-int8" else bnb.nn.Linear4bit
    llm = _linears(q.model.language_model)
    assert llm and all(isinstance(m, kind) for m in llm.values())
    for part in (q.model.vision_tower, q.model.multi_modal_projector, q.lm_head):
        kept = _linears(part)  # (lm_head: itself)
        assert kept and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in kept.values())
    # the weights shrink by what the language model's linear layers save (less the quantization constants)
    llm_params = sum(m.weight.numel() for m in _linears(full.model.language_model).values())
    bits = 8 if name == "bnb-int8" else 4
    saved = full.get_memory_footprint() - q.get_memory_footprint()
    assert 0.9 * llm_params * (4 - bits / 8) <= saved <= llm_params * (4 - bits / 8)


@pytest.fixture(scope="module")
def images():
    return [random_image(s, (96, 96)) for s in range(2)]


@pytest.mark.parametrize("pruning", PRUNERS.names())
def test_every_pruner_and_decoder_runs_on_quantized_weights(engines, synth_images, pruning):
    _, paths = synth_images
    from PIL import Image

    reqs = [Request(prompt="Please describe this image in detail.", images=[Image.open(p).convert("RGB")])
            for p in paths[:2]]
    budget = None if pruning == "none" else 16
    for decoding in DECODERS.names():
        spec = GenerationSpec(pruning=pruning, budget=budget, decoding=decoding, max_new_tokens=8)
        full = engines["none"].generate(reqs, spec)
        for res, ref in zip(engines["bnb-nf4"].generate(reqs, spec), full):
            assert len(res.token_ids) == 8 and res.text.strip(), (pruning, decoding, res.text)
            # the pruner feeds each layer the tokens it feeds at full precision (the vision tower is not quantized)
            assert res.visual_tokens_kept == ref.visual_tokens_kept, (pruning, decoding)
            assert (res.visual_tokens_kept[-1] < 144) == (pruning != "none")


def test_nf4_answers_each_request_the_same_in_a_batch_as_alone(engines, synth_images):
    _, paths = synth_images
    from PIL import Image

    eng = engines["bnb-nf4"]
    reqs = [Request(prompt="Please describe this image in detail.", images=[Image.open(p).convert("RGB")])
            for p in paths]
    for pruning, decoding in (("none", "greedy"), ("flowcut", "vista"), ("adaptinfer", "vcd")):
        spec = GenerationSpec(pruning=pruning, budget=None if pruning == "none" else 16, decoding=decoding,
                              max_new_tokens=24)
        together = [r.token_ids for r in eng.generate(reqs, spec)]
        assert together == [eng.generate([r], spec)[0].token_ids for r in reqs], (pruning, decoding)


def test_quantized_pope_answers_are_the_full_precision_ones_but_a_few(engines, synth_images, tmp_path):
    from vlmguard.bench.report import flatten
    from vlmguard.bench.runner import default_spec, run_benchmark
    from vlmguard.bench.db import list_runs

    dataset, _ = synth_images
    db = tmp_path / "q.sqlite"
    outs = {q: run_benchmark(eng, "pope", dataset, default_spec("pope"), db, split="random", limit=120,
                             progress=False) for q, eng in engines.items()}
    with sqlite3.connect(db) as conn:
        answers = {q: dict(conn.execute("SELECT sample_key, prediction FROM samples WHERE run_id = ?",
                                        (o.run_id,)).fetchall()) for q, o in outs.items()}
    assert len(answers["none"]) == 120
    for q in QUANTIZED:
        same = sum(answers[q][k] == answers["none"][k] for k in answers["none"]) / 120
        assert same >= 0.95, (q, same)  # measured on 600 questions: 99.8% for both
        assert abs(outs[q].metrics["accuracy"] - outs["none"].metrics["accuracy"]) <= 3
    # three runs of their own, labelled by their weights; full precision keeps the run id it always had
    assert len({o.run_id for o in outs.values()}) == 3
    assert "quantization" not in outs["none"].knobs and outs["bnb-nf4"].knobs["quantization"] == "bnb-nf4"
    # a sweep that names the quantization resumes the same run
    from vlmguard.bench.sweep import run_sweep

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("model: tiny\ndataset: synthcoco\nquantization: bnb-nf4\nlimit: 120\n"
                   "benchmarks:\n  - pope: {splits: [random]}\n")
    (again,) = run_sweep(cfg, db=db)
    assert again.run_id == outs["bnb-nf4"].run_id and again.n_new == 0
    labels = {r["run_id"]: flatten(r)["model"] for r in list_runs(db)}
    assert labels == {outs["none"].run_id: "tiny", outs["bnb-int8"].run_id: "tiny [bnb-int8]",
                      outs["bnb-nf4"].run_id: "tiny [bnb-nf4]"}


def test_a_checkpoint_saved_quantized_loads_as_it_was_saved(engines, images, tmp_path):
    src = resolve_model_path("tiny")
    out = tmp_path / "tiny-nf4"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    engines["bnb-nf4"].model.save_pretrained(out)
    loaded = Engine.load(out)
    assert loaded.quantization == "bnb-nf4"
    reqs = [Request(prompt="Please describe this image in detail.", images=[im]) for im in images]
    spec = GenerationSpec(max_new_tokens=16)
    assert [r.token_ids for r in loaded.generate(reqs, spec)] == \
        [r.token_ids for r in engines["bnb-nf4"].generate(reqs, spec)]
    with pytest.raises(InvalidInput, match=r"saved quantized \(bnb-nf4\).*not as bnb-int8"):
        Engine.load(out, quantization="bnb-int8")
    assert Engine.load(out, quantization="bnb-nf4").quantization == "bnb-nf4"  # asking for what it is: fine


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_the_other_families_keep_their_vision_towers_too(family, tmp_path):
    """LLaVA-NeXT and Qwen2-VL (``model.visual``, its merger inside) from disk: only the language model's layers are
    quantized, and a vision-side pruner composed with a contrastive decoder runs."""
    import json

    import bitsandbytes as bnb
    from vlmguard.engine import MODEL_CLASSES
    from vlmguard.testing import QWEN_TEMPLATE, tiny_llava_next, tiny_qwen2_vl

    assert set(quant.KEEP_UNQUANTIZED) == set(MODEL_CLASSES)
    model, proc = (tiny_llava_next if family == "llava_next" else tiny_qwen2_vl)()
    model.save_pretrained(tmp_path)
    if family == "llava_next":
        proc.save_pretrained(tmp_path)
    else:
        proc.tokenizer.save_pretrained(tmp_path)
        proc.image_processor.save_pretrained(tmp_path)
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    eng = Engine.load(tmp_path, quantization="bnb-int8", device="cpu")
    def parts(kind) -> set[str]:  # the model's parts (model.X, or lm_head) holding layers of this kind
        return {name.removeprefix("model.").split(".")[0] for name, m in eng.model.named_modules() if type(m) is kind}

    assert parts(bnb.nn.Linear8bitLt) == {"language_model"}
    vision = {"vision_tower", "multi_modal_projector"} if family == "llava_next" else {"visual"}
    assert parts(torch.nn.Linear) == vision | {"lm_head"}
    (res,) = eng.generate([Request(prompt="Describe the image.", images=[random_image(0, (64, 64))])],
                          GenerationSpec(max_new_tokens=3, pruning="flowcut", budget=4, decoding="vcd"))
    assert len(res.token_ids) == 3


def test_perf_builds_a_benchmark_shape_quantized():
    from vlmguard.perf.models import load_engine
    from vlmguard.perf.timing import environment

    q = load_engine("llava-1.5-7b-cpu", device="cpu", quantization="bnb-int8")
    full = load_engine("llava-1.5-7b-cpu", device="cpu")
    assert q.model_name == "llava-1.5-7b-cpu" and q.quantization == "bnb-int8" and q.adapter.n_tokens is None
    assert q.model.config.text_config.to_dict() == full.model.config.text_config.to_dict()
    env = environment(q)
    assert env["quantization"] == "bnb-int8" and env["weights_mb"] < 0.6 * environment(full)["weights_mb"]
    (res,) = q.generate([Request(prompt="Describe the image.", images=[random_image(0, (336, 336))])],
                        GenerationSpec(max_new_tokens=2, pruning="flowcut", budget=64))
    assert len(res.token_ids) == 2 and min(res.visual_tokens_kept) == 64


def test_bad_quantization_settings_are_one_clear_error(monkeypatch):
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48))
    layer[0].support_avx512bf16_for_cpu = True  # what bitsandbytes sets on a 4-bit layer where its CPU kernel packs
    with pytest.raises(InvalidInput, match="a multiple of 32 .*; 0 has 48. Use bnb-int8, or a GPU"):
        quant.check_cpu_layout(layer)
    layer[0].support_avx512bf16_for_cpu = False
    quant.check_cpu_layout(layer)
    with pytest.raises(InvalidInput, match="runs on CUDA, XPU or the CPU, not on meta"):
        quant.load_kwargs("bnb-nf4", model_type="llava", compute_dtype=torch.float32, device=torch.device("meta"))
    with pytest.raises(InvalidInput, match="unknown quantization 'int4' \\(use none, bnb-int8, bnb-nf4\\)"):
        Engine.load("tiny", quantization="int4")
    with pytest.raises(InvalidInput, match="quantization applies to models loaded from files, not random:llava"):
        Engine.load("random:llava", quantization="bnb-nf4")
    real = quant.importlib.util.find_spec
    monkeypatch.setattr(quant.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelLoadError,
                       match=r"quantization bnb-nf4 needs bitsandbytes: pip install 'vlmguard\[quant\]'"):
        Engine.load("tiny", quantization="bnb-nf4")


def test_the_command_line_and_the_service_take_a_quantization(engines, tmp_path, capsys):
    from cli_support import run_json
    from vlmguard.cli import main
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker
    from vlmguard.workers.launch import apply_overrides

    img = tmp_path / "img.png"
    random_image(3, (96, 96)).save(img)
    out = run_json(["generate", "--image", str(img), "--prompt", "Is there a cup in the image?", "--quantization",
                    "bnb-nf4", "--max-new-tokens", "4", "--json"])
    spec = GenerationSpec(max_new_tokens=4)
    from PIL import Image

    want = engines["bnb-nf4"].generate([Request(prompt="Is there a cup in the image?",
                                                images=[Image.open(img).convert("RGB")])], spec)[0]
    assert out["tokens"] == want.token_ids
    for argv in (["generate", "--image", str(img), "--prompt", "x"], ["bench", "pope"], ["serve"],
                 ["prune", "analyze"], ["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"]):
        with pytest.raises(SystemExit):
            main([*argv, "--quantization", "int3"])
        assert "argument --quantization: invalid choice: 'int3'" in capsys.readouterr().err, argv

    config = apply_overrides(ServiceConfig(models=[{"model": "tiny"}, {"model": "tiny", "name": "b"}]),
                             quantization="bnb-int8")
    assert [m.quantization for m in config.models] == ["bnb-int8", "bnb-int8"]
    with pytest.raises(ValueError, match="Input should be 'none', 'bnb-int8' or 'bnb-nf4'"):
        ModelConfig(quantization="fp8")
    with pytest.raises(ValueError, match="quantization applies to models loaded from files, not random:llava"):
        ModelConfig(model="random:llava", quantization="bnb-nf4")
    worker = EngineWorker(engine=engines["bnb-int8"])
    assert worker.info()["quantization"] == "bnb-int8"
    card = _model_card(worker)
    assert (card["dtype"], card["quantization"]) == ("float32", "bnb-int8")
    from vlmguard.workers.deployment import ModelReplica

    replica = ModelReplica({"model": "tiny", "device": "cpu", "torch_threads": 1, "quantization": "bnb-nf4"})
    try:
        assert replica.worker.info()["quantization"] == "bnb-nf4"
        assert replica.worker.engine.model.model.language_model.layers[0].mlp.up_proj.__class__.__name__ == \
            "Linear4bit"
    finally:
        replica.batcher.close()


def _model_card(worker) -> dict:
    """``GET /v1/models/tiny-llava`` of the HTTP API over ``worker`` (no Ray)."""
    import asyncio

    import httpx
    from service_support import BatcherBackend
    from vlmguard.workers.api import create_api
    from vlmguard.workers.config import ServiceConfig
    from vlmguard.workers.inflight import InflightBatcher

    batcher = InflightBatcher(worker, 4, 0.0)
    app = create_api(BatcherBackend(worker, batcher), ServiceConfig(api_key_env=None, host="127.0.0.1"))

    async def get() -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            r = await http.get("/v1/models/tiny-llava")
            assert r.status_code == 200, r.text
            return r.json()

    try:
        return asyncio.run(get())
    finally:
        batcher.close()


def test_the_dashboard_names_a_quantized_model_as_the_report_does(monkeypatch, tmp_path):
    from test_dashboard_pages import CLIENT_KEY, StubClient, page, quiet_env
    from vlmguard.api_schema import ModelCard, ModelList
    from vlmguard.dashboard.service import model_label, probe_service

    class QuantizedStub(StubClient):
        def models(self):
            return ModelList(data=[ModelCard(id="tiny-llava", family="llava", quantization="bnb-nf4")])

    facts = probe_service(QuantizedStub(), "u").facts["tiny-llava"]
    assert facts.quantization == "bnb-nf4" and model_label("tiny-llava", facts) == "tiny-llava [bnb-nf4]"
    assert model_label("m", None) == "m" and model_label("m", probe_service(StubClient(), "u").facts.get("m")) == "m"
    quiet_env(monkeypatch, tmp_path)
    at = page("playground_page.py")
    at.session_state[CLIENT_KEY] = QuantizedStub()
    at.run()
    assert not at.exception, at.exception
    assert any("models: tiny-llava [bnb-nf4]" in c.value for c in at.caption)
