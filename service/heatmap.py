"""The difference heatmap a person looks at: the anomaly map in colour over the part.

The map is scaled so that the image threshold sits at the middle of the
colour map: blue is well inside normal, red is over the threshold, whatever
the model's error units. The tile grid is drawn thin, defective tiles thick.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.tiler import tile_boxes


def overlay(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float,
    defective_tiles: tuple[int, ...],
    rows: int = 3,
    cols: int = 3,
    alpha: float = 0.45,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the coloured map blended in and the grid drawn."""
    h, w = rgb.shape[:2]
    amap = anomaly_map if anomaly_map.shape == (h, w) else cv2.resize(anomaly_map, (w, h))
    level = np.clip(amap / (2.0 * threshold), 0.0, 1.0)
    heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(bgr, 1.0 - alpha, heat, alpha, 0.0)
    for k, (y0, x0, y1, x1) in enumerate(tile_boxes(h, w, rows, cols), start=1):
        if k in defective_tiles:
            cv2.rectangle(out, (x0 + 1, y0 + 1), (x1 - 2, y1 - 2), (0, 0, 255), 3)
        else:
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def to_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
