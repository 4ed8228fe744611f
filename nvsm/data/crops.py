"""Object crops with exact cameras (``nvsm.pose.camera``) and an exact sub-pixel warp.

A crop is the similarity ``crop_xy = s · image_xy + offset`` of ``CropCamera``. Pixel centres sit
at integer coordinates in both images (OpenCV convention), so crop pixel (u, v) samples the image
at ((u − offset_x)/s, (v − offset_y)/s). The warp is ``torch.nn.functional.grid_sample`` with
``align_corners=True`` (normalised −1/+1 = the centres of the first/last pixels), which makes that
mapping exact; outside the image the crop is zero.

Crop sizes are (H, W) and should be multiples of the backbone stride (8: the feature map is
(H/8, W/8); its camera is ``feature_intrinsics(camera.k, 8)``).
"""

from __future__ import annotations

import math
from typing import Literal

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.conversions import normalize_pixel_coordinates

from nvsm.data.record import ObjectRecord
from nvsm.errors import check_choice
from nvsm.pose.camera import CropCamera, CropProtocol, bbox_crop, gt_normalized_crop
from nvsm.pose.convention import PASCAL3D_VIEWPORT

__all__ = [
    "DEFAULT_CROP_SIZES",
    "FALLBACK_CROP_SIZE",
    "crop_camera",
    "crop_mask",
    "crop_object",
    "default_crop_size",
    "gaussian_blur",
    "warp_to_crop",
]

#: NeMo's per-category crop sizes (H, W) (``MeshPoseSolveAll.py``; the memo's §2.4 table).
#: KITTI cars use the car entry, as the reference does.
DEFAULT_CROP_SIZES: dict[str, tuple[int, int]] = {
    "aeroplane": (320, 1024), "bicycle": (608, 608), "boat": (480, 1120),
    "bottle": (512, 736), "bus": (320, 800), "car": (256, 672),
    "chair": (544, 384), "diningtable": (320, 800), "motorbike": (512, 512),
    "sofa": (352, 736), "train": (256, 608), "tvmonitor": (480, 480),
}
#: Size for categories without an entry (e.g. most ObjectNet3D classes).
FALLBACK_CROP_SIZE: tuple[int, int] = (512, 512)


