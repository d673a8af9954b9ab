"""The one Gaussian kernel and separable blur both families smooth their maps with.

P-WAE smooths its per-pixel error (``error_sigma``, reflect padding: the
error at the border is mirrored), OT prototypes its ensemble's anomaly map
(``smoothing_sigma``, replicate padding: borders are not darkened). Each
model keeps the kernel as a buffer, so the exported graph holds its taps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``sigma`` pixels, radius ceil(3 sigma) (at least 1)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def separable_blur(
    image: torch.Tensor, kernel: torch.Tensor, padding: Literal["reflect", "replicate"]
) -> torch.Tensor:
    """(N, 1, H, W) blurred by the 1-D ``kernel`` along the rows, then the
    columns, each padded by ``padding`` to keep the size; a 1-tap kernel
    returns the image as it is."""
    k = kernel.numel()
    if k == 1:
        return image
    r = k // 2
    x = F.conv2d(F.pad(image, (r, r, 0, 0), mode=padding), kernel.view(1, 1, 1, k))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=padding), kernel.view(1, 1, k, 1))
