import faulthandler
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLMGUARD_SHARED", ROOT.parent / "shared"))


def pytest_configure(config):
    """One intra-op thread for the whole session, from its first test. The tiny test models run faster without
    torch's pool on a 2-core machine, and the suite's results no longer depend on which test ran first: a perf
    command run in-process (``--threads 1``) used to leave the process at one thread, so a test comparing two
    batch shapes bit for bit passed in the suite and failed alone (BLAS blocks a matrix differently by thread
    count). Tests that need more threads set them themselves."""
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After pytest's own faulthandler has stood down: a native crash in the interpreter's teardown, after the
    verdict (it happened once: "double free or corruption", exit 134, every test passed), still prints every
    thread's Python stack, so the log says which library's teardown it was."""
    faulthandler.enable(file=sys.__stderr__, all_threads=True)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.exists(), f"shared/ not found beside the repo at {SHARED}"
    return SHARED


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything would start or join a Ray cluster."""
    import ray

    from vlmguard.workers import launch

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch, "start_service", boom)
    monkeypatch.setattr(launch, "start_detached_cluster", boom)
    monkeypatch.setattr(ray, "init", boom)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``), whatever an
    earlier test left (the session starts on one, see ``pytest_configure``, but a model replica built in-process sets
    its own count); the count before is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen():
    """A tiny random Qwen2-VL's worker, served as ``tiny-qwen`` (the Responses and Conversations tests' model)."""
    from service_support import qwen_worker

    return qwen_worker()
