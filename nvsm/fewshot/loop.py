"""The NVSM EM loop: NeMo on the labelled anchors, then rounds of synthesis → matching →
refined pseudo-labels → retraining.

* Round 0 trains NeMo on the N labelled anchors only (``NeMoTrainer``); it is the ``nemo``
  baseline.
* EM round k ≥ 1, E-step: the anchors (labels + the previous round's most confident accepted
  pseudo-labels) give vertex features at their (pseudo-)poses
  (``sample_anchor_vertex_features``); their views are synthesised on
  ``expanding_shift_grid(k − 1)`` and matched to every unlabelled image (the injected
  ``Matcher``, clutter-aware with the bank's clutter model, self-matches excluded by uid); the
  best pose, its distant-pose margin and its front/back flip score make a ``PseudoLabel``; the
  round's ``AcceptanceRule`` accepts some; each accepted match is refined against the current
  model (``nvsm.infer.solve.refine_poses``) so it does not inherit the anchor's θ and the
  grid's coarseness; the confidence (score / best accepted score, floored) is its weight.
* M-step: train on labels (weight 1) + accepted pseudo-labels (weight = confidence), either
  continuing from the current model or restarting from the labelled-only model.

The unlabelled images' ground-truth poses are removed from their ``CropSet`` before the loop
starts (replaced by NaN): they are read only by ``pseudo_label_diagnostics``.

Each round writes ``RUN/round_<k>/``: ``model.pt``, ``config.json``, (k ≥ 1)
``pseudo_labels.csv`` / ``pseudo_labels.jsonl``, and last ``metrics.json`` (the completion
marker). With ``resume=True`` complete rounds are loaded instead of recomputed. Every round
starts from its predecessor's checkpoint on disk and seeds its own generators, so a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvsm.config import FewShotConfig, RunConfig, config_to_dict
from nvsm.data.splits import azimuth_coverage
from nvsm.fewshot.matching import FaissMatcher, Matcher, TorchMatcher
from nvsm.fewshot.pseudo_labels import (
    AcceptanceRule,
    AcceptanceSchedule,
    PseudoLabel,
    best_pose_and_margin,
    flip_score,
    make_pseudo_labels,
)
from nvsm.fewshot.synthesis import (
    canonical_pose,
    expanding_shift_grid,
    iter_synthesized_views,
    sample_anchor_vertex_features,
)
from nvsm.infer.solve import (
    InferenceSchedule,
    canonical_feature_camera,
    clutter_model,
    refine_poses,
)
from nvsm.io import atomic_write_json, atomic_write_text
from nvsm.mesh import Mesh
from nvsm.models import normalize_images
from nvsm.models.common import STRIDE
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import NORMALIZED_DISTANCE
from nvsm.pose.metrics import pose_errors, summarize_errors
from nvsm.render import Rasterizer, get_rasterizer
from nvsm.train.cropset import CropSet
from nvsm.train.model import NeMoModel, build_model
from nvsm.train.trainer import NeMoTrainer

__all__ = [
    "CSV_FIELDS",
    "FewShotData",
    "FewShotResult",
    "acceptance_schedule",
    "confidence_weights",
    "config_differences",
    "e_step",
    "extract_features",
    "hide_poses",
    "make_matcher",
    "prepare_fewshot_data",
    "pseudo_label_diagnostics",
    "pseudo_labels_csv",
    "read_pseudo_labels",
    "run_fewshot",
    "summary_levels",
]

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

#: Pose-summary keys reported per occlusion level in the top-level metrics.
SUMMARY_KEYS = ("acc_pi_6", "acc_pi_18", "median_error_deg", "n", "failures")

#: Seed offset between EM rounds (trainer, augmentation and clutter streams).
ROUND_SEED_STRIDE = 1000


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class FewShotData:
    """What the loop works on.

    Attributes:
        meshes: category → cuboid.
        labelled: the N labelled anchors per category (poses = labels, weights 1).
        unlabelled: the unlabelled pool. Its ``poses`` may hold the ground truth: the loop
            hides them (``hide_poses``) and uses them only for diagnostics.
        test: test crops of every configured occlusion level (ground truth for scoring).
    """

    meshes: dict[str, Mesh]
    labelled: CropSet
    unlabelled: CropSet
    test: CropSet


def prepare_fewshot_data(config: RunConfig) -> FewShotData:
    """Split the configured dataset: ``labels.annotations`` anchors per category (the
    deterministic ``labels.anchors`` split with ``config.seed``), the rest of the training
    records as the unlabelled pool (optionally the first ``fewshot.unlabelled_limit``), and the
    test split at ``fewshot.occlusion_levels``."""
    from nvsm.pipeline import category_meshes, cropsets, labelled_subset, load_splits

    n = config.labels.annotations
    if n is None:
        raise ValueError("the few-shot loop needs labels.annotations (e.g. 7)")
    fs = config.fewshot
    splits = load_splits(config, tuple(fs.occlusion_levels))
    labelled = labelled_subset(splits.train, n, config.labels.anchors, config.seed)
    ids = {r.uid for r in labelled}
    pool = [r for r in splits.train if r.uid not in ids]
    if fs.unlabelled_limit is not None:
        pool = pool[: fs.unlabelled_limit]
    if not pool:
        raise ValueError("no unlabelled training records left for the few-shot loop")
    test = CropSet.concat(
        [cropsets(config, recs, f"cropping test L{lv}") for lv, recs in sorted(splits.test.items())]
    )
    return FewShotData(
        meshes=category_meshes(splits.root, config.data.categories, config.model.n_vertices),
        labelled=cropsets(config, labelled, "cropping labelled"),
        unlabelled=cropsets(config, pool, "cropping unlabelled"),
        test=test,
    )


def hide_poses(data: CropSet) -> tuple[CropSet, torch.Tensor]:
    """The crops with NaN poses and zero weights, and the hidden (N, 4) poses."""
    hidden = data.poses.clone()
    return data.with_poses(torch.full_like(hidden, math.nan), torch.zeros(len(data))), hidden


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def make_matcher(name: str) -> Matcher:
    """``torch`` (exact brute force) or ``faiss`` (shortlist + exact re-scoring)."""
    if name == "torch":
        return TorchMatcher()
    if name == "faiss":
        return FaissMatcher()
    raise ValueError(f"unknown matcher {name!r}; expected torch | faiss")


def acceptance_schedule(fs: FewShotConfig) -> AcceptanceSchedule:
    """Rule of EM round k (index k − 1): the top fraction min(max, first + (k − 1)·step) of the
    pool by score, plus the optional fixed margin and flip thresholds. It does not depend on
    ``fs.rounds``, so extending a run with ``resume`` gives the rounds a longer run would."""
    first = AcceptanceRule(
        min_margin=fs.accept_min_margin,
        min_flip_margin=fs.accept_min_flip_margin,
        top_fraction=min(fs.accept_top_fraction_first, fs.accept_top_fraction_max),
    )
    rules = [first]
    while rules[-1].top_fraction is not None and rules[-1].top_fraction < (
        fs.accept_top_fraction_max
    ):
        if fs.accept_top_fraction_step <= 0:
            break
        frac = min(
            fs.accept_top_fraction_max,
            fs.accept_top_fraction_first + len(rules) * fs.accept_top_fraction_step,
        )
        rules.append(dataclasses.replace(first, top_fraction=frac))
    return AcceptanceSchedule(tuple(rules))


@torch.no_grad()
def extract_features(
    model: NeMoModel, data: CropSet, device: torch.device, batch_size: int = 16
) -> torch.Tensor:
    """(N, D, h, w) float32 unit feature maps of every crop, on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].float().to(device) / 255.0
        out.append(model.features(normalize_images(images)).float().cpu())
    return torch.cat(out)


