"""NeMo's contrastive training objective as pure functions (reference memo §5.1 and §5.3).

Coordinates: ``vertex_px`` are FEATURE-MAP pixel coordinates (x, y) in the OpenCV convention of
``nvsm.pose`` (integer coordinates at cell centres), i.e. crop pixels mapped with
``nvsm.pose.camera.feature_intrinsics``: cell (row i, col j) is centred at (x, y) = (j, i) and
covers crop pixels [8j, 8j + 7] × [8i, 8i + 7].

Typical step (B images, one category with K vertices, bank from ``nvsm.train.bank``)::

    fmap = backbone(images)                                             # (B, D, h, w)
    f = sample_vertex_features(fmap, vertex_px, visible)               # (B, K, D)
    clutter, valid = sample_clutter_features(fmap, object_mask, 16, generator=gen)
    near = near_vertex_mask_2d(vertex_px, radius_px=6.0)               # (B, K, K)
    loss = contrastive_loss(f, visible, bank.memory, bank.clutter_queue(), near) \
        + background_regulariser(clutter, bank.memory, valid=valid)
    loss.backward()
    bank.update(f, visible, clutter, valid)                             # after the loss
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

SampleMode = Literal["bilinear", "nearest"]
#: Which vertices are too near to be negatives: within a radius in object space or in the image.
NearMode = Literal["3d", "2d"]


def _check_map(feature_map: torch.Tensor) -> tuple[int, int, int, int]:
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must be (B, D, h, w), got {tuple(feature_map.shape)}")
    b, d, h, w = (int(s) for s in feature_map.shape)
    return b, d, h, w


def _gather_cells(feature_map: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """feature_map (B, D, h, w), flat_idx (B, N) row-major cell indices -> (B, N, D)."""
    b, d = feature_map.shape[:2]
    flat = feature_map.reshape(b, d, -1)
    idx = flat_idx[:, None, :].expand(b, d, flat_idx.shape[1])
    return flat.gather(2, idx).transpose(1, 2)


def sample_vertex_features(
    feature_map: torch.Tensor,
    vertex_px: torch.Tensor,
    visible: torch.Tensor | None = None,
    mode: SampleMode = "bilinear",
    renormalize: bool = True,
) -> torch.Tensor:
    """Features of the feature map at the projected vertices.

    Args:
        feature_map: (B, D, h, w).
        vertex_px: (B, K, 2) feature-map pixel coordinates (x, y), integer = cell centre.
        visible: optional (B, K) bool; rows of invisible vertices are returned as zeros.
        mode: ``"bilinear"`` (``grid_sample``, align_corners=False with coordinates mapped so
            that integer coordinates hit cell centres exactly; outside the map the border cell
            is used) or ``"nearest"`` (the cell whose centre is nearest, ties rounded up, i.e.
            the reference's ``(row // 8, col // 8)`` for integer crop pixels; clamped to the map).
        renormalize: L2-normalise the sampled features (bilinear mixes of unit vectors are
            shorter than 1).

    Returns:
        (B, K, D) features, differentiable w.r.t. ``feature_map``.
    """
    b, _d, h, w = _check_map(feature_map)
    if vertex_px.ndim != 3 or vertex_px.shape[0] != b or vertex_px.shape[2] != 2:
        raise ValueError(f"vertex_px must be (B={b}, K, 2), got {tuple(vertex_px.shape)}")
    xy = vertex_px.to(feature_map.dtype)
    if mode == "bilinear":
        gx = (2.0 * xy[..., 0] + 1.0) / w - 1.0
        gy = (2.0 * xy[..., 1] + 1.0) / h - 1.0
        grid = torch.stack([gx, gy], dim=-1)[:, :, None, :]  # (B, K, 1, 2)
        out = F.grid_sample(
            feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False
        )[..., 0].transpose(1, 2)
    elif mode == "nearest":
        ix = torch.floor(xy[..., 0] + 0.5).long().clamp(0, w - 1)
        iy = torch.floor(xy[..., 1] + 0.5).long().clamp(0, h - 1)
        out = _gather_cells(feature_map, iy * w + ix)
    else:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if renormalize:
        out = F.normalize(out, dim=-1, eps=1e-12)
    if visible is not None:
        if visible.shape != vertex_px.shape[:2]:
            raise ValueError(
                f"visible must be (B, K) = {tuple(vertex_px.shape[:2])}, got {tuple(visible.shape)}"
            )
        out = out * visible.to(out.dtype)[..., None]
    return out


def sample_clutter_features(
    feature_map: torch.Tensor,
    object_mask: torch.Tensor,
    n_per_image: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw background ("clutter") features from cells OUTSIDE the object mask.

    Cells are drawn uniformly without replacement. An image with fewer than ``n_per_image``
    background cells reuses its c cells in turn (slot i takes the (i mod c)-th drawn cell), so
    every background cell is used as evenly as possible; an image with no background cell gets
    zero features and ``valid`` False. Nothing raises for small backgrounds.

    Args:
        feature_map: (B, D, h, w).
        object_mask: (B, h, w) bool, True on object cells (e.g. the rendered silhouette).
        n_per_image: n.
        generator: optional torch.Generator for reproducible draws.

    Returns:
        (features (B, n, D), differentiable; valid (B, n) bool).
    """
    b, d, h, w = _check_map(feature_map)
    if object_mask.shape != (b, h, w):
        raise ValueError(
            f"object_mask must be (B, h, w) = {(b, h, w)}, got {tuple(object_mask.shape)}"
        )
    if n_per_image < 0:
        raise ValueError(f"n_per_image must be >= 0, got {n_per_image}")
    device = feature_map.device
    if n_per_image == 0:
        return feature_map.new_zeros(b, 0, d), torch.zeros(b, 0, dtype=torch.bool, device=device)
    background = ~object_mask.bool().reshape(b, h * w)
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(b, h * w, generator=generator, device=gen_device).to(device)
    scores = torch.where(background, scores, torch.full_like(scores, -1.0))
    order = scores.topk(min(n_per_image, h * w), dim=1).indices  # background cells first
    count = background.sum(1)  # (B,)
    pos = torch.arange(n_per_image, device=device)[None, :] % count.clamp_min(1)[:, None]
    cells = order.gather(1, pos)
    valid = (count > 0)[:, None].expand(b, n_per_image)
    feats = _gather_cells(feature_map, cells) * valid[..., None].to(feature_map.dtype)
    return feats, valid


def near_vertex_mask_3d(vertices: torch.Tensor, radius: float) -> torch.Tensor:
    """(K, K) bool: True where two distinct vertices lie within ``radius`` in 3D (object units).

    The diagonal is False: a vertex is never its own negative, and ``contrastive_loss`` keeps
    its own prototype as the target whatever the mask says.
    """
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be (K, 3), got {tuple(vertices.shape)}")
    dist = torch.cdist(vertices[None].float(), vertices[None].float())[0]
    eye = torch.eye(vertices.shape[0], dtype=torch.bool, device=vertices.device)
    return (dist <= radius) & ~eye


def near_vertex_mask_2d(vertex_px: torch.Tensor, radius_px: float) -> torch.Tensor:
    """(B, K, K) bool: True where two distinct vertices project within ``radius_px`` pixels.

    Use the same pixel units for ``vertex_px`` and ``radius_px`` (the reference uses 48 crop
    pixels, i.e. 6 feature cells). All vertices count, visible or not. Diagonal False.
    """
    if vertex_px.ndim != 3 or vertex_px.shape[2] != 2:
        raise ValueError(f"vertex_px must be (B, K, 2), got {tuple(vertex_px.shape)}")
    dist = torch.cdist(vertex_px.float(), vertex_px.float())
    eye = torch.eye(vertex_px.shape[1], dtype=torch.bool, device=vertex_px.device)
    return (dist <= radius_px) & ~eye


def contrastive_loss(
    vertex_feats: torch.Tensor,
    visible: torch.Tensor,
    bank: torch.Tensor,
    clutter_bank: torch.Tensor | None,
    near_mask: torch.Tensor | None = None,
    temperature: float = 0.07,
    clutter_weight: float = 5e-3,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-vertex InfoNCE against all vertex prototypes and the clutter queue.

    For every visible (n, k), with f = f_nk, ℓ_j = f·m_j / T and ℓ_c = f·c / T:

        L_nk = −log [ exp(ℓ_k) / ( exp(ℓ_k) + Σ_{j ≠ k, not near(k, j)} exp(ℓ_j)
                                   + clutter_weight · Σ_c exp(ℓ_c) ) ]

    (the clutter logits are shifted by + log(clutter_weight)), and the loss is the mean of L_nk
    over visible (n, k), weighted by ``weights[n]`` when given.

    Args:
        vertex_feats: (B, K, D) unit features at the projected vertices.
        visible: (B, K) bool.
        bank: (K, D) vertex prototypes (used as given; pass the bank BEFORE this step's update).
        clutter_bank: (Q, D) clutter features (Q may be 0) or None.
        near_mask: (K, K) or (B, K, K) bool, True = remove vertex j from vertex k's negatives;
            its diagonal is ignored (the target always stays). None = no exclusion.
        temperature: T.
        clutter_weight: multiplier of the clutter terms in the denominator (0 drops them).
        weights: optional (B,) non-negative per-image weights (pseudo-label confidence).

    Returns:
        Scalar loss; 0 (still connected to the graph) when no vertex is visible.
    """
    if vertex_feats.ndim != 3:
        raise ValueError(f"vertex_feats must be (B, K, D), got {tuple(vertex_feats.shape)}")
    b, k, d = vertex_feats.shape
    if bank.shape != (k, d):
        raise ValueError(f"bank must be (K, D) = {(k, d)}, got {tuple(bank.shape)}")
    if visible.shape != (b, k):
        raise ValueError(f"visible must be (B, K) = {(b, k)}, got {tuple(visible.shape)}")
    if temperature <= 0 or clutter_weight < 0:
        raise ValueError(
            f"need temperature > 0 and clutter_weight >= 0, got {temperature}, {clutter_weight}"
        )
    bi, ki = visible.bool().nonzero(as_tuple=True)
    if bi.numel() == 0:
        return vertex_feats.sum() * 0.0
    f = vertex_feats[bi, ki] / temperature  # (N, D): 1/T folded in before the product
    # One product against [prototypes; clutter] with an additive bias (−inf for the target's
    # near vertices, log(clutter_weight) on the clutter columns) and cross-entropy's fused
    # log-softmax: the (N, K + Q) logits are the step's largest tensor, and this makes fewer
    # passes over them than masked_fill + cat + logsumexp (a CPU training step: ~6 % faster).
    keys = bank.to(f.dtype)
    clutter = clutter_bank if clutter_weight > 0 else None
    if clutter is not None and clutter.shape[0] > 0:
        if clutter.ndim != 2 or clutter.shape[1] != d:
            raise ValueError(f"clutter_bank must be (Q, {d}), got {tuple(clutter.shape)}")
        keys = torch.cat([keys, clutter.to(f.dtype)])
    bias = f.new_zeros(f.shape[0], keys.shape[0])
    if near_mask is not None:
        if near_mask.shape == (k, k):
            rows = near_mask[ki]
        elif near_mask.shape == (b, k, k):
            rows = near_mask[bi, ki]
        else:
            raise ValueError(
                f"near_mask must be (K, K) or (B, K, K) with K={k}, got {tuple(near_mask.shape)}"
            )
        rows = rows.bool().scatter(1, ki[:, None], False)  # the target stays
        bias[:, :k].masked_fill_(rows, float("-inf"))
    if keys.shape[0] > k:
        bias[:, k:] = math.log(clutter_weight)
    logits = torch.addmm(bias, f, keys.t())  # (N, K [+ Q])
    per = F.cross_entropy(logits, ki, reduction="none")  # logsumexp − target logit, (N,)
    if weights is None:
        return per.mean()
    if weights.shape != (b,):
        raise ValueError(f"weights must be (B,) = ({b},), got {tuple(weights.shape)}")
    w = weights.to(per.dtype)[bi]
    total = w.sum()
    if float(total) <= 0:
        return per.sum() * 0.0
    return (w * per).sum() / total


def background_regulariser(
    clutter_feats: torch.Tensor,
    bank: torch.Tensor,
    weight: float = 0.1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight · mean over (valid clutter samples, all K prototypes) of clutter · m_j (memo §5.3).

    Pushes background features away from every vertex prototype; its gradient reaches the
    backbone through ``clutter_feats``.

    Args:
        clutter_feats: (B, n, D) from ``sample_clutter_features``.
        bank: (K, D) vertex prototypes.
        weight: the regulariser weight (0.1 in the reference).
        valid: optional (B, n) bool from ``sample_clutter_features``.

    Returns:
        Scalar; 0 (connected to the graph) when there is no valid sample.
    """
    if clutter_feats.ndim != 3 or clutter_feats.shape[2] != bank.shape[1]:
        raise ValueError(
            f"clutter_feats must be (B, n, {bank.shape[1]}), got {tuple(clutter_feats.shape)}"
        )
    sims = clutter_feats @ bank.to(clutter_feats.dtype).mean(0)  # (B, n): mean_j c · m_j
    if valid is not None and valid.shape != sims.shape:
        raise ValueError(f"valid must be (B, n) = {tuple(sims.shape)}, got {tuple(valid.shape)}")
    if valid is None or bool(valid.all()):  # the plain mean (the same float result as before)
        return weight * sims.mean() if sims.numel() else clutter_feats.sum() * 0.0
    m = valid.to(sims.dtype)
    if float(m.sum()) == 0:
        return clutter_feats.sum() * 0.0
    return weight * (sims * m).sum() / m.sum()
