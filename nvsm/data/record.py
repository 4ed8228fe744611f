"""``ObjectRecord``: one annotated object, the same type for every dataset nvsm reads.

Units and conventions (see ``nvsm.pose.convention``):

* angles in **radians**, PASCAL3D+ convention (azimuth about the object's z-up axis, elevation of
  the camera above the object's xy plane, θ in-plane);
* pixel coordinates are **0-based with pixel centres at integers** (OpenCV); readers of MATLAB
  annotations (PASCAL3D+, ObjectNet3D) convert from MATLAB's 1-based pixels by subtracting 1;
* ``distance`` is in object (mesh) units; ``focal · viewport`` is the focal length in pixels and
  ``(px, py)`` the pixel where the object origin projects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from nvsm.data.categories import is_known_category
from nvsm.data.errors import DataFormatError
from nvsm.pose.convention import intrinsics, opencv_extrinsics

__all__ = ["ObjectRecord"]

_ELEVATION_TOL = 1e-6


def _as_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class ObjectRecord:
    """One object instance with its 2D box and 3D viewpoint, validated on construction.

    Attributes:
        image_path: image file holding the object.
        category: object class (a registered name, see ``nvsm.data.categories``), e.g. ``"car"``.
        bbox: (x1, y1, x2, y2) in 0-based pixels, x1 < x2, y1 < y2, all ≥ 0. For MATLAB-annotated
            datasets these are the centres of the first and last pixels inside the box.
        azimuth, elevation, theta: viewpoint in radians (PASCAL3D+ convention).
        distance: camera-to-object-origin distance, object units, > 0.
        px, py: 0-based pixel where the object origin projects.
        focal, viewport: focal length in pixels is ``focal * viewport`` (PASCAL3D+: 1 and 3000;
            KITTI: P2[0, 0] and 1).
        cad_index: **0-based** index of the closest CAD model of the category (PASCAL3D+ and
            ObjectNet3D store it 1-based; readers subtract 1), or None when the dataset has none.
        truncated, occluded, difficult: the dataset's flags (KITTI: truncation > 0, occlusion
            flag > 0, and "not in KITTI's moderate set").
        occlusion_level: 0..3. Occluded PASCAL3D+: the foreground level k of ``FGL<k>`` (0 for
            the unoccluded PASCAL3D+ images); KITTI: the label's occlusion flag; others: 0.
        source: dataset name (``"pascal3d"``, ``"occluded_pascal3d"``, ``"kitti"``,
            ``"objectnet3d"``, ``"synthetic"``).
        image_id: image identifier within the dataset (file stem).
        object_index: 0-based index of the object in its annotation file.
        object_mask_path, occluder_mask_path: optional mask files (for Occluded PASCAL3D+ the
            annotation ``.npz``; read them with ``nvsm.data.images.load_masks``).
        annotation_path: the annotation file the record came from (named in errors).
        image_size: optional (H, W) of the image in pixels.

    Raises:
        DataFormatError: naming ``annotation_path`` (else ``image_path``) and the bad field.
    """

    image_path: Path
    category: str
    bbox: tuple[float, float, float, float]
    azimuth: float
    elevation: float
    theta: float
    distance: float
    px: float
    py: float
    focal: float
    viewport: float
    cad_index: int | None
    truncated: bool
    occluded: bool
    difficult: bool
    occlusion_level: int
    source: str
    image_id: str
    object_index: int
    object_mask_path: Path | None = None
    occluder_mask_path: Path | None = None
    annotation_path: Path | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "image_path", Path(self.image_path))
        for name in ("object_mask_path", "occluder_mask_path", "annotation_path"):
            set_(self, name, _as_path(getattr(self, name)))
        where = self.annotation_path or self.image_path

        def fail(name: str, expected: str, got: Any) -> NoReturn:
            raise DataFormatError(where, name, expected, got)

        if not is_known_category(self.category):
            fail("category", "a known category (nvsm.data.categories.known_categories())",
                 self.category)

        try:
            box = tuple(float(v) for v in np.asarray(self.bbox, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            fail("bbox", "4 finite numbers (x1, y1, x2, y2)", self.bbox)
        x1, y1, x2, y2 = box
        if min(x1, y1) < 0:
            fail("bbox", "non-negative coordinates", box)
        if not (x2 > x1 and y2 > y1):
            fail("bbox", "x2 > x1 and y2 > y1", box)
        set_(self, "bbox", box)

        for name in ("azimuth", "elevation", "theta", "distance", "px", "py", "focal", "viewport"):
            raw = getattr(self, name)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                fail(name, "a finite number", raw)
            if not math.isfinite(value):
                fail(name, "a finite number", raw)
            set_(self, name, value)
        if abs(self.elevation) > math.pi / 2 + _ELEVATION_TOL:
            fail("elevation", "radians in [-pi/2, pi/2]", self.elevation)
        for name in ("distance", "focal", "viewport"):
            if not getattr(self, name) > 0:
                fail(name, "a positive number", getattr(self, name))

        if self.cad_index is not None:
            if isinstance(self.cad_index, bool) or int(self.cad_index) != self.cad_index:
                fail("cad_index", "a 0-based integer or None", self.cad_index)
            if int(self.cad_index) < 0:
                fail("cad_index", "a 0-based integer >= 0 or None", self.cad_index)
            set_(self, "cad_index", int(self.cad_index))
        for name in ("truncated", "occluded", "difficult"):
            raw = getattr(self, name)
            if raw not in (0, 1, True, False):
                fail(name, "a boolean flag", raw)
            set_(self, name, bool(raw))
        if isinstance(self.occlusion_level, bool) or self.occlusion_level not in (0, 1, 2, 3):
            fail("occlusion_level", "an integer in 0..3", self.occlusion_level)
        set_(self, "occlusion_level", int(self.occlusion_level))
        if isinstance(self.object_index, bool) or int(self.object_index) != self.object_index \
                or self.object_index < 0:
            fail("object_index", "a 0-based integer", self.object_index)
        set_(self, "object_index", int(self.object_index))
        for name in ("source", "image_id"):
            raw = getattr(self, name)
            if not isinstance(raw, str) or not raw or any(c.isspace() for c in raw):
                fail(name, "a non-empty string without whitespace", raw)
        if self.image_size is not None:
            size = tuple(int(v) for v in self.image_size)
            if len(size) != 2 or min(size) <= 0:
                fail("image_size", "(H, W) positive integers", self.image_size)
            set_(self, "image_size", size)

    # ------------------------------------------------------------------ derived quantities
    @property
    def focal_px(self) -> float:
        """Focal length in pixels, ``focal * viewport``."""
        return self.focal * self.viewport

    @property
    def uid(self) -> str:
        """``"<image_id>:<object_index>"``, the key used in split lists (unique within a source
        and category)."""
        return f"{self.image_id}:{self.object_index}"

    @property
    def pose(self) -> tuple[float, float, float, float]:
        """(azimuth, elevation, theta, distance), radians and object units."""
        return (self.azimuth, self.elevation, self.theta, self.distance)

    def k(self) -> np.ndarray:
        """(3, 3) OpenCV intrinsics of the original image under this record's pose model."""
        return np.asarray(intrinsics(self.focal_px, self.px, self.py))

    def extrinsics(self) -> tuple[np.ndarray, np.ndarray]:
        """OpenCV world→camera (R_cv (3, 3), t_cv (3,)) of the record's pose."""
        r, t = opencv_extrinsics(self.azimuth, self.elevation, self.theta, self.distance)
        return np.asarray(r), np.asarray(t)
