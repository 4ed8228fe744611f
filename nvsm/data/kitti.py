"""KITTI 3D object benchmark reader: cars → PASCAL3D+-convention ``ObjectRecord``s.

Published layout (root = the folder holding ``training``)::

    training/image_2/<id>.png
    training/label_2/<id>.txt    15 fields per line: type truncated occluded alpha x1 y1 x2 y2
                                 h w l x y z rotation_y (DontCare lines present; a 16th
                                 detection score only in result files); type is one of
                                 ``KITTI_TYPES``
    training/calib/<id>.txt      P0..P3 (3x4), R0_rect (3x3), Tr_velo_to_cam, Tr_imu_to_velo (3x4)

Conversion (derived here; ``tests/test_data_readers.py`` checks it by projecting 3D boxes)
------------------------------------------------------------------------------------------
KITTI's rectified camera: x right, y down, z forward. A label's object frame has x along the car's
length (its heading), y down, z = x × y (the car's left); ``rotation_y`` turns it about the camera
y axis and ``location`` is the bottom centre. PASCAL3D+ car CADs are z-up with the front facing
−y, so +x is the car's left. Hence PASCAL coordinates X_p = ``KITTI_OBJECT_TO_PASCAL`` · X_k with
X_k relative to the box centre c = location − [0, h/2, 0].

Using camera 2 (image_2): P2 = K2 [I | t2], so the centre in camera-2 coordinates is c2 = c + t2,
t2 = K2⁻¹ P2[:, 3]. The real camera sees the object with rotation R_real = R_y(ry) · M. The
PASCAL3D+ model needs a camera whose optical axis goes through the object origin; nvsm takes the
"pan-tilt" virtual camera R_virt = R_align · R_real, where R_align turns c2 onto +z by a pan about
the camera y axis then a tilt about its x axis (so its x axis stays level). Then exactly

    azimuth   = (rotation_y + π + atan2(c2_z, c2_x)) mod 2π
    elevation = asin(c2_y / ‖c2‖)        (> 0: camera above the car's centre, as in PASCAL3D+)
    θ         = 0                         (exact for the pan-tilt camera: its x axis is level)
    distance  = ‖c2‖ · units_per_metre,   (px, py) = projection of c with P2,
    focal     = P2[0, 0], viewport = 1.

Sanity: a car seen from behind (heading away, rotation_y = −π/2, straight ahead) gets azimuth π,
PASCAL3D+'s back view; heading towards the camera gets 0 (front); heading right gets 3π/2
(its right side faces the camera). The azimuth equals the reference converter's
(``CreateKITTI3D.py``); its elevation is −asin(c_y/d), the opposite sign of ours — a camera
1.65 m above the road looks *down* on cars, which PASCAL3D+ calls positive elevation.

The PASCAL3D+ projection (a translation of the virtual camera's image to (px, py)) differs from
the real off-axis pinhole view by the homography K2 · R_alignᵀ · K_virt⁻¹: exact at the object
centre, a few pixels at the box corners for objects far off the optical axis.

Units: PASCAL3D+ distances are in CAD units, and ``gt-normalized`` crops show an object as if it
stood 5 units from a 3000 px camera. ``units_per_metre`` (default ``NEMO_KITTI_UNITS_PER_METRE``)
makes those crops identical to the reference's KITTI crops (resize by 200·d/1280 at KITTI's focal
of 721.5377 px: 3000·s·d/(5·721.5377) = d/6.4 ⇒ s = 721.5377/3840 ≈ 0.1879 units per metre, a car
of 4 m ≈ 0.75 units, about the size of a PASCAL3D+ car CAD). Pass 1.0 for metres.

Filters (``KittiConfig``; reference ``CreateKITTI3D.py``): class Car, shorter box side > 100 px,
truncation < 0.2, occlusion flag in {0 fully visible, 1 partly, 2 largely occluded}; flag 3 is
"unknown". Filtered cars are reported as skipped with the reason; other classes and DontCare
lines are ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nvsm.data.errors import DataFormatError
from nvsm.data.matlab import ErrorMode, ReadResult, SkippedObject
from nvsm.data.record import ObjectRecord

__all__ = [
    "KITTI_CALIB_KEYS",
    "KITTI_LABEL_FIELDS",
    "KITTI_N_FOLDS",
    "KITTI_OBJECT_TO_PASCAL",
    "KITTI_TEST_FOLD",
    "KITTI_TYPES",
    "NEMO_KITTI_UNITS_PER_METRE",
    "KittiConfig",
    "KittiObject",
    "KittiPose",
    "camera_to_pascal_object",
    "kitti_box_corners",
    "kitti_camera2_offset",
    "kitti_centre",
    "kitti_folds",
    "kitti_frame_id",
    "kitti_pose",
    "kitti_records",
    "load_kitti",
    "read_kitti_calib",
    "read_kitti_label",
    "rotation_y_matrix",
]

KITTI_LABEL_FIELDS: tuple[str, ...] = (
    "type", "truncated", "occluded", "alpha", "x1", "y1", "x2", "y2",
    "h", "w", "l", "x", "y", "z", "rotation_y",
)
#: The object types of KITTI's devkit (readme.txt of devkit_object), spelled as in the labels.
KITTI_TYPES: tuple[str, ...] = (
    "Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare",
)
#: Calibration entries and their shapes.
KITTI_CALIB_KEYS: dict[str, tuple[int, int]] = {
    "P0": (3, 4), "P1": (3, 4), "P2": (3, 4), "P3": (3, 4), "R0_rect": (3, 3),
    "Tr_velo_to_cam": (3, 4), "Tr_imu_to_velo": (3, 4),
}
#: X_pascal = KITTI_OBJECT_TO_PASCAL @ X_kitti_object
#: (KITTI: x length/front, y down, z left → PASCAL: x left, y back, z up).
KITTI_OBJECT_TO_PASCAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
#: Units per metre that reproduce the reference's KITTI crop scale (see the module docstring).
NEMO_KITTI_UNITS_PER_METRE = 721.5377 / 3840.0
#: KITTI's labels are split by frame number mod KITTI_N_FOLDS; this fold is the test set.
KITTI_N_FOLDS = 4
KITTI_TEST_FOLD = 0


@dataclass(frozen=True)
class KittiObject:
    """One label line. Lengths in metres, angles in radians, pixels 0-based.

    Attributes:
        type: class name (``"Car"``, ``"DontCare"``, ...).
        truncated: 0..1 fraction of the object outside the image.
        occluded: 0 fully visible, 1 partly, 2 largely occluded, 3 unknown.
        alpha: observation angle.
        bbox: (x1, y1, x2, y2).
        dimensions: (h, w, l).
        location: (x, y, z) bottom centre in rectified camera-0 coordinates.
        rotation_y: rotation about the camera y axis, [−π, π].
        line: 0-based line index in the label file.
    """

    type: str
    truncated: float
    occluded: int
    alpha: float
    bbox: tuple[float, float, float, float]
    dimensions: tuple[float, float, float]
    location: tuple[float, float, float]
    rotation_y: float
    line: int


@dataclass(frozen=True)
class KittiConfig:
    """Which KITTI objects become records, and how.

    Attributes:
        classes: (KITTI type, nvsm category) pairs to keep.
        min_box_side: keep objects whose shorter 2D box side is strictly greater (pixels;
            reference: 100).
        max_truncation: keep truncation strictly below (reference: 0.2).
        occlusion_flags: occlusion flags to keep (reference: 0, 1, 2).
        units_per_metre: distance scale, see the module docstring (1.0 = metres).
        split_dir: ``"training"`` (only it has labels).
    """

    classes: tuple[tuple[str, str], ...] = (("Car", "car"),)
    min_box_side: float = 100.0
    max_truncation: float = 0.2
    occlusion_flags: tuple[int, ...] = (0, 1, 2)
    units_per_metre: float = NEMO_KITTI_UNITS_PER_METRE
    split_dir: str = "training"


@dataclass(frozen=True)
class KittiPose:
    """PASCAL3D+-convention pose of a KITTI object (radians; distance in object units)."""

    azimuth: float
    elevation: float
    theta: float
    distance: float
    px: float
    py: float
    focal: float


def _floats(parts: list[str], path: Path, lineno: int) -> list[float]:
    out = []
    # A 16th field is the detection score of KITTI's result files: a number like the others.
    for name, text in zip((*KITTI_LABEL_FIELDS[1:], "score"), parts[1:], strict=False):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataFormatError(path, f"line {lineno + 1} {name}", "a finite number", text)
        out.append(value)
    return out


def read_kitti_label(path: Path) -> list[KittiObject]:
    """Parse a ``label_2`` file (15 fields per line; a 16th detection score is checked, then
    ignored).

    Raises:
        DataFormatError: missing file, wrong field count, a type not in ``KITTI_TYPES``,
            non-numeric or out-of-range value, a box with x2 < x1 or y2 < y1.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "<file>", "an existing KITTI label file", "missing")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "<file>", "a readable text file", str(exc)) from exc
    objects = []
    for lineno, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (15, 16):
            raise DataFormatError(path, f"line {lineno + 1}",
                                  f"15 fields {' '.join(KITTI_LABEL_FIELDS)}",
                                  f"{len(parts)} fields: {line!r}")
        # Types are case-sensitive in the devkit; a misspelt one ("car", "Carr") would otherwise
        # drop the object from every class filter without a word.
        if parts[0] not in KITTI_TYPES:
            raise DataFormatError(path, f"line {lineno + 1} type",
                                  f"one of KITTI's types {', '.join(KITTI_TYPES)}", parts[0])
        v = _floats(parts, path, lineno)
        trunc, occ = v[0], v[1]
        for axis, lo, hi in (("x", 3, 5), ("y", 4, 6)):  # indices of x1/y1 and x2/y2 in v
            if v[hi] < v[lo]:
                raise DataFormatError(
                    path, f"line {lineno + 1} {axis}2",
                    f"{axis}2 >= {axis}1 = {parts[lo + 1]} (boxes are x1 y1 x2 y2)", parts[hi + 1])
        if parts[0] != "DontCare":
            if not 0.0 <= trunc <= 1.0:
                raise DataFormatError(path, f"line {lineno + 1} truncated", "a number in [0, 1]",
                                      parts[1])
            if occ not in (0.0, 1.0, 2.0, 3.0):
                raise DataFormatError(path, f"line {lineno + 1} occluded", "0, 1, 2 or 3",
                                      parts[2])
        objects.append(KittiObject(
            type=parts[0], truncated=trunc, occluded=int(occ), alpha=v[2],
            bbox=(v[3], v[4], v[5], v[6]), dimensions=(v[7], v[8], v[9]),
            location=(v[10], v[11], v[12]), rotation_y=v[13], line=lineno,
        ))
    return objects


