"""Pseudo-labels from match scores (NVSM E-step, part 3): best pose, confidence, acceptance.

Given the score of every target image against synthesised views with known poses — a full
(T, M) matrix, or a matcher's (T, K) top-K with view indices — this module picks each target's
best view and measures how much to trust it:

* ``margin``: best score − the best score among views whose rotation is at least
  ``min_separation_deg`` (geodesic, ``nvsm.pose.rotation_error``) away from the best view. A
  small margin means a distant pose explains the image almost as well. +inf when no distant
  view has a finite score.
* ``flip_score`` (computed by the caller, ``nvsm.infer.solve.flip_margin``): how much worse the
  current model explains the image at the pose's front/back counterpart (azimuth + 180°).
  Front/back flips are the dominant pseudo-label error (feasibility notes, lesson 3) and are
  scored as confidently as correct poses; a large value says the flipped pose is clearly worse.

With a (T, K) top-K input the margin is computed among the K candidates only: the competitor
may be missing from the shortlist, so it is then an upper bound (exact when the competitor is
among the candidates).

``AcceptanceRule`` turns these into accept/reject decisions and ``AcceptanceSchedule`` loosens
the rule from round to round. A round's labels are written as ``pseudo_labels.csv`` and
``pseudo_labels.jsonl`` (``pseudo_labels_csv``, ``pseudo_labels_jsonl``, read back by
``read_pseudo_labels``), and ``pseudo_label_diagnostics`` scores them against ground truth where
it exists (diagnostics only). Angles are radians everywhere (``nvsm.pose`` convention).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.stats import rankdata

from nvsm.data.splits import azimuth_bins as azimuth_bin_index
from nvsm.data.splits import azimuth_coverage
from nvsm.pose.convention import rotation_matrix
from nvsm.pose.metrics import pose_errors, rotation_error, summarize_errors

__all__ = [
    "CSV_FIELDS",
    "FLIP_ERROR_DEG",
    "AcceptanceRule",
    "AcceptanceSchedule",
    "BestMatch",
    "PseudoLabel",
    "apply_acceptance",
    "best_pose_and_margin",
    "make_pseudo_labels",
    "pseudo_label_diagnostics",
    "pseudo_labels_csv",
    "pseudo_labels_jsonl",
    "read_pseudo_labels",
]

#: Angular slack (radians) of the ≥ / < separation tests, against arccos round-off.
_ANGLE_EPS = 1e-6
_ROWS = 256
#: PseudoLabel fields stored as (possibly non-finite) floats.
_LABEL_FLOATS = (
    "azimuth", "elevation", "theta", "distance", "score", "margin", "flip_score", "weight"
)


def _json_float(x: float) -> float | str | None:
    """Strict-JSON-safe float: NaN → None, ±inf → "inf" / "-inf"."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


#: ``_json_float``'s spellings of ±inf (NaN is null).
_JSON_INF = {"inf": math.inf, "-inf": -math.inf}
#: PseudoLabel fields that an accepted label must have finite: the pose it trains on. The loop
#: only accepts matched labels (finite score), whose poses come from finite view poses or from
#: refining them, so a non-finite one here is a damaged file, not a legitimate label.
_ACCEPTED_FINITE = ("azimuth", "elevation", "theta", "distance")


def _from_json_float(x: Any, name: str) -> float:
    """Inverse of ``_json_float`` for field ``name``; ValueError unless x is a JSON number,
    null (NaN) or "inf" / "-inf" (bool is a number to Python but not to JSON)."""
    if x is None:
        return math.nan
    if isinstance(x, str) and x in _JSON_INF:
        return _JSON_INF[x]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        try:
            return float(x)
        except OverflowError:  # a JSON integer beyond float range
            raise ValueError(f"field {name!r}: number {x} is out of float range") from None
    raise ValueError(
        f'field {name!r}: expected a number, null (NaN) or "inf" / "-inf", got {x!r}'
    )


def _typed(data: dict[str, Any], name: str, kind: type, expected: str) -> Any:
    """data[name] if it is of ``kind`` (bool never passes for int); ValueError otherwise."""
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {name!r}: expected {expected}, got {value!r}")
    return value


