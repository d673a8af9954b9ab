"""P-WAE's pieces: sliced-Wasserstein distance, Student-t prior, jigsaw
permutations, backbones, and one training step end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_export.backbones import ResNet50, resnet50
from model_export.pwae import (
    FEATURE_ERROR,
    PAPER,
    PWAE,
    PWAEConfig,
    fit,
    losses,
    lr_at,
    permutation_set,
    progress_total,
    random_projections,
    sample_student_t,
    sliced_wasserstein,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_swd_is_zero_for_identical_samples() -> None:
    a = torch.randn(64, 10, generator=_gen())
    p = random_projections(10, 32, _gen(1))
    assert float(sliced_wasserstein(a, a.clone(), p)) == 0.0
    # and for the same sample in another order: it compares distributions
    assert float(sliced_wasserstein(a, a[torch.randperm(64, generator=_gen(2))], p)) < 1e-10


def test_swd_grows_with_a_shift() -> None:
    a = torch.randn(256, 8, generator=_gen())
    p = random_projections(8, 64, _gen(1))
    d = [float(sliced_wasserstein(a, a + s, p)) for s in (0.5, 1.0, 2.0)]
    assert d[0] < d[1] < d[2]


def test_swd_matches_the_closed_form_in_one_dimension() -> None:
    # In 1-D the only directions are +-1, and W2^2 between a sample and the
    # same sample shifted by c is exactly c^2.
    a = torch.randn(100, 1, generator=_gen())
    p = torch.ones(1, 1)
    assert float(sliced_wasserstein(a, a + 3.0, p)) == pytest.approx(9.0, rel=1e-5)
    # And between two sorted samples it is the mean squared difference of order statistics.
    b = torch.randn(100, 1, generator=_gen(5))
    expected = float(((a.sort(0).values - b.sort(0).values) ** 2).mean())
    assert float(sliced_wasserstein(a, b, p)) == pytest.approx(expected, rel=1e-6)


def test_projections_are_unit_directions() -> None:
    p = random_projections(20, 50, _gen())
    np.testing.assert_allclose(p.norm(dim=0).numpy(), 1.0, rtol=1e-5)


def test_student_t_moments() -> None:
    nu, mu, sigma = 5.0, 3.0, 1.0
    x = sample_student_t((200_000,), nu, mu, sigma, _gen())
    assert float(x.mean()) == pytest.approx(mu, abs=0.02)
    assert float(x.var()) == pytest.approx(sigma**2 * nu / (nu - 2), rel=0.05)  # 5/3
    # heavier tails than a normal of the same variance
    z = (x - mu) / x.std()
    assert float((z.abs() > 3).float().mean()) > 0.0027


def test_student_t_is_seeded() -> None:
    a = sample_student_t((1000,), 5.0, 0.0, 1.0, _gen(7))
    b = sample_student_t((1000,), 5.0, 0.0, 1.0, _gen(7))
    assert torch.equal(a, b)


def test_permutation_set() -> None:
    perms = permutation_set(1000, seed=0)
    assert perms.shape == (1000, 9)
    assert (perms[0] == np.arange(9)).all()  # the test-time order
    assert len({tuple(p) for p in perms}) == 1000  # unique
    assert all(sorted(p) == list(range(9)) for p in perms)  # permutations
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    off = d[~np.eye(1000, dtype=bool)]
    assert off.min() >= 5 and off.mean() > 7.9  # large Hamming distances
    assert (permutation_set(1000, seed=0) == perms).all()  # seeded


def test_learning_rate_schedule() -> None:
    assert lr_at(PAPER, 0.0) == 0.01
    assert lr_at(PAPER, 1.0) == pytest.approx(0.01 / 11**0.75)


def test_paper_preset_keeps_the_papers_recipe() -> None:
    assert PAPER.swd_on == "map" and PAPER.error_normalisation == "none"
    assert PAPER.tile_error == "mean" and PAPER.error_space == "pixel" and PAPER.w_perceptual == 0
    assert (PAPER.prior_nu, PAPER.prior_sigma, PAPER.lr, PAPER.momentum) == (5.0, 1.0, 0.01, 0.9)
    # The default departs from it only in the choices made on validation figures.
    default, paper = PWAEConfig().to_dict(), PAPER.to_dict()
    assert {k for k in default if default[k] != paper[k]} == {
        "latent_channels",
        "swd_on",
        "error_space",
        "error_normalisation",
        "tile_error",
    }


def test_a_config_from_before_a_setting_reads_as_what_it_was_trained_with() -> None:
    whole = PWAEConfig().to_dict()
    del whole["error_feature_scale"]  # written before the channels could be scaled
    assert PWAEConfig.from_dict(whole).error_feature_scale == "none"
    del whole["error_backbone"]  # written before the feature network was a setting:
    assert PWAEConfig.from_dict(whole).error_backbone == "efficientnet_lite0"  # the encoder's
    lite2 = PWAEConfig.from_dict({**whole, "backbone": "efficientnet_lite2"})
    assert lite2.error_backbone == "efficientnet_lite2"
    resnet = PWAEConfig.from_dict({**whole, "backbone": "resnet50"})
    assert resnet.error_backbone == "efficientnet_lite0"
    del whole["augment_hflip"]  # older: written before mirroring was a setting
    assert not PWAEConfig.from_dict(whole).augment_hflip
    del whole["error_feature_stride"]  # older still: stride 8, the only tap then
    oldest = PWAEConfig.from_dict(whole)
    assert oldest.error_feature_stride == 8 and oldest.error_backbone == "efficientnet_lite0"
    # Settings over the defaults (the command line's --set) keep today's defaults.
    today = PWAEConfig.from_dict({"error_space": "feature"})
    assert today.error_feature_stride == 16 and today.error_backbone == "efficientnet_lite1"
    assert FEATURE_ERROR.error_backbone == "efficientnet_lite0"  # as it was measured


def test_where_the_error_is_measured_does_not_change_what_is_trained() -> None:
    # The training draws (initial weights, shuffles, permutations, SWD
    # projections) come from the same random state whatever the error space.
    def after_build(cfg: PWAEConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        model = PWAE(cfg)
        trained = {k: v for k, v in model.state_dict().items() if not k.startswith("perceptual.")}
        return trained, torch.rand(8)

    pixel, next_pixel = after_build(
        PWAEConfig(permutations=24, error_space="pixel", error_normalisation="zscore")
    )
    feature, next_feature = after_build(
        PWAEConfig(permutations=24, error_space="feature", error_normalisation="zscore")
    )
    assert pixel.keys() == feature.keys()
    assert all(torch.equal(pixel[k], feature[k]) for k in pixel)
    assert torch.equal(next_pixel, next_feature)


@pytest.mark.parametrize("error_space", ["pixel", "feature"])
def test_a_training_step_has_finite_losses_and_gradients(error_space: str) -> None:
    torch.manual_seed(0)
    cfg = PWAEConfig(
        permutations=24, error_space=error_space, error_normalisation="zscore", w_perceptual=1.0
    )  # type: ignore[arg-type]
    model = PWAE(cfg).train()
    x = torch.randn(2, 3, 300, 300, generator=_gen())
    parts = losses(model, x, None, torch.tensor([0, 5]), _gen())
    assert all(torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen
    model.eval()
    with torch.no_grad():
        e0, tiles, amap = model(x)
    assert e0.shape == (2,) and tiles.shape == (2, 9) and amap.shape == (2, 300, 300)
    assert torch.isfinite(amap).all() and (amap >= 0).all()


def test_encoder_stride_sets_the_latent_map_and_affine_lets_the_prior_be_reached() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 300, 300, generator=_gen())
    for stride, cells in ((16, 7), (8, 13)):
        model = PWAE(PWAEConfig(permutations=24, encoder_stride=stride, latent_channels=4)).eval()
        with torch.no_grad():
            z = model.encode(model.tiles(x))
            assert z.shape == (2, 9, 4, cells, cells)
            assert model.decode(z).shape == (2, 3, 300, 300)
    # Without its affine part the latent's batch norm centres every channel
    # over the nine tiles, so the mean of the codes cannot follow the priors'
    # means 1..9; with it, a learnt shift can.
    plain = PWAE(PWAEConfig(permutations=24)).train()
    affine = PWAE(PWAEConfig(permutations=24, latent_affine=True)).train()
    assert not any(p.requires_grad for p in plain.to_latent[1].parameters())
    with torch.no_grad():
        affine.to_latent[1].bias.fill_(5.0)  # type: ignore[union-attr]
        plain_codes = plain.encode(plain.tiles(x)).mean((3, 4))
        affine_codes = affine.encode(affine.tiles(x)).mean((3, 4))
    assert plain_codes.mean().abs() < 1e-4
    assert affine_codes.mean() == pytest.approx(5.0, abs=1e-4)


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path: Path) -> None:
    images = [torch.randn(3, 300, 300, generator=_gen(i)) for i in range(4)]
    cfg = PWAEConfig(permutations=24, epochs=3, batch_size=2)
    whole, _ = fit(cfg, images)
    ckpt = tmp_path / "state.pt"
    fit(cfg, images, checkpoint=ckpt, stop_after_epoch=1)  # "killed" after epoch 1
    resumed, log = fit(cfg, images, checkpoint=ckpt)
    assert [h["epoch"] for h in log["history"]] == [1, 2, 3]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another config"):
        fit(cfg.model_copy(update={"epochs": 4}), images, checkpoint=ckpt)


def test_resnet50_loads_a_torchvision_style_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = ResNet50().state_dict()
    assert "layer1.0.downsample.0.weight" in state and "fc.weight" in state  # torchvision names
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    enc = resnet50(path, stride=16).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 100, 100))
    assert out.shape == (1, 1024, 7, 7) and enc.channels == 1024
    torch.save({"conv1.weight": state["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-50"):
        resnet50(tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="supply torchvision's file"):
        resnet50(tmp_path / "missing.pth")


def test_pwae_on_resnet50(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(ResNet50().state_dict(), tmp_path / "r50.pth")
    cfg = PWAEConfig(
        backbone="resnet50",
        backbone_weights=str(tmp_path / "r50.pth"),
        permutations=24,
        error_space="pixel",
        error_normalisation="zscore",
    )
    model = PWAE(cfg).eval()
    with torch.no_grad():
        e0, tiles, _ = model(torch.randn(1, 3, 300, 300))
    assert torch.isfinite(e0).all() and tiles.shape == (1, 9)


def _part_tensor(rgb: np.ndarray) -> torch.Tensor:
    from service.contract import InputSpec
    from service.preprocessing import normalise

    return torch.from_numpy(normalise(rgb.astype(np.float32) / 255, InputSpec()))


def test_zscore_maps_and_peak_tile_errors_through_onnx() -> None:
    import onnxruntime as ort

    from model_export.pwae import to_onnx
    from service import tiler
    from tests.helpers.synthetic import good_image, inject_defect

    rng = np.random.default_rng(0)
    parts = [good_image(rng) for _ in range(6)]
    cfg = PWAEConfig(
        permutations=24,
        epochs=2,
        batch_size=3,
        error_space="pixel",
        error_normalisation="zscore",
        tile_error="peak",
    )
    model, _ = fit(cfg, [_part_tensor(p) for p in parts])
    # Statistics of the training images' raw maps, the std floored at
    # error_std_floor times its mean over the image.
    assert float(model.error_mean.min()) >= 0 and float(model.error_mean.max()) > 0
    raw = model.raw_error_maps(torch.stack([_part_tensor(p) for p in parts]))["pixel"]
    std = raw.std(0)
    torch.testing.assert_close(model.error_mean, raw.mean(0))
    torch.testing.assert_close(
        model.error_std, std.clamp_min(cfg.error_std_floor * float(std.mean()))
    )
    clean = parts[0]
    broken, mask = inject_defect(clean, rng, "blob")
    x = torch.stack([_part_tensor(clean), _part_tensor(broken)])
    with torch.no_grad():
        e0, tiles, amap = model(x)
    assert (amap >= 0).all()  # clipped at 0: below-usual error is no defect
    torch.testing.assert_close(tiles, tiler.tile_maxima(amap, 3, 3))
    torch.testing.assert_close(e0, amap.mean((1, 2)))
    # The defect raises the map where it is, far above the clean image's.
    inside = torch.from_numpy(mask > 0)
    assert float(amap[1][inside].mean()) > 3 * float(amap[0][inside].mean())
    # The exported graph computes the same normalised map and tile peaks.
    sess = ort.InferenceSession(to_onnx(model), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})
    for g, w in zip(got, (e0, tiles, amap), strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-4)


def test_mirror_augmentation_caches_both_views_and_counts_them() -> None:
    from model_export.pwae.fit import PWAEFitting

    images = [torch.randn(3, 300, 300, generator=_gen(i)) for i in range(3)]
    cfg = PWAEConfig(permutations=24, epochs=1, batch_size=2, augment_hflip=True)
    fitting = PWAEFitting(cfg, images, torch.device("cpu"))
    ticks: list[int] = []
    assert fitting.prepare(ticks.append) == 6 == sum(ticks)
    assert fitting.feats_all is not None and fitting.feats_all.shape[:3] == (2, 3, 9)
    with torch.no_grad():
        x = torch.stack(images).flip(-1)
        mirrored = fitting.model.encoder(fitting.model.tiles(x).reshape(-1, 3, 100, 100))
    torch.testing.assert_close(fitting.feats_all[1].reshape(mirrored.shape), mirrored)
    # Both views' features, one epoch's steps, the feature decoder's epochs over both views.
    assert progress_total(cfg, 3) == 2 * 3 + 1 * 2 + cfg.feature_decoder_epochs * 6
    # Off, nothing changes: one view, and the epoch draws as before.
    plain = cfg.model_copy(update={"augment_hflip": False})
    assert progress_total(plain, 3) == 3 + 2 + cfg.feature_decoder_epochs * 3


def test_the_feature_decoder_learns_the_features_and_changes_nothing_else() -> None:
    images = [torch.randn(3, 300, 300, generator=_gen(i)) for i in range(4)]
    pixel_cfg = PWAEConfig(
        permutations=24, epochs=1, batch_size=2, error_space="pixel", error_normalisation="zscore"
    )
    pixel, _ = fit(pixel_cfg, images)
    auto_cfg = pixel_cfg.model_copy(update={"error_space": "auto", "feature_decoder_epochs": 30})
    auto, _ = fit(auto_cfg, images)
    assert pixel.feature_decoder is None and auto.feature_decoder is not None
    # Built on a forked random state and trained after the epochs with its own
    # generator: every other trained weight is the pixel model's to the last digit.
    statistics = ("error_mean", "error_std")  # fitted by the pixel model only ("auto" settles)
    for key, value in pixel.state_dict().items():
        if key not in statistics:
            assert torch.equal(auto.state_dict()[key], value), key
    # Its targets are the encoder's channels in units of their spread over the images.
    x = torch.stack(images)
    with torch.no_grad():
        feats, _ = auto.features_and_latent(x)
    spread = feats.transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(auto.feature_target_scale, spread)
    # And it learnt them: its error on the training images is below an untrained decoder's.
    untrained = PWAE(auto_cfg, auto.encoder).eval()
    untrained.load_state_dict(
        {k: v for k, v in auto.state_dict().items() if not k.startswith("feature_decoder.")},
        strict=False,
    )
    with torch.no_grad():
        trained_error = auto.feature_reconstruction_error(x).mean()
        untrained_error = untrained.feature_reconstruction_error(x).mean()
    assert trained_error < 0.5 * untrained_error
    assert auto.raw_error_map(x, space="feature_reconstruction").shape == (4, 300, 300)


def test_error_stat_radius_spreads_each_pixels_statistics_over_its_neighbourhood() -> None:
    """A part a few pixels off moves its usual errors onto neighbouring pixels:
    with a radius, each pixel's mean and std are the largest within it."""
    maps = torch.rand(6, 300, 300) * 0.1
    maps[:, 100, 200] += torch.arange(6.0)  # one pixel whose error is high and varies
    own = PWAE(
        PWAEConfig(permutations=24, error_space="pixel", error_normalisation="zscore")
    ).eval()
    own.set_error_statistics(maps)
    r = 4
    spread = PWAE(
        PWAEConfig(
            permutations=24, error_space="pixel", error_normalisation="zscore", error_stat_radius=r
        )
    ).eval()
    spread.set_error_statistics(maps)
    window = (slice(100 - r, 100 + r + 1), slice(200 - r, 200 + r + 1))
    assert float(own.error_mean[window].min()) < 0.2  # only the one pixel is high
    assert float(spread.error_mean[window].min()) == float(own.error_mean[100, 200])
    assert float(spread.error_std[window].min()) == float(own.error_std[100, 200])
    # Beyond the radius the pixels keep statistics of their own neighbourhood.
    assert float(spread.error_mean[100, 200 + r + 1]) < 0.2
    # Nowhere lower than the pixel's own: a larger mean and std only lower the z-score.
    assert bool((spread.error_mean >= own.error_mean).all())
    assert bool((spread.error_std >= own.error_std).all())
