#!/usr/bin/env bash
# Checks that the lower bounds in pyproject.toml hold: builds a second virtualenv with every direct dependency (and
# the quant extras) at the lowest version pyproject.toml allows (`name>=X` installed as `name==X`; unbounded ones as
# pip resolves them),
# the dev extras at their constraints.txt versions, this checkout installed --no-deps, and runs the default test
# suite there. A bound pip cannot install (it conflicts with another package's requirements) fails the install.
# torch's lower bound comes from PyPI, a CUDA build (with its nvidia-* packages) that runs on the CPU; TORCH=2.13.0
# installs the CPU build on these machines' disk instead (torch's own bound is then not tested, the rest still are).
# A maintenance check, not run by CI (.ci/run): it downloads and installs a whole second environment (~8 GB;
# ~1.5 GB with TORCH=2.13.0).
# Usage: [TORCH=VERSION] scripts/check-lowest-deps.sh [DIR]   (DIR: where the venv goes; default: a new mktemp dir)
# Extra pytest arguments can be passed in PYTEST_ARGS, e.g. PYTEST_ARGS="-x tests/test_engine.py".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
DIR=${1:-$(mktemp -d -t vlmguard-lowest.XXXXXX)}
mkdir -p "$DIR"
VENV="$DIR/venv"
echo "check-lowest-deps: venv in $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

# The requirement lines: each direct dependency and the quant extras at their lower bounds (torch: $TORCH if set),
# the dev extras pinned.
"$PY" - pyproject.toml constraints.txt > "$DIR/lowest-requirements.txt" <<'EOF'
import os, re, sys, tomllib

def parse(text):  # "name[extras]>=1.2,<3  # comment" -> ("name[extras]", "1.2" or None)
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)\s*([^;]*?)\s*(;.*)?", text)
    if not m or m[3]:
        sys.exit(f"check-lowest-deps: cannot read requirement {text!r}")
    lows = re.findall(r">=\s*([^,\s]+)", m[2])
    return m[1].replace(" ", ""), (lows[0] if len(lows) == 1 else None)

def key(name):
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
pins = {}
for line in open(sys.argv[2]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==", 1)
        pins[key(name)] = version.strip()

for text in project["dependencies"] + project["optional-dependencies"]["quant"]:
    name, low = parse(text)
    if key(name) == "torch" and os.environ.get("TORCH"):
        low = os.environ["TORCH"]
    print(f"{name}=={low}" if low else name)
for text in project["optional-dependencies"]["dev"]:
    name, low = parse(text)
    pin = pins.get(key(name))
    print(f"{name}=={pin}" if pin else text)
EOF
echo "check-lowest-deps: installing"; cat "$DIR/lowest-requirements.txt"

# All in one resolve (torch==2.13.0 gets the CPU build on disk, 2.13.0+cpu, as in scripts/setup.sh).
"$PY" -m pip install -q -r "$DIR/lowest-requirements.txt"
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip check
"$PY" -m pip freeze --exclude-editable > "$DIR/freeze.txt"

# Offline NLTK data and the browser, as `make setup` does (idempotent; they do not touch the venv).
for extra in scripts/setup.d/*.sh; do
  [ -e "$extra" ] && PATH="$VENV/bin:$PATH" bash "$extra"
done

echo "check-lowest-deps: running the default test suite (pip freeze in $DIR/freeze.txt)"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-}
