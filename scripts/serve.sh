#!/usr/bin/env bash
# Install the server (no torch) into .venv and run it on the embedded default
# model at http://127.0.0.1:8000. Arguments go to `python -m service`
# (e.g. --host 0.0.0.0 --port 9000 --model-dir models/bottle-pwae).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu]'
exec .venv/bin/python -m service "$@"