def kitti_frame_id(label: Path) -> str:
    """The frame id of a ``label_2/<frame>.txt`` file: its stem, a frame number (``"000123"``).

    Raises:
        DataFormatError: the stem is not a number (the folds are frame number mod n_folds).
    """
    label = Path(label)
    if not re.fullmatch(r"[0-9]+", label.stem):
        raise DataFormatError(label, "<file name>", "a frame number such as 000123.txt",
                              label.name)
    return label.stem


def read_kitti_calib(path: Path) -> dict[str, np.ndarray]:
    """Parse a ``calib`` file into arrays (``P2`` (3, 4), ``R0_rect`` (3, 3), ...).

    Raises:
        DataFormatError: missing file, missing or repeated ``P2``, wrong number of values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "<file>", "an existing KITTI calib file", "missing")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "<file>", "a readable text file", str(exc)) from exc
    out: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        key = key.strip()
        if not sep:
            raise DataFormatError(path, f"line {lineno}", "'<key>: <numbers>'", line)
        try:
            values = np.array([float(t) for t in rest.split()], dtype=np.float64)
        except ValueError as exc:
            raise DataFormatError(path, key, "numbers", rest.strip()) from exc
        if key in out:  # which of two would be the camera is anyone's guess
            raise DataFormatError(path, f"line {lineno}", f"one '{key}:' line", line)
        shape = KITTI_CALIB_KEYS.get(key)
        if shape is not None:
            if values.size != shape[0] * shape[1] or not np.all(np.isfinite(values)):
                raise DataFormatError(path, key, f"{shape[0] * shape[1]} finite numbers",
                                      f"{values.size} values")
            values = values.reshape(shape)
        out[key] = values
    if "P2" not in out:
        raise DataFormatError(path, "P2", "a 'P2:' line with 12 numbers", f"keys {sorted(out)}")
    p2 = out["P2"]
    if not (abs(p2[0, 0] - p2[1, 1]) <= 1e-6 * abs(p2[0, 0]) and p2[0, 0] > 0
            and p2[0, 1] == 0 and np.allclose(p2[2, :3], [0, 0, 1])):
        raise DataFormatError(path, "P2", "a rectified camera: fx == fy > 0, no skew, "
                              "last row [0 0 1 t]", p2[:, :3].tolist())
    return out


def rotation_y_matrix(angle: float) -> np.ndarray:
    """(3, 3) rotation about the camera y axis, as KITTI's devkit builds it."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def kitti_centre(obj: KittiObject) -> np.ndarray:
    """(3,) 3D box centre in rectified camera-0 coordinates: location − [0, h/2, 0]."""
    return np.asarray(obj.location, dtype=np.float64) - np.array([0.0, obj.dimensions[0] / 2, 0.0])


