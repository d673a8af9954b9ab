"""The Deployment's init container seeds the shared model repository with the
image's default model: run here with /bin/sh on temporary folders, it copies
the missing versions, leaves existing ones alone and succeeds on a second
start (`cp -n` exits 1 on skipped files in coreutils 9.2-9.4)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def seed_script(models: Path, repository: Path) -> list[str]:
    deployment = yaml.safe_load((REPO / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (seed,) = [c for c in pod["initContainers"] if c["name"] == "seed-models"]
    mounts = {m["mountPath"] for m in seed["volumeMounts"]}
    assert mounts == {"/repository"}
    command = list(seed["command"])
    script = command[-1].replace("/models", str(models))
    command[-1] = script.replace("/repository", str(repository))
    return command


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_seed_copies_missing_versions_and_succeeds_again(tmp_path: Path) -> None:
    image, repository = tmp_path / "image-models", tmp_path / "repository"
    for version in ("1", "2"):
        (image / "bottle-pwae" / version).mkdir(parents=True)
        (image / "bottle-pwae" / version / "model.onnx").write_text(f"graph {version}")
    # The repository already holds version 1, changed by a recalibration, and a
    # half-copied version 2 that a killed pod left behind.
    (repository / "bottle-pwae" / "1").mkdir(parents=True)
    (repository / "bottle-pwae" / "1" / "model.onnx").write_text("kept")
    (repository / "bottle-pwae" / "2.seeding").mkdir()
    (repository / "bottle-pwae" / "2.seeding" / "partial").write_text("")
    command = seed_script(image, repository)
    first = run(command)
    assert first.returncode == 0, first.stderr
    assert (repository / "bottle-pwae" / "1" / "model.onnx").read_text() == "kept"
    assert (repository / "bottle-pwae" / "2" / "model.onnx").read_text() == "graph 2"
    assert sorted(p.name for p in (repository / "bottle-pwae").iterdir()) == ["1", "2"]
    # A second start (the pod restarted): nothing to copy, and no failure.
    again = run(command)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    # An empty repository (a new volume) gets every version.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run(seed_script(image, fresh)).returncode == 0
    assert sorted(p.name for p in (fresh / "bottle-pwae").iterdir()) == ["1", "2"]
