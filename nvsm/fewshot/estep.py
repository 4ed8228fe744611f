"""The E-step of an EM round: the pool's feature maps, the anchors' views synthesised and
matched to them category by category, the front/back flip margin of each best match, the
round's acceptance and confidence weights, and the render-and-compare refinement of the accepted
poses; and self-training's E-step, NeMo's own predictions labelled by the same rule.

``nvsm.fewshot.loop`` runs these round by round; the pure parts they combine live in
``synthesis`` (views), ``matching`` (scores) and ``pseudo_labels`` (best pose, acceptance).
``pool.poses`` is never read here: the loop hides the unlabelled images' ground truth first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from nvsm.config import FewShotConfig, RunConfig, ScoreArea, check_choice
from nvsm.fewshot.matching import (
    Matcher,
    nvsm_similarity,
    top_scores,
    view_hubness,
)
from nvsm.fewshot.pseudo_labels import (
    AcceptanceRule,
    PseudoLabel,
    best_pose_and_margin,
    make_pseudo_labels,
)
from nvsm.fewshot.synthesis import (
    SynthesizedViews,
    canonical_pose,
    expanding_shift_grid,
    iter_synthesized_views,
    sample_anchor_vertex_features,
)
from nvsm.infer.solve import (
    InferenceSchedule,
    canonical_feature_camera,
    clutter_model,
    flip_margin,
    refine_poses,
    score_templates,
)
from nvsm.mesh import Mesh
from nvsm.models import normalize_images
from nvsm.models.common import STRIDE
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import NORMALIZED_DISTANCE
from nvsm.render import Rasterizer
from nvsm.train.cropset import CropSet, hidden_cells, mapped_empty, outside_image
from nvsm.train.model import NeMoModel

__all__ = [
    "StageTimer",
    "accept_and_weight",
    "confidence_weights",
    "e_step",
    "extract_features",
    "flip_margins",
    "refine_accepted",
    "round_shifts",
    "self_training_labels",
    "view_areas",
]


class StageTimer:
    """Wall-clock seconds per named stage, accumulated over ``with timer("stage"):`` blocks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def round_shifts(fs: FewShotConfig, round_index: int) -> torch.Tensor:
    """(S, 3) pose shifts of EM round ``round_index`` (≥ 1): the configured expanding grid
    (azimuth widening per round, ``fs.shift_elevations_deg`` × ``fs.shift_thetas_deg``)."""
    return expanding_shift_grid(
        round_index - 1,
        fs.shift_step_deg,
        fs.shift_base_deg,
        fs.shift_growth_deg,
        tuple(fs.shift_elevations_deg),
        tuple(fs.shift_thetas_deg),
    )


@torch.no_grad()
def extract_features(
    model: NeMoModel,
    data: CropSet,
    device: torch.device,
    batch_size: int = 16,
    folder: Path | None = None,
) -> torch.Tensor:
    """(N, D, h, w) float32 unit feature maps of every crop, on the CPU.

    With ``folder`` the maps are written batch by batch into a memory-mapped anonymous file
    there (``mapped_empty``), which the returned tensor views, so a large unlabelled pool's
    maps never need to fit in RAM (the E-step reads them a chunk at a time)."""
    model.eval()
    out: torch.Tensor | None = None
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].float().to(device) / 255.0
        maps = model.features(normalize_images(images)).float().cpu()
        if out is None:
            shape = (len(data), *maps.shape[1:])
            if folder is None:
                out = torch.empty(shape)
            else:
                out = mapped_empty(shape, np.dtype(np.float32), folder,
                                   f"the feature maps of {len(data)} images")
        out[start : start + len(maps)] = maps
    if out is None:
        raise ValueError("extract_features: no crops")
    return out


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


def view_areas(views: SynthesizedViews, score_area: ScoreArea) -> torch.Tensor | None:
    """(M,) denominators of the NVSM score (``nvsm.fewshot.matching``) for ``score_area``: each
    view's silhouette pixel count, or None for the matcher's default (its usable pixels)."""
    if check_choice(score_area, ScoreArea, "fewshot.score_area") == "usable":
        return None
    return views.silhouette.flatten(1).sum(1)


