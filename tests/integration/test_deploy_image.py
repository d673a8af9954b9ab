"""The CPU image, built and run for real, without a Docker engine.

podman builds docker/Dockerfile's `cpu` target with chroot isolation on a
local stand-in for the public base (scripts/build-local-base.sh: debootstrap,
then podman import; no registry is reachable). buildah runs the image's own
ENTRYPOINT + CMD inside it, on 127.0.0.1, and the test inspects real MVTec AD
bottle images through HTTP against the default model baked into the image,
comparing the errors with onnxruntime run on the host on the same files.

Layers are cached in podman's store, and the base's root filesystem under
/var/cache/inspection-ci, so a second run rebuilds nothing that did not change.
The image carries the OCI labels (version, revision, source), and a change to
one line of the server's code, built again, adds a layer of well under 5 MB
(the dependencies' layer, ~370 MB, is reused).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.deploy import REPO, free_port, tool, wait_ready

pytestmark = pytest.mark.slow

DEFAULT_MODEL = REPO / "models" / "bottle-pwae"
IMAGE = "localhost/inspection-server:cpu-test"
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
BOTTLE = DATASETS / "mvtec_ad" / "bottle" / "test"
# A code-only change may add at most this much to the image.
CODE_CHANGE_MAX_BYTES = 5e6


def run(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def revision() -> str:
    """The commit being tested, for the image's revision label."""
    found = run(["git", "rev-parse", "HEAD"], cwd=REPO)
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def documented_build() -> list[str]:
    """The `podman build` line of docs/deployment.md, as words."""
    text = (REPO / "docs" / "deployment.md").read_text().replace("\\\n", " ")
    (line,) = [ln.strip() for ln in text.splitlines() if ln.startswith("    podman build ")]
    return shlex.split(line)


def build_command(context: Path, tag: str) -> list[str]:
    """The documented podman build of the cpu target, for this machine: the
    local base, this commit, pip's CA bundle, the given tag and context."""
    base = run(["bash", str(REPO / "scripts" / "build-local-base.sh")], timeout=600)
    assert base.returncode == 0, base.stderr
    substitutes = {
        "CPU_BASE=$(bash scripts/build-local-base.sh)": (
            f"CPU_BASE={base.stdout.strip().splitlines()[-1]}"
        ),
        "REVISION=$(git rev-parse HEAD)": f"REVISION={revision()}",
        "docker/Dockerfile": str(REPO / "docker" / "Dockerfile"),
        ".": str(context),
    }
    words = documented_build()
    assert words[:2] == ["podman", "build"] and words[-1] == ".", words
    cmd: list[str] = []
    flags = iter(words)
    for word in flags:
        if word in ("-t", "--tag"):
            next(flags)
            cmd += [word, tag]
        elif word == "--secret":
            secret = next(flags)
            assert secret.startswith("id=pip_ca,src="), secret
            ca = pip_ca()  # the CA bundle pip trusts here, wherever it lies
            if ca is not None:
                cmd += [word, f"id=pip_ca,src={ca}"]
        else:
            cmd.append(substitutes.get(word, word))
    assert str(context) == cmd[-1] and f"REVISION={revision()}" in cmd, cmd
    index = os.environ.get("PIP_INDEX_URL", "")
    if index.startswith(("http://", "https://")):  # a file:// index is not visible in the build
        cmd[-1:-1] = ["--build-arg", f"PIP_INDEX_URL={index}"]
    return cmd


