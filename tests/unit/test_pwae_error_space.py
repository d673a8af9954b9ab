"""error_space="auto": the space is settled on validation after training, and
the settled model scores as its own graph does."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_export.data import load_tensor
from model_export.pwae import PWAE, PWAEConfig
from model_export.pwae.error_space import DEFECT_SEED_OFFSET, SPACES, settle
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


def _model(space: str) -> PWAE:
    torch.manual_seed(0)
    return PWAE(PWAEConfig(permutations=24, error_space=space)).eval()  # type: ignore[arg-type]


def test_a_named_space_is_left_as_it_is(images: tuple[list[torch.Tensor], list[Path]]) -> None:
    fit, held = images
    model = _model("pixel")
    settled, record = settle(model, fit, held, SPEC, seed=0)
    assert settled is model and record == {}


def test_auto_keeps_the_space_with_the_higher_validation_auroc(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    fit, held = images
    auto = _model("auto")
    with pytest.raises(ValueError, match="settled after training"):
        auto(fit[0][None])
    settled, record = settle(auto, fit, held, SPEC, seed=3)
    aurocs = {s: record["figures"][f"error_space_{s}_validation_auroc"] for s in SPACES}
    best = max(aurocs.values())
    chosen = next(s for s in SPACES if aurocs[s] == best)  # ties: pixel, the first
    assert record["settings"] == {"error_space": chosen}
    assert settled.config.error_space == chosen
    assert record["defect_seed"] == 3 + DEFECT_SEED_OFFSET
    assert (record["held_out_images"], record["defective_images"]) == (3, 6)
    # The settled model, run as its graph runs (forward), gives the figure the choice recorded:
    # its per-pixel statistics are those of the fit images, its errors those the choice scored.
    refit = PWAE(settled.config, settled.encoder).eval()
    refit.load_state_dict(settled.state_dict())
    refit.fit_error_statistics(torch.stack(fit))
    torch.testing.assert_close(refit.error_mean, settled.error_mean)
    torch.testing.assert_close(refit.error_std, settled.error_std)
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
    assert roc_auc_score(labels, np.r_[good, bad]) == pytest.approx(aurocs[chosen], abs=1e-4)


def test_a_rescoring_of_the_settled_settings_gives_the_figure_the_choice_recorded(
    images: tuple[list[torch.Tensor], list[Path]],
) -> None:
    from model_export.pwae.rescore import rescore

    fit, held = images
    auto = _model("auto")
    settled, record = settle(auto, fit, held, SPEC, seed=3)
    seed = record["defect_seed"]
    # The trained model before the choice, rescored each way.
    rows = rescore(auto, torch.stack(fit), held, SPEC, [{"error_space": s} for s in SPACES],
                   seeds=[seed])  # fmt: skip
    for space, row in zip(SPACES, rows, strict=True):
        recorded = record["figures"][f"error_space_{space}_validation_auroc"]
        assert row["validation_auroc"][f"seed {seed}"] == pytest.approx(recorded, abs=1e-4)
    # The settled model (what the checkpoint keeps), rescored in its space.
    chosen = record["settings"]
    (row,) = rescore(settled, torch.stack(fit), held, SPEC, [chosen], seeds=[seed])
    assert row["validation_auroc"][f"seed {seed}"] == pytest.approx(
        record["figures"][f"error_space_{chosen['error_space']}_validation_auroc"], abs=1e-4
    )


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
    config = PWAEConfig(permutations=24, error_space="feature", error_feature_scale="channel")
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
