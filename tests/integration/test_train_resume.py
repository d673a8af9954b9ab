"""Training killed mid-run (SIGKILL, as a preempted node) and started again
resumes from its checkpoint and ends with the model an uninterrupted run
gives under the same seed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.deploy import REPO
from tests.helpers.synthetic import write_category

SETTINGS = ["--set", "epochs=4", "--set", "batch_size=2", "--set", "permutations=24"]


def _train(data: Path, work: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "model_export", "train", "--family", "pwae",
         "--data", str(data), "--work", str(work), *SETTINGS],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
def test_killed_and_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    data = write_category(tmp_path / "data", n_train=10, n_test_good=1, n_test_defective=1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _train(data, whole).wait(timeout=600) == 0

    proc = _train(data, cut)
    state = cut / "train_state.pt"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        # The state is renamed into place whole, so a file seen is complete.
        if state.is_file() and torch.load(state, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    epoch = torch.load(state, weights_only=False)["epoch"]
    assert 1 <= epoch < 4, "killed too late to test resuming"
    assert not (cut / "checkpoint.pt").exists()

    assert _train(data, cut).wait(timeout=600) == 0
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(cut / "checkpoint.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
