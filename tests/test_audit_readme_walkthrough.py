"""Found by running README.md's and workers/README.md's commands literally: ``vlmguard job submit bench pope --help``
named the module the job runs (``python -m vlmguard.workers.bench_job``) instead of the command the user typed."""
from __future__ import annotations

import pytest

from vlmguard.cli import main


@pytest.mark.parametrize("argv, usage", [
    (["job", "submit", "bench", "pope", "--help"], "usage: vlmguard job submit bench [-h]"),
    (["job", "submit", "bench", "sweep", "--help"], "usage: vlmguard job submit bench sweep [-h]"),
])
def test_a_jobs_benchmark_help_names_the_command_typed(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(usage) and "bench_job" not in out


def test_a_config_short_of_cpus_and_gpus_names_both():
    """``serve --config configs/serve-gpu.yaml`` against a 2-CPU cluster without GPUs named the CPUs only: a user who
    lowered num_cpus then met the GPU error next."""
    from vlmguard.errors import InvalidInput
    from vlmguard.workers.config import ServiceConfig
    from vlmguard.workers.launch import check_resources

    cfg = ServiceConfig(models=[{"model": "tiny", "num_replicas": 2, "num_cpus": 4, "num_gpus": 1, "device": "cuda"}])
    with pytest.raises(InvalidInput) as e:
        check_resources(cfg, {"CPU": 2.0, "GPU": 0.0}, "the Ray cluster at h:1")
    msg = str(e.value)
    assert msg.startswith("the replicas reserve more CPUs than the Ray cluster at h:1 has (2): tiny 8 (2 replicas x 4)")
    assert "; and more GPUs than the Ray cluster at h:1 has (0): tiny 2 (2 replicas x 1)" in msg
    assert "\n" not in msg
