"""Each backbone's own input (backbones.PRETRAINED_CFG), and the metadata
that carries it to the server."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from model_export.backbones import PRETRAINED_CFG, efficientnet_lite0, pretrained_cfg
from model_export.data import load_tensor
from service.contract import InputSpec, ModelMetadata, Normalization
from tests.helpers.onnx_models import colour_distance_model, metadata_for

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
BOTTLES = sorted((DATASETS / "mvtec_ad" / "bottle" / "train" / "good").glob("*.png"))[:16]


def _stem_variance_ratio(norm: Normalization) -> float:
    """Median over channels of the stem activations' variance on real bottles
    against the variance the stem BatchNorm's running statistics describe."""
    encoder = efficientnet_lite0(300, stride=4).eval()
    conv, bn = encoder.body[0], encoder.body[1]
    spec = InputSpec(normalization=norm)
    x = torch.stack([load_tensor(p, spec) for p in BOTTLES])
    with torch.no_grad():
        var = conv(x).var(dim=(0, 2, 3))
    live = bn.running_var > 1e-6  # a few stem channels are dead: variance 0
    return float((var[live] / bn.running_var[live]).median())


def test_efficientnet_lite0_sees_the_statistics_it_was_trained_on() -> None:
    """Fed ImageNet mean/std, the stem's activations on real bottles have
    about 2.7x the variance its BatchNorm expects; fed its own
    (x - 127) / 128, about half: nearer, on the scale that matters (a ratio),
    to what the weights were trained on."""
    assert len(BOTTLES) == 16, f"MVTec AD bottle not found under {DATASETS}"
    own = _stem_variance_ratio(pretrained_cfg("efficientnet_lite0").normalization())
    imagenet = _stem_variance_ratio(InputSpec().normalization)
    assert 2.0 < imagenet < 3.5, imagenet
    assert 0.35 < own < 0.7, own
    assert abs(math.log(own)) < abs(math.log(imagenet))


def test_every_backbone_the_families_build_has_a_config() -> None:
    from model_export.backbones import BackboneName

    assert set(BackboneName.__args__) == set(PRETRAINED_CFG)  # type: ignore[attr-defined]
    lite0 = pretrained_cfg("efficientnet_lite0")
    assert lite0.mean == (127 / 255,) * 3 and lite0.std == (128 / 255,) * 3
    assert lite0.licence == "Apache-2.0"
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        pretrained_cfg("vgg")


def test_metadata_refuses_an_input_the_backbone_was_not_trained_on() -> None:
    cfg = pretrained_cfg("efficientnet_lite0")
    meta = metadata_for(colour_distance_model())
    own = meta.model_copy(update={"input": InputSpec(normalization=cfg.normalization())})
    fields = own.model_dump(mode="json")
    ok = ModelMetadata.model_validate({**fields, "backbone": cfg.model_dump(mode="json")})
    assert ok.backbone == cfg
    assert math.isclose(ok.input.normalization.std[0], 128 / 255)
    imagenet = {**fields, "input": InputSpec().model_dump(mode="json")}
    with pytest.raises(ValueError, match="is not backbone efficientnet_lite0's own"):
        ModelMetadata.model_validate({**imagenet, "backbone": cfg.model_dump(mode="json")})
    # Versions from before the field: no backbone recorded, the input as written.
    assert ModelMetadata.model_validate(imagenet).backbone is None
