"""Crop cameras: the exact pinhole camera of an image crop and of a stride-s feature map of it.

All cameras follow the OpenCV convention of ``nvsm.pose.convention`` (pixel centres at integer
coordinates). A crop is an axis-aligned similarity of the original image,
``crop_xy = scale · image_xy + offset``, so its intrinsics follow exactly from the original ones;
no field-of-view approximation is involved.

Protocols (named in configs and outputs):

* ``gt-normalized`` (NeMo's reference protocol; uses ground-truth centre and distance): the image
  is scaled so that the object looks as if it stood at ``NORMALIZED_DISTANCE`` (5) in front of a
  ``PASCAL3D_VIEWPORT`` (3000 px) camera, and the crop is centred on the projected object origin.
* ``bbox``: the scale comes from the 2D box (the box, aspect kept, fits in a fixed fraction of
  the crop) and the crop is centred on the box centre; distance is left to estimate. The camera
  keeps the original principal point, which for PASCAL3D+ annotations is (px, py), where the
  object's origin projects: the object's 2D centre is still ground truth (NeMo estimates no 2D
  translation). Less is given than with ``gt-normalized``, not only the box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from nvsm.pose.convention import NORMALIZED_DISTANCE, PASCAL3D_VIEWPORT, intrinsics

CropProtocol = Literal["gt-normalized", "bbox"]


@dataclass(frozen=True)
class CropCamera:
    """Exact camera of a crop.

    Attributes:
        k: (3, 3) crop intrinsics (OpenCV).
        scale: crop pixels per original pixel.
        offset: (2,) crop_xy = scale · image_xy + offset.
        size: (H, W) of the crop in pixels.
        protocol: which crop protocol produced it.
        normalized_focal: focal length (crop pixels) at which an object of normalised size
            appears at ``NORMALIZED_DISTANCE`` (3000 in NeMo's protocol; smaller values give
            proportionally smaller crops for CPU recipes).
    """

    k: np.ndarray
    scale: float
    offset: np.ndarray
    size: tuple[int, int]
    protocol: str
    normalized_focal: float = PASCAL3D_VIEWPORT

    def image_to_crop(self) -> np.ndarray:
        """(2, 3) affine matrix mapping original pixels to crop pixels."""
        return np.array(
            [[self.scale, 0.0, self.offset[0]], [0.0, self.scale, self.offset[1]]], dtype=np.float64
        )

    def reference_distance(self) -> float:
        """Distance at which an object of the normalised size appears in this crop.

        For ``gt-normalized`` crops this is the annotated distance (the crop focal is
        F·d/5 px for the normalised focal F), so the pose is rendered exactly with its true
        distance; for ``bbox`` crops it is the distance the box scale suggests.
        """
        return float(self.k[0, 0]) * NORMALIZED_DISTANCE / self.normalized_focal


def feature_intrinsics(k: np.ndarray, stride: int) -> np.ndarray:
    """Intrinsics of a stride-s feature map: cell j covers crop pixels [s·j, s·j + s − 1].

    Cell centres sit at crop coordinate s·j + (s − 1)/2, so x_feat = (x_crop − (s − 1)/2) / s:
    focal / s, and a principal point at the crop centre maps to the feature-map centre.
    """
    k = np.asarray(k, dtype=np.float64)
    half = (stride - 1) / 2.0
    out = k.copy()
    out[..., 0, 0] = k[..., 0, 0] / stride
    out[..., 1, 1] = k[..., 1, 1] / stride
    out[..., 0, 2] = (k[..., 0, 2] - half) / stride
    out[..., 1, 2] = (k[..., 1, 2] - half) / stride
    return out


def _crop_camera(
    focal_px: float,
    centre_xy: tuple[float, float],
    principal_xy: tuple[float, float],
    scale: float,
    size: tuple[int, int],
    protocol: str,
    normalized_focal: float,
) -> CropCamera:
    h, w = size
    # The crop is centred on `centre_xy` (scaled): its centre pixel is ((W−1)/2, (H−1)/2).
    offset = np.array([(w - 1) / 2 - scale * centre_xy[0], (h - 1) / 2 - scale * centre_xy[1]])
    k = intrinsics(
        focal_px * scale, scale * principal_xy[0] + offset[0], scale * principal_xy[1] + offset[1]
    )
    return CropCamera(
        k=np.asarray(k),
        scale=float(scale),
        offset=offset,
        size=(h, w),
        protocol=protocol,
        normalized_focal=float(normalized_focal),
    )


def gt_normalized_crop(
    distance: float,
    px: float,
    py: float,
    focal_px: float,
    size: tuple[int, int],
    normalized_focal: float = PASCAL3D_VIEWPORT,
) -> CropCamera:
    """NeMo-protocol crop: object origin at the crop centre, scaled to look 5 units away at
    ``normalized_focal`` px (3000 in NeMo).

    Args:
        distance: ground-truth object distance (> 0).
        px, py: ground-truth projection of the object origin in the original image.
        focal_px: focal length of the original image in pixels (focal · viewport in PASCAL3D+).
        size: crop (H, W).
        normalized_focal: see ``CropCamera.normalized_focal``.
    """
    if not distance > 0:
        raise ValueError(f"gt-normalized crop needs a positive distance, got {distance}")
    scale = normalized_focal * distance / (NORMALIZED_DISTANCE * focal_px)
    return _crop_camera(
        focal_px, (px, py), (px, py), scale, size, "gt-normalized", normalized_focal
    )


def bbox_crop(
    bbox_xyxy: tuple[float, float, float, float],
    principal_xy: tuple[float, float],
    focal_px: float,
    size: tuple[int, int],
    fill: float = 0.8,
    normalized_focal: float = PASCAL3D_VIEWPORT,
) -> CropCamera:
    """Crop from a 2D box: the box is centred and, aspect kept, fits in ``fill`` of the crop (its
    limiting side fills it). ``principal_xy`` is the original camera's principal point (the image
    centre when unknown); a PASCAL3D+ annotation's (px, py) is where the object's origin
    projects, so passing it gives the object's 2D centre (module docstring).
    """
    x0, y0, x1, y1 = bbox_xyxy
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bbox crop needs x1 > x0 and y1 > y0, got {bbox_xyxy}")
    h, w = size
    scale = fill * min(w / (x1 - x0), h / (y1 - y0))
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    return _crop_camera(focal_px, centre, principal_xy, scale, size, "bbox", normalized_focal)
