"""Adding a method is one module that registers itself (docs/architecture.md, "Adding a method"), inside vlmguard or
outside it as a plug-in (vlmguard/registry.py: ``$VLMGUARD_PLUGINS`` or a ``vlmguard.methods`` entry point). The
example plug-in ``tests/fixtures/plugins/vlmguard_example_plugin.py`` (a pruner and a decoder) is taken by name
everywhere a built-in method is (the spec, the engine with batching and composition, the CLI in a process of its own,
the HTTP API, the dashboard's method forms, `prune methods`), with its parameters validated, and a plug-in that
cannot be imported is one clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service_support import qwen_api, run_with_sdk
from vlmguard.cli import main
from vlmguard.decoding.registry import DECODERS
from vlmguard.engine import Request
from vlmguard.errors import InvalidInput
from vlmguard.images import image_to_data_url
from vlmguard.pruning.registry import PRUNERS
from vlmguard.registry import PLUGINS_ENV, PluginError, import_plugins, plugin_modules
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

PLUGIN_DIR = Path(__file__).parent / "fixtures" / "plugins"
PLUGIN = "vlmguard_example_plugin"


@pytest.fixture
def registries():
    """The method registries as they are now, put back afterwards (with the plug-in module forgotten)."""
    saved = dict(PRUNERS._items), dict(DECODERS._items)
    yield
    for registry, items in zip((PRUNERS, DECODERS), saved):
        registry._items.clear()
        registry._items.update(items)
    sys.modules.pop(PLUGIN, None)


@pytest.fixture
def plugins(registries, monkeypatch):
    """The example plug-in named in ``$VLMGUARD_PLUGINS`` and imported as vlmguard imports plug-ins."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.setenv(PLUGINS_ENV, f" {PLUGIN} ,")
    import_plugins()


REQS = [Request("What is in the picture?", [random_image(i, (48, 40))]) for i in range(3)]


def test_a_plugin_pruner_and_decoder_run_in_the_engine_batched_and_composed(plugins):
    engine = tiny_engine("llava")
    spec = GenerationSpec(pruning="keep_first", budget=6, pruning_params={"skip": 2}, decoding="textfree",
                          decoding_params={"alpha": 0.5}, max_new_tokens=5)
    batched = engine.generate(REQS, spec)
    alone = [engine.generate([r], spec)[0] for r in REQS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert all(list(r.kept_indices) == list(range(2, 8)) for r in batched)  # (first 6 after 2)
    assert batched[0].decoding["name"] == "textfree" and batched[0].pruning == {
        "name": "keep_first", "budget": 6, "params": {"skip": 2}}
    plain = engine.generate(REQS, GenerationSpec(pruning="keep_first", budget=6, pruning_params={"skip": 2},
                                                 max_new_tokens=5))
    off = engine.generate(REQS, spec.model_copy(update={"decoding_params": {"alpha": 0.0}}))
    assert [r.token_ids for r in off] == [r.token_ids for r in plain]  # (strength 0: plain decoding)
    with pytest.raises(InvalidInput, match="parameters for decoding method 'textfree': alpha"):
        GenerationSpec(decoding="textfree", decoding_params={"alpha": 9}).resolve()
    with pytest.raises(InvalidInput, match="'keep_first' needs a budget"):
        GenerationSpec(pruning="keep_first").resolve()


def test_a_plugin_named_in_the_environment_is_taken_by_the_cli_in_a_process_of_its_own(tmp_path):
    image = tmp_path / "img.png"
    random_image(1, (48, 40)).save(image)
    env = {**os.environ, PLUGINS_ENV: PLUGIN, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(PLUGIN_DIR), os.environ.get("PYTHONPATH")]))}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vlmguard.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    ran = cli("generate", "--model", "random:llava", "--image", str(image), "--prompt", "hi", "--max-new-tokens", "3",
              "--pruning", "keep_first", "--budget", "4", "--decoding", "textfree", "--param", "alpha=0.5", "--json")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["kept_indices"] == [0, 1, 2, 3] and len(out["tokens"]) == 3
    env[PLUGINS_ENV] = f"{PLUGIN},no_such_plugin_module"
    broken = cli("prune", "methods")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip() == ("vlmguard: error: plug-in method module 'no_such_plugin_module' (from "
                                     "$VLMGUARD_PLUGINS) cannot be imported: ModuleNotFoundError: No module named "
                                     "'no_such_plugin_module'")


