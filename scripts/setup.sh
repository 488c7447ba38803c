#!/usr/bin/env bash
# Create .venv and install vtdsl with its test tools. Idempotent; works on a bare machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.vtdsl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-lock.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[dev,lmms]"
    # lmms-eval without its declared dependencies: they include torchvision, which breaks this
    # CPU torch (pyproject.toml, the lmms extra); the extra holds what it really imports.
    .venv/bin/python -m pip install --quiet -c requirements-lock.txt --no-deps lmms-eval
    touch "$stamp"
fi
