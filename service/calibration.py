"""Thresholds eps0..epsK with a promise that holds on *new* good images.

The rule stays the paper's: an image is defect-free only if e0 <= eps0 and
every tile error ek <= epsk. Choosing the K+1 thresholds one by one, each at
about the largest of n held-out errors, makes a new good image exceed at
least one of them with probability up to (K+1)/(n+1): ten criteria, ten
chances. So the thresholds are set through one score instead:

    s = max_k ek / scale_k        (scales from images other than these n)
    t = the ceil((n+1)(1-alpha))-th smallest s over the n calibration images
    eps_k = t * scale_k           (so "any ek > epsk" is exactly "s > t")

If the calibration images and a new good image are exchangeable (drawn alike
from the same line), the new image's s is equally likely to fall in any of
the n+1 gaps between the sorted scores, so P(s > t) <= 1 - k/(n+1) <= alpha
(split conformal prediction). That guarantee needs k <= n: with n images the
smallest promise is 1/(n+1), reached with t at their maximum; a target below
it cannot be kept, and calibration says how many images it would need.

Conditional on one calibration set, the false-reject rate of new images is
itself random, Beta(n+1-k, k)-distributed; its 90% quantile is recorded next
to the expectation, so an operator sees how much one draw may miss by.

This module is plain numpy, shared by the trainer and the server's
recalibration, so both calibrate the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHOD = "conformal-max-normalised-error"
# Calibration images never give a threshold below a held-out score: the
# k-th one is accepted, so eps sits a little above it. The trainer's scores
# are torch's, the served verdicts the exported graph's, and float32 kernels
# fused or reordered by onnxruntime differ around 1e-6 of an output's scale:
# with a margin of 1e-6 the served graph rejected the held-out image at the
# threshold of the tiles' P-WAE (3.6e-6 above it). A higher threshold only
# keeps the promise more surely.
_ABOVE = 1 + 1e-4


def rule_score(errors: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(N, K+1) errors -> (N,) continuous scores max_k(ek / epsk); above 1 is defective."""
    return np.asarray((errors / eps).max(axis=-1))


def rule_flags(errors: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(N, K+1) errors -> (N,) the paper's rule: defective where any ek > epsk."""
    return np.asarray((errors > eps).any(axis=-1))


def error_scales(errors: np.ndarray) -> np.ndarray:
    """Per-error scale: the median over images, floored so no column divides by 0.

    Computed on images other than the calibration images (the fit images at
    training time, the parent version's scales on the line), which keeps the
    conformal guarantee exact. The median, not a high quantile, because it is
    stable on the fit images, whose tails are shorter than new images'.
    """
    med = np.median(np.asarray(errors, np.float64), axis=0)
    floor = max(float(np.abs(med).max()) * 1e-6, 1e-12)
    return np.maximum(med, floor)


def conformal_rank(n: int, target_fpr: float) -> int:
    """k: the order statistic (1-based) whose threshold keeps the target, capped at n."""
    if n < 1:
        raise ValueError("calibration needs at least one image")
    return min(n, math.ceil((n + 1) * (1 - target_fpr) - 1e-9))


def promised_fpr(n: int, target_fpr: float) -> float:
    """The false-reject rate the rank-k threshold promises for new images: 1 - k/(n+1)."""
    return 1 - conformal_rank(n, target_fpr) / (n + 1)


# Below one in a million, a promise would need over a million good calibration
# images; smaller values are typing mistakes (and 1/target overflows near 1e-308).
MIN_TARGET_FPR = 1e-6


def images_for_target(target_fpr: float) -> int:
    """The fewest calibration images with which ``target_fpr`` can be promised."""
    if not MIN_TARGET_FPR <= target_fpr < 1:
        raise ValueError(
            f"target false-reject rate must lie in [{MIN_TARGET_FPR:g}, 1), got {target_fpr}"
        )
    return max(1, math.ceil(1 / target_fpr - 1 - 1e-9))


def _log_choose(m: int, j: int) -> float:
    """log of the binomial coefficient C(m, j)."""
    return math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1)


def _log_beta(p: float, q: float) -> float:
    """log of the Beta function B(p, q)."""
    return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)


