"""Pictures of a prediction: the cuboid drawn at the predicted pose, and NeMo's outlier map.

* ``draw_overlay``: the 12 edges of the mesh's bounding cuboid projected with the crop camera
  (OpenCV pixels, centres at integer coordinates) and drawn with ``PIL.ImageDraw``.
* ``occlusion_map``: the per-cell foreground evidence mask·ReLU(⟨R, F⟩ − ⟨b, F⟩) of the
  clutter-aware loss (``nvsm.infer.solve.pose_loss`` is 1 − its mean). Inside the silhouette it
  is high where the neural mesh explains the image better than clutter and 0 where clutter
  wins — the pixels NeMo's outlier process treats as occluded.
* ``render_overlays``: both side by side for every solved crop of a ``CropSet`` (used by
  ``nvsm infer --overlays``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from nvsm.infer.evaluate import Predictions, _features
from nvsm.infer.solve import clutter_model
from nvsm.mesh import Mesh
from nvsm.models.common import STRIDE
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import opencv_extrinsics, project_opencv
from nvsm.render import Rasterizer, default_rasterizer, render_pose
from nvsm.train.cropset import CropSet
from nvsm.train.model import NeMoModel

#: RGB colour of the cuboid edges drawn by ``draw_overlay``.
EDGE_COLOR: tuple[int, int, int] = (0, 255, 0)
#: Matplotlib colormap of the occlusion heat overlay, and the value shown at full colour.
HEAT_COLORMAP = "inferno"
HEAT_MAX = 1.0

# Corner i of the bounding box takes max along axis j where bit j of i is set; edges join corners
# that differ in exactly one bit.
_EDGES: tuple[tuple[int, int], ...] = tuple(
    (i, i | (1 << j)) for i in range(8) for j in range(3) if not i & (1 << j)
)


def occlusion_map(
    feature_map: torch.Tensor,
    rendered: torch.Tensor,
    mask: torch.Tensor,
    clutter: torch.Tensor,
) -> torch.Tensor:
    """Per-cell foreground evidence against clutter (NeMo's outlier map).

    Args:
        feature_map: (D, h, w) unit-norm image features (or (B, D, h, w)).
        rendered: (D, h, w) neural-mesh features rendered at the pose, 0 off the silhouette
            (or (B, D, h, w)).
        mask: (h, w) silhouette, bool or 0/1 (or (B, h, w)).
        clutter: (D,) clutter model b.
    Returns:
        (h, w) (or (B, h, w)) map mask·ReLU(⟨R, F⟩ − ⟨b, F⟩): 0 off the silhouette and where
        clutter explains the cell at least as well as the mesh (occluded). Its mean is
        1 − ``pose_loss``.
    """
    obj = (rendered * feature_map).sum(-3)
    clu = torch.einsum("d,...dhw->...hw", clutter.to(feature_map.dtype), feature_map)
    return mask.to(obj.dtype) * torch.relu(obj - clu)


def _hwc_uint8(crop: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from a (3, H, W) or (H, W, 3) uint8 array/tensor."""
    a = crop.detach().cpu().numpy() if isinstance(crop, torch.Tensor) else np.asarray(crop)
    if a.ndim != 3:
        raise ValueError(f"crop must be (3, H, W) or (H, W, 3), got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.shape[-1] != 3:
        raise ValueError(f"crop must be (3, H, W) or (H, W, 3), got shape {a.shape}")
    return np.ascontiguousarray(a.astype(np.uint8))


def cuboid_corners(mesh: Mesh) -> np.ndarray:
    """(8, 3) corners of the axis-aligned bounding box of the mesh's vertices (corner i takes
    the maximum along axis j where bit j of i is set)."""
    v = mesh.vertices.detach().cpu().double().numpy()
    lo, hi = v.min(0), v.max(0)
    return np.array([[hi[j] if i & (1 << j) else lo[j] for j in range(3)] for i in range(8)])


def project_corners(
    mesh: Mesh, pose: torch.Tensor | np.ndarray, k: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Crop pixels (8, 2) (x, y) and depths (8,) of the bounding-cuboid corners at ``pose``
    (a, e, θ, d) (radians) seen by the (3, 3) OpenCV intrinsics ``k``."""
    p = np.asarray(pose.detach().cpu() if isinstance(pose, torch.Tensor) else pose, np.float64)
    kk = np.asarray(k.detach().cpu() if isinstance(k, torch.Tensor) else k, np.float64)
    r_cv, t_cv = opencv_extrinsics(p[0], p[1], p[2], p[3])
    pix, depth = project_opencv(cuboid_corners(mesh), r_cv, t_cv, kk)
    return np.asarray(pix), np.asarray(depth)


def draw_overlay(
    crop_uint8: torch.Tensor | np.ndarray,
    mesh: Mesh,
    pose: torch.Tensor | np.ndarray,
    k: torch.Tensor | np.ndarray,
    color: tuple[int, int, int] = EDGE_COLOR,
    width: int | None = None,
) -> Image.Image:
    """The crop with the mesh's bounding cuboid drawn at ``pose``.

    Args:
        crop_uint8: (3, H, W) or (H, W, 3) uint8 crop.
        mesh: the category's mesh (object coordinates).
        pose: (4,) (azimuth, elevation, θ, distance), radians; a non-finite pose draws nothing.
        k: (3, 3) crop intrinsics (OpenCV, pixel centres at integers: a point projecting to
            (x, y) colours pixel (round(x), round(y))).
        color: edge colour; width: line width in pixels (default 1 per 128 px of crop side).
    Returns:
        RGB ``PIL.Image`` of size (W, H). Edges with a corner behind the camera are skipped.
    """
    image = Image.fromarray(_hwc_uint8(crop_uint8), mode="RGB")
    p = np.asarray(pose.detach().cpu() if isinstance(pose, torch.Tensor) else pose, np.float64)
    if p.shape != (4,) or not np.isfinite(p).all():
        return image
    pix, depth = project_corners(mesh, p, k)
    ok = np.isfinite(pix).all(1) & (depth > 1e-6)
    xy = [(round(float(x)), round(float(y))) for x, y in np.where(ok[:, None], pix, 0.0)]
    lw = width or max(1, round(min(image.size) / 128))
    draw = ImageDraw.Draw(image)
    for a, b in _EDGES:
        if ok[a] and ok[b]:
            draw.line([xy[a], xy[b]], fill=color, width=lw)
    for i in np.flatnonzero(ok):
        x, y = xy[i]
        draw.point((x, y), fill=color)
    return image


def heat_overlay(
    crop_uint8: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray, alpha: float = 0.55
) -> Image.Image:
    """The crop blended with ``heat`` in the ``HEAT_COLORMAP`` colours.

    Args:
        crop_uint8: (3, H, W) or (H, W, 3) uint8.
        heat: (h, w) map (e.g. ``occlusion_map``), upsampled bilinearly to (H, W) (feature cell
            j covers crop pixels [8j, 8j + 7], so ``align_corners=False`` keeps the centres);
            values are shown on [0, ``HEAT_MAX``].
        alpha: weight of the colours.
    """
    from matplotlib import colormaps

    crop = _hwc_uint8(crop_uint8)
    h, w = crop.shape[:2]
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    rgb = colormaps[HEAT_COLORMAP](np.clip(up / HEAT_MAX, 0.0, 1.0))[..., :3] * 255.0
    out = (1 - alpha) * crop.astype(np.float64) + alpha * rgb
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8), mode="RGB")


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two images of the same height next to each other."""
    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def render_overlays(
    model: NeMoModel,
    data: CropSet,
    predictions: Predictions,
    device: torch.device | str = "cpu",
    rasterizer: Rasterizer | None = None,
    batch_size: int = 16,
) -> Iterator[Image.Image | None]:
    """For every crop: [cuboid at the predicted pose | occlusion heat map], one RGB image of
    size (2W, H) per crop, in ``data`` order.

    Args:
        predictions: ``Predictions`` of ``data``; ``predictions.categories`` (else
            ``data.categories``) picks each crop's mesh.
    Yields:
        RGB ``PIL.Image`` of size (2W, H) per crop; None for a failed crop (an error, a
        non-finite pose or an unknown category): it has nothing to show, and a picture of the
        bare crop (black for an unreadable image) would pass for a result.
    """
    device = torch.device(device)
    rast = rasterizer or default_rasterizer(device)
    cats = predictions.categories or data.categories
    for s in range(0, len(data), batch_size):
        idx = list(range(s, min(s + batch_size, len(data))))
        fmap = _features(model, data.images[torch.tensor(idx)], device)
        h, w = fmap.shape[-2:]
        for j, i in enumerate(idx):
            crop = data.images[i]
            pose = predictions.poses[i]
            cat = cats[i]
            failed = predictions.errors[i] is not None or not bool(torch.isfinite(pose).all())
            if failed or cat not in model.meshes:
                yield None
                continue
            mesh, bank = model.meshes[cat], model.banks[cat]
            k_feat = torch.as_tensor(feature_intrinsics(data.k[i].numpy(), STRIDE)).float()
            azimuth, elevation, theta, distance = pose.to(fmap.device, torch.float32)
            with torch.no_grad():
                out = render_pose(
                    mesh,
                    bank.memory.float(),
                    azimuth,
                    elevation,
                    theta,
                    distance,
                    k_feat,
                    (h, w),
                    rast,
                )
                clutter = clutter_model(bank.clutter_queue().float())
                heat = occlusion_map(fmap[j], out.features[0], out.mask[0], clutter)
            yield side_by_side(
                draw_overlay(crop, mesh, pose, data.k[i]), heat_overlay(crop, heat.cpu())
            )


__all__ = [
    "EDGE_COLOR",
    "HEAT_COLORMAP",
    "HEAT_MAX",
    "cuboid_corners",
    "draw_overlay",
    "heat_overlay",
    "occlusion_map",
    "project_corners",
    "render_overlays",
    "side_by_side",
]