@dataclass(frozen=True)
class PseudoLabel:
    """One target image's pseudo-label of one EM round.

    Attributes:
        uid: the target image's record uid; category: its category.
        azimuth, elevation, theta: the matched pose (radians); distance: its camera distance.
        score: the best match score; margin, flip_score: see the module docstring.
        source_uid: uid of the anchor whose synthesised view matched ("" when none).
        shift: (Δa, Δe, Δθ) radians of that view relative to its anchor.
        accepted: whether the round's acceptance rule kept it; weight: training weight.
        round: EM round (0-based).
    """

    uid: str
    category: str
    azimuth: float
    elevation: float
    theta: float
    distance: float
    score: float
    margin: float
    flip_score: float
    source_uid: str
    shift: tuple[float, float, float]
    accepted: bool = False
    weight: float = 0.0
    round: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-safe dict (NaN → null, ±inf → "inf"/"-inf", shift → list)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _LABEL_FLOATS:
                value = _json_float(float(value))
            elif f.name == "shift":
                value = [_json_float(float(v)) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PseudoLabel:
        """Inverse of ``to_dict``, with every field's JSON type checked (no coercion).

        ``accepted``, ``weight`` and ``round`` may be missing (their defaults).

        Raises:
            ValueError: naming the field: not a JSON object, unknown or missing fields, a value
                of the wrong type, an accepted label with a non-finite pose, or a weight outside
                [0, 1] (not 0 for a rejected label).
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        unknown = set(data) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        missing = [
            f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"missing fields {missing}")
        kw: dict[str, Any] = {
            name: _from_json_float(data[name], name) for name in _LABEL_FLOATS if name in data
        }
        for name in ("uid", "category", "source_uid"):
            kw[name] = _typed(data, name, str, "a string")
            if not kw[name].isprintable():
                # A lone surrogate (valid JSON: "\ud800", not printable) cannot be written as
                # UTF-8, so the CSV export failed deep in its write; control characters such as
                # a newline break the CSV's rows.
                raise ValueError(f"field {name!r}: expected printable text, got {kw[name]!r}")
        shift = _typed(data, "shift", list, "a list of 3 numbers")
        if len(shift) != 3:
            raise ValueError(f"field 'shift': expected 3 values, got {len(shift)}")
        kw["shift"] = tuple(_from_json_float(v, "shift") for v in shift)
        if "accepted" in data:
            kw["accepted"] = _typed(data, "accepted", bool, "true or false")
        if "round" in data:
            kw["round"] = _typed(data, "round", int, "an integer")
            if kw["round"] < 0:
                raise ValueError(f"field 'round': expected an integer >= 0, got {kw['round']}")
        if kw.get("accepted", False):
            for name in _ACCEPTED_FINITE:
                if not math.isfinite(kw[name]):
                    raise ValueError(f"accepted pseudo-label with non-finite {name} ({kw[name]})")
        # The M-step trains with these weights (a resumed round reads them from the file): an
        # accepted label's in [0, 1] (``confidence_weights``), a rejected one's 0.
        weight = kw.get("weight", 0.0)
        if not (0.0 <= weight <= 1.0) or (weight and not kw.get("accepted", False)):
            expected = "a number in [0, 1]" if kw.get("accepted", False) else "0 (rejected)"
            raise ValueError(f"field 'weight': expected {expected}, got {weight}")
        return cls(**kw)


class BestMatch(NamedTuple):
    """Per-target best match: view (T,) int64 view index (−1 when nothing scored), score (T,)
    (−inf when none), margin (T,) (NaN when none, +inf when no distant competitor)."""

    view: torch.Tensor
    score: torch.Tensor
    margin: torch.Tensor


def _view_rotations(view_poses: torch.Tensor) -> torch.Tensor:
    """(M, ≥3) (a, e, θ, ...) radians → (M, 3, 3) float64 R_eval."""
    if view_poses.ndim != 2 or view_poses.shape[1] < 3:
        raise ValueError(f"view_poses must be (M, 3) or (M, 4), got {tuple(view_poses.shape)}")
    p = view_poses.to(torch.float64)
    return rotation_matrix(p[:, 0], p[:, 1], p[:, 2])


def _check_scores(
    scores: torch.Tensor, m: int, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D, got {tuple(scores.shape)}")
    if index is None:
        if scores.shape[1] != m:
            raise ValueError(f"scores have {scores.shape[1]} columns but there are {m} views")
        return scores, None
    if index.shape != scores.shape:
        raise ValueError(f"index {tuple(index.shape)} must match scores {tuple(scores.shape)}")
    idx = index.to(scores.device, torch.int64)
    return scores.masked_fill(idx < 0, float("-inf")), idx


def _candidate_rotations(
    rot: torch.Tensor, index: torch.Tensor | None, r0: int, r1: int
) -> torch.Tensor:
    """(r, K, 3, 3) rotations of the candidates of rows r0:r1 ((1, M, 3, 3) for a full matrix)."""
    if index is None:
        return rot[None]
    return rot[index[r0:r1].clamp(min=0)]


def _best_within(
    scores: torch.Tensor,
    rot: torch.Tensor,
    index: torch.Tensor | None,
    reference: torch.Tensor,
    radius: float,
    outside: bool,
) -> torch.Tensor:
    """Per row, the best score among candidates whose rotation is ≥ radius (outside=True) or
    < radius (outside=False) away from the row's reference rotation (T, 3, 3); −inf if none."""
    t = scores.shape[0]
    out = torch.full((t,), float("-inf"), dtype=scores.dtype, device=scores.device)
    for r0 in range(0, t, _ROWS):
        r1 = min(r0 + _ROWS, t)
        cand = _candidate_rotations(rot, index, r0, r1)
        dist = rotation_error(reference[r0:r1, None], cand)  # (r, K)
        sel = dist >= radius - _ANGLE_EPS if outside else dist < radius - _ANGLE_EPS
        vals = scores[r0:r1].masked_fill(~sel.to(scores.device), float("-inf"))
        out[r0:r1] = vals.max(dim=1).values if vals.shape[1] else out[r0:r1]
    return out


def best_pose_and_margin(
    scores: torch.Tensor,
    view_poses: torch.Tensor,
    min_separation_deg: float = 30.0,
    index: torch.Tensor | None = None,
) -> BestMatch:
    """Best view per target and its margin over the best distant view.

    Args:
        scores: (T, M) scores of every view (−inf = excluded), or (T, K) candidate scores
            together with ``index``.
        view_poses: (M, 4) or (M, 3) view poses (a, e, θ[, d]) radians.
        min_separation_deg: a competitor must be at least this far (geodesic rotation angle).
        index: optional (T, K) int64 view indices of the candidate scores (−1 = none).
    Returns:
        ``BestMatch`` (view (T,) view indices, score (T,), margin (T,)).
    """
    rot = _view_rotations(view_poses)
    scores, idx = _check_scores(scores, rot.shape[0], index)
    t = scores.shape[0]
    if scores.shape[1] == 0:
        neg = torch.full((t,), float("-inf"), dtype=scores.dtype, device=scores.device)
        return BestMatch(
            torch.full((t,), -1, dtype=torch.int64), neg, torch.full_like(neg, math.nan)
        )
    best_score, pos = scores.max(dim=1)
    best = pos if idx is None else idx.gather(1, pos[:, None])[:, 0]
    none = best_score == float("-inf")
    best = best.masked_fill(none, -1)
    rot_d = rot.to(scores.device)
    ref = rot_d[best.clamp(min=0)]
    competitor = _best_within(
        scores, rot_d, idx, ref, math.radians(min_separation_deg), outside=True
    )
    margin = (best_score - competitor).masked_fill(none, math.nan)
    margin = torch.where(~none & (competitor == float("-inf")), math.inf, margin)
    return BestMatch(best, best_score, margin)


def make_pseudo_labels(
    uids: Sequence[str],
    category: str,
    best: BestMatch,
    flip: torch.Tensor,
    view_poses: torch.Tensor,
    view_shifts: torch.Tensor,
    view_source_uids: Sequence[str],
    round_index: int,
) -> list[PseudoLabel]:
    """One (not yet accepted, weight 0) ``PseudoLabel`` per target.

    Args:
        uids: T target uids; category: their category.
        best: ``best_pose_and_margin`` result; flip: (T,) flip margins of the best poses.
        view_poses: (M, 4) view poses (a, e, θ, d); view_shifts: (M, 3) their shifts.
        view_source_uids: M anchor uids (``SynthesizedViews.source`` mapped to uids).
        round_index: the EM round.
    Returns:
        T labels; targets without any match get NaN pose and score −inf.
    """
    t = len(uids)
    if best.view.shape != (t,) or flip.shape != (t,):
        raise ValueError(f"best and flip must have {t} rows")
    idx = best.view.cpu().numpy()
    poses = view_poses.detach().to("cpu", torch.float64).numpy()
    shifts = view_shifts.detach().to("cpu", torch.float64).numpy()
    score = best.score.detach().to("cpu", torch.float64).numpy()
    margin = best.margin.detach().to("cpu", torch.float64).numpy()
    flips = flip.detach().to("cpu", torch.float64).numpy()
    labels = []
    nan = math.nan
    for i in range(t):
        j = int(idx[i])
        pose = poses[j] if j >= 0 else (nan, nan, nan, nan)
        shift = shifts[j] if j >= 0 else (nan, nan, nan)
        labels.append(
            PseudoLabel(
                uid=str(uids[i]),
                category=category,
                azimuth=float(pose[0]),
                elevation=float(pose[1]),
                theta=float(pose[2]),
                distance=float(pose[3]),
                score=float(score[i]),
                margin=float(margin[i]),
                flip_score=float(flips[i]),
                source_uid=str(view_source_uids[j]) if j >= 0 else "",
                shift=(float(shift[0]), float(shift[1]), float(shift[2])),
                accepted=False,
                weight=0.0,
                round=int(round_index),
            )
        )
    return labels


@dataclass(frozen=True)
class AcceptanceRule:
    """Which pseudo-labels to keep. Every set criterion must hold (None = not tested).

    Attributes:
        min_score: score ≥ min_score.
        min_margin: margin ≥ min_margin (NaN fails, +inf passes).
        min_flip_margin: flip_score ≥ min_flip_margin; a NaN flip score (no view near the
            flipped pose) passes unless ``require_flip_evidence``.
        top_fraction: in (0, 1]: keep the ceil(f·n) highest finite scores of the pool (ties at
            the threshold kept), n counted per category when ``per_category`` and per azimuth
            bin when ``azimuth_bins`` > 1; computed over all labels passed to ``accept``,
            independently of the other criteria.
        require_flip_evidence: see ``min_flip_margin``.
        per_category: rank ``top_fraction`` within each category.
        rank_with_flip: rank ``top_fraction`` by ``score_rank_weight`` times the score's rank
            plus ``flip_rank_weight`` times the flip score's (a NaN flip score ranks last; equal
            rank sums tie exactly, so with whole weights the ties are kept) instead of
            by the score alone, so a label must be both well matched and clearly not back to
            front.
        flip_rank_weight: > 0, the flip score's weight in that ranking (1: both count the same;
            larger values trust the front/back evidence more than the match score).
        score_rank_weight: ≥ 0, the score's weight in that ranking (0: rank by the flip score
            alone).
        azimuth_bins: ≥ 1; above 1, ``top_fraction`` is taken within each bin of the
            pseudo-pose's azimuth (``nvsm.data.splits.azimuth_bins``: 360°/n wide, the first
            centred on 0°, the front) instead of over the whole pool, so that every view of the
            object gets its share of pseudo-labels, not only the views the features match best.
            Ranks are then ranks within the bin.
    Non-finite scores (no match) are always rejected.
    """

    min_score: float | None = None
    min_margin: float | None = None
    min_flip_margin: float | None = None
    top_fraction: float | None = None
    require_flip_evidence: bool = False
    per_category: bool = True
    rank_with_flip: bool = False
    flip_rank_weight: float = 1.0
    score_rank_weight: float = 1.0
    azimuth_bins: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flip_rank_weight) and self.flip_rank_weight > 0):
            raise ValueError(f"flip_rank_weight must be > 0, got {self.flip_rank_weight}")
        if not (math.isfinite(self.score_rank_weight) and self.score_rank_weight >= 0):
            raise ValueError(f"score_rank_weight must be >= 0, got {self.score_rank_weight}")
        if not (isinstance(self.azimuth_bins, int) and self.azimuth_bins >= 1):
            raise ValueError(f"azimuth_bins must be an integer >= 1, got {self.azimuth_bins!r}")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")

    def accept_arrays(
        self,
        score: np.ndarray,
        margin: np.ndarray,
        flip: np.ndarray,
        categories: Sequence[str] | None = None,
        azimuths: np.ndarray | None = None,
    ) -> np.ndarray:
        """The rule on arrays (n,) of scores, margins, flip scores and pseudo-pose azimuths
        (radians; needed when ``azimuth_bins`` > 1); returns (n,) bool."""
        s = np.asarray(score, np.float64)
        m = np.asarray(margin, np.float64)
        f = np.asarray(flip, np.float64)
        ok = np.isfinite(s)
        with np.errstate(invalid="ignore"):
            if self.min_score is not None:
                ok &= s >= self.min_score
            if self.min_margin is not None:
                ok &= m >= self.min_margin
            if self.min_flip_margin is not None:
                flip_ok = f >= self.min_flip_margin
                if not self.require_flip_evidence:
                    flip_ok |= np.isnan(f)
                ok &= flip_ok
        if self.top_fraction is not None:
            groups: list[object] = [
                categories[i] if self.per_category and categories is not None else ""
                for i in range(len(s))
            ]
            if self.azimuth_bins > 1:
                if azimuths is None or len(azimuths) != len(s):
                    raise ValueError("azimuth_bins > 1 needs the (n,) pseudo-pose azimuths")
                # A label without a match has a NaN pose; its score is -inf, so it is never kept
                # whichever bin it falls in.
                bins = azimuth_bin_index(
                    np.nan_to_num(np.asarray(azimuths, np.float64)), self.azimuth_bins
                )
                groups = [(g, int(b)) for g, b in zip(groups, bins, strict=True)]
            ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
            group_of = np.array([ids[g] for g in groups], dtype=np.int64)
            top = np.zeros(len(s), dtype=bool)
            for g in ids.values():
                members = (group_of == g) & np.isfinite(s)
                if not members.any():
                    continue
                key = s
                if self.rank_with_flip:
                    key = np.full(len(s), -np.inf)
                    key[members] = self.score_rank_weight * _ranks(
                        s[members]
                    ) + self.flip_rank_weight * _ranks(f[members])
                vals = np.sort(key[members])[::-1]
                keep = math.ceil(self.top_fraction * vals.size - 1e-9)
                top |= members & (key >= vals[max(keep, 1) - 1])
            ok &= top
        return ok

    def accept(self, labels: Sequence[PseudoLabel]) -> np.ndarray:
        """(n,) bool decisions for the labels (the pool of one round)."""
        return self.accept_arrays(
            np.array([lb.score for lb in labels], np.float64),
            np.array([lb.margin for lb in labels], np.float64),
            np.array([lb.flip_score for lb in labels], np.float64),
            [lb.category for lb in labels],
            np.array([lb.azimuth for lb in labels], np.float64),
        )


