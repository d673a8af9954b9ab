"""Resolve pyproject.toml's dependencies into the lock files under requirements/.

Every install path installs from one of these files, with pip's hash
checking (`pip install --require-hashes -r requirements/<name>.txt`, then the
project itself with `--no-deps`), so two builds of one commit get the same
packages, byte for byte:

    requirements/cpu.txt    the server + onnxruntime: the CPU image and
                            scripts/serve.sh (any platform, Python >= 3.11)
    requirements/gpu.txt    the server + onnxruntime-gpu: the GPU image
                            (Linux x86_64, Ubuntu 24.04's Python 3.12)
    requirements/dev.txt    the server, the trainer and the test tools:
                            scripts/test.sh, i.e. CI (Linux x86_64, Python
                            3.11), with torch 2.13.0's CPU build (+cpu)
    requirements/train.txt  the trainer: the train image (Linux x86_64,
                            Python 3.12), torch 2.13.0 from PyPI (CUDA)

Each file pins every package, the build backend (setuptools) included, with
the sha256 of every file PyPI has for that version. The four agree with one
another: a package in two of them has one version (torch's local label
aside), and onnxruntime is pinned to the release of onnxruntime-gpu, so the
CPU image, the GPU image and CI run the same runtime. An existing pin is
kept unless pyproject.toml no longer allows it; `--upgrade` moves every
package to the newest version allowed, `--upgrade-package NAME` one of them.

    .venv/bin/python scripts/lock.py                      # after editing pyproject.toml
    .venv/bin/python scripts/lock.py --upgrade-package fastapi
    .venv/bin/python scripts/lock.py --check              # offline: do they cover pyproject?

Needs uv (the dev extra installs it) and PyPI, and for dev.txt a folder or
index with torch's 2.13.0+cpu wheel: `--torch-find-links`, default
$TORCH_FIND_LINKS or else pip's find-links ($PIP_FIND_LINKS; these machines
keep a copy there). tests/unit/test_lock.py runs the `--check` part.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCKS = REPO / "requirements"
COMMAND = ".venv/bin/python scripts/lock.py"

LINUX_X86_64 = "x86_64-manylinux_2_28"


@dataclass(frozen=True)
class Target:
    """One lock file: which extras, for which interpreter and platform."""

    name: str
    extras: tuple[str, ...]
    python: str
    platform: str | None  # None: universal (every platform, every Python >= python)
    torch_cpu: bool = False  # torch from the +cpu wheel's folder


TARGETS = {
    t.name: t
    for t in (
        Target("cpu", ("cpu",), "3.11", None),
        Target("gpu", ("gpu",), "3.12", LINUX_X86_64),
        Target("dev", ("train", "dev"), "3.11", LINUX_X86_64, torch_cpu=True),
        Target("train", ("train",), "3.12", LINUX_X86_64),
    )
}


def lock_path(target: str) -> Path:
    return LOCKS / f"{target}.txt"


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: Version
    marker: str | None
    hashes: tuple[str, ...]


def read_lock(path: Path) -> dict[str, list[Pin]]:
    """The pins of a lock file by canonical name (several where markers split one)."""
    pins: dict[str, list[Pin]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
        req = Requirement(re.sub(r"\s--hash=\S+", "", line).strip())
        (spec,) = req.specifier  # exactly one ==
        assert spec.operator == "==", line
        pin = Pin(
            canonicalize_name(req.name),
            Version(spec.version),
            str(req.marker or "") or None,
            hashes,
        )
        pins.setdefault(pin.name, []).append(pin)
    return pins


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """What pyproject.toml asks for with these extras, the build backend included."""
    pyproject = tomllib.loads(PYPROJECT.read_text())
    project = pyproject["project"]
    lines = [*pyproject["build-system"]["requires"], *project["dependencies"]]
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def check(targets: list[Target]) -> list[str]:
    """What is wrong with the lock files, offline: empty when they cover pyproject."""
    problems: list[str] = []
    locks: dict[str, dict[str, list[Pin]]] = {}
    for target in targets:
        path = lock_path(target.name)
        if not path.is_file():
            problems.append(f"{path.relative_to(REPO)} is missing: run {COMMAND}")
            continue
        pins = locks[target.name] = read_lock(path)
        for pin in (p for ps in pins.values() for p in ps):
            if not pin.hashes:
                problems.append(f"{path.name}: {pin.name} has no --hash")
        for req in project_requirements(target.extras):
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"{path.name}: {req} (pyproject.toml) is not locked: run {COMMAND}")
                continue
            for pin in pins[name]:
                if not req.specifier.contains(pin.version, prereleases=True):
                    problems.append(
                        f"{path.name}: {name}=={pin.version} does not satisfy {req}"
                        f" (pyproject.toml): run {COMMAND}"
                    )
    # One version of each package across the files (torch: +cpu on CI, CUDA in the image).
    versions: dict[str, set[tuple[str, str]]] = {}
    for lock_name, lock_pins in locks.items():
        for package, package_pins in lock_pins.items():
            for pin in package_pins:
                versions.setdefault(package, set()).add((lock_name, pin.version.public))
    for package, seen in versions.items():
        if len({v for _, v in seen}) > 1:
            problems.append(f"{package} has several versions: {sorted(seen)}")
    ort = {v for n in ("onnxruntime", "onnxruntime-gpu") for _, v in versions.get(n, ())}
    if len(ort) > 1:
        problems.append(f"onnxruntime and onnxruntime-gpu differ: {sorted(ort)}")
    return problems


# ------------------------------------------------------------------ writing


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        sys.exit("lock.py: uv is not installed (the dev extra has it: pip install uv)")
    return found


def compile_lock(
    target: Target,
    constraints: list[str],
    constraints_name: str,
    output: Path,
    torch_find_links: str | None,
    upgrade: list[str],
    work: Path,
) -> None:
    """uv pip compile one target into `output` (its old pins are the preferences)."""
    inputs = work / f"{target.name}.in"
    inputs.write_text("\n".join(str(r) for r in project_requirements(target.extras)) + "\n")
    cmd = [
        uv(), "pip", "compile", str(inputs),
        "--output-file", str(output),
        "--python-version", target.python,
        "--generate-hashes",
        "--no-strip-markers",
        "--quiet",
    ]  # fmt: skip
    cmd += ["--python-platform", target.platform] if target.platform else ["--universal"]
    # One version of a package for every Python the file serves (numpy's newest
    # may want a newer Python than the oldest supported: then an older numpy).
    cmd += ["--fork-strategy", "fewest"]
    if target.torch_cpu:
        if not torch_find_links:
            sys.exit(
                "lock.py: dev.txt wants torch's 2.13.0+cpu wheel: give its folder or index"
                " with --torch-find-links (or TORCH_FIND_LINKS)"
            )
        cmd += ["--find-links", torch_find_links]
    if constraints:
        # Named after where the pins come from: uv's annotations show the name.
        constraint_file = work / constraints_name
        constraint_file.write_text("\n".join(constraints) + "\n")
        cmd += ["--constraint", constraint_file.name]
    cmd += upgrade
    env = {**os.environ, "UV_CUSTOM_COMPILE_COMMAND": COMMAND}
    result = subprocess.run(cmd, cwd=work, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"lock.py: resolving {output.name} failed:\n{result.stderr}")
    # uv names the temporary input in its annotations: name pyproject instead.
    text = output.read_text().replace(f"-r {inputs}", "pyproject.toml")
    text = text.replace(str(inputs), "pyproject.toml").replace(inputs.name, "pyproject.toml")
    output.write_text(text)


def pins_as_constraints(target: str, drop: frozenset[str] = frozenset()) -> list[str]:
    out = []
    for name, pins in read_lock(lock_path(target)).items():
        if name in drop:
            continue
        for pin in pins:
            out.append(f"{name}=={pin.version}" + (f" ; {pin.marker}" if pin.marker else ""))
    return out


def write_locks(torch_find_links: str | None, upgrade: list[str]) -> None:
    LOCKS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def run(target: str, constraints: list[str], constraints_name: str = "") -> None:
            compile_lock(
                TARGETS[target],
                constraints,
                constraints_name,
                lock_path(target),
                torch_find_links,
                upgrade,
                work,
            )
            print(f"lock.py: wrote {lock_path(target).relative_to(REPO)}", file=sys.stderr)

        # 1. The GPU runtime's release decides onnxruntime's: onnxruntime-gpu
        #    lags the CPU package on PyPI at times.
        run("gpu", [])
        (ort_gpu,) = read_lock(lock_path("gpu"))["onnxruntime-gpu"]
        # 2. The server's stack, for every platform; 3. the GPU image on it.
        run("cpu", [f"onnxruntime=={ort_gpu.version}"], "onnxruntime-gpu-release.txt")
        run("gpu", pins_as_constraints("cpu", frozenset({"onnxruntime"})), "cpu.txt")
        # 4. CI: the same server stack plus the trainer and the tools.
        run("dev", pins_as_constraints("cpu"), "cpu.txt")
        # 5. The train image: CI's versions, torch from PyPI instead of +cpu.
        run("train", pins_as_constraints("dev", frozenset({"torch"})), "dev.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the files, offline")
    parser.add_argument("--upgrade", action="store_true", help="newest versions allowed")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME")
    parser.add_argument(
        "--torch-find-links",
        default=os.environ.get("TORCH_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS"),
        help="folder or index page with torch's 2.13.0+cpu wheel (for dev.txt)",
    )
    args = parser.parse_args(argv)
    if not args.check:
        upgrade = ["--upgrade"] if args.upgrade else []
        for name in args.upgrade_package:
            upgrade += ["--upgrade-package", name]
        write_locks(args.torch_find_links, upgrade)
    problems = check(list(TARGETS.values()))
    for problem in problems:
        print(f"lock.py: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
