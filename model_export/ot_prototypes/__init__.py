"""Local and global prototypes with optimal transport (Trombetta & Lartizien, 2025).

The model, as in the paper:

* a frozen ImageNet-pretrained encoder gives patch features at one or more
  scales of the 300x300 image (EfficientNet-Lite0 from
  model_export.backbones, the one P-WAE uses; a "scale" is one block's
  output, or two concatenated, the deeper one upsampled, after a 3x3 local
  average so a patch sees its neighbourhood; the default ensemble has four
  members on "s8" and "s16" and, chosen on validation, a fifth on the
  deepest block alone, "s32");
* every feature-grid position owns ``prototypes_per_position`` prototypes,
  each a feature vector (learned) and a fixed position (that grid cell);
* the cost between patch i and prototype j is
  ``(1 - alpha) * (1 - cos(x_i, p_j)) / 2 + alpha * |pos_i - pos_j| / sqrt(2)``
  with positions in [0, 1]^2, so both terms lie in [0, 1]. alpha = 0 makes the
  prototypes global (any patch may use any prototype); alpha > 0 makes them
  local (a patch pays for using a prototype from elsewhere in the image);
* learning: entropic OT (log-domain Sinkhorn, uniform marginals) between a
  batch of patches and all prototypes; each prototype moves to an exponential
  moving average (default 0.95) of its transport barycentre
  ``b_j = sum_i T_ij x_i / sum_i T_ij``;
* scoring: each patch's cost to its best prototype is its anomaly score; the
  map is upsampled to 300x300. The final model ensembles (scale, alpha)
  members: each member's map is divided by its mean score on the training
  patches so members weigh alike, the maps are averaged and smoothed.

The contract's errors are reductions of that map with the service's tiler:
e0 = the map's maximum, e1..e9 = each tile's maximum (service.tiler), so the
server's threshold rule works unchanged. Maxima, not means: a defect that is
a few pixels wide must raise its tile's error, and a mean over 100x100 pixels
would dilute it.

The family is four modules, as anomalib shapes one: config.py (the
hyper-parameters), model.py (the torch module and its export), cost.py (the
transport cost and the prototype update) and fit.py (its fitting, run by the
shared trainer, model_export/trainer.py).
"""

from __future__ import annotations

from model_export.ot_prototypes.config import (
    FIRST_ENSEMBLE,
    IMAGE_SIZE,
    OPSET,
    SCALES,
    MemberConfig,
    OTPrototypesConfig,
)
from model_export.ot_prototypes.cost import (
    barycentres,
    ema_update,
    feature_cost,
    grid_positions,
    spatial_cost,
    transport_cost,
)
from model_export.ot_prototypes.fit import (
    MemberFitting,
    OTFitting,
    extract_features,
    fit,
    fit_member,
    progress_total,
)
from model_export.ot_prototypes.model import (
    MultiScaleFeatures,
    OTPrototypesModel,
    PrototypeMember,
    frozen_encoder,
    to_onnx,
)

__all__ = [
    "FIRST_ENSEMBLE", "IMAGE_SIZE", "OPSET", "SCALES", "MemberConfig", "MemberFitting",
    "MultiScaleFeatures", "OTFitting", "OTPrototypesConfig", "OTPrototypesModel",
    "PrototypeMember", "barycentres", "ema_update", "extract_features", "feature_cost", "fit",
    "fit_member", "frozen_encoder", "grid_positions", "progress_total", "spatial_cost", "to_onnx",
    "transport_cost",
]  # fmt: skip
