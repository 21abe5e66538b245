#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment with the CPU build of
# torch, the project and its test tools, and the mosquitto binary.
# Usage: scripts/bootstrap.sh   (VENV=path to choose the environment folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing mosquitto with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  else
    echo "[bootstrap] the 'mosquitto' broker binary is missing." >&2
    echo "            install it with: sudo apt-get install mosquitto   (Debian/Ubuntu)" >&2
    echo "            or: conda env create -f environment.yml           (conda-forge)" >&2
    exit 1
  fi
fi

stamp="$VENV/.fedhlm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned, so that pip takes the CPU wheel instead of a multi-GB CUDA build
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
