"""Run render-and-compare inference over a ``CropSet`` and score it honestly.

Every image gets a prediction or is counted as a failure: a batch whose inference raises, or a
prediction that is not finite, scores a 180° error (``nvsm.pose.metrics``); nothing is dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from nvsm.infer.solve import (
    SCHEDULES,
    CategoryModel,
    InferenceSchedule,
    TemplateBank,
    canonical_feature_camera,
    clutter_model,
    estimate_poses_categories,
    render_templates,
)
from nvsm.models import normalize_images
from nvsm.models.common import STRIDE
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.metrics import PoseMetrics, pose_errors, summarize_errors, weighted_mean
from nvsm.render import Rasterizer, default_rasterizer
from nvsm.train.cropset import CropSet
from nvsm.train.model import NeMoModel


@dataclass
class Predictions:
    """Per-crop results: poses (N, 4) (NaN rows for failures), loss (N,), seconds (N,),
    the error message of each failed crop (None when it succeeded), and the category each crop
    was solved as (the given one, or the inferred one with ``predict(infer_category=True)``;
    "" when inference failed before a category could be chosen)."""

    poses: torch.Tensor
    loss: torch.Tensor
    seconds: torch.Tensor
    errors: list[str | None]
    categories: list[str] = field(default_factory=list)


def resolve_schedule(name: str) -> InferenceSchedule:
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown inference schedule {name!r}; expected one of {sorted(SCHEDULES)}"
        )
    return SCHEDULES[name]


@torch.no_grad()
def _features(model: NeMoModel, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    return model.features(normalize_images(images.float().to(device) / 255.0)).float()


def predict(
    model: NeMoModel,
    data: CropSet,
    schedule: InferenceSchedule,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    rasterizer: Rasterizer | None = None,
    show_progress: bool = True,
    description: str = "inference",
    infer_category: bool = False,
) -> Predictions:
    """Estimate the pose of every crop.

    Args:
        model: trained model (backbone, meshes, banks).
        data: N crops (3, H, W) with their cameras; ``data.categories`` names each crop's
            category unless ``infer_category``.
        schedule: template grid and refinement schedule.
        infer_category: solve every crop with every category of the model (all on the same
            crop and feature map) and keep, per crop, the category whose best hypothesis has the
            lowest loss; ``data.categories`` is then ignored. Otherwise each crop is solved with
            its given category's mesh.
    Returns:
        ``Predictions`` (poses (N, 4), loss (N,), seconds (N,), errors, categories).
    """
    device = torch.device(device)
    rasterizer = rasterizer or default_rasterizer(device)
    n = len(data)
    poses = torch.full((n, 4), float("nan"), dtype=torch.float64)
    loss = torch.full((n,), float("nan"))
    seconds = torch.zeros(n)
    errors: list[str | None] = [None] * n
    categories = [""] * n if infer_category else list(data.categories)
    size = (data.images.shape[-2] // STRIDE, data.images.shape[-1] // STRIDE)

    def candidate(cat: str) -> CategoryModel:
        bank = model.banks[cat]
        return CategoryModel(
            mesh=model.meshes[cat],
            vertex_features=bank.memory.float(),
            clutter=clutter_model(bank.clutter_queue().float()),
            templates=category_templates(
                model, cat, size, data.normalized_focal, schedule, rasterizer
            ),
        )

    batches: list[tuple[list[str], list[int]]] = []
    if infer_category:
        names = model.categories
        batches = [(names, list(range(s, min(s + batch_size, n)))) for s in range(0, n, batch_size)]
    else:
        for cat in sorted(set(data.categories)):
            idx = [i for i, c in enumerate(data.categories) if c == cat]
            batches += [([cat], idx[s : s + batch_size]) for s in range(0, len(idx), batch_size)]
    candidates = {cat: candidate(cat) for cat in sorted({c for names, _ in batches for c in names})}
    # A bar that stops on leaving the block, an interruption included (``track``'s went on
    # redrawing over the error message).
    with Progress(*Progress.get_default_columns(), disable=not show_progress) as progress:
        for names, idx in progress.track(batches, description=description):
            start = time.perf_counter()
            try:
                index = torch.tensor(idx)
                fmap = _features(model, data.images[index], device)
                k_feat = torch.as_tensor(feature_intrinsics(data.k[index].numpy(), STRIDE)).float()
                pred = estimate_poses_categories(
                    fmap,
                    k_feat,
                    data.reference_distance[index].float(),
                    {cat: candidates[cat] for cat in names},
                    schedule,
                    rasterizer,
                )
                poses[index] = pred.poses.double().cpu()
                loss[index] = pred.loss.float().cpu()
                if infer_category:
                    for i, name in zip(idx, pred.names(), strict=True):
                        categories[i] = name
            except Exception as exc:  # counted as failures (180°), never dropped
                for i in idx:
                    errors[i] = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - start
            seconds[torch.tensor(idx)] = elapsed / len(idx)
    for i in range(n):
        if errors[i] is None and not bool(torch.isfinite(poses[i]).all()):
            errors[i] = "non-finite prediction"
    return Predictions(
        poses=poses, loss=loss, seconds=seconds, errors=errors, categories=categories
    )


def category_templates(
    model: NeMoModel,
    category: str,
    size: tuple[int, int],
    normalized_focal: float,
    schedule: InferenceSchedule,
    rasterizer: Rasterizer,
) -> TemplateBank:
    """Templates of one category at one feature-map size (h, w), rendered once per model and
    (category, size, normalised focal, schedule) with the canonical camera of that size.

    The cache lives on the model and remembers which bank tensor (and its in-place version
    counter) it rendered, so templates are re-rendered whenever the bank changed."""
    memory = model.banks[category].memory
    key = (category, size[0], size[1], float(normalized_focal), schedule)
    hit = model.template_cache.get(key)
    if hit is None or hit[0] is not memory or hit[1] != memory._version:
        bank = render_templates(
            model.meshes[category],
            memory.float(),
            schedule,
            size,
            STRIDE,
            rasterizer,
            k_feat=canonical_feature_camera(size, STRIDE, normalized_focal),
        )
        hit = (memory, memory._version, bank)
        model.template_cache[key] = hit
    return hit[2]


def score(data: CropSet, predictions: Predictions) -> dict[str, Any]:
    """Metrics per category and occlusion level, pooled, and the image-weighted mean.

    Returns a JSON-able dict:
        {"per_category": {cat: {"L0": PoseMetrics-dict, ...}}, "pooled": {"L0": ...},
         "mean": {"L0": ...}, "seconds_per_image": float, "failures": int}
    where "mean" is the papers' image-count-weighted mean of the per-category numbers.
    """
    finite = torch.isfinite(predictions.poses[:, :3]).all(1).tolist()
    failed = np.array(
        [e is not None or not ok for e, ok in zip(predictions.errors, finite, strict=True)]
    )
    preds = [
        None if failed[i] else tuple(predictions.poses[i, :3].tolist()) for i in range(len(data))
    ]
    err = pose_errors(preds, data.poses[:, :3].numpy())
    levels = data.occlusion_levels.numpy()
    cats = np.array(data.categories)
    # per_category: {cat: {level: metrics}}; pooled and mean: {level: metrics}
    out: dict[str, dict[str, Any]] = {
        "per_category": {},
        "pooled": {},
        "mean": {},
    }
    per_level: dict[str, list[PoseMetrics]] = {}
    for cat in sorted(set(data.categories)):
        out["per_category"][cat] = {}
        for level in sorted(set(levels.tolist())):
            sel = (cats == cat) & (levels == level)
            if not sel.any():
                continue
            m = summarize_errors(err[sel], failures=int(failed[sel].sum()))
            out["per_category"][cat][f"L{level}"] = _with_time(m, predictions, sel)
            per_level.setdefault(f"L{level}", []).append(m)
    for level in sorted(set(levels.tolist())):
        sel = levels == level
        m = summarize_errors(err[sel], failures=int(failed[sel].sum()))
        out["pooled"][f"L{level}"] = _with_time(m, predictions, sel)
        out["mean"][f"L{level}"] = weighted_mean(per_level[f"L{level}"]).to_dict()
    return {
        **out,
        "seconds_per_image": float(predictions.seconds.mean()) if len(data) else math.nan,
        "failures": int(failed.sum()),
    }


def _with_time(m: PoseMetrics, predictions: Predictions, sel: np.ndarray) -> dict[str, float | int]:
    return {
        **m.to_dict(),
        "seconds_per_image": float(predictions.seconds[torch.as_tensor(sel)].mean()),
    }
