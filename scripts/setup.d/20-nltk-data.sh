#!/usr/bin/env bash
# Offline NLTK data for CHAIR (benchmarks.md 2.5): WordNet 3.0 from Debian, the perceptron tagger from the
# converted copy the package ships, both into the project-owned data dir (vlmguard/assets/nltk_data,
# or $VLMGUARD_NLTK_DATA). Never downloads from NLTK's server. Idempotent; run by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then
  pkgs=(wordnet-base wordnet-sense-index)
  if [ "$(id -u)" = 0 ]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo -n); else SUDO=(); fi
  if [ "$(id -u)" = 0 ] || [ ${#SUDO[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || {
      "${SUDO[@]}" apt-get update -qq >/dev/null
      "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    }
  else
    echo "20-nltk-data: WordNet missing and not root; install: apt-get install ${pkgs[*]}" >&2
    exit 1
  fi
fi

# The tagger comes with the package (vlmguard/assets/nltk_tagger, converted from nltk_data's pickle).
if "$PY" -m vlmguard.bench.nltk_setup --check >/dev/null 2>&1; then
  echo "20-nltk-data: NLTK data already installed"
else
  "$PY" -m vlmguard.bench.nltk_setup
fi
