#!/usr/bin/env bash
# Chromium from the Debian packages, for tests/test_preview.py (the preview opened in a real
# headless browser). Does nothing when a Chromium is already installed.
set -euo pipefail
for exe in chromium chromium-browser google-chrome; do
  if command -v "$exe" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] no apt-get here: install Chromium with your package manager for the preview test" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "[setup] installing chromium (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