def default_crop_size(category: str,
                      table: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """(H, W) crop size of a category from ``table`` (default ``DEFAULT_CROP_SIZES``)."""
    return (table or DEFAULT_CROP_SIZES).get(category, FALLBACK_CROP_SIZE)


def crop_camera(
    record: ObjectRecord,
    protocol: str = "gt-normalized",
    size: tuple[int, int] | None = None,
    *,
    fill: float = 0.8,
    principal_xy: tuple[float, float] | None = None,
    normalized_focal: float = PASCAL3D_VIEWPORT,
) -> CropCamera:
    """The crop camera of a record under a protocol.

    Args:
        record: the object.
        protocol: ``"gt-normalized"`` (ground-truth centre and distance; NeMo) or ``"bbox"``
            (window and scale from the 2D box, which fits in ``fill`` of the crop; see
            ``nvsm.pose.camera`` for what stays ground truth).
        size: (H, W); default ``default_crop_size(record.category)``.
        principal_xy: principal point of the original camera for ``"bbox"``; default the
            record's (px, py), the principal point of its PASCAL3D+ camera model, so the record's
            pose projects correctly with the crop camera.
    """
    check_choice(protocol, CropProtocol, "protocol")
    size = size or default_crop_size(record.category)
    if protocol == "gt-normalized":
        return gt_normalized_crop(record.distance, record.px, record.py, record.focal_px, size,
                                  normalized_focal)
    principal = principal_xy if principal_xy is not None else (record.px, record.py)
    return bbox_crop(record.bbox, principal, record.focal_px, size, fill=fill,
                     normalized_focal=normalized_focal)


def _to_chw_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = np.array(image)
    t = torch.as_tensor(image)
    if t.ndim != 3 or t.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W, 3) (or 1/4 channels), got shape {tuple(t.shape)}")
    t = t[..., :3] if t.shape[-1] == 4 else t
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t.permute(2, 0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) over ±3σ, reflect padding (keeps pixel centres)."""
    radius = max(1, math.ceil(3 * sigma))
    # Reflect padding needs more pixels than the radius; tiny images replicate instead.
    border = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    size = 2 * radius + 1
    return kornia.filters.gaussian_blur2d(x, (size, size), (sigma, sigma), border_type=border)


def warp_to_crop(
    image_chw: torch.Tensor,
    camera: CropCamera,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    antialias: bool = True,
) -> torch.Tensor:
    """Warp a (C, H, W) float image into the crop of ``camera``: (C, h, w), zeros outside.

    Args:
        antialias: when the crop shrinks the image (scale < 1), low-pass it first with a
            Gaussian of σ = (1/scale − 1)/2 original pixels (symmetric: no sub-pixel shift).
    """
    if image_chw.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image_chw.shape)}")
    _, h, w = image_chw.shape
    x = image_chw[None].float()
    if antialias and mode == "bilinear" and camera.scale < 1.0:
        sigma = (1.0 / camera.scale - 1.0) / 2.0
        if sigma > 0.25:
            x = gaussian_blur(x, sigma)
    # A one-pixel side has no span between its first and last pixel centres to normalise by:
    # grid_sample (align_corners) then read that one row or column at every crop position.
    # A zero pixel on each side of it is what the zero padding beyond the image gives anyway.
    pad_x, pad_y = int(w == 1), int(h == 1)
    x = F.pad(x, (pad_x, pad_x, pad_y, pad_y))
    out_h, out_w = camera.size
    dev = x.device
    u = torch.arange(out_w, dtype=torch.float64, device=dev)
    v = torch.arange(out_h, dtype=torch.float64, device=dev)
    xs = (u - float(camera.offset[0])) / camera.scale + pad_x
    ys = (v - float(camera.offset[1])) / camera.scale + pad_y
    pix = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    grid = normalize_pixel_coordinates(pix, h + 2 * pad_y, w + 2 * pad_x).to(x.dtype)
    out = F.grid_sample(x, grid[None], mode=mode, padding_mode="zeros", align_corners=True)
    return out[0]


def image_box_in_crop(camera: CropCamera, image_hw: tuple[int, int]) -> np.ndarray:
    """Where the original image lies in the crop: (4,) float64 (x_lo, y_lo, x_hi, y_hi), its
    first and last pixel centres in crop pixels. ``warp_to_crop`` reads a crop pixel from the
    image alone iff it lies in this box; outside it the crop is (partly) the zero padding, which
    training must not take for the object (``nvsm.train.cropset.outside_image``)."""
    h, w = image_hw
    lo = np.asarray(camera.offset, dtype=np.float64)
    hi = lo + camera.scale * np.array([w - 1, h - 1], dtype=np.float64)
    return np.concatenate([lo, hi])


def crop_object(
    image: np.ndarray | torch.Tensor,
    record: ObjectRecord,
    protocol: str = "gt-normalized",
    size: tuple[int, int] | None = None,
    *,
    fill: float = 0.8,
    principal_xy: tuple[float, float] | None = None,
    stride: int | None = 8,
    antialias: bool = True,
    normalized_focal: float = PASCAL3D_VIEWPORT,
) -> tuple[torch.Tensor, CropCamera]:
    """Crop an object with its exact camera.

    Args:
        image: (H, W, 3) uint8 (0..255) or float (0..1), numpy or torch.
        record: the object (its box, or its GT centre/distance, define the crop).
        protocol: ``"gt-normalized"`` or ``"bbox"`` (see ``crop_camera``).
        size: (H, W) of the crop; default per category (``DEFAULT_CROP_SIZES``).
        fill, principal_xy, normalized_focal: see ``crop_camera``.
        stride: if set, ``size`` must be a multiple of it (the feature-map stride).
        antialias: see ``warp_to_crop``.
    Returns:
        crop (3, H, W) float32 in [0, 1], and the ``CropCamera`` (``camera.k`` projects the
        record's pose: ``project_opencv(X, *record.extrinsics(), camera.k)``).
    """
    size = size or default_crop_size(record.category)
    if stride and (size[0] % stride or size[1] % stride):
        raise ValueError(f"crop size {size} is not a multiple of the stride {stride}")
    camera = crop_camera(record, protocol, size, fill=fill, principal_xy=principal_xy,
                         normalized_focal=normalized_focal)
    crop = warp_to_crop(_to_chw_float(image), camera, "bilinear", antialias)
    return crop.clamp_(0.0, 1.0), camera


def crop_mask(
    mask: np.ndarray | torch.Tensor,
    camera: CropCamera,
    mode: Literal["nearest", "bilinear"] = "nearest",
) -> torch.Tensor:
    """The same warp for an (H, W) mask: (h, w) bool for ``"nearest"``, float in [0, 1] for
    ``"bilinear"`` (soft coverage; threshold at 0.5 for a binary mask)."""
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.array(mask))
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {tuple(m.shape)}")
    out = warp_to_crop(m.float()[None], camera, mode, antialias=False)[0]
    return out > 0.5 if mode == "nearest" else out
