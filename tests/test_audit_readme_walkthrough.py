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
