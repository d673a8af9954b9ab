"""Settling ``error_space="auto"`` and ``error_normalisation="auto"``: where
P-WAE's reconstruction error is measured and whether it is z-scored, chosen
for each category on its own validation after training.

No space wins everywhere (docs/pwae-experiments.md, "Where the error is
measured" and "Reconstructing the encoder's features"): pixels separate
synthetic defects better than features of the reconstruction on the bottle,
whose reconstruction is close, and worse on the magnetic tiles, whose texture
the decoder blurs in every pixel; the encoder's features against their
reconstruction from the latent ("feature_reconstruction") compare no
reconstructed image at all. A user's own part is none of these, so the
trained model is scored each way on the held-out good images against the same
images with synthetic defects (model_export/validation.py).

Nor does the z-score win everywhere: it makes the tiles' score separate
defects better, and the bottle's throw out every good part a 5% dimmer lamp
shows (docs/pwae-experiments.md, "When the line changes a little"). So of
the candidates within TOLERANCE of the best validation AUROC, the one kept
is the one whose calibrated threshold rejects the fewest held-out good
images when the line changes a little (model_export/line_changes.py); ties
keep the higher AUROC, then the one listed first (the paper's pixels first,
z-scored first).

The score is max_k(e_k / s_k) with s_k the fit images' median error k: the
ranking the calibrated rule gives at any target (its thresholds are t * s_k).
The defects are drawn with another seed than ``calibrate``'s validation, so
the validation figure it reports is on defects this choice never saw. The
held-out good images are the same ones ``calibrate`` sets the thresholds on
(they are all the category has): the conformal promise holds for each
candidate on its own, and picking one of six with those images can at worst
multiply it by six (a union bound), which is why the candidates are few. No
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
from model_export.line_changes import LINE_CHANGES, changed_inputs, half_split_rejects
from model_export.pwae.config import ErrorNormalisation, ErrorSpace
from model_export.pwae.model import PWAE
from model_export.validation import synthetic_defectives, validation_figures
from service.calibration import error_scales, rule_score
from service.contract import Codec, InputSpec

SPACES: tuple[ErrorSpace, ...] = get_args(ErrorSpace)  # pixel first: it wins ties
NORMALISATIONS: tuple[ErrorNormalisation, ...] = get_args(ErrorNormalisation)  # zscore first
Candidate = tuple[ErrorSpace, ErrorNormalisation]
# Validation AUROC a candidate may give up to the best and still be chosen
# for holding better when the line changes: the margin every rule on these
# 42 or 152 held-out images has used for noise (docs/pwae-experiments.md).
TOLERANCE = 0.01
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
    """The trained ``model`` with its error space and normalisation settled
    where the config left them "auto", and the record of the choice ({} where
    it named both): ``images`` are the fit images it was trained on,
    ``holdout`` the held-out ones."""
    cfg = model.config
    spaces = SPACES if cfg.error_space == "auto" else (cfg.error_space,)
    norms = NORMALISATIONS if cfg.error_normalisation == "auto" else (cfg.error_normalisation,)
    candidates = [(s, n) for s in spaces for n in norms]
    if len(candidates) == 1:
        return model, {}
    held = torch.stack([load_tensor(p, spec, codec) for p in holdout])
    defective = torch.stack(
        synthetic_defectives(holdout, seed + DEFECT_SEED_OFFSET, 2, spec, codec)
    )
    maps = {
        part: model.raw_error_maps(x, spaces, progress=progress)
        for part, x in (("fit", torch.stack(list(images))), ("held", held), ("bad", defective))
    }
    device = module_device(model)
    state = model.state_dict()
    built: dict[Candidate, PWAE] = {}
    aurocs: dict[Candidate, float] = {}
    for space, norm in candidates:
        candidate = measured_as(model, {"error_space": space, "error_normalisation": norm}, state)
        aurocs[space, norm] = score(candidate, {part: m[space] for part, m in maps.items()})
        built[space, norm] = candidate
    best = max(aurocs.values())
    close = [c for c in candidates if aurocs[c] >= best - TOLERANCE]
    rejects = line_change_rejects(model, built, close, maps, holdout, spec, codec, progress)
    # Fewest rejected, then the higher AUROC, then the first listed.
    chosen = min(close, key=lambda c: (rejects.get(c, 0), -aurocs[c]))
    figures: dict[str, float] = {}
    for c in candidates:
        figures[f"error_{c[0]}_{c[1]}_validation_auroc"] = round(aurocs[c], 4)
        if c in rejects:
            figures[f"error_{c[0]}_{c[1]}_line_change_rejects"] = rejects[c]
    return built[chosen].to(device), {
        "settings": {"error_space": chosen[0], "error_normalisation": chosen[1]},
        "figures": figures,
        "defect_seed": seed + DEFECT_SEED_OFFSET,
        "held_out_images": len(held),
        "defective_images": len(defective),
        **({"line_changes": list(LINE_CHANGES)} if rejects else {}),
    }


def line_change_rejects(
    model: PWAE,
    built: dict[Candidate, PWAE],
    close: Sequence[Candidate],
    maps: dict[str, dict[ErrorSpace, torch.Tensor]],
    holdout: Sequence[Path],
    spec: InputSpec,
    codec: Codec | None,
    progress: Callable[[int], object] | None,
) -> dict[Candidate, int]:
    """For each of ``close`` (where there are several), how many held-out
    images under LINE_CHANGES the other half's threshold rejects, all changes
    together ({} for one, with nothing to weigh, and for one held-out image,
    which has no other half to be judged by: the higher AUROC is kept then)."""
    if len(close) < 2 or len(holdout) < 2:
        return {}
    spaces = tuple(dict.fromkeys(space for space, _ in close))
    changed = {
        name: model.raw_error_maps(changed_inputs(holdout, spec, change, codec), spaces,
                                   progress=progress)
        for name, change in LINE_CHANGES.items()
    }  # fmt: skip
    rejects = {}
    for c in close:
        space = c[0]
        raw = {"fit": maps["fit"][space], "held": maps["held"][space]}
        raw.update((name, m[space]) for name, m in changed.items())
        counts = line_change_counts(built[c], raw)
        rejects[c] = sum(counts[name] for name in LINE_CHANGES)
    return rejects


def line_change_counts(candidate: PWAE, raw: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many held-out images the other half's threshold rejects, unchanged
    and under each of LINE_CHANGES (model_export/line_changes.py), from
    ``candidate``'s raw error maps of the fit images ("fit"), the held-out
    ones ("held") and the held-out ones changed (one entry per change)."""
    errs = measured_errors(candidate, {part: raw[part] for part in ("fit", "held", *LINE_CHANGES)})
    scales = error_scales(errs["fit"])  # in the place of eps: the rule's ranking
    scores = {part: rule_score(e, scales) for part, e in errs.items()}
    return half_split_rejects(scores["held"], {name: scores[name] for name in LINE_CHANGES})


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
    errs = measured_errors(candidate, raw)
    # The scales in the place of eps: the same ranking (see the module doc).
    return validation_figures(errs["held"], errs["bad"], error_scales(errs["fit"]))[
        "synthetic_auroc"
    ]


def measured_errors(candidate: PWAE, raw: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The errors (N, 10) of every part of ``raw`` (raw error maps, "fit" among
    them), measured as ``candidate`` says, the z-score's statistics set from "fit"."""
    if candidate.config.error_normalisation == "zscore":
        candidate.set_error_statistics(raw["fit"])
    return {part: _errors(candidate, maps) for part, maps in raw.items()}


@torch.no_grad()
def _errors(model: PWAE, raw: torch.Tensor) -> np.ndarray:
    e0, tiles = model.errors(model.normalise(raw))
    return torch.cat([e0[:, None], tiles], 1).numpy()
