#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh machine: a virtualenv in .venv with Trapline and everything
# its services, tests and tools need, plus buf for the contracts. Re-running it is quick when nothing changed.
#   PYTHON=python3.11 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
stamp="$VENV/.trapline-setup"
want="$(cat pyproject.toml setup.py package.json | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/trapline" ]; then
  echo "setup: up to date ($VENV)"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch/torchvision first and pinned: these exact releases install from local disk on the reference machine
# (a CUDA build that also runs on the CPU); a looser request could pull several GB from the network.
echo "setup: torch + torchvision (trainer and model building only)"
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
echo "setup: trapline[dev] (all services, tests, stub generator)"
$PIP install -q -e ".[dev]"
if command -v npm >/dev/null; then
  echo "setup: buf (contract lint) via npm"
  npm install --no-audit --no-fund --silent >/dev/null 2>&1 || echo "setup: npm install failed; buf lint will be skipped" >&2
fi
echo "$want" > "$stamp"
echo "setup: done"
