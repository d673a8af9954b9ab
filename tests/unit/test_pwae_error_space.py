"""error_space and error_normalisation "auto": settled on validation after training, and
the settled model scores as its own graph does."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_export.data import load_tensor
from model_export.pwae import PWAE, PWAEConfig
from model_export.pwae.error_space import (
    DEFECT_SEED_OFFSET,
    NORMALISATIONS,
    SPACES,
    TOLERANCE,
    Candidate,
    settle,
)
from model_export.validation import synthetic_defectives
from service.calibration import error_scales, rule_score
from service.contract import InputSpec
from tests.helpers.synthetic import good_image

SPEC = InputSpec()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[torch.Tensor], list[Path]]:
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(9):
        path = folder / f"{i:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(good_image(rng), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return [load_tensor(p, SPEC) for p in paths[:6]], paths[6:]


def _model(space: str, normalisation: str = "zscore") -> PWAE:
    torch.manual_seed(0)
    cfg = PWAEConfig(permutations=24, error_space=space, error_normalisation=normalisation)  # type: ignore[arg-type]
    return PWAE(cfg).eval()


def _expected(figures: dict[str, float], candidates: list[Candidate]) -> Candidate:
    """The settling's rule, from its record: of those within TOLERANCE of the
    best AUROC, the fewest line-change rejects, then the higher AUROC, then the first."""
    auroc = {c: figures[f"error_{c[0]}_{c[1]}_validation_auroc"] for c in candidates}
    best = max(auroc.values())
    close = [c for c in candidates if auroc[c] >= best - TOLERANCE]
    if len(close) > 1:  # then each was changed and counted
        assert all(f"error_{c[0]}_{c[1]}_line_change_rejects" in figures for c in close)
    rejects = {c: figures.get(f"error_{c[0]}_{c[1]}_line_change_rejects", 0) for c in close}
    return min(close, key=lambda c: (rejects[c], -auroc[c]))


def test_a_named_space_and_normalisation_are_left_as_they_are(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    fit, held = images
    model = _model("pixel")
    settled, record = settle(model, fit, held, SPEC, seed=0)
    assert settled is model and record == {}


def test_auto_keeps_the_candidate_the_rule_names_and_scores_as_recorded(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    fit, held = images
    auto = _model("auto", "auto")
    with pytest.raises(ValueError, match="settled after training"):
        auto(fit[0][None])
    settled, record = settle(auto, fit, held, SPEC, seed=3)
    candidates = [(s, n) for s in SPACES for n in NORMALISATIONS]
    chosen = _expected(record["figures"], candidates)
    assert record["settings"] == {"error_space": chosen[0], "error_normalisation": chosen[1]}
    assert (settled.config.error_space, settled.config.error_normalisation) == chosen
    assert record["defect_seed"] == 3 + DEFECT_SEED_OFFSET
    assert (record["held_out_images"], record["defective_images"]) == (3, 6)
    if chosen[1] == "zscore":
        # Its per-pixel statistics are those of the fit images.
        refit = PWAE(settled.config, settled.encoder).eval()
        refit.load_state_dict(settled.state_dict())
        refit.fit_error_statistics(torch.stack(fit))
        torch.testing.assert_close(refit.error_mean, settled.error_mean)
        torch.testing.assert_close(refit.error_std, settled.error_std)
    else:
        assert "error_mean" not in settled.state_dict()
    # The settled model, run as its graph runs (forward), gives the figure the choice recorded.
    with torch.no_grad():

        def errors(x: torch.Tensor) -> np.ndarray:
            e0, tiles, _ = settled(x)
            return torch.cat([e0[:, None], tiles], 1).numpy()

        scales = error_scales(errors(torch.stack(fit)))
        good = rule_score(errors(torch.stack([load_tensor(p, SPEC) for p in held])), scales)
        bad_x = torch.stack(synthetic_defectives(held, record["defect_seed"], 2, SPEC))
        bad = rule_score(errors(bad_x), scales)
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    recorded = record["figures"][f"error_{chosen[0]}_{chosen[1]}_validation_auroc"]
    assert roc_auc_score(labels, np.r_[good, bad]) == pytest.approx(recorded, abs=1e-4)


def test_a_named_space_settles_its_normalisation_alone(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    fit, held = images
    settled, record = settle(_model("pixel", "auto"), fit, held, SPEC, seed=3)
    candidates = [("pixel", n) for n in NORMALISATIONS]
    assert set(record["figures"]) >= {f"error_pixel_{n}_validation_auroc" for n in NORMALISATIONS}
    assert not any(k.startswith("error_feature") for k in record["figures"])
    assert (settled.config.error_space, settled.config.error_normalisation) == _expected(
        record["figures"], candidates
    )


def test_the_line_changes_weigh_between_candidates_that_validate_alike(
    images: tuple[list[torch.Tensor], list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every candidate within the tolerance, the choice is the fewest rejects."""
    from model_export.line_changes import LINE_CHANGES, changed_inputs, half_split_rejects
    from model_export.pwae import error_space

    fit, held = images
    model = _model("pixel", "auto")
    monkeypatch.setattr(error_space, "TOLERANCE", 1.0)  # every candidate is close
    settled, record = settle(model, fit, held, SPEC, seed=3)
    assert record["line_changes"] == list(LINE_CHANGES)
    rejects = {n: record["figures"][f"error_pixel_{n}_line_change_rejects"] for n in NORMALISATIONS}
    assert settled.config.error_normalisation == min(
        NORMALISATIONS,
        key=lambda n: (rejects[n], -record["figures"][f"error_pixel_{n}_validation_auroc"]),
    )
    # The count is the half split's over the settled model's own scores.
    with torch.no_grad():

        def scores(x: torch.Tensor, scales: np.ndarray | None = None) -> np.ndarray:
            e0, tiles, _ = settled(x)
            e = torch.cat([e0[:, None], tiles], 1).numpy()
            return e if scales is None else rule_score(e, scales)

        scales = error_scales(scores(torch.stack(fit)))
        good = scores(torch.stack([load_tensor(p, SPEC) for p in held]), scales)
        changed = {
            name: scores(changed_inputs(held, SPEC, change), scales)
            for name, change in LINE_CHANGES.items()
        }
    counts = half_split_rejects(good, changed)
    assert rejects[settled.config.error_normalisation] == sum(counts[n] for n in LINE_CHANGES)


