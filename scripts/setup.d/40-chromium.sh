#!/usr/bin/env bash
# Headless Chromium + chromedriver (Debian's `chromium`, `chromium-driver`) for the dashboard's real-browser
# test (tests/test_dashboard_browser.py). Installs them with apt-get only when absent; idempotent.
# Run by scripts/setup.sh. Without root (and without passwordless sudo) it says what to install and fails,
# like 20-nltk-data.sh.
set -euo pipefail

have_browser() {
  { command -v chromium >/dev/null || [ -x /usr/bin/chromium ]; } &&
    { command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ]; }
}

if have_browser; then
  echo "40-chromium: chromium and chromedriver already installed"
  exit 0
fi

pkgs=(chromium chromium-driver fonts-dejavu-core)
if [ "$(id -u)" = 0 ]; then SUDO=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
  echo "40-chromium: chromium/chromedriver missing and not root; install: apt-get install ${pkgs[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; then
  "${SUDO[@]}" apt-get update -qq >/dev/null
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

if have_browser; then
  echo "40-chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
else
  echo "40-chromium: apt-get finished but chromium/chromedriver are still missing" >&2
  exit 1
fi
