"""Settling ``error_space="auto"``: where P-WAE's reconstruction error is
measured, chosen for each category on its own validation after training.

No space wins everywhere (docs/pwae-experiments.md, "Where the error is
measured" and "Reconstructing the encoder's features"): pixels separate
synthetic defects better than features of the reconstruction on the bottle,
whose reconstruction is close, and worse on the magnetic tiles, whose texture
the decoder blurs in every pixel; the encoder's features against their
reconstruction from the latent ("feature_reconstruction") compare no
reconstructed image at all. A user's own part is none of these, so the
trained model is scored each way on the held-out good images against the same
images with synthetic defects (model_export/validation.py), and the space
with the highest AUROC is kept; a tie keeps the one listed first (the paper's
pixels first).

The score is max_k(e_k / s_k) with s_k the fit images' median error k: the
ranking the calibrated rule gives at any target (its thresholds are t * s_k).
The defects are drawn with another seed than ``calibrate``'s validation, so
the validation figure it reports is on defects this choice never saw. The
held-out good images are the same ones ``calibrate`` sets the thresholds on
(they are all the category has): the conformal promise holds for each space
on its own, and picking one of three with those images can at worst triple
it (a union bound over the three), which is why the candidates are few. No
test image is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from model_export.data import load_tensor
from model_export.device import module_device
from model_export.pwae.config import ErrorSpace
from model_export.pwae.model import PWAE
from model_export.validation import synthetic_defectives, validation_figures
from service.calibration import error_scales
from service.contract import Codec, InputSpec

SPACES: tuple[ErrorSpace, ...] = get_args(ErrorSpace)  # pixel first: it wins ties
# Added to the split seed: calibrate's validation draws its defects with the seed itself.
DEFECT_SEED_OFFSET = 1


def settle(
    model: PWAE,
    images: Sequence[torch.Tensor],
    holdout: Sequence[Path],
    spec: InputSpec,
    seed: int,
    codec: Codec | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[PWAE, dict[str, Any]]:
    """The trained ``model`` with its error space settled, and the record of
    the choice ({} where the config named a space): ``images`` are the fit
    images it was trained on, ``holdout`` the held-out ones."""
    if model.config.error_space != "auto":
        return model, {}
    held = torch.stack([load_tensor(p, spec, codec) for p in holdout])
    defective = torch.stack(
        synthetic_defectives(holdout, seed + DEFECT_SEED_OFFSET, 2, spec, codec)
    )
    maps = {
        part: model.raw_error_maps(x, SPACES, progress=progress)
        for part, x in (("fit", torch.stack(list(images))), ("held", held), ("bad", defective))
    }
    device = module_device(model)
    state = model.state_dict()
    candidates: dict[ErrorSpace, PWAE] = {}
    aurocs: dict[ErrorSpace, float] = {}
    for space in SPACES:
        candidate = measured_as(model, {"error_space": space}, state)
        aurocs[space] = score(candidate, {part: m[space] for part, m in maps.items()})
        candidates[space] = candidate
    chosen = max(SPACES, key=lambda s: aurocs[s])  # the first of equals: pixel
    return candidates[chosen].to(device), {
        "settings": {"error_space": chosen},
        "figures": {f"error_space_{s}_validation_auroc": round(a, 4) for s, a in aurocs.items()},
        "defect_seed": seed + DEFECT_SEED_OFFSET,
        "held_out_images": len(held),
        "defective_images": len(defective),
    }


def measured_as(
    model: PWAE, update: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> PWAE:
    """The trained ``model`` with its error measured as ``update`` says (the
    error's settings only): the same trained weights, on the CPU, in eval
    mode; a feature network it names anew is the pretrained one."""
    config = model.config.model_copy(update=update)
    candidate = PWAE(config, model.encoder)
    state = model.state_dict() if state is None else state
    own = candidate.state_dict()
    # The feature network is frozen and pretrained: kept where it is the
    # same network, built anew where the update names another.
    # (The channels' scales belong to the network and its tap.)
    same_net = (config.error_backbone, config.error_feature_stride) == (
        model.config.error_backbone, model.config.error_feature_stride)  # fmt: skip
    network = ("perceptual.", "feature_scale")
    kept = {k: v for k, v in state.items()
            if k in own and (same_net or not k.startswith(network))}  # fmt: skip
    # What score() sets (the z-score's statistics) or the network is built
    # with may be new; anything else new would be untrained.
    fresh = ("perceptual.", "error_mean", "error_std", "feature_scale")
    missing = [k for k in own if k not in kept and not k.startswith(fresh)]
    if missing:
        raise ValueError(f"{update} changes more than the error: {missing[:3]} would be untrained")
    candidate.load_state_dict({**own, **kept})
    return candidate.cpu().eval()


def score(candidate: PWAE, raw: dict[str, torch.Tensor]) -> float:
    """The validation AUROC of max_k(e_k / s_k) from ``candidate``'s raw error
    maps of the fit images ("fit"), the held-out good ones ("held") and their
    synthetic defectives ("bad"); the z-score's statistics are set from "fit"."""
    if candidate.config.error_normalisation == "zscore":
        candidate.set_error_statistics(raw["fit"])
    errs = {part: _errors(candidate, maps) for part, maps in raw.items()}
    # The scales in the place of eps: the same ranking (see the module doc).
    return validation_figures(errs["held"], errs["bad"], error_scales(errs["fit"]))[
        "synthetic_auroc"
    ]


@torch.no_grad()
def _errors(model: PWAE, raw: torch.Tensor) -> np.ndarray:
    e0, tiles = model.errors(model.normalise(raw))
    return torch.cat([e0[:, None], tiles], 1).numpy()
