"""NeMo render-and-compare pose estimation: template search, top-k, joint gradient refinement.

Score of a pose for an image feature map F (unit-norm, (D, h, w)), with the neural mesh's
rendered features R (zero off the silhouette) and the clutter model b (one unit vector):

    obj(p) = ⟨R(p), F(p)⟩,   clu(p) = ⟨b, F(p)⟩,   loss = 1 − mean_p mask(p)·ReLU(obj(p) − clu(p))

(the outlier process of NeMo: a pixel explains the object only where the mesh explains it better
than clutter, so occluded pixels stop contributing). The reference computes
mean_p max(obj, clu) − mean_p clu with obj = 0 off the silhouette, which also credits background
pixels with ReLU(−clu); nvsm masks them out so a pose is never rewarded for pixels it does not
cover.

Poses are optimised directly as (azimuth, elevation, θ, distance) — no look-at camera and so no
singularity at the poles — for B images × k hypotheses in one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nvsm.config import ScheduleName
from nvsm.mesh import Mesh
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import NORMALIZED_DISTANCE, PASCAL3D_VIEWPORT, intrinsics, wrap_azimuth
from nvsm.render import Rasterizer, render_pose


@dataclass(frozen=True)
class InferenceSchedule:
    """Template grid and refinement schedule.

    Attributes:
        n_azimuth: azimuths 0, 360/n, ... degrees.
        elevations_deg, thetas_deg: template elevations and in-plane rotations (degrees).
        top_k: hypotheses refined per image.
        steps: Adam steps; lr, betas: Adam; lr decays ×``lr_decay`` every ``lr_decay_every``.
        tolerance: stop early after ``patience`` steps in a row in none of which a
            hypothesis' loss fell more than this below its best so far (a loss falling by less
            each step stops too; 0 disables early stopping).
    """

    n_azimuth: int = 12
    elevations_deg: tuple[float, ...] = (-30.0, 0.0, 30.0, 60.0)
    thetas_deg: tuple[float, ...] = (-30.0, 0.0, 30.0)
    top_k: int = 1
    steps: int = 300
    lr: float = 0.05
    betas: tuple[float, float] = (0.4, 0.6)
    lr_decay: float = 0.2
    lr_decay_every: int = 100
    tolerance: float = 0.0
    patience: int = 10

    def template_poses(self) -> torch.Tensor:
        """(T, 3) template (azimuth, elevation, θ) in radians, azimuth-major order."""
        az = torch.arange(self.n_azimuth, dtype=torch.float64) * (2 * math.pi / self.n_azimuth)
        el = torch.tensor(self.elevations_deg, dtype=torch.float64).deg2rad()
        th = torch.tensor(self.thetas_deg, dtype=torch.float64).deg2rad()
        grid = torch.cartesian_prod(az, el, th)
        return grid.reshape(-1, 3)


#: The reference NeMo schedule: 144 templates, top-1, Adam 0.05 (0.4, 0.6), 300 steps, ×0.2/100.
REFERENCE_SCHEDULE = InferenceSchedule()

#: nvsm's default: a denser template grid (scoring is one batched einsum, so templates are
#: cheap) and a short refinement of the best hypothesis with early stopping. Chosen with
#: ``benchmarks/bench_inference.py`` (README): as accurate as the reference on synthetic car at
#: about a tenth of its cost.
FAST_SCHEDULE = InferenceSchedule(
    n_azimuth=24,
    elevations_deg=(-15.0, 0.0, 15.0, 30.0, 45.0, 60.0),
    thetas_deg=(-20.0, 0.0, 20.0),
    top_k=1,
    steps=10,
    lr=0.05,
    lr_decay=0.3,
    lr_decay_every=6,
    tolerance=1e-4,
    patience=5,
)

SCHEDULES: dict[ScheduleName, InferenceSchedule] = {
    "reference": REFERENCE_SCHEDULE, "fast": FAST_SCHEDULE,
}


@dataclass(frozen=True)
class PosePrediction:
    """Per-image result: poses (B, 4) as (azimuth, elevation, θ, distance) and loss (B,)."""

    poses: torch.Tensor
    loss: torch.Tensor
    hypotheses: torch.Tensor = field(repr=False)  # (B, k, 4) refined hypotheses
    hypothesis_loss: torch.Tensor = field(repr=False)  # (B, k)


def clutter_model(clutter_queue: torch.Tensor) -> torch.Tensor:
    """Single clutter vector b (D,): the re-normalised mean of the clutter queue (Q, D); zero
    (no clutter evidence yet, scores reduce to ReLU(cosine)) for an empty queue, not NaN."""
    if clutter_queue.shape[0] == 0:
        return clutter_queue.new_zeros(clutter_queue.shape[1])
    return torch.nn.functional.normalize(clutter_queue.mean(0), dim=0)


def canonical_feature_camera(
    image_size: tuple[int, int], stride: int, normalized_focal: float = PASCAL3D_VIEWPORT
) -> np.ndarray:
    """Feature-map intrinsics of a normalised crop: focal ``normalized_focal`` px at the crop's
    full resolution (3000 in NeMo), principal point at the map centre; objects of normalised
    size then stand at ``NORMALIZED_DISTANCE``."""
    h, w = image_size
    k = np.asarray(intrinsics(normalized_focal, (w * stride - 1) / 2, (h * stride - 1) / 2))
    return feature_intrinsics(k, stride)


def pose_loss(
    feature_maps: torch.Tensor,
    rendered: torch.Tensor,
    mask: torch.Tensor,
    clutter: torch.Tensor,
) -> torch.Tensor:
    """Clutter-aware render-and-compare loss, one value per (image, pose) pair.

    Args:
        feature_maps: (N, D, h, w) image features; rendered: (N, D, h, w); mask: (N, h, w);
        clutter: (D,) clutter model.
    Returns:
        (N,) loss = 1 − mean_p mask·ReLU(⟨R, F⟩ − ⟨b, F⟩), in the feature maps' dtype.
    """
    obj = (rendered.to(feature_maps.dtype) * feature_maps).sum(1)
    clu = torch.einsum("d,ndhw->nhw", clutter.to(feature_maps.dtype), feature_maps)
    return 1 - (mask * torch.relu(obj - clu)).mean(dim=(1, 2))


def score_templates(
    feature_maps: torch.Tensor,
    templates: torch.Tensor,
    template_masks: torch.Tensor,
    clutter: torch.Tensor,
) -> torch.Tensor:
    """Loss of every template for every image in one batched operation.

    Args:
        feature_maps: (B, D, h, w); templates: (T, D, h, w); template_masks: (T, h, w) bool;
        clutter: (D,).
    Returns:
        (B, T) losses (lower is better), in the feature maps' dtype.
    """
    clu = torch.einsum("d,bdhw->bhw", clutter.to(feature_maps.dtype), feature_maps)
    obj = torch.einsum("bdhw,tdhw->bthw", feature_maps, templates.to(feature_maps.dtype))
    fg = torch.relu(obj - clu[:, None]) * template_masks[None].to(obj.dtype)
    return 1 - fg.mean(dim=(2, 3))


@dataclass
class TemplateBank:
    """Templates rendered once per model: poses (T, 3), features (T, D, h, w), masks (T, h, w)."""

    poses: torch.Tensor
    features: torch.Tensor
    masks: torch.Tensor


def render_templates(
    mesh: Mesh,
    vertex_features: torch.Tensor,
    schedule: InferenceSchedule,
    image_size: tuple[int, int],
    stride: int,
    rasterizer: Rasterizer | None = None,
    chunk: int = 64,
    k_feat: np.ndarray | None = None,
) -> TemplateBank:
    """Render the schedule's template grid at distance 5 with ``k_feat`` (default: the
    canonical camera of ``canonical_feature_camera``)."""
    poses = schedule.template_poses().to(vertex_features.device, vertex_features.dtype)
    if k_feat is None:
        k_feat = canonical_feature_camera(image_size, stride)
    k = torch.as_tensor(k_feat, dtype=vertex_features.dtype)
    feats, masks = [], []
    with torch.no_grad():
        for start in range(0, len(poses), chunk):
            p = poses[start : start + chunk]
            out = render_pose(
                mesh,
                vertex_features,
                p[:, 0],
                p[:, 1],
                p[:, 2],
                torch.full_like(p[:, 0], NORMALIZED_DISTANCE),
                k,
                image_size,
                rasterizer,
            )
            feats.append(out.features)
            masks.append(out.mask)
    return TemplateBank(poses, torch.cat(feats), torch.cat(masks))


@torch.no_grad()
def flip_margin(
    feature_maps: torch.Tensor,
    poses: torch.Tensor,
    mesh: Mesh,
    vertex_features: torch.Tensor,
    clutter: torch.Tensor,
    k_feat: torch.Tensor,
    rasterizer: Rasterizer | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Front/back flip margin: ``pose_loss`` at (a + π, e, θ, d) − ``pose_loss`` at (a, e, θ, d).

    A cuboid centred on the object's origin maps onto itself under a half turn about its
    vertical axis, so the two poses cover the same pixels (nvsm's cuboids are centred on the CAD
    models' extents, off by ~0.002 on the synthetic cars; an off-centre one would add a
    silhouette difference to the margin): the margin measures only how much better the vertex
    features explain the image the given way round than back to front (feasibility notes: ~180°
    flips are the dominant few-shot error, and match scores alone do not expose them).

    Args:
        feature_maps: (N, D, h, w) unit features; poses: (N, 4) (a, e, θ, d);
        vertex_features: (V, D); clutter: (D,); k_feat: (N, 3, 3) or (3, 3).
    Returns:
        (N,) margins (positive: the given orientation is the better one); NaN for non-finite
        poses.
    """
    n, _, h, w = feature_maps.shape
    kk = k_feat.to(feature_maps.dtype)
    kk = kk.expand(n, 3, 3) if kk.ndim == 2 else kk
    p = poses.to(feature_maps.dtype)
    ok = torch.isfinite(p).all(1)
    # Non-finite rows are rendered at a harmless pose and reported as NaN.
    p = torch.where(ok[:, None], p, p.new_tensor([0.0, 0.0, 0.0, NORMALIZED_DISTANCE]))
    out = torch.empty(n, dtype=feature_maps.dtype)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        q = p[sl].repeat(2, 1)
        q[: q.shape[0] // 2, 0] += math.pi
        r = render_pose(mesh, vertex_features, q[:, 0], q[:, 1], q[:, 2], q[:, 3],
                        kk[sl].repeat(2, 1, 1), (h, w), rasterizer)  # fmt: skip
        loss = pose_loss(feature_maps[sl].repeat(2, 1, 1, 1), r.features, r.mask, clutter)
        flipped, given = loss.chunk(2)
        out[sl] = (flipped - given).cpu()
    return out.masked_fill(~ok.cpu(), math.nan)


def refine_poses(
    feature_maps: torch.Tensor,
    init: torch.Tensor,
    mesh: Mesh,
    vertex_features: torch.Tensor,
    clutter: torch.Tensor,
    k_feat: torch.Tensor,
    schedule: InferenceSchedule,
    rasterizer: Rasterizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine k pose hypotheses per image jointly by gradient descent on (a, e, θ, d).

    Args:
        feature_maps: (B, D, h, w); init: (B, k, 4) hypotheses (a, e, θ, d);
        k_feat: (B, 3, 3) or (3, 3) feature-map intrinsics of each image.
    Returns:
        refined (B, k, 4) and their final losses (B, k). Each hypothesis keeps the best pose
        seen during optimisation: the start and the pose after each of the ``schedule.steps``
        Adam steps (fewer when early stopping ends it).
    """
    b, k, _ = init.shape
    _, _, h, w = feature_maps.shape
    # Everything follows the feature maps' device: callers hand in crop cameras and starting
    # distances from the (CPU) crop set.
    params = init.detach().to(feature_maps.device).reshape(b * k, 4).clone().requires_grad_(True)
    fmap = feature_maps.detach().repeat_interleave(k, dim=0)
    kk = k_feat.to(feature_maps)
    kk = kk.expand(b, 3, 3) if kk.ndim == 2 else kk
    kk = kk.repeat_interleave(k, dim=0)
    best = params.detach().clone()
    best_loss = torch.full_like(params[:, 0].detach(), math.inf)

    def render_loss(p: torch.Tensor) -> torch.Tensor:
        out = render_pose(
            mesh, vertex_features, p[:, 0], p[:, 1], p[:, 2], p[:, 3], kk, (h, w), rasterizer
        )
        return pose_loss(fmap, out.features, out.mask, clutter)

    if schedule.steps == 0:
        with torch.no_grad():
            best_loss = render_loss(params)
        return best.reshape(b, k, 4), best_loss.reshape(b, k)
    opt = torch.optim.Adam([params], lr=schedule.lr, betas=schedule.betas)
    sched = torch.optim.lr_scheduler.StepLR(opt, schedule.lr_decay_every, schedule.lr_decay)
    stale = 0

    def keep_best(loss: torch.Tensor) -> bool:
        """Keep the best pose seen; whether early stopping ends the refinement: a step that
        improves no hypothesis' best loss by more than the tolerance counts towards patience
        (reading it back waits for the device, so only when early stopping is on)."""
        nonlocal best, best_loss, stale
        with torch.no_grad():
            better = loss < best_loss
            if schedule.tolerance > 0:
                significant = bool((loss < best_loss - schedule.tolerance).any())
                stale = 0 if significant else stale + 1
            best = torch.where(better[:, None], params.detach(), best)
            best_loss = torch.where(better, loss.detach(), best_loss)
        return schedule.tolerance > 0 and stale >= schedule.patience

    for _ in range(schedule.steps):
        loss = render_loss(params)
        if keep_best(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
    else:
        # The pose after the last step: unscored, the last step was wasted (1 step did nothing).
        with torch.no_grad():
            keep_best(render_loss(params))
    return best.reshape(b, k, 4), best_loss.reshape(b, k)


def estimate_poses(
    feature_maps: torch.Tensor,
    k_feat: torch.Tensor,
    init_distance: torch.Tensor,
    mesh: Mesh,
    vertex_features: torch.Tensor,
    clutter: torch.Tensor,
    templates: TemplateBank,
    schedule: InferenceSchedule,
    rasterizer: Rasterizer | None = None,
) -> PosePrediction:
    """Template search → top-k → joint refinement → best hypothesis, for a batch of images.

    Args:
        feature_maps: (B, D, h, w) unit-norm features; k_feat: (B, 3, 3) or (3, 3);
        init_distance: (B,) starting distance per image (the crop's reference distance).
    """
    scores = score_templates(feature_maps, templates.features, templates.masks, clutter)
    top = torch.topk(-scores, k=min(schedule.top_k, scores.shape[1]), dim=1).indices  # (B, k)
    init_rot = templates.poses[top]  # (B, k, 3)
    init = torch.cat(
        [init_rot, init_distance.to(init_rot)[:, None, None].expand(*top.shape, 1)], dim=-1
    )
    hyp, hyp_loss = refine_poses(
        feature_maps, init, mesh, vertex_features, clutter, k_feat, schedule, rasterizer
    )
    best = hyp_loss.argmin(1)
    poses = hyp[torch.arange(len(best), device=best.device), best]
    poses = torch.cat([wrap_azimuth(poses[:, :1]), poses[:, 1:]], dim=1)
    return PosePrediction(
        poses=poses, loss=hyp_loss.min(1).values, hypotheses=hyp, hypothesis_loss=hyp_loss
    )


@dataclass(frozen=True)
class CategoryModel:
    """What ``estimate_poses`` needs for one category: its mesh, vertex features (V, D), clutter
    model (D,) and templates rendered at the feature-map size of the images being solved."""

    mesh: Mesh
    vertex_features: torch.Tensor
    clutter: torch.Tensor
    templates: TemplateBank


@dataclass(frozen=True)
class CategoryPrediction:
    """Best category per image and its pose.

    Attributes:
        poses: (B, 4) (a, e, θ, d) under the chosen category's mesh (NaN where every
            category's loss was non-finite).
        loss: (B,) loss of the chosen category (NaN where none was finite).
        category_index: (B,) int64 index into ``categories`` (−1 where none was finite).
        categories: the candidate names, in the order they were tried.
        category_loss: (B, C) best-hypothesis loss of every candidate.
    """

    poses: torch.Tensor
    loss: torch.Tensor
    category_index: torch.Tensor
    categories: tuple[str, ...]
    category_loss: torch.Tensor

    def names(self) -> list[str]:
        """Chosen category name per image ("" where none was finite)."""
        return [self.categories[i] if i >= 0 else "" for i in self.category_index.tolist()]


def estimate_poses_categories(
    feature_maps: torch.Tensor,
    k_feat: torch.Tensor,
    init_distance: torch.Tensor,
    candidates: dict[str, CategoryModel],
    schedule: InferenceSchedule,
    rasterizer: Rasterizer | None = None,
) -> CategoryPrediction:
    """Solve every image with every candidate category; keep the category of lowest loss.

    Each candidate runs the full ``estimate_poses`` (template search, top-k, refinement) on the
    same feature maps, so the losses are comparable: all are 1 − the mean clutter-aware
    foreground evidence over the same map. Ties go to the earlier candidate; non-finite losses
    never win. One candidate gives plain ``estimate_poses`` with the category known.

    Args:
        feature_maps: (B, D, h, w) unit-norm features; k_feat: (B, 3, 3) or (3, 3);
        init_distance: (B,); candidates: category → ``CategoryModel`` (templates of size (h, w)).
    Returns:
        ``CategoryPrediction`` with poses (B, 4), loss (B,), category_index (B,),
        category_loss (B, C).
    """
    if not candidates:
        raise ValueError("estimate_poses_categories: no candidate categories")
    b = feature_maps.shape[0]
    names = tuple(candidates)
    all_poses = torch.full((len(names), b, 4), math.nan, dtype=torch.float64)
    all_loss = torch.full((b, len(names)), math.inf, dtype=torch.float64)
    for c, name in enumerate(names):
        cand = candidates[name]
        pred = estimate_poses(
            feature_maps,
            k_feat,
            init_distance,
            cand.mesh,
            cand.vertex_features,
            cand.clutter,
            cand.templates,
            schedule,
            rasterizer,
        )
        all_poses[c] = pred.poses.detach().double().cpu()
        all_loss[:, c] = pred.loss.detach().double().cpu()
    ranked = torch.where(torch.isfinite(all_loss), all_loss, torch.full_like(all_loss, math.inf))
    best_loss, best = ranked.min(1)  # min returns the first index on ties
    found = torch.isfinite(best_loss)
    poses = all_poses[best, torch.arange(b)]
    poses[~found] = math.nan
    return CategoryPrediction(
        poses=poses,
        loss=torch.where(found, best_loss, torch.full_like(best_loss, math.nan)),
        category_index=torch.where(found, best, torch.full_like(best, -1)),
        categories=names,
        category_loss=all_loss,
    )


__all__ = [
    "FAST_SCHEDULE",
    "REFERENCE_SCHEDULE",
    "SCHEDULES",
    "CategoryModel",
    "CategoryPrediction",
    "InferenceSchedule",
    "PosePrediction",
    "TemplateBank",
    "canonical_feature_camera",
    "clutter_model",
    "estimate_poses",
    "estimate_poses_categories",
    "flip_margin",
    "pose_loss",
    "refine_poses",
    "render_templates",
    "score_templates",
]
