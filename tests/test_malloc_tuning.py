"""CPU engines keep freed activation memory mapped (glibc mallopt), so batched forwards stop re-faulting
fresh pages. Checked by counting the kernel's minor page faults (a count, not a timing)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from vlmguard.malloc_tuning import ENV_SWITCH, tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a serving replica's shape: the engine stepped from a worker thread, 16 requests per batch
PROBE = r"""
import json, resource, threading
import numpy as np
from PIL import Image
from vlmguard.engine import Engine
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec

engine = Engine.load("tiny", device="cpu")
rng = np.random.default_rng(0)
reqs = [Request("Describe this image.", [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))])
        for _ in range(16)]
out = {}

def work():
    spec = GenerationSpec(max_new_tokens=4)
    for _ in range(3):
        engine.generate(reqs, spec)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        engine.generate(reqs, spec)
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"tuned": engine.malloc_tuned, "faults": out["faults"]}))
"""


def _probe(switch: str) -> dict:
    env = dict(os.environ, **{ENV_SWITCH: switch}, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_tuned_engine_stops_refaulting_freed_memory():
    default, tuned = _probe("0"), _probe("1")
    assert default["tuned"] is False and tuned["tuned"] is True
    # glibc's defaults hand the blocks back and fault them in again on every batch
    assert tuned["faults"] < max(default["faults"] / 4, 2500), (default, tuned)


def test_tuning_is_once_per_process_and_reports_its_state():
    first = tune_malloc()
    assert tune_malloc() is first
    assert first is GLIBC or os.environ.get(ENV_SWITCH) == "0"