def _beta_cdf(x: float, a: int, b: int) -> float:
    """P(Beta(a, b) <= x) for integers a, b >= 1: P(Binomial(a+b-1, x) >= a)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    m = a + b - 1
    lx, l1x = math.log(x), math.log1p(-x)
    return math.fsum(math.exp(_log_choose(m, j) + j * lx + (m - j) * l1x) for j in range(a, m + 1))


def fpr_quantile(n: int, k: int, q: float = 0.9) -> float:
    """The q-quantile of the false-reject rate given one calibration draw (Beta(n+1-k, k))."""
    a, b = n + 1 - k, k
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection to ~1e-18; the CDF is monotone
        mid = (lo + hi) / 2
        if _beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return hi


def rejects_at_least(x: int, m: int, n: int, k: int) -> float:
    """P(at least ``x`` of ``m`` new good images are rejected) by the rank-``k``
    threshold of ``n`` calibration images, all exchangeable: given the draw,
    the rate is Beta(n+1-k, k), so the count is beta-binomial. How surprising a
    count of false rejects on a test split is under the promise: a small value
    says the new images are not like the calibration images (drift), not that
    one draw was unlucky."""
    if not 0 <= x <= m or not 1 <= k <= n:
        raise ValueError(f"need 0 <= x <= m and 1 <= k <= n, got x={x} m={m} n={n} k={k}")
    a, b = n + 1 - k, k
    terms = (
        math.exp(_log_choose(m, j) + _log_beta(j + a, m - j + b) - _log_beta(a, b))
        for j in range(x, m + 1)
    )
    return min(1.0, math.fsum(terms))


@dataclass(frozen=True)
class ConformalThresholds:
    eps: np.ndarray  # (K+1,) eps0..epsK
    scales: np.ndarray  # (K+1,)
    score_threshold: float  # t
    images: int  # n
    rank: int  # k
    target_fpr: float
    promised_fpr: float  # 1 - k/(n+1): the expected false-reject rate bound
    fpr_upper_90: float  # not exceeded with 90% probability over calibration draws
    achieved_fpr: float  # on the calibration images themselves
    reference_score: float  # median rule score of the calibration images

    @property
    def supports_target(self) -> bool:
        return self.promised_fpr <= self.target_fpr + 1e-12

    def report(self) -> str:
        """The thresholds and the promise, as an operator reads them."""
        tiles = ", ".join(f"{e:.4g}" for e in self.eps[1:])
        return (
            f"eps0={self.eps[0]:.4g}, tiles {tiles}\n"
            f"{self.images} calibration images promise a false-reject rate on new good "
            f"parts of at most {self.promised_fpr:.2%} expected, {self.fpr_upper_90:.2%} "
            "with 90% probability"
        )

    def warning(self) -> str | None:
        """Why the target cannot be promised with these images, and what would do."""
        if self.supports_target:
            return None
        need = images_for_target(self.target_fpr)
        return (
            f"{self.images} good images can promise a false-reject rate of at best "
            f"{self.promised_fpr:.2%} (1/(n+1)), above the {self.target_fpr:.2%} target; "
            f"{need} good images would be needed"
        )


def conformal_thresholds(
    errors: np.ndarray, scales: np.ndarray, target_fpr: float
) -> ConformalThresholds:
    """eps0..epsK from the (n, K+1) errors of n calibration images (see module doc)."""
    errors = np.asarray(errors, np.float64)
    scales = np.asarray(scales, np.float64)
    if errors.ndim != 2 or errors.shape[1] != scales.shape[0]:
        raise ValueError(f"errors {errors.shape} do not match scales {scales.shape}")
    if not np.isfinite(errors).all():
        raise ValueError("calibration errors contain NaN or infinity")
    if not 0 < target_fpr < 1:
        raise ValueError(f"target false-reject rate must lie in (0, 1), got {target_fpr}")
    n = errors.shape[0]
    k = conformal_rank(n, target_fpr)
    scores = (errors / scales).max(axis=1)
    t = float(np.sort(scores)[k - 1]) * _ABOVE
    t = max(t, 1e-12)
    eps = t * scales
    return ConformalThresholds(
        eps=eps,
        scales=scales,
        score_threshold=t,
        images=n,
        rank=k,
        target_fpr=target_fpr,
        promised_fpr=1 - k / (n + 1),
        fpr_upper_90=fpr_quantile(n, k, 0.9),
        achieved_fpr=float(rule_flags(errors, eps).mean()),
        reference_score=float(np.median(rule_score(errors, eps))),
    )
