#!/usr/bin/env bash
# Install everything from scratch into .venv and run lint, types and tests.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (pinned in the train extra) is the CPU build on these machines.
.venv/bin/python -m pip install -q -e '.[train,dev]'

echo "== ruff"
.venv/bin/ruff check service model_export tests bench
echo "== mypy"
.venv/bin/mypy service model_export
echo "== pytest"
.venv/bin/python -m pytest "$@"
