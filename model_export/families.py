"""The model families the pipeline knows, behind one interface.

A family is a torch module whose ``forward(image (N, 3, 300, 300))`` returns
``(image_error (N), tile_errors (N, 9), anomaly_map (N, 300, 300))``, a typed
config with ``to_dict``/``from_dict``, a ``fit`` on defect-free images and an
ONNX export. Calibration, evaluation and export (model_export/cli.py) work on
that interface only, so a new family is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.contract import ModelFamily


@dataclass(frozen=True)
class Family:
    name: ModelFamily
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    # fit(config, images, progress=..., checkpoint=...) -> (model, log)
    fit: Callable[..., tuple[nn.Module, Any]]
    to_onnx: Callable[[Any], bytes]
    opset: int
    describe: Callable[[Any], dict[str, str | int | float | bool]]
    resumable: bool  # fit takes a checkpoint path and resumes from it
    # Named configurations (``--preset``), e.g. the paper's own recipe.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


def _pwae() -> Family:
    from model_export import pwae

    def describe(cfg: pwae.PWAEConfig) -> dict[str, str | int | float | bool]:
        cells = pwae.latent_cells(cfg.encoder_stride)
        return {
            "backbone": cfg.backbone,
            "encoder": "frozen" if cfg.freeze_encoder else "fine-tuned",
            "latent": f"{cfg.latent_channels} x {cells} x {cells} per tile",
            "latent_norm": "batch norm, affine" if cfg.latent_affine else "batch norm",
            "prior": f"T(nu={cfg.prior_nu}, mu=k*{cfg.prior_mu_step}, sigma={cfg.prior_sigma})",
            "permutations": cfg.permutations,
            "epochs": cfg.epochs,
            "swd_on": cfg.swd_on,
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
        resumable=True,
        presets={"paper": pwae.PAPER.to_dict(), "feature_error": pwae.FEATURE_ERROR.to_dict()},
    )


def _ot_prototypes() -> Family:
    from model_export import ot_prototypes as ot

    def fit(config: Any, images: Sequence[torch.Tensor], progress: Any = None, **_: Any) -> Any:
        return ot.fit(config, images, progress=progress)

    def describe(cfg: Any) -> dict[str, str | int | float | bool]:
        return {
            "backbone": "efficientnet_lite0 (frozen, ImageNet)",
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
        fit=fit,
        to_onnx=ot.to_onnx,
        opset=ot.OPSET,
        describe=describe,
        resumable=False,
    )


FAMILIES: dict[str, Callable[[], Family]] = {"pwae": _pwae, "ot_prototypes": _ot_prototypes}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]()
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from {sorted(FAMILIES)}") from None


def load_checkpoint(path: Path) -> tuple[Family, Any, nn.Module, dict[str, Any]]:
    """(family, config, model in eval mode, the checkpoint dict) from a trained checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    family = get_family(ckpt["family"])
    config = family.config_from_dict(ckpt["config"])
    model = family.build(config)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return family, config, model, ckpt
