"""The trainer as a new user meets it, where no training is needed: every
mistake stops it before any work, with a sentence that names the flag or the
file; help says what each stage does and defaults to; the summary compares
only with figures that apply and says why a figure is missing."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from model_export import cli, preflight, pwae
from model_export.backbones import efficientnet_lite
from model_export.config_args import ConfigError, build_config, parse_set
from model_export.data import (
    MAX_AUTO_HOLDOUT,
    MIN_AUTO_HOLDOUT,
    auto_holdout,
    holdout_count,
    labelled_images,
    list_images,
    split_paths,
)
from model_export.evaluation import evaluate_scores, masked_defectives
from model_export.families import get_family
from model_export.ot_prototypes import OTPrototypesConfig
from model_export.report import paper_reference, write_summary
from model_export.sources import DataError, check_images, folder_source, good_images
from service.calibration import images_for_target
from tests.helpers.good_folder import write_good_folder, write_test_folder


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the trainer, expect the usage-error exit, return its stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own: the defaults runs/ and models/ land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _nothing_written(root: Path) -> None:
    assert not (root / "runs").exists() and not (root / "models").exists()


# --- settings: --set, --config, --preset ------------------------------------------


def test_set_values_are_json_or_a_bare_word() -> None:
    assert parse_set("epochs=5") == ("epochs", 5)
    assert parse_set("decoder_channels=[64, 32]") == ("decoder_channels", [64, 32])
    assert parse_set("freeze_encoder=false") == ("freeze_encoder", False)
    assert parse_set("backbone=resnet50") == ("backbone", "resnet50")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set("epochs")


def test_bad_settings_name_the_flag_before_any_work(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_good_folder(in_tmp / "photos", n=3)
    cases = {
        ("--set", "epochs=abc"): "--set epochs=abc: epochs takes a whole number (default 30)",
        ("--set", "backbone=resnet50"): "--set backbone=resnet50: the ResNet-50 encoder needs",
        ("--set", "epoch=3"): "--set epoch=3: pwae has no setting 'epoch' (did you mean epochs?)",
        ("--set", "epochs=0"): "--set epochs=0: epochs: Input should be greater than or equal",
        ("--set", "swd_on=all"): "--set swd_on=all: swd_on: Input should be 'map' or 'code'",
        ("--set", "lr"): "--set lr: expected KEY=VALUE",
        ("--preset", "fast"): "--preset fast: pwae has ['feature_error', 'paper']",
        ("--holdout", "1.5"): "--holdout 1.5: a fraction between 0 and 1, e.g. 0.2, or auto",
        ("--holdout", "most"): "--holdout: 'most' is neither 'auto' nor a fraction",
        ("--target-fpr", "0"): "--target-fpr 0.0: target false-reject rate must lie in",
    }
    for flags, message in cases.items():
        err = _fails(capsys, "run", "--good", str(good), *flags)
        assert message in err, (flags, err)
    weights = in_tmp / "missing.pth"
    err = _fails(capsys, "run", "--good", str(good), "--set", "backbone=resnet50",
                 "--set", f"backbone_weights={weights}")  # fmt: skip
    assert f"no such file {weights}" in err
    err = _fails(capsys, "run", "--good", str(good), "--family", "ot_prototypes",
                 "--set", "epsilon=abc")  # fmt: skip
    default = OTPrototypesConfig().epsilon
    assert f"--set epsilon=abc: epsilon takes a number (default {default})" in err
    bad_json = in_tmp / "config.json"
    bad_json.write_text("{epochs: 3}")
    assert "--config" in _fails(capsys, "run", "--good", str(good), "--config", str(bad_json))
    bad_json.write_text('{"epochz": 3}')
    err = _fails(capsys, "run", "--good", str(good), "--config", str(bad_json))
    assert f"--config {bad_json}: pwae has no setting 'epochz'" in err
    _nothing_written(in_tmp)


def test_a_good_config_builds() -> None:
    family = get_family("pwae")
    cfg = build_config(family, "paper", None, ["epochs=2", "error_sigma=3"])
    assert cfg.epochs == 2 and cfg.error_sigma == 3.0 and cfg.swd_on == "map"


# --- images: missing, empty, unreadable, too few -------------------------------------


def test_folders_without_images_are_sentences(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "empty" / "sub").mkdir(parents=True)
    (in_tmp / "empty" / "notes.txt").write_text("no images here")
    err = _fails(capsys, "run", "--good", "empty")
    assert "empty holds no images in it or its subfolders (looked for .png, .jpg" in err
    assert "--good nowhere: no such folder" in _fails(capsys, "run", "--good", "nowhere")
    err = _fails(capsys, "run", "--data", "empty")
    assert "not a category in MVTec AD layout" in err and "use --good empty" in err
    assert "no images: give --good DIR" in _fails(capsys, "run")
    one = write_good_folder(in_tmp / "one", n=1)
    assert "holds 1 image; training needs at least 2" in _fails(capsys, "run", "--good", str(one))
    _nothing_written(in_tmp)


def test_unreadable_images_are_listed_with_the_servers_reason(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_good_folder(in_tmp / "photos", n=4)
    (good / "empty.png").write_bytes(b"")
    (good / "notes.jpg").write_bytes(b"not an image at all")
    whole = (good / "camera-b" / "part00.png").read_bytes()
    (good / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert cv2.imwrite(str(good / "tiny.png"), np.zeros((40, 40, 3), np.uint8))
    (good / ".hidden.png").write_bytes(b"")  # hidden files are not images of the set
    err = _fails(capsys, "run", "--good", str(good))
    assert "4 of 8 good images cannot be read as the server reads images" in err
    assert f"{good / 'empty.png'}: empty: the file has 0 bytes" in err
    assert f"{good / 'notes.jpg'}: unsupported_format: not a PNG, JPEG, BMP or TIFF" in err
    assert f"{good / 'cut.png'}: truncated:" in err
    assert f"{good / 'tiny.png'}: too_small: 40x40 is smaller than one tile" in err
    _nothing_written(in_tmp)


def test_a_greyscale_image_among_colour_ones_is_named(tmp_path: Path) -> None:
    good = write_good_folder(tmp_path, n=3)
    assert cv2.imwrite(str(good / "grey.png"), np.full((300, 300), 128, np.uint8))
    with pytest.raises(DataError, match=r"1 of 4 good images are greyscale among colour"):
        check_images(list_images(good))
    (good / "grey.png").unlink()
    assert check_images(list_images(good)) == "RGB"


def test_a_target_the_held_out_images_cannot_keep(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_good_folder(in_tmp / "photos", n=12)
    err = _fails(capsys, "run", "--good", str(good), "--target-fpr", "0.05", "--holdout", "0.2")
    assert (
        "--target-fpr 0.05 cannot be kept: 12 good images, 2 of them held out to calibrate "
        "(--holdout 0.2), can promise a false-reject rate of at best 33.33% on new good parts; "
        "5.00% needs 19 held-out images, about 95 good images" in err
    )
    # The default, --holdout auto, holds out half of them, and no more.
    err = _fails(capsys, "run", "--good", str(good), "--target-fpr", "0.05")
    assert (
        "12 good images, 6 of them held out to calibrate (--holdout auto), can promise a "
        "false-reject rate of at best 14.29% on new good parts; 5.00% needs 19 held-out "
        "images, about 38 good images" in err
    )
    _nothing_written(in_tmp)
    # The default target is not the user's ask: the promise it can keep is
    # said before training, and written into the metadata after.
    preflight._check_target(12, 0.2, preflight.DEFAULT_TARGET_FPR, explicit=False, flag="0.2")
    note = capsys.readouterr().err
    assert "note: 12 good images, 2 of them held out" in note and "will promise 33.33%" in note
    preflight._check_target(600, 0.2, 0.01, explicit=True, flag="0.2")  # 120 held out keep 1%


def test_auto_holdout_holds_out_what_the_target_needs() -> None:
    """``--holdout auto``: 20%, raised to the images the target's promise
    needs (99 for 1%), never above half; the fraction counts them exactly."""
    need = images_for_target(0.01)
    assert need == 99
    for n, held in [(762, 152), (495, 99), (300, 99), (209, 99), (199, 99), (198, 99),
                    (150, 75), (12, 6), (2, 1)]:  # fmt: skip
        fraction = auto_holdout(n, need)
        assert holdout_count(n, fraction) == held, n
        assert MIN_AUTO_HOLDOUT <= fraction <= MAX_AUTO_HOLDOUT
        fit, hold = split_paths([Path(f"{i}.png") for i in range(n)], fraction, seed=0)
        assert len(hold) == held and len(fit) == n - held
    assert auto_holdout(209, need) < 0.48  # no more than it needs: 110 bottles still fit
    # A number given is kept as given; auto resolves against the target asked.
    assert preflight.resolve_holdout(0.3, 209, 0.01) == 0.3
    assert holdout_count(209, preflight.resolve_holdout("auto", 209, 0.05)) == 42
    assert holdout_count(209, preflight.resolve_holdout("auto", 209, 0.01)) == 99


def test_an_existing_export_version_stops_the_run_before_any_work(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_good_folder(in_tmp / "photos", n=3)
    (in_tmp / "models" / "photos-pwae" / "1").mkdir(parents=True)
    err = _fails(capsys, "run", "--good", str(good), "--export", "models/photos-pwae/1")
    assert "--export models/photos-pwae/1 already exists and versions are immutable" in err
    assert "give the model directory (models/photos-pwae)" in err
    err = _fails(capsys, "run", "--good", str(good), "--export", "models/bad name")
    assert "may hold letters, digits and _ . - only" in err
    err = _fails(capsys, "export", "--work", "runs/x", "--export", "models/photos-pwae/1")
    assert "already exists" in err
    assert not (in_tmp / "runs").exists()
    err = _fails(capsys, "calibrate", "--work", "runs/x")
    assert "runs/x/checkpoint.pt is missing: train first" in err


# --- help ------------------------------------------------------------------------------


def test_each_stage_has_its_own_help_with_the_stages_and_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: inspection-train run")
    for text in ("1. train", "2. calibrate", "3. evaluate", "4. export", "--good", "--test",
                 "runs/<name>-pwae", "models/<name>-pwae", "(default: auto)", "(default 0.01)",
                 "(default: pwae)", "--force", "reused", "resumed"):  # fmt: skip
        assert text in out, text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for stage in ("run", "train", "calibrate", "evaluate", "export", "predict"):
        assert f"    {stage}" in top, stage
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    assert "service.decision.decide" in capsys.readouterr().out


# --- data layout --------------------------------------------------------------------------


def test_a_plain_folder_is_read_recursively_and_split_reproducibly(tmp_path: Path) -> None:
    good = write_good_folder(tmp_path / "line3" / "good", n=10)
    (good / ".thumbs").mkdir()
    (good / ".thumbs" / "a.png").write_bytes(b"x")
    (good / "readme.txt").write_text("x")
    paths = good_images(folder_source(good))
    assert len(paths) == 10 and all(".thumbs" not in p.parts for p in paths)
    assert {p.suffix for p in paths} == {".png", ".jpg", ".bmp", ".tif"}
    assert {p.parent.name for p in paths} == {"camera-a", "camera-b"}
    fit, hold = split_paths(paths, 0.2, 0)
    assert len(hold) == 2 and not set(fit) & set(hold)
    assert split_paths(paths, 0.2, 0) == (fit, hold)  # seeded
    # The model's name comes from the folder, skipping a "good" or "train" level.
    assert folder_source(good).category == "line3"


def test_a_test_folder_with_masks_for_some_images(tmp_path: Path) -> None:
    test = write_test_folder(tmp_path)
    source = folder_source(write_good_folder(tmp_path, n=2), test)
    assert source.masks == tmp_path / "ground_truth"  # beside the test folder
    items = labelled_images(test, source.masks)
    labels = np.array([y for _, y, _ in items])
    masks = np.stack([m for _, _, m in items])
    assert labels.tolist() == [1, 1, 0, 0, 1, 1]  # blob, good, scratch
    assert masked_defectives(labels, masks) == 2


def test_pixel_figures_leave_out_defective_images_without_a_mask() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((4, 300, 300)).astype(np.float32)
    masks = np.zeros((4, 300, 300), bool)
    masks[2, 100:150, 100:150] = True
    maps[2, 100:150, 100:150] += 1.0
    maps[3] += 5.0  # defective, no mask: its whole map would count as normal pixels
    labels = np.array([0, 0, 1, 1])
    errors = rng.random((4, 10))
    got = evaluate_scores(errors, maps, labels, masks, np.ones(10))
    want = evaluate_scores(errors[:3], maps[:3], labels[:3], masks[:3], np.ones(10))
    assert got["pixel_auroc"] == want["pixel_auroc"] == 1.0
    assert got["pro_30"] == want["pro_30"]
    assert "pixel_auroc" not in evaluate_scores(errors, maps, labels, masks & False, np.ones(10))


# --- the summary ----------------------------------------------------------------------------


def test_the_papers_figures_only_where_they_apply() -> None:
    assert "P-WAE paper, bottle" in paper_reference("pwae", "MVTec AD", "bottle")
    assert "bottle" not in paper_reference("pwae", "mvtec_ad", "cable").split("(")[0]
    assert "No published P-WAE figure for cable" in paper_reference("pwae", "MVTec AD", "cable")
    ot = paper_reference("ot_prototypes", "mvtec_ad", "cable")
    assert "MVTec AD mean" in ot and "not cable's own figure" in ot
    for family in ("pwae", "ot_prototypes"):
        assert paper_reference(family, "own images", "line3") == (
            "No published figure for these images to compare with."
        )


def _ckpt(category: str, dataset: str) -> dict[str, object]:
    return {"family": "pwae", "data": f"/x/{category}", "fit": ["a"] * 8, "holdout": ["b"] * 2,
            "train_seconds": 12.0, "dataset": dataset, "category": category}  # fmt: skip


def test_the_summary_says_why_pixel_figures_are_missing(tmp_path: Path) -> None:
    metrics = {"image_auroc": 0.9, "image_auroc_e0": 0.8, "max_balanced_accuracy": 0.85,
               "tp": 3.0, "fp": 1.0, "tn": 1.0, "fn": 1.0}  # fmt: skip
    write_summary(tmp_path, _ckpt("line3", "own images"), metrics, None, 0)
    text = (tmp_path / "summary.md").read_text()
    assert "nan" not in text
    assert "| pixel AUROC | - (no defect masks in the test split" in text
    assert "P-WAE paper" not in text and "No published figure" in text
    metrics.update(pixel_auroc=0.7, pro_30=0.6)
    write_summary(tmp_path, _ckpt("cable", "MVTec AD"), metrics, None, 2)
    text = (tmp_path / "summary.md").read_text()
    assert "| pixel AUROC | 0.700 |" in text
    assert "over the 2 of 4 defective images that have a mask" in text
    assert "bottle: image AUROC 0.99" not in text
    write_summary(tmp_path, _ckpt("line3", "own images"), None, None)
    text = (tmp_path / "summary.md").read_text()
    assert "No test split was given" in text and "| image AUROC" not in text


# --- the log ----------------------------------------------------------------------------


def test_the_pretrained_encoder_prints_nothing() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        efficientnet_lite("efficientnet_lite2", 100)
    assert out.getvalue() == ""


def test_pwae_progress_counts_every_pass_and_ends_at_its_total() -> None:
    import torch

    cfg = pwae.PWAEConfig(
        permutations=24, epochs=2, batch_size=2, error_space="pixel", error_normalisation="zscore"
    )
    images = [torch.randn(3, 300, 300, generator=torch.Generator().manual_seed(i))
              for i in range(5)]  # fmt: skip
    ticks: list[int] = []
    stages: list[str] = []
    pwae.fit(cfg, images, progress=ticks.append, on_stage=stages.append)
    # 5 (features) + 2 epochs x 4 (two whole batches of 2) + 5 (error statistics)
    assert pwae.progress_total(cfg, 5) == sum(ticks) == 18
    assert stages == ["fitting per-pixel error statistics on the 5 images (once, after the epochs)"]
    # error_space="auto" fits its statistics when the space is settled, after fit(),
    # and trains the feature decoder one of its spaces needs: 2 epochs x 5 more.
    auto = cfg.model_copy(update={"error_space": "auto", "feature_decoder_epochs": 2})
    ticks.clear()
    stages.clear()
    pwae.fit(auto, images, progress=ticks.append, on_stage=stages.append)
    assert pwae.progress_total(auto, 5) == sum(ticks) == 23
    assert stages == ["training the feature decoder on the 5 images' latents (2 epochs)"]
    # A fine-tuned encoder has no feature pass first; the decoder's features come after (5).
    tuned = auto.model_copy(update={"freeze_encoder": False})
    ticks.clear()
    pwae.fit(tuned, images, progress=ticks.append)
    assert pwae.progress_total(tuned, 5) == sum(ticks) == 23
    # A feature error with scaled channels fits the scales first (5 more).
    scaled = cfg.model_copy(update={"error_space": "feature", "error_feature_scale": "channel"})
    ticks.clear()
    stages.clear()
    model, _ = pwae.fit(scaled, images, progress=ticks.append, on_stage=stages.append)
    assert pwae.progress_total(scaled, 5) == sum(ticks) == 23
    assert stages[0] == "fitting the feature channels' scales on the 5 images"
    assert not torch.equal(model.feature_scale, torch.ones_like(model.feature_scale))
