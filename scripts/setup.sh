#!/usr/bin/env bash
# Creates .venv and installs vlmguard with its dev and quant extras, offline data and system tools.
# Idempotent; called by `make setup` (and so by `make test` / `make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch that installs on these machines; an unpinned torch would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# Every package at the version the tests last passed with (constraints.txt); pyproject.toml holds the ranges.
pins=(); [ -f constraints.txt ] && pins=(-c constraints.txt)
.venv/bin/python -m pip install -q "${pins[@]}" -e ".[dev,quant]"
for extra in scripts/setup.d/*.sh; do
  [ -e "$extra" ] && bash "$extra"
done
echo "vlmguard setup complete"