def _match_category(
    anchors: CropSet,
    anchor_feats: torch.Tensor,
    pool_feats: torch.Tensor,
    target_index: list[int],
    target_uids: list[str],
    mesh: Mesh,
    clutter: torch.Tensor | None,
    shifts: torch.Tensor,
    view_k: np.ndarray,
    matcher: Matcher,
    fs: FewShotConfig,
    rasterizer: Rasterizer,
    timer: StageTimer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Top candidates of the targets ``pool_feats[target_index]`` over all synthesised views.

    Views are synthesised ``fs.view_chunk`` at a time and every chunk is matched against the
    targets ``fs.target_chunk`` at a time, so neither the views nor the pool's feature maps
    (possibly a memory-mapped file, ``extract_features(path=...)``) are ever all in memory.
    With ``fs.hubness_k`` > 0 the views of each chunk are first scored against an evenly spaced
    sample of ``fs.hubness_sample`` pool images for their hubness r_m (``view_hubness``), and the
    matcher then keeps every target's best views by the CSLS-corrected score s − r_m / 2, so the
    candidates do not depend on how the views are chunked.

    Returns scores (T, K), view index (T, K), view poses (M, 4), view shifts (M, 3) and the
    anchor uid of every view."""
    k_anchor = torch.as_tensor(feature_intrinsics(anchors.k.numpy(), STRIDE))
    device = anchor_feats.device
    # Vertices on the crop's padding (the crop reaching past its image) see zeros, not object.
    crop_hw = (anchors.images.shape[-2], anchors.images.shape[-1])
    padding = hidden_cells(outside_image(anchors.image_box, crop_hw), STRIDE)
    feats, visible = sample_anchor_vertex_features(
        anchor_feats, anchors.poses.to(device), k_anchor, mesh, occluded=padding
    )
    view_anchor_poses = anchors.poses.clone().to(device)
    view_anchor_poses[:, 3] = NORMALIZED_DISTANCE  # the canonical camera of the views
    size = (pool_feats.shape[-2], pool_feats.shape[-1])
    t = len(target_index)
    best_s = torch.full((t, 0), -math.inf)
    best_i = torch.full((t, 0), -1, dtype=torch.int64)
    poses, shift, source = [], [], []
    offset = 0
    # The hubness sample: every hub_stride-th target, spread over the pool.
    hub_rows = list(range(0, t, max(1, math.ceil(t / max(1, fs.hubness_sample)))))
    synthesized = iter_synthesized_views(
        feats, visible, view_anchor_poses, shifts, mesh, view_k, size, rasterizer, fs.view_chunk
    )
    while True:
        with timer("synthesis"):
            views = next(synthesized, None)
        if views is None:
            break
        src_uids = np.asarray([anchors.uids[i] for i in views.source.tolist()])
        areas = view_areas(views, fs.score_area)
        k = min(fs.candidates, len(views))
        offsets = None
        if fs.hubness_k > 0:
            with timer("matching"):
                hubness = _view_hubness_over(
                    views, areas, pool_feats, [target_index[r] for r in hub_rows],
                    [target_uids[r] for r in hub_rows], src_uids, clutter, fs,
                )  # fmt: skip
            offsets = -hubness / 2
        parts_s, parts_i = [], []
        for start in range(0, t, fs.target_chunk):
            rows = slice(start, start + fs.target_chunk)
            with timer("matching"):
                targets = pool_feats[torch.tensor(target_index[rows])].to(device)
                s, i = matcher.search(
                    views.features.float(),
                    views.mask,
                    targets,
                    k,
                    clutter=clutter,
                    exclude=(np.asarray(target_uids[rows]), src_uids),
                    areas=areas,
                    offsets=offsets,
                )
            parts_s.append(s.float().cpu())
            parts_i.append(i.cpu())
        chunk_s, chunk_i = torch.cat(parts_s), torch.cat(parts_i)
        chunk_i = torch.where(chunk_i >= 0, chunk_i + offset, chunk_i)
        cat_s = torch.cat([best_s, chunk_s], 1)
        cat_i = torch.cat([best_i, chunk_i], 1)
        best_s, pos = cat_s.topk(min(fs.candidates, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, pos)
        poses.append(views.poses.double().cpu())
        shift.append(views.shift.cpu())
        source += src_uids.tolist()
        offset += len(views)
    return best_s, best_i, torch.cat(poses), torch.cat(shift), source


def _view_hubness_over(
    views: SynthesizedViews,
    areas: torch.Tensor | None,
    pool_feats: torch.Tensor,
    sample_index: list[int],
    sample_uids: list[str],
    src_uids: np.ndarray,
    clutter: torch.Tensor | None,
    fs: FewShotConfig,
) -> torch.Tensor:
    """(M,) ``view_hubness`` of the views over the sampled pool images ``pool_feats[
    sample_index]`` (read ``fs.target_chunk`` at a time; self-matches excluded): the mean of
    each view's ``fs.hubness_k`` best scores."""
    top = None
    device = views.features.device
    for start in range(0, len(sample_index), fs.target_chunk):
        rows = slice(start, start + fs.target_chunk)
        s = nvsm_similarity(
            views.features.float(),
            views.mask,
            pool_feats[torch.tensor(sample_index[rows])].to(device),
            clutter=clutter,
            exclude=(np.asarray(sample_uids[rows]), src_uids),
            areas=areas,
        )
        top = top_scores(s, fs.hubness_k, top)
    if top is None:  # no target at all: nothing to correct
        return torch.zeros(len(views), device=device)
    return view_hubness(top)


def flip_margins(
    model: NeMoModel,
    crops: CropSet,
    feats: torch.Tensor,
    index: Sequence[int],
    poses: torch.Tensor,
    device: torch.device,
    rasterizer: Rasterizer,
    batch_size: int = 64,
) -> torch.Tensor:
    """(n,) ``flip_margin`` of the crops ``index`` (one category) with feature maps
    ``feats[index]`` (read a batch at a time: ``feats`` may be memory-mapped) at the given
    (n, 4) poses (their rotation; the distance is the crop's reference distance) under the
    current model's mesh features."""
    cat = crops.categories[index[0]]
    bank = model.banks[cat]
    mesh = model.meshes[cat].to(device)
    memory = bank.memory.detach().float().to(device)
    clutter = clutter_model(bank.clutter_queue().detach().float()).to(device)
    out = []
    for start in range(0, len(index), batch_size):
        ix = torch.tensor(index[start : start + batch_size])
        at = poses[start : start + batch_size].to(torch.float64).clone()
        at[:, 3] = crops.reference_distance[ix]
        k_feat = torch.as_tensor(feature_intrinsics(crops.k[ix].numpy(), STRIDE)).float()
        out.append(
            flip_margin(
                feats[ix].to(device),
                at.float().to(device),
                mesh,
                memory,
                clutter,
                k_feat.to(device),
                rasterizer,
            )
        )
    return torch.cat(out)


def accept_and_weight(
    labels: Sequence[PseudoLabel], rule: AcceptanceRule, fs: FewShotConfig
) -> list[PseudoLabel]:
    """The labels with ``accepted`` set by the rule and ``confidence_weights`` as weights (one
    path for NVSM and self-training, so both use the same acceptance and weighting)."""
    keep = rule.accept(labels)
    out = [dataclasses.replace(lb, accepted=bool(k)) for lb, k in zip(labels, keep, strict=True)]
    weights = confidence_weights(out, fs.min_weight)
    return [dataclasses.replace(lb, weight=float(w)) for lb, w in zip(out, weights, strict=True)]


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
    timer: StageTimer | None = None,
) -> tuple[list[PseudoLabel], torch.Tensor]:
    """Pseudo-labels of every pool image for EM round ``round_index`` (≥ 1).

    ``pool.poses`` is never read. Returns the labels (accepted ones with refined poses and
    confidence weights) and the raw matched poses (N, 4) before refinement (diagnostics).
    ``timer`` accumulates the ``synthesis``, ``matching`` and ``refinement`` seconds.
    """
    timer = timer or StageTimer()
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
                pool_feats,
                t_idx,
                uids,
                model.meshes[cat].to(device),
                clutter,
                shifts,
                view_k,
                matcher,
                fs,
                rasterizer,
                timer,
            )
            with timer("matching"):
                best = best_pose_and_margin(scores, vposes, fs.min_separation_deg, index=index)
        best_poses = vposes[best.view.clamp(min=0)].clone()
        best_poses[best.view < 0] = math.nan
        with timer("flip check"):
            flip = flip_margins(model, pool, pool_feats, t_idx, best_poses, device, rasterizer)
        made = make_pseudo_labels(uids, cat, best, flip, vposes, vshift, vsource, round_index)
        for i, lb in zip(t_idx, made, strict=True):
            labels[i] = lb
    out = accept_and_weight([lb for lb in labels if lb is not None], rule, fs)
    matched = torch.tensor(
        [[lb.azimuth, lb.elevation, lb.theta, lb.distance] for lb in out], dtype=torch.float64
    )
    with timer("refinement"):
        refined = refine_accepted(model, pool, pool_feats, out, fs, device, rasterizer)
    return refined, matched


