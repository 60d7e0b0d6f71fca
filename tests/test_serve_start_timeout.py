"""deploy_app's bounded wait for Serve to report the app RUNNING, against a scripted ``serve.status`` (the real
cluster case, replicas Ray cannot place, is in test_serve_ray.py): a failed deploy, an app removed meanwhile, an
update of a running app that is not ours to remove, Ctrl-C, and ``vlmguard serve --start-timeout``'s validation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlmguard.errors import InvalidInput, VlmguardError
from vlmguard.workers import launch
from vlmguard.workers.config import ModelConfig, ServiceConfig

CFG = ServiceConfig(app_name="app", models=[ModelConfig(model="random:llava")])


def _app(status: str, message: str = "", deployments: dict | None = None):
    deps = {k: SimpleNamespace(status=v[0], message=v[1]) for k, v in (deployments or {}).items()}
    return SimpleNamespace(status=status, message=message, deployments=deps)


@pytest.fixture
def fake_serve(monkeypatch):
    """serve.status returns the scripted app states in turn (the last repeats); run_many and delete are recorded."""
    from ray import serve

    state = {"before": {}, "script": [], "deleted": [], "deployed": 0}

    def status():
        if not state["deployed"]:
            return SimpleNamespace(applications=state["before"])
        step = state["script"].pop(0) if len(state["script"]) > 1 else state["script"][0]
        if isinstance(step, BaseException):
            raise step
        return SimpleNamespace(applications={} if step is None else {"app": step})

    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(serve, "run_many", lambda targets, **k: state.update(deployed=1, targets=targets, kw=k))
    monkeypatch.setattr(serve, "delete", lambda name: state["deleted"].append(name))
    monkeypatch.setattr(launch, "_check_against_cluster", lambda config: None)
    return state


def test_running_returns_without_removing_and_deploys_without_serves_unbounded_wait(fake_serve):
    fake_serve["script"] = [_app("DEPLOYING"), _app("RUNNING")]
    launch.deploy_app(CFG, timeout_s=5, poll_s=0)
    assert fake_serve["kw"] == {"wait_for_applications_running": False}
    (target,) = fake_serve["targets"]
    assert (target.name, target.route_prefix) == ("app", "/")
    assert fake_serve["deleted"] == []


def test_a_failed_deploy_is_one_line_from_the_replicas_traceback_and_the_app_goes(fake_serve):
    tb = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n  File \"x.py\", "
          "line 1, in <module>\nvlmguard.errors.ModelLoadError: no model at /models/llava\n")
    fake_serve["script"] = [_app("DEPLOY_FAILED", "Failed to update the deployments ['ModelWorker_0_tiny'].",
                                 {"Ingress": ("HEALTHY", ""), "ModelWorker_0_tiny": ("DEPLOY_FAILED", tb)})]
    with pytest.raises(VlmguardError) as ei:
        launch.deploy_app(CFG, timeout_s=5, poll_s=0)
    assert str(ei.value) == ("deploying the app 'app' failed: ModelWorker_0_tiny DEPLOY_FAILED: no model at "
                             "/models/llava")
    assert fake_serve["deleted"] == ["app"]
    # no deployment to blame: Serve's message for the app
    fake_serve.update(deployed=0, script=[_app("DEPLOY_FAILED", "Failed to build the app.\n")])
    with pytest.raises(VlmguardError, match=r"^deploying the app 'app' failed: Failed to build the app$"):
        launch.deploy_app(CFG, timeout_s=5, poll_s=0)


def test_an_app_removed_while_it_deploys_is_named(fake_serve):
    fake_serve["script"] = [_app("DEPLOYING"), None]
    with pytest.raises(VlmguardError, match=r"the app 'app' was removed while it deployed"):
        launch.deploy_app(CFG, timeout_s=5, poll_s=0)


def test_timeout_names_what_serve_says_and_a_redeploys_running_version_stays(fake_serve, capsys):
    waiting = _app("DEPLOYING", deployments={
        "Ingress": ("HEALTHY", ""),
        "ModelWorker_0_tiny": ("UPDATING", "Deployment 'ModelWorker_0_tiny' has 1 replicas that have taken more than "
                                           "30s to be scheduled.\n Resources required for each replica: {'GPU': 1}")})
    fake_serve["script"] = [waiting]
    with pytest.raises(VlmguardError) as ei:
        launch.deploy_app(CFG, timeout_s=0.05, poll_s=0.01, report_every_s=0.01)
    msg = str(ei.value)
    assert msg.startswith("the app 'app' was not running after 0.05 s (--start-timeout), so it was removed: "
                          "ModelWorker_0_tiny UPDATING: Deployment 'ModelWorker_0_tiny' has 1 replicas that have "
                          "taken more than 30s to be scheduled. Resources required for each replica: {'GPU': 1}"), msg
    assert "Ingress" not in msg  # healthy deployments are not what it waits for
    assert fake_serve["deleted"] == ["app"]
    assert "waiting for the app 'app' (0 of at most 0.05 s): ModelWorker_0_tiny UPDATING" in capsys.readouterr().err

    # the same on an update of a running app: the app is not this call's to remove
    fake_serve.update(before={"app": _app("RUNNING")}, deployed=0, deleted=[], script=[waiting])
    with pytest.raises(VlmguardError, match=r"after 0.02 s \(--start-timeout\), and Serve goes on rolling out this "
                                            r"update of the running app \(`vlmguard serve --stop` removes the app\)"):
        launch.deploy_app(CFG, timeout_s=0.02, poll_s=0.01)
    assert fake_serve["deleted"] == []


def test_the_clusters_shortfall_comes_first(fake_serve, monkeypatch):
    def short(config):
        raise InvalidInput("the replicas reserve more GPUs than the Ray cluster at 10.0.0.5:6379 has (0): tiny 1")

    monkeypatch.setattr(launch, "_check_against_cluster", short)
    fake_serve["script"] = [_app("DEPLOYING")]
    with pytest.raises(VlmguardError, match=r"so it was removed: the replicas reserve more GPUs than the Ray cluster "
                                            r"at 10.0.0.5:6379 has \(0\): tiny 1$"):
        launch.deploy_app(CFG, timeout_s=0.02, poll_s=0.01)


def test_ctrl_c_while_waiting_removes_the_app(fake_serve):
    fake_serve["script"] = [_app("DEPLOYING"), KeyboardInterrupt()]
    with pytest.raises(KeyboardInterrupt):
        launch.deploy_app(CFG, timeout_s=5, poll_s=0)
    assert fake_serve["deleted"] == ["app"]


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_serve_refuses_a_start_timeout_that_is_no_positive_number(value, capsys, no_ray):
    from vlmguard.cli import main

    assert main(["serve", "--start-timeout", value]) == 2
    assert f"--start-timeout {float(value)}: expected a number of seconds > 0" in capsys.readouterr().err
