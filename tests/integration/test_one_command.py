"""Issue 15: the trainer in one command, tried as a new user would.

A plain folder of good images (nested, four formats, five sizes) is trained,
calibrated, validated and exported with ``run --good`` alone; run again it
says it reuses the model and keeps its true training time; another setting
is refused, ``--force`` trains afresh; an interrupted training resumes and
says so; a test split with masks for some images is evaluated later; and
``predict`` answers what the server answers."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model_export import cli, pwae
from model_export.backbones import IMAGENET
from model_export.predict import CSV_NAME
from service.app import create_app
from service.artifact import load_artifact, resolve_version_dir
from service.settings import Settings
from tests.helpers.good_folder import write_good_folder, write_test_folder
from tests.helpers.synthetic import encode, good_image, inject_defect, part_png

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
DEFAULT_MODEL = REPO / "models" / "bottle-pwae"
TINY = [
    "--set", "permutations=24", "--set", "batch_size=4", "--set", "feature_decoder_epochs=2",
    "--device", "cpu",
]  # fmt: skip


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # runs/ and models/ are made here
    return tmp_path


@pytest.mark.slow
def test_one_command_on_a_plain_folder_then_again_then_otherwise(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_good_folder(in_tmp / "photos", n=12)
    # 20% held out, as the counts below assume (--holdout auto would hold out
    # half of 12 images: tests/unit/test_trainer_cli.py checks it).
    run = ["run", "--good", str(good), "--set", "epochs=2", "--holdout", "0.2", *TINY]
    cli.main(run)
    out, err = capsys.readouterr()
    work, model = in_tmp / "runs" / "photos-pwae", in_tmp / "models" / "photos-pwae"
    art = load_artifact(model)
    meta = art.metadata
    assert (meta.name, meta.version, meta.family) == ("photos-pwae", 1, "pwae")
    assert meta.evaluation is None  # no test split: no test figures, none invented
    # The backbone's own input config recorded; P-WAE trains on ImageNet's
    # normalisation (its validated default), which the server applies.
    assert meta.backbone is not None and meta.backbone.name == "efficientnet_lite0"
    assert meta.backbone.std == (128 / 255,) * 3
    assert meta.input.normalization == IMAGENET
    assert meta.model_info["input_normalisation"] == "imagenet"
    assert meta.training_data.category == "photos" and meta.training_data.train_images == 10
    assert meta.calibration.holdout_images == 2
    assert meta.model_info["validation_synthetic_images"] == 4.0
    summary = (work / "summary.md").read_text()
    assert "No test split was given" in summary and "No published figure" in summary
    assert "nan" not in summary
    # 2 held-out images cannot promise 1%: said before training, and in the summary.
    assert "note: 12 good images, 2 of them held out to calibrate" in err
    assert "promise a false-reject rate on new good parts of at most 33.33% expected" in summary
    assert "above the 1.00% target" in summary
    # The log: the encoder named once, nothing printed by the library, the
    # bar through every pass (10 features + 2 x 8 steps + the feature
    # decoder's 2 x 10) to 100%, then the error space and normalisation
    # settled on validation (the statistics fitted there).
    assert "Loaded pretrained" not in out + err
    assert out.count("encoder: efficientnet_lite0, ImageNet, from the") == 1
    assert "input: normalised with mean (0.485, 0.456, 0.406)" in out
    assert "100%" in err and "46/46" in err
    space, norm = meta.model_info["error_space"], meta.model_info["error_normalisation"]
    settled = f"error_space={str(space).split()[0]}, error_normalisation={norm}"
    assert f"pwae settled {settled} on validation (" in out
    assert "done: models/photos-pwae/1;" in out
    ckpt = torch.load(work / "checkpoint.pt", weights_only=False)
    seconds = ckpt["train_seconds"]
    assert meta.model_info["train_seconds"] == round(seconds, 1)
    # Settling is timed apart from training, and said so.
    assert meta.model_info["settle_seconds"] == ckpt["settled"]["seconds"] > 0
    assert f"in {ckpt['settled']['seconds']:.0f} s" in out
    # Where it was trained, so a re-run elsewhere that differs in the last
    # digits can be told apart from one that should not.
    assert meta.model_info["train_device"] == "cpu"
    assert meta.model_info["train_platform"] == ckpt["platform"]

    # Again in the finished work dir: reused, and said so; the time stays the true one.
    cli.main(run)
    out, err = capsys.readouterr()
    assert "is this same training, finished (10 images" in out
    assert "reusing it, nothing is trained again (--force trains afresh)" in out
    assert "training pwae on" not in out and "pwae:" not in err  # no training, no bar
    again = load_artifact(model).metadata
    assert again.version == 2 and again.model_info["train_seconds"] == round(seconds, 1)
    assert torch.load(work / "checkpoint.pt", weights_only=False)["train_seconds"] == seconds

    # Another setting in the same work dir: refused before any work.
    with pytest.raises(SystemExit) as exc:
        cli.main([*run, "--set", "epochs=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "runs/photos-pwae already holds a trained model (checkpoint.pt) of another " in err
    assert "(epochs 2 -> 3)" in err and "--force" in err

    # A test split given later: evaluated with the model as it is; masks for
    # some defective images only, and the pixel figures say over which.
    test = write_test_folder(in_tmp / "later")
    cli.main(["evaluate", "--work", str(work), "--test", str(test), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "pixel AUROC and PRO over the 2 of 4 defective images with a mask" in out
    ev = json.loads((work / "evaluation.json").read_text())
    assert ev["defective_images"] == 4 and ev["good_images"] == 2 and "pixel_auroc" in ev
    per_image = json.loads((work / "per_image.json").read_text())
    assert {p["image"] for p in per_image} >= {"test/good/0.png", "test/scratch/1.png"}
    summary = (work / "summary.md").read_text()
    assert "over the 2 of 4 defective images that have a mask" in summary

    # --force: what the trainer wrote is deleted and it trains afresh.
    cli.main([*run, "--set", "epochs=1", "--force", "--no-export"])  # the last --set wins
    out = capsys.readouterr().out
    assert "--force: deleted checkpoint.pt" in out and "training pwae on cpu" in out
    assert not (work / "evaluation.json").exists()
    assert torch.load(work / "checkpoint.pt", weights_only=False)["config"]["epochs"] == 1
    assert load_artifact(model).metadata.version == 2  # --no-export


@pytest.mark.slow
def test_an_interrupted_training_resumes_and_says_so(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_good_folder(in_tmp / "photos", n=12)
    work = in_tmp / "work"
    train = ["train", "--good", str(good), "--work", str(work), "--set", "epochs=3", *TINY]
    real = pwae.fit

    def killed(*args: object, **kwargs: object) -> None:
        real(*args, stop_after_epoch=1, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # as a killed run: its epoch-1 state is on disk

    monkeypatch.setattr(pwae, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        cli.main(train)
    monkeypatch.setattr(pwae, "fit", real)
    earlier = torch.load(work / "train_state.pt", weights_only=False)["seconds"]
    assert earlier > 0 and not (work / "checkpoint.pt").exists()
    capsys.readouterr()

    cli.main(train)
    out, err = capsys.readouterr()
    assert "resuming the interrupted training at epoch 2 of 3 (--force trains afresh)" in out
    assert "s in the earlier runs it resumed)" in out
    ckpt = torch.load(work / "checkpoint.pt", weights_only=False)
    assert ckpt["log"]["seconds_before"] == pytest.approx(earlier)
    assert ckpt["train_seconds"] > earlier  # the earlier run's time counted, not lost
    assert [h["epoch"] for h in ckpt["log"]["history"]] == [1, 2, 3]
    assert len(ckpt["fit"]) == 6  # --holdout auto: half of 12 held out for a 1% target
    total = pwae.progress_total(pwae.PWAEConfig(**ckpt["config"]), len(ckpt["fit"]))
    assert f"{total}/{total}" in err  # the bar starts where the state is and ends at 100%

    # All epochs done, the final checkpoint gone: finished without training
    # again; the time recorded is the whole training's, not this run's seconds.
    (work / "checkpoint.pt").unlink()
    whole = torch.load(work / "train_state.pt", weights_only=False)["seconds"]
    cli.main(train)
    out, err = capsys.readouterr()
    assert "all 3 epochs were trained by an earlier run; finishing the model" in out
    assert torch.load(work / "checkpoint.pt", weights_only=False)["train_seconds"] >= whole
    assert f"{total}/{total}" in err

    # Another training over that state is refused, naming what differs.
    (work / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit):
        cli.main([*train, "--seed", "1"])
    assert "an interrupted training (train_state.pt) of another training" in (
        capsys.readouterr().err
    )


# --- predict: the server's verdicts ------------------------------------------------------


def _images(tmp: Path) -> list[Path]:
    """A few bottles (or synthetic parts where the dataset is absent), one as
    a JPEG, and one file the server refuses."""
    bottle = DATASETS / "mvtec_ad" / "bottle" / "test"
    if bottle.is_dir():
        paths = [*sorted((bottle / "good").glob("*.png"))[:2],
                 *sorted((bottle / "broken_large").glob("*.png"))[:2]]  # fmt: skip
    else:
        paths = []
        for i, defect in enumerate((None, None, "scratch", "blob")):
            paths.append(tmp / f"part{i}.png")
            paths[-1].write_bytes(part_png(i, defect))
    img = cv2.imdecode(np.frombuffer(paths[-1].read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    (tmp / "as-camera.jpg").write_bytes(encode(".jpg", img))
    (tmp / "broken.png").write_bytes(paths[0].read_bytes()[:500])
    return [*paths, tmp / "as-camera.jpg", tmp / "broken.png"]


def test_predict_answers_what_the_server_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path)
    out = tmp_path / "predictions"
    with pytest.raises(SystemExit) as exc:  # one image cannot be read: exit 1, after the rest
        cli.main(["predict", str(DEFAULT_MODEL), *map(str, images), "--out", str(out)])
    assert exc.value.code == 1
    said = capsys.readouterr()
    version = resolve_version_dir(DEFAULT_MODEL)
    assert f"{version}: {len(images) - 1} images inspected" in said.out
    assert f"error: {images[-1]}: truncated:" in said.err
    rows = list(csv.DictReader((out / CSV_NAME).open()))
    assert [r["image"] for r in rows] == [str(p) for p in images]

    app = create_app(Settings(model_dir=DEFAULT_MODEL, providers=("CPUExecutionProvider",)))
    headers = {"Content-Type": "application/octet-stream"}
    with TestClient(app) as client:
        for path, row in zip(images, rows, strict=True):
            data = path.read_bytes()
            r = client.post("/v1/inspect", content=data, headers=headers)
            if r.status_code != 200:
                assert row["verdict"] == "error"
                assert row["error"].startswith(r.json()["error"]["reason"] + ":")
                continue
            body = r.json()
            assert row["verdict"] == body["verdict"], path
            assert float(row["e0"]) == pytest.approx(body["image"]["error"], rel=1e-4)
            assert float(row["eps0"]) == pytest.approx(body["image"]["threshold"], rel=1e-5)
            tiles = [float(row[f"e{k}"]) for k in range(1, 10)]
            np.testing.assert_allclose(tiles, [t["error"] for t in body["tiles"]], rtol=1e-4)
            assert row["defective_tiles"].split() == [str(k) for k in body["defective_tiles"]]
            assert row["matches_calibration"] == str(body["input"]["matches_calibration"]).lower()
            heat = client.post("/v1/inspect/heatmap", content=data, headers=headers)
            ours = cv2.imdecode(np.frombuffer((out / row["overlay"]).read_bytes(), np.uint8), 1)
            theirs = cv2.imdecode(np.frombuffer(heat.content, np.uint8), 1)
            assert ours.shape == theirs.shape
            assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 0.5
    assert {r["verdict"] for r in rows} >= {"defective", "error"}


def test_predict_without_a_model_or_images_is_a_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", str(tmp_path / "none"), str(tmp_path)])
    assert exc.value.code == 2 and "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", str(DEFAULT_MODEL), str(tmp_path / "missing.png"), str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no images to inspect" in err and "missing.png: no such file or folder" in err
    assert f"{tmp_path}: a folder with no images" in err


def test_predict_reads_a_grey_or_odd_sized_image_as_the_server_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    img, _ = inject_defect(good_image(rng), rng, "blob")
    big = cv2.resize(img, (900, 700))
    (tmp_path / "big.bmp").write_bytes(encode(".bmp", cv2.cvtColor(big, cv2.COLOR_RGB2BGR)))
    (tmp_path / "grey.png").write_bytes(encode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        cli.main(["predict", str(DEFAULT_MODEL), str(tmp_path), "--out", str(out)])
    rows = {Path(r["image"]).name: r for r in csv.DictReader((out / CSV_NAME).open())}
    assert rows["big.bmp"]["verdict"] in ("defective", "defect_free")
    assert rows["big.bmp"]["input"] == "bmp" and rows["big.bmp"]["overlay"] == "big.png"
    assert rows["grey.png"]["verdict"] == "error"
    assert rows["grey.png"]["error"].startswith("wrong_colour:")
