"""Second audit of `vlmguard serve` / `vlmguard job`: `serve --stop` removes only vlmguard's apps and names the
cluster; replicas needing more CPUs/GPUs than the cluster has, and unknown random:FAMILY models, fail at once
instead of hanging; options of `job submit` placed after `bench` are named. Nothing here starts Ray."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlmguard.cli import main
from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.workers import jobs, launch, ray_auth
from vlmguard.workers.config import ModelConfig, ServiceConfig


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmguard: error: ") and "\n" not in err, err
    return err


# ---- serve --stop -------------------------------------------------------------------------------------

@pytest.fixture
def fake_cluster(monkeypatch):
    """A joined cluster at 10.1.2.3:6379 whose Serve apps are ``state["apps"]`` (name -> deployment names);
    what --stop deletes or shuts down is recorded."""
    import ray
    from ray import serve

    state = {"apps": {}, "deleted": [], "shutdown": 0, "init": None}
    monkeypatch.setattr(ray_auth, "use_local_auth_token", lambda: None)
    monkeypatch.setattr(ray, "init", lambda address=None, **k: state.update(init=address))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="10.1.2.3:6379"))
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={
        name: SimpleNamespace(deployments=dict.fromkeys(deps)) for name, deps in state["apps"].items()}))
    monkeypatch.setattr(serve, "delete", lambda name, **k: state["deleted"].append(name))
    monkeypatch.setattr(serve, "shutdown", lambda: state.update(shutdown=state["shutdown"] + 1))
    return state


def test_stop_leaves_a_cluster_without_a_vlmguard_app_alone(fake_cluster, capsys):
    # the cluster Ray found ($RAY_ADDRESS, this machine's latest) runs another program's app: --stop used to
    # shut Serve down there
    fake_cluster["apps"] = {"theirs": ["Router", "Model"]}
    assert main(["serve", "--stop"]) == 0
    out = capsys.readouterr().out
    assert fake_cluster["init"] == "auto"
    assert fake_cluster["shutdown"] == 0 and fake_cluster["deleted"] == []
    assert out == "no vlmguard app on the Ray cluster at 10.1.2.3:6379 (Serve apps there: theirs): nothing to stop\n"


@pytest.mark.parametrize("apps, deleted, shutdown, kept", [
    # the vlmguard app beside another program's: only ours goes, Serve keeps serving theirs
    ({"vlmguard": ["ModelWorker_0_tiny"], "theirs": ["Model"]}, ["vlmguard"], 0, " (Serve keeps running theirs)"),
    # ours alone (a separate-ingress app, another app name): Serve goes too, freeing its HTTP port
    ({"perf-a": ["Ingress", "ModelWorker_0_tiny", "ModelWorker_1_random_llava"]}, ["perf-a"], 1, ""),
])
def test_stop_removes_only_vlmguard_apps_and_names_the_cluster(fake_cluster, capsys, apps, deleted, shutdown, kept):
    fake_cluster["apps"] = apps
    assert main(["serve", "--stop"]) == 0
    assert fake_cluster["deleted"] == deleted and fake_cluster["shutdown"] == shutdown
    assert capsys.readouterr().out == (f"vlmguard app {deleted[0]} removed from the Ray cluster at 10.1.2.3:6379{kept}; "
                                       "the cluster keeps running (`ray stop` ends it)\n")


# ---- resources ----------------------------------------------------------------------------------------

def test_serve_refuses_replicas_needing_more_cpus_than_num_cpus_before_ray(no_ray, capsys, tmp_path):
    assert main(["serve", "--model", "random:llava", "--replicas", "2", "--num-cpus", "1", "--port", "0",
                 "--dashboard-port", "0"]) == 2
    assert ("the replicas reserve more CPUs than a cluster of --num-cpus 1 has (1): random:llava 2 (2 replicas x 1)"
            in _one_error_line(capsys))
    cfg = tmp_path / "big.yaml"
    cfg.write_text("models: [{model: random:llava, num_cpus: 4}]\n")
    assert main(["serve", "--config", str(cfg), "--num-cpus", "2", "--port", "0", "--dashboard-port", "0"]) == 2
    assert "more CPUs than a cluster of --num-cpus 2 has (2): random:llava 4 (1 replica x 4)" in _one_error_line(capsys)


@pytest.fixture
def fake_connected(monkeypatch):
    """start_service connected to a fake cluster: ``state`` sets its resources, GCS address and ownership;
    records whether the owned cluster was shut down and whether Serve was reached."""
    import ray
    from ray import serve

    state = {"resources": {}, "gcs": "127.0.0.1:6379", "owns": False, "ray_shutdown": 0, "serve_start": 0}
    monkeypatch.setattr(launch, "connect_ray", lambda *a, **k: (state["owns"], None))
    monkeypatch.setattr(ray, "cluster_resources", lambda: state["resources"])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address=state["gcs"]))
    monkeypatch.setattr(ray, "shutdown", lambda: state.update(ray_shutdown=state["ray_shutdown"] + 1))

    def serve_start(**k):
        state["serve_start"] += 1
        raise RuntimeError("Serve reached")

    monkeypatch.setattr(serve, "start", serve_start)
    return state


def test_start_service_fails_at_once_when_the_cluster_lacks_cpus(fake_connected):
    # serve.run used to wait for ever for replicas Ray could not place (not even the health timeout ended it)
    fake_connected.update(resources={"CPU": 2.0, "memory": 1e9}, owns=True, gcs="10.0.0.5:41234")
    cfg = ServiceConfig(models=[ModelConfig(model="random:llava", num_replicas=2, num_cpus=1.5)], port=0)
    with pytest.raises(InvalidInput) as ei:
        launch.start_service(cfg)
    assert str(ei.value).startswith("the replicas reserve more CPUs than the Ray cluster at 10.0.0.5:41234 has (2): "
                                    "random:llava 3 (2 replicas x 1.5)")
    assert fake_connected["serve_start"] == 0 and fake_connected["ray_shutdown"] == 1  # the cluster it started ends
    # a joined cluster on this machine (e.g. `serve --detach`'s) cannot grow either; no GPU key means none
    fake_connected.update(resources={"CPU": 8.0}, owns=False, gcs="127.0.0.1:6379")
    with pytest.raises(InvalidInput, match=r"more GPUs than the Ray cluster at 127.0.0.1:6379 has \(0\): tiny 1 "):
        launch.start_service(ServiceConfig(models=[ModelConfig(device="cuda")], port=0))
    assert fake_connected["serve_start"] == 0
    # enough: deployment goes on
    fake_connected.update(resources={"CPU": 3.0})
    with pytest.raises(VlmguardError, match="Serve reached"):
        launch.start_service(cfg)


def test_start_service_warns_on_a_remote_cluster_that_may_autoscale(fake_connected, capsys):
    fake_connected.update(resources={"CPU": 16.0}, gcs="10.0.0.5:6379")
    with pytest.raises(VlmguardError, match="Serve reached"):
        launch.start_service(ServiceConfig(models=[ModelConfig(device="cuda", num_replicas=2)], port=0))
    err = capsys.readouterr().err
    assert err.startswith("warning: the replicas reserve more GPUs than the Ray cluster at 10.0.0.5:6379 has (0): "
                          "tiny 2 (2 replicas x 1)") and "stay pending until the cluster grows" in err


# ---- random:FAMILY ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", [[], ["--address", "auto"]])
def test_serve_unknown_random_family_is_refused_before_ray(no_ray, capsys, where):
    assert main(["serve", "--model", "random:nosuch", "--port", "0", "--dashboard-port", "0", *where]) == 2
    assert _one_error_line(capsys) == ("vlmguard: error: unknown family 'nosuch' in 'random:nosuch' "
                                       "(known: llava, llava_next, qwen2_vl)")
    with pytest.raises(AssertionError, match="Ray was started"):  # a known family goes on to Ray
        main(["serve", "--model", "random:qwen2_vl", "--port", "0", "--dashboard-port", "0", *where])


# ---- job submit ---------------------------------------------------------------------------------------

def test_job_submit_names_its_own_options_placed_after_bench(monkeypatch, capsys):
    def no_cluster(*a, **k):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(jobs, "client", no_cluster)
    assert main(["job", "submit", "bench", "pope", "--limit", "2", "--wait", "--timeout=5"]) == 2
    assert _one_error_line(capsys) == (
        "vlmguard: error: bad benchmark job arguments: unrecognized arguments: --wait --timeout=5 (--wait, "
        "--timeout: options of `job submit`, not of the benchmark; put them before `bench`)")
    assert main(["job", "submit", "bench", "pope", "--address", "http://10.0.0.5:8265"]) == 2
    assert "(--address: an option of `job submit`, not of the benchmark; put it before `bench`)" in \
        _one_error_line(capsys)
    assert main(["job", "submit", "bench", "pope", "--nosuch"]) == 2  # not one of ours: no hint
    assert _one_error_line(capsys) == "vlmguard: error: bad benchmark job arguments: unrecognized arguments: --nosuch"
