"""The lock files under requirements/: they cover pyproject.toml, agree with one
another, and every install path (the README's two commands, CI, the images)
installs from one of them with pip's hash checking. Offline: the files are
read, nothing is resolved (scripts/lock.py writes them)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_script", REPO / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_lock_files_cover_pyproject_and_agree(lock: ModuleType) -> None:
    # Every dependency of pyproject.toml (with each file's extras and the build
    # backend) pinned to a version its specifier allows, with hashes; one
    # version of a package across the files; onnxruntime = onnxruntime-gpu.
    problems = lock.check(list(lock.TARGETS.values()))
    assert not problems, "\n".join(problems)


def test_check_finds_an_unlocked_or_unsatisfied_dependency(
    lock: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (REPO / "pyproject.toml").read_text()
    edited = text.replace('"numpy>=1.26",', '"numpy>=99", "left-pad-not-locked>=1",', 1)
    assert edited != text
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(edited)
    monkeypatch.setattr(lock, "PYPROJECT", pyproject)
    problems = "\n".join(lock.check([lock.TARGETS["cpu"]]))
    assert "left-pad-not-locked" in problems and "is not locked" in problems
    assert re.search(r"numpy==\S+ does not satisfy numpy>=99", problems), problems


def pins(lock: ModuleType, target: str) -> dict[str, str]:
    return {n: str(p[0].version) for n, p in lock.read_lock(lock.lock_path(target)).items()}


def test_server_locks_carry_the_right_runtime_and_no_torch(lock: ModuleType) -> None:
    cpu, gpu = pins(lock, "cpu"), pins(lock, "gpu")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    for server in (cpu, gpu):
        assert "fastapi" in server and "setuptools" in server  # the build backend
        assert not {"torch", "torchvision", "onnx", "triton"} & set(server)
    # CI trains with the CPU build of torch, the train image with PyPI's (CUDA).
    assert pins(lock, "dev")["torch"] == "2.13.0+cpu"
    assert pins(lock, "train")["torch"] == "2.13.0"


def test_every_install_path_installs_from_a_lock_file() -> None:
    installs = {
        "scripts/serve.sh": "requirements/cpu.txt",
        "scripts/test.sh": "requirements/dev.txt",
    }
    for script, lock_file in installs.items():
        text = (REPO / script).read_text()
        pip_lines = [line for line in text.splitlines() if "pip install" in line]
        assert pip_lines, script
        for line in pip_lines:
            # the lock, hash-checked, or the project itself without dependencies
            assert "--require-hashes" in line or "--no-deps" in line, (script, line)
        assert lock_file in text or f"lock={lock_file}" in text, script
    dockerfile = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    for line in dockerfile.splitlines():
        if "pip install" in line:
            assert "--require-hashes -r requirements.txt" in line or "--no-deps" in line, line
    for target in ("cpu", "gpu", "train"):
        assert f"COPY requirements/{target}.txt requirements.txt" in dockerfile, target
    # the build context carries the lock files
    assert "!requirements/" in (REPO / ".dockerignore").read_text().split()
