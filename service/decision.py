"""The threshold rule of the P-WAE paper, for any model family.

An image is defect-free only if e0 <= eps0 and every tile error ek <= epsk.
A score is error / threshold, so 1.0 is the boundary on every tile and on the
whole image alike, which is what an operator compares across tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract import Thresholds

DEFECT_FREE = "defect_free"
DEFECTIVE = "defective"


@dataclass(frozen=True)
class Decision:
    verdict: str
    image_error: float
    image_score: float
    tile_errors: tuple[float, ...]
    tile_scores: tuple[float, ...]
    defective_tiles: tuple[int, ...]  # 1-based, row-major (service.tiler)

    @property
    def score(self) -> float:
        """The rule's score max(e0/eps0, ek/epsk): above 1.0 is defective.

        One number per image, the one calibration sets its threshold on
        (service.calibration.rule_score), so its drift on good parts is
        comparable with the artifact's ``calibration.reference_score``.
        """
        return max((self.image_score, *self.tile_scores))


def decide(image_error: float, tile_errors: np.ndarray, thresholds: Thresholds) -> Decision:
    tiles = tuple(float(e) for e in tile_errors)
    if len(tiles) != len(thresholds.tiles):
        raise ValueError(f"{len(tiles)} tile errors for {len(thresholds.tiles)} thresholds")
    tile_scores = tuple(e / t for e, t in zip(tiles, thresholds.tiles, strict=True))
    defective_tiles = tuple(i + 1 for i, s in enumerate(tile_scores) if s > 1.0)
    image_score = float(image_error) / thresholds.eps0
    bad = image_score > 1.0 or bool(defective_tiles)
    return Decision(
        verdict=DEFECTIVE if bad else DEFECT_FREE,
        image_error=float(image_error),
        image_score=image_score,
        tile_errors=tiles,
        tile_scores=tile_scores,
        defective_tiles=defective_tiles,
    )