def kitti_box_corners(obj: KittiObject) -> np.ndarray:
    """(8, 3) corners of the 3D box in rectified camera-0 coordinates (metres), devkit order."""
    h, w, l = obj.dimensions
    x = np.array([l, l, -l, -l, l, l, -l, -l]) / 2
    y = np.array([0, 0, 0, 0, -h, -h, -h, -h], dtype=np.float64)
    z = np.array([w, -w, -w, w, w, -w, -w, w]) / 2
    local = np.stack([x, y, z], axis=1)
    return local @ rotation_y_matrix(obj.rotation_y).T + np.asarray(obj.location)


def camera_to_pascal_object(points: np.ndarray, obj: KittiObject,
                            units_per_metre: float = NEMO_KITTI_UNITS_PER_METRE) -> np.ndarray:
    """Rectified-camera points (N, 3) in metres → PASCAL3D+ object coordinates (N, 3), units."""
    local = (np.asarray(points, dtype=np.float64) - kitti_centre(obj)) @ rotation_y_matrix(
        obj.rotation_y)
    return local @ KITTI_OBJECT_TO_PASCAL.T * units_per_metre


def kitti_camera2_offset(p2: np.ndarray) -> np.ndarray:
    """(3,) t2 with P2 = K2 [I | t2]: camera-2 coordinates are rectified camera-0 ones + t2."""
    p2 = np.asarray(p2, dtype=np.float64)
    return np.linalg.solve(p2[:, :3], p2[:, 3])


