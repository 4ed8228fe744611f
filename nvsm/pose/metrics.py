"""Pose-error metrics: geodesic rotation error, Acc@π/6, Acc@π/18 and median error.

Failures are never dropped: a missing (None) or non-finite prediction scores an error of π
(180°), the worst possible geodesic error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from nvsm.pose.convention import rotation_matrix

PI_6 = math.pi / 6
PI_18 = math.pi / 18


def rotation_error(r_pred: Any, r_gt: Any) -> Any:
    """Geodesic angle between rotations, arccos((tr(R_predᵀ R_gt) − 1) / 2), in radians.

    The cosine is clamped to [−1, 1] so valid rotations never give NaN. A non-finite input
    matrix gives a non-finite trace, which is mapped to π (a failure, see module docstring).

    Args:
        r_pred, r_gt: (..., 3, 3), numpy or torch (the result follows the input type).
    Returns:
        (...) errors in [0, π].
    """
    if isinstance(r_pred, torch.Tensor) or isinstance(r_gt, torch.Tensor):
        r_pred, r_gt = torch.as_tensor(r_pred), torch.as_tensor(r_gt)
        tr = (r_pred * r_gt).sum(dim=(-1, -2))
        err = torch.arccos(torch.clamp((tr - 1) / 2, -1.0, 1.0))
        return torch.where(torch.isfinite(tr), err, torch.full_like(err, math.pi))
    tr = (np.asarray(r_pred) * np.asarray(r_gt)).sum(axis=(-1, -2))
    with np.errstate(invalid="ignore"):
        err = np.arccos(np.clip((tr - 1) / 2, -1.0, 1.0))
    return np.where(np.isfinite(tr), err, math.pi)


def pose_errors(
    predictions: Sequence[Sequence[float] | None], ground_truth: np.ndarray
) -> np.ndarray:
    """Rotation errors of (azimuth, elevation, theta) predictions against ground truth.

    Args:
        predictions: N items, each (a, e, θ) in radians or None for a failed image.
        ground_truth: (N, 3) radians (a, e, θ).
    Returns:
        (N,) errors in radians; failures (None, NaN, inf) are π.
    """
    gt = np.asarray(ground_truth, dtype=np.float64).reshape(-1, 3)
    if len(predictions) != len(gt):
        raise ValueError(f"pose_errors: {len(predictions)} predictions for {len(gt)} targets")
    pred = np.array(
        [p if p is not None else (np.nan, np.nan, np.nan) for p in predictions], dtype=np.float64
    ).reshape(-1, 3)
    err = rotation_error(rotation_matrix(*pred.T), rotation_matrix(*gt.T))
    return np.where(np.isfinite(pred).all(axis=1), err, math.pi)


@dataclass(frozen=True)
class PoseMetrics:
    """Summary of N pose errors. Accuracies are fractions in [0, 1]; errors in degrees."""

    acc_pi_6: float
    acc_pi_18: float
    median_error_deg: float
    n: int
    failures: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize_errors(errors: np.ndarray, failures: int | None = None) -> PoseMetrics:
    """Acc@π/6 (error < 30°), Acc@π/18 (error < 10°) and the median error in degrees.

    Args:
        errors: (N,) radians; non-finite entries are counted as failures with error π.
        failures: number of failed images if known; by default the non-finite entries. Errors
            from ``pose_errors`` hold a failed prediction as π already, which cannot be told
            from a true half turn: pass the count with them.
    """
    err = np.asarray(errors, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(err)
    err = np.where(bad, math.pi, err)
    n = int(err.size)
    if n == 0:
        return PoseMetrics(float("nan"), float("nan"), float("nan"), 0, 0)
    return PoseMetrics(
        acc_pi_6=float(np.mean(err < PI_6)),
        acc_pi_18=float(np.mean(err < PI_18)),
        median_error_deg=float(np.degrees(np.median(err))),
        n=n,
        failures=int(bad.sum()) if failures is None else int(failures),
    )


def weighted_mean(per_category: Sequence[PoseMetrics]) -> PoseMetrics:
    """Image-count-weighted mean of per-category metrics (the papers' "Mean" row).

    As in the papers, the MedErr of the mean is the weighted mean of per-category medians.
    """
    ms = [m for m in per_category if m.n > 0]
    n = sum(m.n for m in ms)
    if n == 0:
        return PoseMetrics(float("nan"), float("nan"), float("nan"), 0, 0)
    w = np.array([m.n for m in ms], dtype=np.float64) / n
    return PoseMetrics(
        acc_pi_6=float(sum(wi * m.acc_pi_6 for wi, m in zip(w, ms, strict=True))),
        acc_pi_18=float(sum(wi * m.acc_pi_18 for wi, m in zip(w, ms, strict=True))),
        median_error_deg=float(sum(wi * m.median_error_deg for wi, m in zip(w, ms, strict=True))),
        n=n,
        failures=sum(m.failures for m in ms),
    )
