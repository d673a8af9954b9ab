"""Arrows run one way: model_export -> service. The server must import and
run its whole package in an interpreter where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, pkgutil, sys

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "model_export", "torchvision"):
            raise ImportError(f"service must not import {name}")
        return None

sys.meta_path.insert(0, Forbid())
import service
names = ["service"] + [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "model_export"))
assert not loaded, loaded
print(len(names))
"""


def test_service_imports_without_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 5  # every module was walked, not just the package


def test_forbidding_works() -> None:
    # The probe itself must be able to fail: importing torch under it raises.
    probe = PROBE.replace("import service\n", "import service\nimport torch\n", 1)
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "service must not import torch" in result.stderr