def kitti_pose(obj: KittiObject, p2: np.ndarray,
               units_per_metre: float = NEMO_KITTI_UNITS_PER_METRE) -> KittiPose:
    """PASCAL3D+-convention pose of a KITTI object seen by camera 2 (see the module docstring)."""
    p2 = np.asarray(p2, dtype=np.float64)
    centre = kitti_centre(obj)
    c2 = centre + kitti_camera2_offset(p2)
    dist = float(np.linalg.norm(c2))
    azimuth = (obj.rotation_y + math.pi + math.atan2(c2[2], c2[0])) % (2 * math.pi)
    elevation = math.asin(max(-1.0, min(1.0, c2[1] / dist)))
    uvw = p2 @ np.append(centre, 1.0)
    return KittiPose(azimuth=azimuth, elevation=elevation, theta=0.0,
                     distance=dist * units_per_metre, px=float(uvw[0] / uvw[2]),
                     py=float(uvw[1] / uvw[2]), focal=float(p2[0, 0]))


def _filter_reason(obj: KittiObject, config: KittiConfig) -> str | None:
    x1, y1, x2, y2 = obj.bbox
    side = min(x2 - x1, y2 - y1)
    if not side > config.min_box_side:
        return f"box too small: shorter side {side:.1f} px <= min_box_side {config.min_box_side}"
    if not obj.truncated < config.max_truncation:
        return f"truncated: {obj.truncated:.2f} >= max_truncation {config.max_truncation}"
    if obj.occluded not in config.occlusion_flags:
        return f"occlusion flag {obj.occluded} not in {tuple(config.occlusion_flags)}"
    return None


def _moderate(obj: KittiObject) -> bool:
    """KITTI's 'moderate' difficulty: box height ≥ 25 px, occlusion ≤ 1, truncation ≤ 0.3."""
    return (obj.bbox[3] - obj.bbox[1]) >= 25 and obj.occluded <= 1 and obj.truncated <= 0.3


