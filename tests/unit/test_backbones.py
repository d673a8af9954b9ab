"""Each backbone's own input (backbones.PRETRAINED_CFG), and the metadata
that carries it to the server."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from model_export.backbones import PRETRAINED_CFG, efficientnet_lite, pretrained_cfg
from model_export.data import load_tensor
from service.contract import InputSpec, ModelMetadata, Normalization
from tests.helpers.onnx_models import colour_distance_model, metadata_for

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
BOTTLES = sorted((DATASETS / "mvtec_ad" / "bottle" / "train" / "good").glob("*.png"))[:16]


def _stem_variance_ratio(norm: Normalization) -> float:
    """Median over channels of the stem activations' variance on real bottles
    against the variance the stem BatchNorm's running statistics describe."""
    encoder = efficientnet_lite("efficientnet_lite0", 300, stride=4).eval()
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
    if len(BOTTLES) < 16:
        pytest.skip(f"MVTec AD bottle not found under {DATASETS} (set INSPECTION_DATASETS)")
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


def test_each_family_trains_on_the_normalisation_its_config_names() -> None:
    from model_export.backbones import IMAGENET, input_normalization
    from model_export.ot_prototypes import OTPrototypesConfig
    from model_export.pwae import PWAEConfig

    own = pretrained_cfg("efficientnet_lite0").normalization()
    assert input_normalization("efficientnet_lite0", "backbone") == own
    assert input_normalization("efficientnet_lite0", "imagenet") == IMAGENET
    assert input_normalization("resnet50", "backbone") == IMAGENET  # its own is ImageNet's
    with pytest.raises(ValueError, match="'backbone' or 'imagenet'"):
        input_normalization("efficientnet_lite0", "raw")
    # The defaults validation chose (docs/pwae-experiments.md, docs/ot-prototypes.md).
    assert PWAEConfig().input_normalisation == "imagenet"
    assert OTPrototypesConfig().input_normalisation == "backbone"


def test_metadata_carries_the_backbone_config_beside_the_input_it_was_trained_on() -> None:
    cfg = pretrained_cfg("efficientnet_lite0")
    fields = metadata_for(colour_distance_model()).model_dump(mode="json")
    meta = ModelMetadata.model_validate({**fields, "backbone": cfg.model_dump(mode="json")})
    assert meta.backbone == cfg
    assert meta.input.normalization == InputSpec().normalization  # trained on ImageNet's
    again = ModelMetadata.model_validate_json(meta.model_dump_json())
    assert again.backbone is not None and math.isclose(again.backbone.std[0], 128 / 255)
    # Versions from before the field: no backbone recorded, the input as written.
    assert ModelMetadata.model_validate(fields).backbone is None


def test_a_checkpoint_from_before_the_setting_reads_as_what_it_was_trained_on(
    tmp_path: Path,
) -> None:
    from model_export.families import load_checkpoint
    from model_export.pwae import PWAE, PWAEConfig

    config = PWAEConfig(permutations=24).to_dict()
    del config["input_normalisation"]  # as written before it was a setting
    state = PWAE(PWAEConfig(permutations=24)).state_dict()
    own = pretrained_cfg("efficientnet_lite0").normalization()
    for norm, expected in ((own, "backbone"), (InputSpec().normalization, "imagenet")):
        spec = InputSpec(normalization=norm).model_dump(mode="json")
        path = tmp_path / f"{expected}.pt"
        torch.save({"family": "pwae", "config": config, "state_dict": state, "input": spec}, path)
        assert load_checkpoint(path)[1].input_normalisation == expected


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_the_stage_table_names_each_lite_stage_as_its_network_builds_it(name: str) -> None:
    """LITE_STAGES is what the encoders truncate at and OT's scales tap: each
    stage's last block has the channels the table says, the next block
    (where there is one) starts another stage, and the strides are 2, 4, 8,
    16, 16, 32, 32."""
    from model_export.backbones import LITE_STAGES

    encoder = efficientnet_lite(name, 96, stride=32).eval()
    blocks = list(encoder.body.children())[3:]
    shapes = []
    with torch.no_grad():
        y = torch.nn.Sequential(*list(encoder.body.children())[:3])(torch.zeros(1, 3, 96, 96))
        for block in blocks:
            y = block(y)
            shapes.append((y.shape[1], 96 // y.shape[-1]))
    stages = LITE_STAGES[name]
    assert stages[-1][0] == len(blocks) - 1
    for (last, channels), stride in zip(stages, (2, 4, 8, 16, 16, 32, 32), strict=True):
        assert shapes[last] == (channels, stride), (name, last)
        if last + 1 < len(blocks):
            assert shapes[last + 1][0] != channels, (name, last)
    for stride, channels in ((8, stages[2][1]), (16, stages[4][1]), (32, stages[6][1])):
        assert efficientnet_lite(name, 96, stride=stride).channels == channels


def test_both_families_build_on_a_larger_lite_and_record_its_input() -> None:
    from model_export.ot_prototypes import OTPrototypesConfig, OTPrototypesModel
    from model_export.pwae import PWAE, PWAEConfig

    ot = OTPrototypesModel(OTPrototypesConfig(backbone="efficientnet_lite2")).eval()
    with torch.no_grad():
        feats = ot.features(torch.zeros(1, 3, 300, 300))
    # stride-8 + stride-16 stages, 48 + 120 channels; 120 + 208; 208
    assert {s: tuple(f.shape[1:]) for s, f in feats.items()} == {
        "s8": (168, 38, 38),
        "s16": (328, 19, 19),
        "s32": (208, 10, 10),
    }
    pwae = PWAE(
        PWAEConfig(
            backbone="efficientnet_lite2",
            error_space="feature",
            error_backbone="efficientnet_lite2",
        )
    )
    assert pwae.encoder.channels == 120
    assert pwae.perceptual is not None and pwae.perceptual.channels == 120
    assert pretrained_cfg("efficientnet_lite2").input_size == (3, 260, 260)
