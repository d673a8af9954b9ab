#!/usr/bin/env bash
# Install the server (no torch) into .venv and run it on the embedded default
# model at http://127.0.0.1:8000. Arguments go to `python -m service`
# (e.g. --host 0.0.0.0 --port 9000 --model-dir models/bottle-pwae).
#
# The install uses the lock file requirements/cpu.txt (exact versions, every
# file's sha256 checked) and runs once: again only when pyproject.toml or the
# lock file change (.venv/.serve-installed holds their sha256), so a start
# after the first goes straight to the server.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements/cpu.txt
stamp=.venv/.serve-installed
want="$(python3 -c 'import hashlib, sys
h = hashlib.sha256()
for name in sys.argv[1:]:
    h.update(open(name, "rb").read())
print(h.hexdigest())' pyproject.toml "$lock")"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --require-hashes -r "$lock"
    # The project itself, editable: code changes need no new install.
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    echo "$want" >"$stamp"
fi
exec .venv/bin/python -m service "$@"