def load_kitti(
    root: Path,
    config: KittiConfig | None = None,
    *,
    ids: list[str] | None = None,
    errors: ErrorMode = "raise",
) -> ReadResult:
    """Read KITTI object labels into ``ObjectRecord``s (source ``"kitti"``).

    Args:
        root: folder holding ``training/``.
        config: filters, class mapping and units; default ``KittiConfig()`` (reference filters).
        ids: frame ids (``"000123"``); default every ``label_2/*.txt``, sorted.
        errors: ``"raise"`` or ``"collect"`` ``DataFormatError``s.
    Returns:
        records (``occlusion_level`` = KITTI occlusion flag, ``difficult`` = not KITTI-moderate,
        ``cad_index`` None, ``viewport`` 1), filtered cars in ``skipped`` with reasons.
    """
    config = config or KittiConfig()
    base = Path(root) / config.split_dir
    result = ReadResult()
    if ids is None:
        label_dir = base / "label_2"
        if not label_dir.is_dir():
            exc = DataFormatError(label_dir, "<folder>", "the KITTI label_2 folder", "missing")
            if errors == "raise":
                raise exc
            result.errors.append(exc)
            return result
        ids = sorted(p.stem for p in label_dir.glob("*.txt"))
    for frame in ids:
        try:
            _read_frame(base, frame, config, result)
        except DataFormatError as exc:
            if errors == "raise":
                raise
            result.errors.append(exc)
    result.log_summary("kitti")
    return result


def _read_frame(base: Path, frame: str, config: KittiConfig, result: ReadResult) -> None:
    label = base / "label_2" / f"{frame}.txt"
    kitti_frame_id(label)
    objects = read_kitti_label(label)
    classes = dict(config.classes)
    if not any(o.type in classes for o in objects):
        return
    image = base / "image_2" / f"{frame}.png"
    if not image.is_file():
        raise DataFormatError(image, "image", f"an existing image for {label}", "missing")
    p2 = read_kitti_calib(base / "calib" / f"{frame}.txt")["P2"]
    kitti_records(label, objects, p2, config, result)


def kitti_records(label: Path, objects: list[KittiObject], p2: np.ndarray, config: KittiConfig,
                  result: ReadResult) -> None:
    """Turn the objects of one label file (``read_kitti_label``) into records in ``result``:
    the cars ``config`` filters out go to ``result.skipped`` with the reason. All or nothing:
    on an error ``result`` is left as it was. ``nvsm data verify`` runs this too, so that it
    reports what would stop the loader.

    Raises:
        DataFormatError: a kept car with a non-positive size or depth, or a box the record
            refuses (a negative coordinate), naming its line.
    """
    label = Path(label)
    frame = kitti_frame_id(label)
    image = label.parents[1] / "image_2" / f"{frame}.png"
    classes = dict(config.classes)
    records, skipped = [], []
    for obj in objects:
        if obj.type not in classes:
            continue
        reason = _filter_reason(obj, config)
        if reason is not None:
            skipped.append(SkippedObject(label, obj.line, classes[obj.type], reason))
            continue
        h, w, l = obj.dimensions
        if min(h, w, l) <= 0 or obj.location[2] <= 0:
            raise DataFormatError(label, f"line {obj.line + 1} dimensions/location",
                                  "positive h, w, l and z > 0", (obj.dimensions, obj.location))
        pose = kitti_pose(obj, p2, config.units_per_metre)
        try:
            record = ObjectRecord(
                image_path=image, category=classes[obj.type], bbox=obj.bbox,
                azimuth=pose.azimuth, elevation=pose.elevation, theta=pose.theta,
                distance=pose.distance, px=pose.px, py=pose.py, focal=pose.focal, viewport=1.0,
                cad_index=None, truncated=obj.truncated > 0, occluded=obj.occluded > 0,
                difficult=not _moderate(obj), occlusion_level=obj.occluded, source="kitti",
                image_id=frame, object_index=obj.line, annotation_path=label,
            )
        except DataFormatError as exc:  # the record names the field; the file's line is ours
            raise DataFormatError(label, f"line {obj.line + 1} {exc.field}", exc.expected,
                                  exc.got) from exc
        records.append(record)
    result.records.extend(records)
    result.skipped.extend(skipped)


def kitti_folds(
    records: list[ObjectRecord], n_folds: int = KITTI_N_FOLDS
) -> dict[int, list[ObjectRecord]]:
    """KITTI has no public test labels; the reference splits its lists by index mod 4. nvsm
    uses the frame number mod ``n_folds`` so that objects of one image share a fold."""
    folds: dict[int, list[ObjectRecord]] = {k: [] for k in range(n_folds)}
    for rec in records:
        folds[int(rec.image_id) % n_folds].append(rec)
    return folds