def test_a_rescoring_of_the_settled_settings_gives_the_figure_the_choice_recorded(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    from model_export.pwae.rescore import rescore

    fit, held = images
    auto = _model("auto", "auto")
    settled, record = settle(auto, fit, held, SPEC, seed=3)
    seed = record["defect_seed"]
    # The trained model before the choice, rescored each way.
    candidates = [(s, n) for s in SPACES for n in NORMALISATIONS]
    updates = [{"error_space": s, "error_normalisation": n} for s, n in candidates]
    rows = rescore(auto, torch.stack(fit), held, SPEC, updates, seeds=[seed])
    for (space, norm), row in zip(candidates, rows, strict=True):
        recorded = record["figures"][f"error_{space}_{norm}_validation_auroc"]
        assert row["validation_auroc"][f"seed {seed}"] == pytest.approx(recorded, abs=1e-4)
    # The settled model (what the checkpoint keeps), rescored as it was settled.
    chosen = record["settings"]
    (row,) = rescore(settled, torch.stack(fit), held, SPEC, [chosen], seeds=[seed])
    recorded = record["figures"][
        f"error_{chosen['error_space']}_{chosen['error_normalisation']}_validation_auroc"
    ]
    assert row["validation_auroc"][f"seed {seed}"] == pytest.approx(recorded, abs=1e-4)


def test_candidates_that_share_raw_maps_score_as_each_alone(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    from model_export.pwae.rescore import rescore

    fit, held = images
    model = _model("feature")
    model.fit_error_statistics(torch.stack(fit))
    sigma, floor = {"error_sigma": 2.0}, {"error_std_floor": 0.3}
    together = rescore(model, torch.stack(fit), held, SPEC, [sigma, floor], seeds=[0, 1])
    for row, update in zip(together, (sigma, floor), strict=True):
        assert rescore(model, torch.stack(fit), held, SPEC, [update], seeds=[0, 1]) == [row]


def test_a_rescoring_counts_what_the_line_changes_reject_beside_the_same_auroc(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    from model_export.line_changes import LINE_CHANGES, changed_inputs, half_split_rejects
    from model_export.pwae.rescore import rescore

    fit, held = images
    model = _model("pixel")
    model.fit_error_statistics(torch.stack(fit))
    update = {"error_std_floor": 0.3}
    (plain,) = rescore(model, torch.stack(fit), held, SPEC, [update], seeds=[0])
    (row,) = rescore(model, torch.stack(fit), held, SPEC, [update], seeds=[0], line_changes=True)
    assert row["validation_auroc"] == plain["validation_auroc"]
    assert row["line_change_images"] == len(held)
    # The counts are the half split's over the rule scores of the candidate's errors.
    candidate = PWAE(model.config.model_copy(update=update), model.encoder).eval()
    candidate.load_state_dict(model.state_dict())
    candidate.fit_error_statistics(torch.stack(fit))

    def scores(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            e0, tiles, _ = candidate(x)
        return torch.cat([e0[:, None], tiles], 1).numpy()

    scales = error_scales(scores(torch.stack(fit)))
    good = rule_score(scores(torch.stack([load_tensor(p, SPEC) for p in held])), scales)
    changed = {
        name: rule_score(scores(changed_inputs(held, SPEC, change)), scales)
        for name, change in LINE_CHANGES.items()
    }
    assert row["line_change_rejects"] == half_split_rejects(good, changed)


def test_measured_with_another_network_keeps_every_trained_weight() -> None:
    from model_export.pwae.error_space import measured_as

    model = _model("feature")
    lite2 = measured_as(model, {"error_backbone": "efficientnet_lite2"})
    assert lite2.perceptual is not None and lite2.perceptual.channels == 120  # Lite2's stride 16
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith("perceptual.")}
    for key, value in trained.items():
        torch.testing.assert_close(lite2.state_dict()[key], value)


def test_a_rescoring_takes_only_the_errors_settings() -> None:
    from model_export.config_args import ConfigError
    from model_export.pwae.rescore import parse_candidate

    assert parse_candidate("error_space=feature,error_feature_stride=8") == {
        "error_space": "feature",
        "error_feature_stride": 8,
    }
    with pytest.raises(ConfigError, match="latent_channels would change what is trained"):
        parse_candidate("error_space=feature,latent_channels=8")


def test_the_rescoring_command_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_export.pwae.rescore import main

    for args, message in (
        ([str(tmp_path), "--candidate", "error_space=pixel"], "holds no checkpoint.pt"),
        ([str(tmp_path), "--candidate", "epochs=3"], "epochs would change what is trained"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_channel_scaled_feature_error_divides_each_channel_by_its_spread(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    fit, _ = images
    torch.manual_seed(0)
    config = PWAEConfig(
        permutations=24,
        error_space="feature",
        error_normalisation="zscore",
        error_feature_scale="channel",
    )
    model = PWAE(config).eval()
    x = torch.stack(fit)
    model.fit_feature_scale(x, batch=4)
    assert model.perceptual is not None
    with torch.no_grad():
        feats = model.perceptual(x)
        std = feats.permute(1, 0, 2, 3).reshape(feats.shape[1], -1).std(1, correction=0)
        torch.testing.assert_close(model.feature_scale, std.clamp_min(1e-3 * float(std.mean())))
        recon = model.reconstruct(x)
        diff = (feats - model.perceptual(recon)) / model.feature_scale.view(1, -1, 1, 1)
        expected = torch.nn.functional.interpolate(
            (diff**2).mean(1, keepdim=True), size=x.shape[-2:], mode="bilinear"
        )
        torch.testing.assert_close(model.feature_error(x, recon), expected)
    # The scales are saved with the weights: a copy loaded from them measures the same.
    copy = PWAE(config, model.encoder).eval()
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.feature_scale, model.feature_scale)