def self_training_labels(
    model: NeMoModel,
    pool: CropSet,
    config: RunConfig,
    round_index: int,
    device: torch.device,
    rasterizer: Rasterizer,
    timer: StageTimer | None = None,
    show_progress: bool = False,
    features_folder: Path | None = None,
) -> list[PseudoLabel]:
    """Plain self-training pseudo-labels: NeMo's own render-and-compare prediction
    (``config.infer.schedule``) of every pool image (not yet accepted).

    score = 1 − the prediction's loss (the clutter-aware NeMo score). The margin comes from the
    template scores NeMo's search starts from, by the function the NVSM E-step uses on its
    synthesised views (``best_pose_and_margin``), and the flip score is the same
    ``flip_margins`` as NVSM's, so an acceptance rule means the same thing for both.
    ``pool.poses`` is never read; ``features_folder``: see ``extract_features``."""
    from nvsm.infer.evaluate import category_templates, predict, resolve_schedule

    timer = timer or StageTimer()
    fs = config.fewshot
    schedule = resolve_schedule(config.infer.schedule)
    with timer("inference"):
        preds = predict(
            model,
            pool,
            schedule,
            config.infer.batch_size,
            device,
            rasterizer,
            show_progress=show_progress,
            description=f"self-training round {round_index}: predicting",
        )
    with timer("features"):
        feats = extract_features(model, pool, device, config.infer.batch_size, features_folder)
    labels: list[PseudoLabel | None] = [None] * len(pool)
    size = (feats.shape[-2], feats.shape[-1])
    with timer("matching"), torch.no_grad():
        for cat in sorted(set(pool.categories)):
            idx = [i for i, c in enumerate(pool.categories) if c == cat]
            bank = model.banks[cat]
            tb = category_templates(model, cat, size, pool.normalized_focal, schedule, rasterizer)
            clutter = clutter_model(bank.clutter_queue().float())
            scores = torch.cat(
                [
                    1 - score_templates(feats[c].to(device), tb.features, tb.masks, clutter)
                    for c in torch.tensor(idx).split(config.infer.batch_size)
                ]
            ).cpu()
            tposes = torch.cat(
                [tb.poses.cpu().double(), torch.full((len(tb.poses), 1), NORMALIZED_DISTANCE)], 1
            )
            best = best_pose_and_margin(scores, tposes, fs.min_separation_deg)
            flip = flip_margins(model, pool, feats, idx, preds.poses[idx], device, rasterizer)
            for j, i in enumerate(idx):
                p = preds.poses[i]
                ok = preds.errors[i] is None and bool(torch.isfinite(p).all())
                a, e, t = canonical_pose(p[0:1], p[1:2], p[2:3])
                labels[i] = PseudoLabel(
                    uid=pool.uids[i],
                    category=cat,
                    azimuth=float(a[0]),
                    elevation=float(e[0]),
                    theta=float(t[0]),
                    distance=float(p[3]),
                    score=1.0 - float(preds.loss[i]) if ok else -math.inf,
                    margin=float(best.margin[j]),
                    flip_score=float(flip[j]),
                    source_uid="",
                    shift=(0.0, 0.0, 0.0),
                    round=round_index,
                )
    return [lb for lb in labels if lb is not None]


def refine_accepted(
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