def test_prune_methods_and_env_list_a_plugins_methods(plugins, capsys):
    assert main(["prune", "methods"]) == 0 and "keep_first" in capsys.readouterr().out
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "keep_first" in env["methods"]["pruning"] and "textfree" in env["methods"]["decoding"]
    assert env["plugins"] == [{"module": PLUGIN, "from": "$VLMGUARD_PLUGINS"}]
    assert main(["env"]) == 0 and f"plug-in method modules: {PLUGIN} (from $VLMGUARD_PLUGINS)" in \
        capsys.readouterr().out


def test_a_plugin_whose_method_takes_a_name_already_taken_is_refused(registries, monkeypatch, tmp_path):
    (tmp_path / "clashing_plugin.py").write_text(
        "from vlmguard.decoding.registry import DECODERS\nfrom vlmguard.decoding.vcd import VCD\n\n\n"
        "@DECODERS.register('vcd')\nclass MyVCD(VCD):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGINS_ENV, "clashing_plugin")
    with pytest.raises(PluginError, match=r"'clashing_plugin' \(from \$VLMGUARD_PLUGINS\) cannot be imported: "
                                          "ValueError: decoding 'vcd' registered twice"):
        import_plugins()
    sys.modules.pop("clashing_plugin", None)


def test_an_installed_plugins_entry_point_is_found(registries, monkeypatch, tmp_path):
    dist = tmp_path / "my_methods-0.1.dist-info"  # (what pip install writes for a plug-in package)
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[vlmguard.methods]\nexample = {PLUGIN}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    assert (PLUGIN, "entry point 'example' of group 'vlmguard.methods'") in plugin_modules()
    import_plugins()
    assert "keep_first" in PRUNERS and "textfree" in DECODERS


def test_the_service_deployments_take_the_plugins_named_here(monkeypatch):
    from vlmguard.workers.app import build_app
    from vlmguard.workers.config import ModelConfig, ServiceConfig

    config = ServiceConfig(models=[ModelConfig(model="tiny"), ModelConfig(model="random:llava", name="other")])
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    assert "runtime_env" not in build_app(config)._bound_deployment.ray_actor_options
    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)
    ingress = build_app(config)._bound_deployment
    models = [arg._bound_deployment for arg in ingress.init_args[1].values()]
    for deployment in (ingress, *models):  # (the ingress validates requests' methods; the models run them)
        assert deployment.ray_actor_options["runtime_env"] == {"env_vars": {PLUGINS_ENV: PLUGIN}}


def test_a_plugin_method_is_served_over_http_and_offered_by_the_dashboard(plugins, qwen):
    from vlmguard.dashboard import ui

    app = qwen_api(qwen)
    image = {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(2, (48, 40)))}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]

    async def scenario(client, http):
        ok = await client.chat.completions.create(model="tiny-qwen", messages=messages, max_tokens=3, extra_body={
            "vlmguard": {"pruning": "keep_first", "budget": 4, "decoding": "textfree", "decoding_params": {"alpha": 2}}})
        bad = await http.post("/v1/chat/completions", json={"model": "tiny-qwen", "messages": messages, "vlmguard": {
            "decoding": "textfree", "decoding_params": {"alpha": -1}}})
        return ok, bad

    ok, bad = run_with_sdk(app, scenario)
    info = ok.model_extra["vlmguard"]
    assert (info["pruning"], info["decoding"], info["kept_indices"]) == ("keep_first", "textfree", [0, 1, 2, 3])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "vlmguard.decoding_params.alpha"
    schemas = ui.method_schemas.__wrapped__() if hasattr(ui.method_schemas, "__wrapped__") else ui.method_schemas()
    assert schemas["pruning"]["keep_first"]["properties"]["skip"]["minimum"] == 0
    assert "alpha" in schemas["decoding"]["textfree"]["properties"]