def _ranks(x: np.ndarray) -> np.ndarray:
    """(n,) average ranks of x (1 … n, ties share their mean rank); NaN ranks below everything.

    Unscaled on purpose: the ranking only compares labels of one group, and sums of these
    half-integers are exact, so labels with equal rank sums tie exactly at the threshold (and
    are kept together) instead of being split by the round-off of rank / n."""
    return rankdata(np.nan_to_num(x, nan=-np.inf))


def apply_acceptance(
    labels: Sequence[PseudoLabel],
    rule: AcceptanceRule,
    weights: np.ndarray | Sequence[float] | None = None,
) -> list[PseudoLabel]:
    """Copies of the labels with ``accepted`` set by the rule and ``weight`` = the given
    per-label weights (default 1) for accepted labels, 0 for rejected ones."""
    keep = rule.accept(labels)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(labels),):
        raise ValueError(f"weights must have {len(labels)} values, got shape {w.shape}")
    return [
        dataclasses.replace(lb, accepted=bool(k), weight=float(wi) if k else 0.0)
        for lb, k, wi in zip(labels, keep, w, strict=True)
    ]


@dataclass(frozen=True)
class AcceptanceSchedule:
    """Acceptance rules per EM round; rounds past the last rule keep the last rule.

    Attributes:
        rules: rule of round 0, 1, ...
    """

    rules: tuple[AcceptanceRule, ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("AcceptanceSchedule needs at least one rule")

    def rule(self, round_index: int) -> AcceptanceRule:
        """The rule of EM round ``round_index`` (0-based)."""
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        return self.rules[min(round_index, len(self.rules) - 1)]


# --------------------------------------------------------------------------------------------
# Files and diagnostics
# --------------------------------------------------------------------------------------------


#: Columns of ``pseudo_labels.csv`` (angles in radians, as in ``PseudoLabel``).
CSV_FIELDS = (
    "uid",
    "category",
    "azimuth",
    "elevation",
    "theta",
    "distance",
    "score",
    "margin",
    "flip_score",
    "source_uid",
    "shift_azimuth",
    "shift_elevation",
    "shift_theta",
    "accepted",
    "weight",
    "round",
)


#: A pose error above this (degrees) counts as a front/back flip in the diagnostics.
FLIP_ERROR_DEG = 150.0


def _pose_summary(poses: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    if len(poses) == 0:
        return {"acc_pi_6": math.nan, "acc_pi_18": math.nan, "median_error_deg": math.nan, "n": 0}
    err = pose_errors([tuple(p[:3]) for p in poses], gt[:, :3])
    m = summarize_errors(err).to_dict()
    m.pop("failures", None)
    m["flip_share"] = float(np.mean(np.degrees(err) > FLIP_ERROR_DEG))
    return m


def pseudo_label_diagnostics(
    labels: Sequence[PseudoLabel], matched: torch.Tensor, hidden_gt: torch.Tensor
) -> dict[str, Any]:
    """Accuracy of a round's pseudo-labels against the hidden ground truth (diagnostics only).

    Returns pool size, accepted count, coverage (accepted / pool), and for the accepted labels
    Acc@π/6, Acc@π/18, median error (degrees), share of ~180° errors (> 150°), for the refined
    poses (``accepted``) and the raw matches (``accepted_matched``); ``all_matched`` is the
    same for every pool image's raw match.
    """
    acc = np.array([lb.accepted for lb in labels], dtype=bool)
    refined = np.array([[lb.azimuth, lb.elevation, lb.theta] for lb in labels]).reshape(-1, 3)
    raw = matched[:, :3].numpy()
    gt = hidden_gt[:, :3].numpy()
    az = [lb.azimuth for lb in labels if lb.accepted]
    return {
        "pool": len(labels),
        "accepted": int(acc.sum()),
        "coverage": float(acc.mean()) if len(acc) else 0.0,
        "accepted_azimuth_coverage": dataclasses.asdict(azimuth_coverage(az)),
        "mean_weight": float(np.mean([lb.weight for lb in labels if lb.accepted]))
        if acc.any()
        else 0.0,
        "refined": _pose_summary(refined[acc], gt[acc]),
        "accepted_matched": _pose_summary(raw[acc], gt[acc]),
        "all_matched": _pose_summary(raw, gt),
    }


def pseudo_labels_csv(labels: Sequence[PseudoLabel]) -> str:
    """CSV text of the labels (``CSV_FIELDS``; floats with repr precision)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for lb in labels:
        writer.writerow(
            [
                lb.uid,
                lb.category,
                *(repr(float(x)) for x in (lb.azimuth, lb.elevation, lb.theta, lb.distance)),
                *(repr(float(x)) for x in (lb.score, lb.margin, lb.flip_score)),
                lb.source_uid,
                *(repr(float(x)) for x in lb.shift),
                int(lb.accepted),
                repr(float(lb.weight)),
                lb.round,
            ]
        )
    return buf.getvalue()


def pseudo_labels_jsonl(labels: Sequence[PseudoLabel]) -> str:
    """JSON-lines text of the labels (``PseudoLabel.to_dict``, keys sorted)."""
    return "".join(json.dumps(lb.to_dict(), sort_keys=True) + "\n" for lb in labels)


def read_pseudo_labels(path: Path, round_index: int | None = None) -> list[PseudoLabel]:
    """Labels from a ``pseudo_labels.jsonl`` (of EM round ``round_index``, when given: every
    label of a round is that round's).

    Raises:
        ValueError: naming the file and line that is not UTF-8, not JSON, or not a
            ``PseudoLabel.to_dict`` object (then also the field, ``PseudoLabel.from_dict``), or
            a label of another round.
    """
    out = []
    # Lines are split as bytes and decoded one by one so that a non-UTF-8 byte is reported
    # with its line like any other damage.
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path} line {number}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} "
                f"at offset {exc.start} of the line)"
            ) from exc
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[…" nested too deep
            raise ValueError(
                f"{path} line {number}: expected one pseudo-label JSON object per line "
                f"(PseudoLabel.to_dict), got invalid JSON: {exc}"
            ) from exc
        try:
            label = PseudoLabel.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path} line {number}: {exc}") from exc
        if round_index is not None and label.round != round_index:
            raise ValueError(f"{path} line {number}: field 'round': expected {round_index} (the "
                             f"file is round {round_index}'s), got {label.round}")
        out.append(label)
    return out
