#!/usr/bin/env bash
# Fetch, on a machine that reaches the package registry, the wheels that the lent GPU machine lacks
# (its image has torch, tokenizers, safetensors, numpy, pillow, ... but not pydantic or pycocotools, and an
# older transformers), into .whl/ (git-ignored), in the versions this checkout's venv runs.
# Then, on the GPU machine: scripts/gpu/perf.sh (the device tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PKGS=(transformers pydantic pydantic_core annotated_types typing_inspection typing_extensions pycocotools)
pins=()
for p in "${PKGS[@]}"; do
  pins+=("$p==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")")
done
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -la .whl
du -sh .whl
