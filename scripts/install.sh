#!/usr/bin/env bash
# Install mmbalance and what it needs on a fresh Debian/Ubuntu machine.
#   bash scripts/install.sh        the library and its system packages
#   bash scripts/install.sh --dev  also the test and lint tools
# The package asks for any torch in a range (pyproject.toml); this script, and so CI, installs
# the exact build the tests run on: torch 2.13.0, the small CPU build on machines without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng dataset-fashion-mnist chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
"$PYTHON" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".${extra}"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
echo "mmbalance installed ($("$PYTHON" -c 'import mmbalance; print(mmbalance.__version__)'))"
