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
    # fit(config, images, progress=..., device=..., on_epoch=..., checkpoint=...)
    # -> (model on that device, log); on_epoch gets each epoch's images/s.
    fit: Callable[..., tuple[nn.Module, Any]]
    to_onnx: Callable[[Any], bytes]
    opset: int
    describe: Callable[[Any], dict[str, str | int | float | bool]]
    resumable: bool  # fit takes a checkpoint path and resumes from it
    # Named configurations (``--preset``), e.g. the paper's own recipe.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # progress_total(config, images): how many images fit() reports to its
    # progress callback in all, so the trainer's bar ends at 100%.
    progress_total: Callable[[Any, int], int] | None = None
    # The pretrained encoder's name and weights file (None: shipped in a package).
    backbone: Callable[[Any], tuple[str, str | None]] = lambda _: ("efficientnet_lite0", None)


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
        progress_total=pwae.progress_total,
        backbone=lambda cfg: (cfg.backbone, cfg.backbone_weights),
    )


def _ot_prototypes() -> Family:
    from model_export import ot_prototypes as ot

    def fit(
        config: Any,
        images: Sequence[torch.Tensor],
        progress: Any = None,
        device: torch.device | str = "cpu",
        on_epoch: Any = None,
        **_: Any,
    ) -> Any:
        return ot.fit(config, images, progress=progress, device=device, on_epoch=on_epoch)

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
        progress_total=lambda cfg, n: n * cfg.epochs * len(cfg.members),
    )


FAMILIES: dict[str, Callable[[], Family]] = {"pwae": _pwae, "ot_prototypes": _ot_prototypes}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]()
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from {sorted(FAMILIES)}") from None


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[Family, Any, nn.Module, dict[str, Any]]:
    """(family, config, model in eval mode on ``device``, the checkpoint dict)
    from a trained checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    family = get_family(ckpt["family"])
    config = family.config_from_dict(ckpt["config"])
    model = family.build(config)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return family, config, model, ckpt
