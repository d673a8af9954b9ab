"""Thresholds eps0..eps9 from held-out defect-free images (never test images)."""

from __future__ import annotations

import numpy as np


def rule_score(errors: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(N, 10) errors -> (N,) continuous scores max_k(ek / epsk); above 1 is defective."""
    return np.asarray((errors / eps).max(axis=-1))


def rule_flags(errors: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(N, 10) errors -> (N,) the paper's rule: defective where any ek > epsk."""
    return np.asarray((errors > eps).any(axis=-1))


def calibrate_thresholds(errors: np.ndarray, target_fpr: float) -> tuple[np.ndarray, float]:
    """One quantile level q for all columns, the lowest whose rule meets the target.

    Returns (eps (10,), achieved FPR). Bisection on q: the rule's FPR falls
    monotonically as q rises, and q = 1 (the held-out maxima) gives 0.
    """

    def rule_fpr(eps: np.ndarray) -> float:
        return float(rule_flags(errors, eps).mean())

    lo, hi = 0.5, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if rule_fpr(np.quantile(errors, mid, axis=0)) <= target_fpr:
            hi = mid
        else:
            lo = mid
    eps = np.quantile(errors, hi, axis=0)
    # Strictly above every accepted held-out value; positive as the contract wants.
    eps = np.maximum(eps * (1 + 1e-6), 1e-12)
    return eps, rule_fpr(eps)
