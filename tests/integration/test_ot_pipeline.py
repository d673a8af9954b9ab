"""OT prototypes end to end: synthetic category -> train -> calibrate ->
evaluate -> export -> service.artifact.load_artifact, and a real-data floor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_export import cli
from model_export.data import load_tensor, split_train
from model_export.data import test_set as load_test_set  # not collected as a test
from model_export.evaluation import evaluate_scores, score
from model_export.ot_prototypes import MemberConfig, OTPrototypesConfig, fit
from service.artifact import load_artifact
from service.preprocessing import prepare
from tests.helpers.synthetic import encode_png, good_image, inject_defect, write_category

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))

# Small enough for CI: one global and one local member, few prototypes.
SMALL = OTPrototypesConfig(
    members=(MemberConfig("s8", 0.0, 2), MemberConfig("s16", 0.5, 4)),
    epsilon=0.05,  # 20 iterations converge at 0.05, not at the default 0.01
    sinkhorn_iterations=20,
    images_per_batch=4,
)


@pytest.mark.slow
def test_synthetic_end_to_end(tmp_path: Path) -> None:
    cat = write_category(tmp_path / "data", n_train=12, n_test_good=4, n_test_defective=6)
    work = tmp_path / "work"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL.to_dict()))
    out = tmp_path / "models" / "synthetic-otproto" / "1"
    cli.main(
        [
            "run",
            "--family",
            "ot_prototypes",
            "--data",
            str(cat),
            "--work",
            str(work),
            "--config",
            str(cfg),
            "--holdout",
            "0.25",
            "--export",
            str(out),
        ]
    )
    ev = json.loads((work / "evaluation.json").read_text())
    # Defects on the synthetic part are blatant: the family must see them.
    assert ev["image_auroc"] >= 0.9
    assert ev["pixel_auroc"] >= 0.9
    assert 0.0 <= ev["pro_30"] <= 1.0

    art = load_artifact(out, providers=["CPUExecutionProvider"])
    assert art.metadata.family == "ot_prototypes"
    # Trained, and served, on EfficientNet-Lite0's own (x - 127) / 128.
    backbone = art.metadata.backbone
    assert backbone is not None and art.metadata.input.normalization == backbone.normalization()
    assert backbone.mean == (127 / 255,) * 3
    assert art.metadata.evaluation is not None
    rng = np.random.default_rng(123)
    good = good_image(rng)
    bad, mask = inject_defect(good, rng, "blob")
    x = np.stack([prepare(encode_png(im), art.metadata.input).tensor for im in (good, bad)])
    e0, tiles, amap = art.session.run(None, {"image": x})
    assert e0.shape == (2,) and tiles.shape == (2, 9) and amap.shape == (2, 300, 300)
    assert np.isfinite(amap).all()
    eps = np.array(art.metadata.thresholds.all)
    ratio = (np.concatenate([e0[:, None], tiles], 1) / eps).max(1)
    assert ratio[1] > ratio[0]
    # The map peaks on the defect.
    assert amap[1][mask > 0].mean() > amap[1][mask == 0].mean() * 1.5


@pytest.mark.slow
def test_bottle_floor() -> None:
    bottle = DATASETS / "mvtec_ad" / "bottle"
    if not (bottle / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {DATASETS} (set INSPECTION_DATASETS)")
    # One cheap member (coarse scale, global) fitted on a fifth of train/good
    # keeps this within CI's budget; the full model's figures are in
    # docs/model-comparison.md. No thresholds are needed for AUROC: the score
    # is e0, the map's maximum.
    fit_paths, _ = split_train(bottle, holdout_fraction=0.8, seed=0)
    config = OTPrototypesConfig(members=(MemberConfig("s16", 0.0, 4),))
    model, _ = fit(config, [load_tensor(p) for p in fit_paths])
    items = load_test_set(bottle)
    errors, maps = score(model, [p for p, _, _ in items])
    labels = np.array([y for _, y, _ in items])
    masks = np.stack([m for _, _, m in items])
    ev = evaluate_scores(errors, maps, labels, masks, eps=np.ones(errors.shape[1]))
    assert ev["image_auroc"] >= 0.95
    assert ev["pixel_auroc"] >= 0.90


@pytest.mark.slow
def test_grey_category_gives_a_grey_model(tmp_path: Path) -> None:
    # A category of single-channel images (like the magnetic tiles) is fitted,
    # calibrated and exported grey; the exported model then takes colour input.
    cat = write_category(tmp_path / "data", n_train=8, n_test_good=2, n_test_defective=3)
    for path in cat.glob("t*/*/*.png"):  # train/ and test/, not the masks
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert cv2.imwrite(str(path), grey)
    work, out = tmp_path / "work", tmp_path / "models" / "grey-otproto" / "1"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL.to_dict()))
    args = ["--family", "ot_prototypes", "--data", str(cat), "--work", str(work)]
    cli.main(["run", *args, "--config", str(cfg), "--holdout", "0.25", "--export", str(out)])
    ckpt = torch.load(work / "checkpoint.pt", weights_only=False)
    assert ckpt["input"]["color"] == "grey"
    art = load_artifact(out, providers=["CPUExecutionProvider"])
    assert art.metadata.input.color == "grey"
    colour = encode_png(good_image(np.random.default_rng(5)))
    assert prepare(colour, art.metadata.input).tensor.shape == (3, 300, 300)