def confidence_weights(labels: Sequence[PseudoLabel], min_weight: float) -> np.ndarray:
    """Per label: score / the best accepted score of its category, clipped to
    [min_weight, 1]; 0 for rejected labels."""
    w = np.zeros(len(labels))
    for cat in sorted({lb.category for lb in labels}):
        idx = [i for i, lb in enumerate(labels) if lb.category == cat and lb.accepted]
        if not idx:
            continue
        top = max(labels[i].score for i in idx)
        for i in idx:
            ratio = labels[i].score / top if top > 0 else 1.0
            w[i] = float(np.clip(ratio, min_weight, 1.0))
    return w


def _match_category(
    anchors: CropSet,
    anchor_feats: torch.Tensor,
    targets: torch.Tensor,
    target_uids: list[str],
    mesh: Mesh,
    clutter: torch.Tensor | None,
    shifts: torch.Tensor,
    view_k: np.ndarray,
    matcher: Matcher,
    fs: FewShotConfig,
    rasterizer: Rasterizer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Top candidates of every target over all synthesised views (chunked).

    Returns scores (T, K), view index (T, K), view poses (M, 4), view shifts (M, 3) and the
    anchor uid of every view."""
    k_anchor = torch.as_tensor(feature_intrinsics(anchors.k.numpy(), STRIDE))
    device = anchor_feats.device
    feats, visible = sample_anchor_vertex_features(
        anchor_feats, anchors.poses.to(device), k_anchor, mesh
    )
    view_anchor_poses = anchors.poses.clone().to(device)
    view_anchor_poses[:, 3] = NORMALIZED_DISTANCE  # the canonical camera of the views
    size = (targets.shape[-2], targets.shape[-1])
    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    poses, shift, source = [], [], []
    offset = 0
    for views in iter_synthesized_views(
        feats, visible, view_anchor_poses, shifts, mesh, view_k, size, rasterizer, fs.view_chunk
    ):
        src_uids = [anchors.uids[i] for i in views.source.tolist()]
        k = min(fs.candidates, len(views))
        s, i = matcher.search(
            views.features.float(),
            views.mask,
            targets,
            k,
            clutter=clutter,
            exclude=(np.asarray(target_uids), np.asarray(src_uids)),
        )
        i = torch.where(i >= 0, i + offset, i)
        if best_s is None or best_i is None:
            best_s, best_i = s, i
        else:
            cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
            keep = min(fs.candidates, cat_s.shape[1])
            best_s, pos = cat_s.topk(keep, dim=1)
            best_i = cat_i.gather(1, pos)
        poses.append(views.poses.double().cpu())
        shift.append(views.shift.cpu())
        source += src_uids
        offset += len(views)
    assert best_s is not None and best_i is not None
    return best_s, best_i, torch.cat(poses), torch.cat(shift), source


def e_step(
    model: NeMoModel,
    round_index: int,
    anchors: CropSet,
    anchor_feats: torch.Tensor,
    pool: CropSet,
    pool_feats: torch.Tensor,
    fs: FewShotConfig,
    matcher: Matcher,
    rule: AcceptanceRule,
    device: torch.device,
    rasterizer: Rasterizer,
) -> tuple[list[PseudoLabel], torch.Tensor]:
    """Pseudo-labels of every pool image for EM round ``round_index`` (≥ 1).

    ``pool.poses`` is never read. Returns the labels (accepted ones with refined poses and
    confidence weights) and the raw matched poses (N, 4) before refinement (diagnostics).
    """
    shifts = round_shifts(fs, round_index)
    size = (pool_feats.shape[-2], pool_feats.shape[-1])
    view_k = canonical_feature_camera(size, STRIDE, pool.normalized_focal)
    labels: list[PseudoLabel | None] = [None] * len(pool)
    for cat in sorted(set(pool.categories)):
        t_idx = [i for i, c in enumerate(pool.categories) if c == cat]
        a_idx = [i for i, c in enumerate(anchors.categories) if c == cat]
        if not a_idx:
            raise ValueError(f"no anchors of category {cat!r}")
        bank = model.banks[cat]
        queue = bank.clutter_queue().detach().float().to(device)
        clutter = clutter_model(queue) if fs.clutter_aware else None
        uids = [pool.uids[i] for i in t_idx]
        with torch.no_grad():
            scores, index, vposes, vshift, vsource = _match_category(
                anchors.subset(a_idx),
                anchor_feats[a_idx].to(device),
                pool_feats[t_idx].to(device),
                uids,
                model.meshes[cat].to(device),
                clutter,
                shifts,
                view_k,
                matcher,
                fs,
                rasterizer,
            )
            best = best_pose_and_margin(scores, vposes, fs.min_separation_deg, index=index)
            flip = flip_score(scores, vposes, best, fs.flip_radius_deg, index=index)
        made = make_pseudo_labels(uids, cat, best, flip, vposes, vshift, vsource, round_index)
        for i, lb in zip(t_idx, made, strict=True):
            labels[i] = lb
    out = [lb for lb in labels if lb is not None]
    matched = torch.tensor(
        [[lb.azimuth, lb.elevation, lb.theta, lb.distance] for lb in out], dtype=torch.float64
    )
    keep = rule.accept(out)
    out = [dataclasses.replace(lb, accepted=bool(k)) for lb, k in zip(out, keep, strict=True)]
    weights = confidence_weights(out, fs.min_weight)
    out = [dataclasses.replace(lb, weight=float(w)) for lb, w in zip(out, weights, strict=True)]
    refined = _refine(model, pool, pool_feats, out, fs, device, rasterizer)
    return refined, matched


def _refine(
    model: NeMoModel,
    pool: CropSet,
    pool_feats: torch.Tensor,
    labels: list[PseudoLabel],
    fs: FewShotConfig,
    device: torch.device,
    rasterizer: Rasterizer,
    batch_size: int = 16,
) -> list[PseudoLabel]:
    """Accepted labels with their pose refined by render-and-compare against the current model
    (init: the matched rotation at the crop's reference distance); others unchanged."""
    out = list(labels)
    accepted = [i for i, lb in enumerate(labels) if lb.accepted]
    schedule = InferenceSchedule(
        steps=fs.refine_steps, lr=fs.refine_lr, lr_decay=0.3, lr_decay_every=6, tolerance=1e-4
    )
    for cat in sorted({pool.categories[i] for i in accepted}):
        idx = [i for i in accepted if pool.categories[i] == cat]
        bank = model.banks[cat]
        mesh = model.meshes[cat].to(device)
        memory = bank.memory.detach().float().to(device)
        clutter = clutter_model(bank.clutter_queue().detach().float()).to(device)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ix = torch.tensor(chunk)
            init = torch.tensor(
                [[labels[i].azimuth, labels[i].elevation, labels[i].theta] for i in chunk],
                dtype=torch.float32,
            )
            dist = pool.reference_distance[ix].float()[:, None]
            init = torch.cat([init, dist], 1)[:, None].to(device)
            k_feat = torch.as_tensor(feature_intrinsics(pool.k[ix].numpy(), STRIDE)).float()
            with torch.enable_grad():
                poses, _ = refine_poses(
                    pool_feats[ix].to(device),
                    init,
                    mesh,
                    memory,
                    clutter,
                    k_feat.to(device),
                    schedule,
                    rasterizer,
                )
            p = poses[:, 0].detach().double().cpu()
            a, e, t = canonical_pose(p[:, 0], p[:, 1], p[:, 2])
            for j, i in enumerate(chunk):
                out[i] = dataclasses.replace(
                    labels[i],
                    azimuth=float(a[j]),
                    elevation=float(e[j]),
                    theta=float(t[j]),
                    distance=float(p[j, 3]),
                )
    return out


# --------------------------------------------------------------------------------------------
# Diagnostics, files
# --------------------------------------------------------------------------------------------


def _pose_summary(poses: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    if len(poses) == 0:
        return {"acc_pi_6": math.nan, "acc_pi_18": math.nan, "median_error_deg": math.nan, "n": 0}
    err = pose_errors([tuple(p[:3]) for p in poses], gt[:, :3])
    m = summarize_errors(err).to_dict()
    m.pop("failures", None)
    m["flip_share"] = float(np.mean(np.degrees(err) > 150.0))
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


def read_pseudo_labels(path: Path) -> list[PseudoLabel]:
    """Labels from a ``pseudo_labels.jsonl``."""
    return [
        PseudoLabel.from_dict(json.loads(line))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def _write_labels(folder: Path, labels: Sequence[PseudoLabel]) -> None:
    atomic_write_text(folder / "pseudo_labels.csv", pseudo_labels_csv(labels))
    atomic_write_text(
        folder / "pseudo_labels.jsonl",
        "".join(json.dumps(lb.to_dict(), sort_keys=True) + "\n" for lb in labels),
    )


def summary_levels(test_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per level L0.. the ``SUMMARY_KEYS`` of the pooled test metrics."""
    return {lv: {k: m[k] for k in SUMMARY_KEYS} for lv, m in sorted(test_metrics["pooled"].items())}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class FewShotResult:
    """The run's top-level metrics and the final model and accepted pseudo-labels."""

    metrics: dict[str, Any]
    model: NeMoModel
    labels: list[PseudoLabel]


def _evaluate(
    model: NeMoModel,
    config: RunConfig,
    test: CropSet,
    device: torch.device,
    rasterizer: Rasterizer,
    show_progress: bool,
) -> dict[str, Any]:
    from nvsm.infer.evaluate import predict, resolve_schedule, score

    preds = predict(
        model,
        test,
        resolve_schedule(config.infer.schedule),
        config.infer.batch_size,
        device,
        rasterizer,
        show_progress=show_progress,
        description="evaluating",
    )
    return {
        "protocol": config.data.crop_protocol,
        "schedule": config.infer.schedule,
        "dataset": config.data.dataset,
        **score(test, preds),
    }


def _train(
    model: NeMoModel,
    config: RunConfig,
    data: CropSet,
    steps: int,
    seed: int,
    device: torch.device,
    rasterizer: Rasterizer,
    show_progress: bool,
    description: str,
) -> dict[str, float]:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(config.train, steps=steps)
    trainer = NeMoTrainer(model, cfg, device, rasterizer, seed=seed)
    return trainer.fit(data, steps=steps, description=description, show_progress=show_progress)


def _anchors(labelled: CropSet, pool: CropSet, labels: Sequence[PseudoLabel], cap: int) -> CropSet:
    """Labelled crops + the ``cap`` most confident accepted pseudo-labelled crops (at their
    pseudo-poses; stable order on ties)."""
    acc = [i for i, lb in enumerate(labels) if lb.accepted]
    acc = sorted(acc, key=lambda i: -labels[i].weight)[: max(0, cap)]
    acc.sort()
    if not acc:
        return labelled
    return CropSet.concat([labelled, _pseudo_set(pool, labels, acc)])


def _pseudo_set(pool: CropSet, labels: Sequence[PseudoLabel], idx: list[int]) -> CropSet:
    poses = torch.tensor(
        [
            [labels[i].azimuth, labels[i].elevation, labels[i].theta, labels[i].distance]
            for i in idx
        ],
        dtype=torch.float64,
    )
    weights = torch.tensor([labels[i].weight for i in idx], dtype=torch.float32)
    return pool.subset(idx).with_poses(poses, weights)


#: Config keys that may change between an interrupted run and its resumption.
RESUMABLE_KEYS = frozenset({"device", "fewshot.rounds", "name", "description"})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``RESUMABLE_KEYS`` ignored)."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_KEYS and a.get(k) != b.get(k))


def round_shifts(fs: FewShotConfig, round_index: int) -> torch.Tensor:
    """(S, 3) pose shifts of EM round ``round_index`` (≥ 1): the configured expanding grid."""
    return expanding_shift_grid(
        round_index - 1,
        fs.shift_step_deg,
        fs.shift_base_deg,
        fs.shift_growth_deg,
        tuple(fs.shift_elevations_deg),
        (0.0,),
    )


def _num_views(fs: FewShotConfig, round_index: int, anchors: CropSet) -> int:
    """Synthesised views of EM round ``round_index`` (anchors × shifts)."""
    shifts = round_shifts(fs, round_index)
    return len(anchors) * int(shifts.shape[0])


def _round_complete(run_dir: Path, k: int) -> bool:
    folder = run_dir / f"round_{k}"
    return (folder / "metrics.json").is_file() and (folder / "model.pt").is_file()


def run_fewshot(
    config: RunConfig,
    run_dir: Path,
    resume: bool = False,
    data: FewShotData | None = None,
    matcher: Matcher | None = None,
    schedule: AcceptanceSchedule | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FewShotResult:
    """Run (or resume) the few-shot loop; writes the round folders and RUN/metrics.json.

    Args:
        config: resolved configuration (``config.fewshot`` for the loop).
        run_dir: the run folder.
        resume: reuse complete rounds (``round_k/metrics.json`` present).
        data: the split (default ``prepare_fewshot_data(config)``).
        matcher: the matcher (default from ``fewshot.matcher``).
        schedule: acceptance rules per EM round (index k − 1; default ``acceptance_schedule``).
        log: optional progress messages.
    """
    say = log or (lambda _msg: None)
    fs = config.fewshot
    if fs.mstep_init not in ("continue", "restart"):
        raise ValueError(f"fewshot.mstep_init must be continue | restart, got {fs.mstep_init!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data or prepare_fewshot_data(config)
    matcher = matcher or make_matcher(fs.matcher)
    schedule = schedule or acceptance_schedule(fs)
    from nvsm.pipeline import resolve_device

    device = resolve_device(config.device)
    rasterizer = get_rasterizer(config.model.rasterizer, device)
    pool, hidden_gt = hide_poses(data.unlabelled)
    config_json = config_to_dict(config)

    round_metrics: list[dict[str, Any]] = []
    labels: list[PseudoLabel] = []
    model: NeMoModel | None = None
    for k in range(fs.rounds + 1):
        folder = run_dir / f"round_{k}"
        if resume and _round_complete(run_dir, k):
            diff = config_differences(json.loads((folder / "config.json").read_text()), config_json)
            if diff:
                raise ValueError(
                    f"cannot resume {run_dir}: {folder}/config.json differs from this run's "
                    f"config in {diff}"
                )
            say(f"round {k}: complete, loaded from {folder}")
            round_metrics.append(json.loads((folder / "metrics.json").read_text()))
            labels = read_pseudo_labels(folder / "pseudo_labels.jsonl") if k > 0 else []
            model = None  # loaded lazily from the last complete round
            continue
        if model is None:
            if k == 0:
                torch.manual_seed(config.seed)
                model = build_model(config, data.meshes)
            else:
                model, _ = NeMoModel.load(run_dir / f"round_{k - 1}" / "model.pt")
        model = model.to(device)
        seed = config.seed + ROUND_SEED_STRIDE * k
        info: dict[str, Any] = {"round": k}
        if k == 0:
            say(f"round 0: NeMo on {len(data.labelled)} labelled images")
            info["train"] = _train(
                model,
                config,
                data.labelled,
                config.train.steps,
                seed,
                device,
                rasterizer,
                show_progress,
                "round 0 (labels)",
            )
        else:
            anchors = _anchors(data.labelled, pool, labels, fs.max_pseudo_anchors)
            say(f"round {k}: E-step, {len(anchors)} anchors, {len(pool)} unlabelled")
            started = time.perf_counter()
            anchor_feats = extract_features(model, anchors, device, config.infer.batch_size)
            pool_feats = extract_features(model, pool, device, config.infer.batch_size)
            labels, matched = e_step(
                model,
                k,
                anchors,
                anchor_feats,
                pool,
                pool_feats,
                fs,
                matcher,
                schedule.rule(k - 1),
                device,
                rasterizer,
            )
            del anchor_feats, pool_feats
            info["e_step"] = {
                "seconds": time.perf_counter() - started,
                "anchors": len(anchors),
                "views": _num_views(fs, k, anchors),
            }
            info["pseudo_labels"] = pseudo_label_diagnostics(labels, matched, hidden_gt)
            acc = [i for i, lb in enumerate(labels) if lb.accepted]
            train_set = (
                CropSet.concat([data.labelled, _pseudo_set(pool, labels, acc)])
                if acc
                else data.labelled
            )
            if fs.mstep_init == "restart":
                model, _ = NeMoModel.load(run_dir / "round_0" / "model.pt")
                model = model.to(device)
            say(f"round {k}: M-step on {len(data.labelled)} labels + {len(acc)} pseudo-labels")
            info["train"] = _train(
                model,
                config,
                train_set,
                fs.mstep_steps,
                seed,
                device,
                rasterizer,
                show_progress,
                f"round {k} (M-step)",
            )
            info["train"]["pseudo_labelled_images"] = len(acc)
            _write_labels(folder, labels)
        info["train"]["labelled_images"] = len(data.labelled)
        info["test"] = _evaluate(model, config, data.test, device, rasterizer, show_progress)
        model.save(folder / "model.pt", {"round": k})
        atomic_write_json(folder / "config.json", config_json)
        atomic_write_json(folder / "metrics.json", info)
        round_metrics.append(json.loads(json.dumps(info, default=str)))
        # Every round continues from its checkpoint on disk: resumed == uninterrupted.
        model = None
    final, _ = NeMoModel.load(run_dir / f"round_{fs.rounds}" / "model.pt")
    metrics = _top_level(config, data, round_metrics)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return FewShotResult(metrics=metrics, model=final, labels=labels)


def _top_level(
    config: RunConfig, data: FewShotData, rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    coverage = {
        cat: dataclasses.asdict(
            azimuth_coverage(
                [
                    float(p[0])
                    for p, c in zip(data.labelled.poses, data.labelled.categories, strict=True)
                    if c == cat
                ]
            )
        )
        for cat in sorted(set(data.labelled.categories))
    }
    return {
        "nemo": summary_levels(rounds[0]["test"]),
        "nvsm": summary_levels(rounds[-1]["test"]),
        "anchor_seed": config.seed,
        "anchor_strategy": config.labels.anchors,
        "annotations": config.labels.annotations,
        "anchor_uids": list(data.labelled.uids),
        "anchor_azimuth_coverage": coverage,
        "rounds": [
            {
                "round": r["round"],
                "test": summary_levels(r["test"]),
                **({"e_step": r["e_step"]} if "e_step" in r else {}),
                "train": r.get("train", {}),
                **({"pseudo_labels": r["pseudo_labels"]} if "pseudo_labels" in r else {}),
            }
            for r in rounds
        ],
    }
