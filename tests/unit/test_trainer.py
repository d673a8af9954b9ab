"""The shared trainer (model_export/trainer.py) on a real family: OT
prototypes resume to the model an uninterrupted run gives, progress ends at
its total, the epoch records and the checkpoint's seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_export import ot_prototypes as ot
from model_export.families import get_family

CONFIG = ot.OTPrototypesConfig(
    members=(ot.MemberConfig("s16", 0.5, 1), ot.MemberConfig("s8", 0.0, 1)),
    epochs=3,
    sinkhorn_iterations=5,
    prototypes_per_problem=64,
    images_per_batch=2,
)


def _images(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(3, 300, 300, generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.fixture(scope="module")
def whole() -> tuple[torch.nn.Module, dict[str, object], list[int]]:
    ticks: list[int] = []
    model, log = ot.fit(CONFIG, _images(), progress=ticks.append)
    return model, log, ticks


def test_ot_resumes_to_the_model_of_an_uninterrupted_run(
    tmp_path: Path, whole: tuple[torch.nn.Module, dict[str, object], list[int]]
) -> None:
    model, log, _ = whole
    state = tmp_path / "train_state.pt"
    cut, _ = ot.fit(CONFIG, _images(), checkpoint=state, stop_after_epoch=1)  # "killed"
    assert torch.load(state, weights_only=False)["epoch"] == 1
    # Stopped after one epoch: not the whole run's model, so the comparison below can fail.
    assert not torch.equal(
        cut.state_dict()["members.0.prototypes"], model.state_dict()["members.0.prototypes"]
    )
    ticks: list[int] = []
    resumed, resumed_log = ot.fit(CONFIG, _images(), checkpoint=state, progress=ticks.append)
    assert [h["epoch"] for h in resumed_log["history"]] == [1, 2, 3]  # type: ignore[index]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_log["marginal_errors"] == log["marginal_errors"]
    assert resumed_log["prototype_shift"] == log["prototype_shift"]
    # The resumed run's bar starts where the state is and still ends at its total.
    total = get_family("ot_prototypes").progress_total(CONFIG, 3)  # type: ignore[misc]
    assert sum(ticks) == total
    with pytest.raises(ValueError, match="another config"):
        ot.fit(CONFIG.model_copy(update={"epochs": 4}), _images(), checkpoint=state)


def test_progress_reaches_the_familys_total_and_epochs_are_recorded(
    whole: tuple[torch.nn.Module, dict[str, object], list[int]],
) -> None:
    _, log, ticks = whole
    total = get_family("ot_prototypes").progress_total(CONFIG, 3)  # type: ignore[misc]
    assert total == 3 * 3 * 2 and sum(ticks) == total  # images x epochs x members
    history = log["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # type: ignore[union-attr]
    assert all(h["images"] == 6 and h["images_per_s"] > 0 for h in history)  # type: ignore[union-attr]
    assert log["seconds_before"] == 0.0


def test_the_checkpoint_counts_the_seconds_since_the_training_started(tmp_path: Path) -> None:
    import time

    config = CONFIG.model_copy(update={"epochs": 1})
    state = tmp_path / "state.pt"
    started = time.perf_counter() - 100.0  # as if loading the images took 100 s
    ot.fit(config, _images(2), checkpoint=state, started=started)
    seconds = torch.load(state, weights_only=False)["seconds"]
    assert seconds >= 100.0  # from the start of the training, not of the last epoch
