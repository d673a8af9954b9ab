"""The model families the pipeline knows, behind one interface: the one
registry of them.

A family is a package of four modules, as anomalib shapes one
(model_export/pwae/, model_export/ot_prototypes/): its config (pydantic, with
``to_dict``/``from_dict``), its torch module, whose ``forward(image (N, 3,
300, 300))`` returns ``(image_error (N), tile_errors (N, 9), anomaly_map (N,
300, 300))``, its loss, and its fitting, which the shared trainer runs
(model_export/trainer.py: epochs, progress, checkpoint and resume, seeding,
device); its graph comes from the shared exporter (model_export/export.py).
Calibration, evaluation and export (model_export/stages.py) work on that
interface only, so a new family is one entry here.

The names: the server checks an artifact's ``family`` against
service.contract.ModelFamily, and the server must not import torch (or this
package), so the names are written once there, in the torch-free contract,
and this registry is keyed by them: :data:`FAMILIES` holds exactly
``get_args(ModelFamily)`` (checked on import and by
tests/unit/test_family_registry.py), and the trainer's ``--family`` choices,
its help and the default folder names all come from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from model_export.backbones import IMAGENET
from service.contract import ModelFamily

FAMILY_NAMES: tuple[str, ...] = get_args(ModelFamily)


@dataclass(frozen=True)
class Family:
    name: ModelFamily
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    # fit(config, images, progress=..., checkpoint=..., device=..., on_epoch=...,
    # on_stage=..., started=...) -> (model on that device, log): the shared
    # trainer (model_export/trainer.py) running the family's fitting.
    fit: Callable[..., tuple[nn.Module, dict[str, Any]]]
    # The contract graph, by the shared exporter (model_export/export.py).
    to_onnx: Callable[[Any], bytes]
    opset: int
    describe: Callable[[Any], dict[str, str | int | float | bool]]
    # Named configurations (``--preset``), e.g. the paper's own recipe.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # progress_total(config, images): how many images fit() reports to its
    # progress callback in all, so the trainer's bar ends at 100%.
    progress_total: Callable[[Any, int], int] | None = None
    # The pretrained encoder's name and weights file (None: shipped in a package).
    backbone: Callable[[Any], tuple[str, str | None]] = lambda _: ("efficientnet_lite0", None)
    # settle(model, fit images, held-out paths, spec, seed, codec, progress) ->
    # (model, record): settings the config leaves to the category, chosen after
    # fitting on its held-out images with synthetic defects. The record's
    # "settings" override the config wherever the checkpoint is loaded.
    settle: Callable[..., tuple[nn.Module, dict[str, Any]]] | None = None


def _space_detail(cfg: Any) -> str:
    """What P-WAE's error space measures with, where it is not pixels."""
    if cfg.error_space == "feature":
        return f" ({cfg.error_backbone}, stride {cfg.error_feature_stride})"
    if cfg.error_space == "feature_reconstruction":
        return f" ({cfg.backbone} features, decoder width {cfg.feature_decoder_width})"
    return ""


def _pwae() -> Family:
    from model_export import pwae
    from model_export.pwae.error_space import settle

    def describe(cfg: pwae.PWAEConfig) -> dict[str, str | int | float | bool]:
        cells = pwae.latent_cells(cfg.encoder_stride)
        return {
            "backbone": cfg.backbone,
            "input_normalisation": cfg.input_normalisation,
            "encoder": "frozen" if cfg.freeze_encoder else "fine-tuned",
            "latent": f"{cfg.latent_channels} x {cells} x {cells} per tile",
            "latent_norm": "batch norm, affine" if cfg.latent_affine else "batch norm",
            "prior": f"T(nu={cfg.prior_nu}, mu=k*{cfg.prior_mu_step}, sigma={cfg.prior_sigma})",
            "permutations": cfg.permutations,
            "epochs": cfg.epochs,
            "swd_on": cfg.swd_on,
            "error_space": cfg.error_space + _space_detail(cfg),
            "error_normalisation": cfg.error_normalisation,
            "tile_error": cfg.tile_error,
            "error_sigma": cfg.error_sigma,
        }

    return Family(
        name="pwae",
        config_from_dict=pwae.PWAEConfig.from_dict,
        build=pwae.PWAE,
        fit=pwae.fit,
        to_onnx=pwae.to_onnx,
        opset=pwae.OPSET,
        describe=describe,
        presets={"paper": pwae.PAPER.to_dict(), "feature_error": pwae.FEATURE_ERROR.to_dict()},
        progress_total=pwae.progress_total,
        backbone=lambda cfg: (cfg.backbone, cfg.backbone_weights),
        settle=settle,
    )


def _ot_prototypes() -> Family:
    from model_export import ot_prototypes as ot

    def describe(cfg: Any) -> dict[str, str | int | float | bool]:
        return {
            "backbone": f"{cfg.backbone} (frozen, ImageNet)",
            "input_normalisation": cfg.input_normalisation,
            "members": ", ".join(
                f"{m.scale}/alpha={m.alpha}/k={m.prototypes_per_position}" for m in cfg.members
            ),
            "epsilon": cfg.epsilon,
            "sinkhorn_iterations": cfg.sinkhorn_iterations,
            "ema": cfg.ema,
        }

    return Family(
        name="ot_prototypes",
        config_from_dict=ot.OTPrototypesConfig.from_dict,
        build=ot.OTPrototypesModel,
        fit=ot.fit,
        to_onnx=ot.to_onnx,
        opset=ot.OPSET,
        describe=describe,
        progress_total=ot.progress_total,
        backbone=lambda cfg: (cfg.backbone, None),
    )


@dataclass(frozen=True)
class Entry:
    """A family as the registry names it, without importing its modules."""

    summary: str  # what --family's help says of it
    # The suffix of its default folders, runs/<name>-<suffix> and
    # models/<name>-<suffix>, as the committed models are named.
    suffix: str
    load: Callable[[], Family]  # its modules imported, on first use


FAMILIES: dict[str, Entry] = {
    "pwae": Entry("patch-wise Wasserstein autoencoder", "pwae", _pwae),
    "ot_prototypes": Entry("prototypes by optimal transport", "otproto", _ot_prototypes),
}
if tuple(FAMILIES) != FAMILY_NAMES:  # the contract's names, in its order
    raise ImportError(
        f"model_export.families registers {tuple(FAMILIES)} but service.contract.ModelFamily "
        f"names {FAMILY_NAMES}: add or remove the family in both"
    )


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name].load()
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from {sorted(FAMILIES)}") from None


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[Family, Any, nn.Module, dict[str, Any]]:
    """(family, config, model in eval mode on ``device``, the checkpoint dict)
    from a trained checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    family = get_family(ckpt["family"])
    # The settings the family settled after fitting (Family.settle) over those asked for.
    raw = {**ckpt["config"], **ckpt.get("settled", {}).get("settings", {})}
    if "input_normalisation" not in raw:
        # A checkpoint from before it was a setting: what its recorded input says.
        recorded = ckpt.get("input", {}).get("normalization")
        imagenet = recorded is None or recorded == IMAGENET.model_dump(mode="json")
        raw["input_normalisation"] = "imagenet" if imagenet else "backbone"
    config = family.config_from_dict(raw)
    model = family.build(config)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return family, config, model, ckpt