def pip_ca() -> Path | None:
    """The CA bundle pip trusts here (a TLS-intercepting proxy's CA, if any)."""
    for candidate in (os.environ.get("PIP_CERT"), ssl.get_default_verify_paths().cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("podman/buildah with chroot isolation need root here (CI runs as root)")
    for name in ("podman", "buildah", "debootstrap"):
        tool(name, "scripts/install-system-deps.sh installs it")
    if not any(DEFAULT_MODEL.glob("*/metadata.json")):
        pytest.skip(f"no default model under {DEFAULT_MODEL} to bake into the image yet")
    started = time.monotonic()
    build = run(build_command(REPO, IMAGE), timeout=900)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    info = inspect_image(IMAGE)
    print(
        f"\nbase image and cpu image build {time.monotonic() - started:.0f} s,"
        f" size {info['Size'] / 1e6:.0f} MB"
    )
    return info


def inspect_image(tag: str) -> dict[str, Any]:
    inspect = run(["podman", "image", "inspect", tag])
    assert inspect.returncode == 0, inspect.stderr
    info: dict[str, Any] = json.loads(inspect.stdout)[0]
    return info


def layers(tag: str) -> list[tuple[str, int, str]]:
    """(diff id, size in bytes, instruction) of each layer of an image, base first."""
    info = inspect_image(tag)
    history = run(["podman", "history", "--format", "json", tag])
    assert history.returncode == 0, history.stderr
    sizes = list(reversed(json.loads(history.stdout)))  # podman lists the newest first
    assert len(sizes) == len(info["History"])
    made = [
        (int(size["size"]), str(entry.get("created_by", "")))
        for size, entry in zip(sizes, info["History"], strict=True)
        if not entry.get("empty_layer")
    ]
    diff_ids = info["RootFS"]["Layers"]
    assert len(made) == len(diff_ids)
    return [(d, size, by) for d, (size, by) in zip(diff_ids, made, strict=True)]


@pytest.fixture(scope="module")
def container(image: dict[str, Any]) -> Iterator[str]:
    name = f"inspection-test-{uuid.uuid4().hex[:8]}"
    made = run(["buildah", "from", "--pull-never", "--name", name, IMAGE])
    assert made.returncode == 0, made.stderr
    try:
        yield name
    finally:
        run(["buildah", "rm", name])


def buildah_run(container: str, cmd: list[str], env: dict[str, str] | None = None) -> list[str]:
    flags = ["--isolation", "chroot", "--network", "host"]
    for key, value in (env or {}).items():
        flags += ["--env", f"{key}={value}"]
    return ["buildah", "run", *flags, container, "--", *cmd]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image") / "server.log"


@pytest.fixture(scope="module")
def server(image: dict[str, Any], container: str, server_log: Path) -> Iterator[str]:
    config = image["Config"]
    # What `docker run` would start: the image's own entrypoint and command.
    command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    port = free_port()
    # Listen on loopback only: the run shares this machine's network.
    env = {"INSPECTION_HOST": "127.0.0.1", "INSPECTION_PORT": str(port)}
    log = server_log
    with log.open("wb") as out:
        proc = subprocess.Popen(
            buildah_run(container, command, env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server inside dies with it
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=180, log=log)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def healthcheck(image: dict[str, Any]) -> dict[str, Any]:
    # podman reports the Docker-format HEALTHCHECK beside Config, docker inside it.
    found = image["Config"].get("Healthcheck") or image.get("Healthcheck")
    assert found, "the image has no HEALTHCHECK (build with --format docker)"
    return dict(found)


def test_image_runs_the_tested_entrypoint_as_non_root(image: dict[str, Any]) -> None:
    config = image["Config"]
    assert config["Entrypoint"] == ["inspection-server"]
    assert config["User"].split(":")[0] == "10001"
    assert "/readyz" in " ".join(healthcheck(image)["Test"])
    assert "/models" in config["Volumes"]
    # "small": the base (~160 MB) plus numpy, OpenCV and onnxruntime, no torch.
    assert image["Size"] < 700e6, f"{image['Size'] / 1e6:.0f} MB"


def test_image_has_onnxruntime_and_no_torch(container: str) -> None:
    probe = (
        "import importlib.util, onnxruntime as ort, os; "
        "print(ort.get_available_providers(), os.getuid(), "
        "importlib.util.find_spec('torch') is None)"
    )
    result = run(buildah_run(container, ["python3", "-c", probe]))
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider" in result.stdout
    assert result.stdout.split()[-2:] == ["10001", "True"], result.stdout


def host_reference(image_bytes: bytes) -> dict[str, Any]:
    """The newest default model version run by onnxruntime on the host."""
    from service.artifact import load_artifact
    from service.contract import OUTPUT_IMAGE_ERROR, OUTPUT_TILE_ERRORS
    from service.preprocessing import prepare

    art = load_artifact(DEFAULT_MODEL, providers=["CPUExecutionProvider"])
    prepared = prepare(image_bytes, art.metadata.input, art.metadata.grid)
    e0, tiles = art.session.run(
        [OUTPUT_IMAGE_ERROR, OUTPUT_TILE_ERRORS], {"image": prepared.tensor[None]}
    )
    thresholds = art.metadata.thresholds
    ratios = [float(e0[0]) / thresholds.eps0] + [
        float(e) / eps for e, eps in zip(tiles[0], thresholds.tiles, strict=True)
    ]
    return {
        "name": art.metadata.name,
        "version": art.metadata.version,
        "e0": float(e0[0]),
        "verdict": "defective" if max(ratios) > 1.0 else "defect_free",
        "margin": min(abs(r - 1.0) for r in ratios),
    }


@pytest.mark.parametrize("picture", ["good/000.png", "broken_large/000.png"])
def test_image_inspects_real_bottles(server: str, picture: str) -> None:
    path = BOTTLE / picture
    if not path.is_file():
        pytest.skip(f"{path} absent: set INSPECTION_DATASETS to the datasets folder")
    data = path.read_bytes()
    answer = httpx.post(
        f"{server}/v1/inspect",
        content=data,
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = host_reference(data)
    # The model baked into the image is the repository's newest default version...
    assert body["model"]["name"] == expected["name"], body
    assert body["model"]["version"] == expected["version"], body
    # ...and answers as onnxruntime does on the host, to float tolerance.
    served_e0 = float(body["image"]["error"])
    assert np.isclose(served_e0, expected["e0"], rtol=1e-3, atol=1e-6), (served_e0, expected)
    verdict = str(body["verdict"]).replace("-", "_")
    if expected["margin"] > 1e-3:  # not on a threshold, where rounding may tip it
        assert verdict == expected["verdict"], (body, expected)
    else:
        assert verdict in ("defect_free", "defective")


def test_image_healthcheck_passes_on_the_running_server(
    image: dict[str, Any], container: str, server: str
) -> None:
    kind, *command = healthcheck(image)["Test"]
    assert kind == "CMD"
    port = server.rsplit(":", 1)[1]
    check = run(buildah_run(container, command, {"INSPECTION_PORT": port}))
    assert check.returncode == 0, check.stderr
    # and it fails where nothing listens
    dead = run(buildah_run(container, command, {"INSPECTION_PORT": str(free_port())}))
    assert dead.returncode != 0


def test_image_carries_its_oci_labels(image: dict[str, Any]) -> None:
    labels = image["Labels"] or image["Config"]["Labels"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    # this build's commit, not a cached label of an earlier build
    assert labels["org.opencontainers.image.revision"] == revision()
    assert labels["org.opencontainers.image.source"].startswith("https://")
    # not the local base's description
    assert "inspection" in labels["org.opencontainers.image.description"].lower()


def test_image_server_starts_without_native_warnings(server: str, server_log: Path) -> None:
    # onnxruntime warns at start where it cannot write under the user's cache
    # directory (a user without a home); the image gives it one.
    lines = [
        json.loads(line) for line in server_log.read_text().splitlines() if line.startswith("{")
    ]
    assert any(line["logger"] == "service.runtime" for line in lines), lines[:5]
    native = [line for line in lines if line["logger"].startswith("native.")]
    assert not native, native


def test_code_only_change_adds_a_small_layer(image: dict[str, Any], tmp_path: Path) -> None:
    # The build context of the cpu target (what .dockerignore lets through),
    # with one line of the server's code changed, built again.
    context = tmp_path / "context"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    for name in ("requirements", "service", f"models/{DEFAULT_MODEL.name}"):
        shutil.copytree(REPO / name, context / name, ignore=skip)
    with (context / "service" / "__init__.py").open("a") as f:
        f.write("# a one-line change: only the code's layer is new\n")
    changed = f"{IMAGE}-code-change"
    started = time.monotonic()
    build = run(build_command(context, changed), timeout=900)
    try:
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        before = {d for d, _, _ in layers(IMAGE)}
        after = layers(changed)
        new = [(size, by) for d, size, by in after if d not in before]
        added = sum(size for size, _ in new)
        print(
            f"\nrebuilt after a code change in {time.monotonic() - started:.0f} s:"
            f" {len(new)} of {len(after)} layers new, {added / 1e6:.2f} MB: {new}"
        )
        assert new, "the changed code is in no new layer"
        assert added < CODE_CHANGE_MAX_BYTES, new
        # and the dependencies' layer (the largest) is the one already there
        largest = max(after, key=lambda layer: layer[1])
        assert largest[0] in before and largest[1] > 100e6, largest
    finally:
        run(["podman", "rmi", "--force", changed])
