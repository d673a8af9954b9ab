#!/usr/bin/env bash
# Install everything from scratch into .venv and run lint, types and tests.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

python3 -m venv .venv
# The lock file (exact versions, every file's sha256 checked; scripts/lock.py
# writes it), then the project itself, editable, without dependencies. It pins
# torch==2.13.0+cpu, the CPU build, which pip finds in the local copy these
# machines keep (pip's find-links); elsewhere give pip PyTorch's CPU index
# (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
.venv/bin/python -m pip install -q --require-hashes -r requirements/dev.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .

echo "== ruff"
.venv/bin/ruff check service model_export tests bench
echo "== mypy"
.venv/bin/mypy service model_export
echo "== pytest"
.venv/bin/python -m pytest "$@"
