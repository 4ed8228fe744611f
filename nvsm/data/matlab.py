"""MATLAB annotations of the PASCAL3D+ family (PASCAL3D+, ObjectNet3D, nvsm's synthetic set).

One parser, ``parse_record_file``, serves every reader of this family. It reads the struct
``record`` with ``scipy.io.loadmat(squeeze_me=True, struct_as_record=False)`` and handles scipy's
quirks explicitly: ``record.objects`` comes back as a single ``mat_struct`` for one object and
as an object array for several; an empty MATLAB field comes back as an empty array.

Coordinate conversion: MATLAB pixels are 1-based (the first pixel's centre is (1, 1)); nvsm's are
0-based with pixel centres at integers. ``bbox`` [x1 y1 x2 y2] and ``px``, ``py`` are therefore
shifted by ``-MATLAB_PIXEL_OFFSET`` (−1). The box corners then are the centres of the first and
last pixels inside the box.

What is *not* an error but is reported (``SkippedObject``): an object of the requested class
with an empty viewpoint, or a viewpoint that only has coarse angles (distance 0 or missing, or
no continuous azimuth/elevation/θ), or one missing focal/viewport/px/py. Malformed values (wrong
type or shape, NaN, unreadable file, missing required field such as ``bbox``) raise
``DataFormatError``. Objects of other classes are ignored because they are another class.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.io

from nvsm.data.errors import DataFormatError, is_real
from nvsm.data.record import ObjectRecord

__all__ = [
    "IMAGE_EXTENSIONS",
    "MATLAB_PIXEL_OFFSET",
    "ParsedFile",
    "ReadResult",
    "SkippedObject",
    "box_outside_image",
    "load_mat_struct",
    "parse_record_file",
    "record_image_size",
    "struct_list",
]

log = logging.getLogger("nvsm.data")

#: Subtracted from MATLAB 1-based pixel coordinates to get nvsm's 0-based ones.
MATLAB_PIXEL_OFFSET = 1.0
#: Image extensions tried, in order, when an annotation does not name its image file.
IMAGE_EXTENSIONS: tuple[str, ...] = (".JPEG", ".jpg", ".jpeg", ".JPG", ".png", ".PNG")

ObjectsMode = Literal["all", "first"]
ErrorMode = Literal["raise", "collect"]


@dataclass(frozen=True)
class SkippedObject:
    """An object of a requested class that a reader did not turn into a record, and why
    (``object_index`` None: a whole image, e.g. one holding no object of the class)."""

    path: Path
    object_index: int | None
    category: str | None
    reason: str

    def __str__(self) -> str:
        idx = "" if self.object_index is None else f" object {self.object_index}"
        return f"{self.path}{idx} ({self.category}): {self.reason}"


@dataclass
class ReadResult:
    """What a reader returns: the records, the objects it skipped (with reasons) and, in
    ``errors="collect"`` mode, the format errors it met (in ``"raise"`` mode it raises)."""

    records: list[ObjectRecord] = field(default_factory=list)
    skipped: list[SkippedObject] = field(default_factory=list)
    errors: list[DataFormatError] = field(default_factory=list)

    def extend(self, other: ReadResult) -> None:
        """Append another result's records, skipped objects and errors."""
        self.records.extend(other.records)
        self.skipped.extend(other.skipped)
        self.errors.extend(other.errors)

    def skip_reasons(self) -> Counter[str]:
        """Number of skipped objects per reason (the text before the first ':')."""
        return Counter(s.reason.split(":", 1)[0] for s in self.skipped)

    def log_summary(self, dataset: str) -> None:
        """Log one line with the counts of records, skipped objects (per reason) and errors."""
        if self.skipped or self.errors:
            reasons = ", ".join(f"{n} x {r}" for r, n in sorted(self.skip_reasons().items()))
            log.warning("%s: %d records, %d skipped (%s), %d format errors", dataset,
                        len(self.records), len(self.skipped), reasons or "-", len(self.errors))
        else:
            log.info("%s: %d records", dataset, len(self.records))


def load_mat_struct(path: Path, variable: str) -> Any:
    """Load ``variable`` (a MATLAB struct) from a v5 ``.mat`` file as a ``mat_struct``.

    Raises:
        DataFormatError: unreadable/truncated file, or no such variable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "<file>", "an existing .mat file", "missing")
    try:
        data = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # scipy raises many types for corrupt files
        raise DataFormatError(path, "<file>", "a readable MATLAB v5 .mat file",
                              f"{type(exc).__name__}: {exc}") from exc
    if variable not in data:
        got = sorted(k for k in data if not k.startswith("__"))
        raise DataFormatError(path, variable, f"a variable '{variable}'", f"variables {got}")
    return data[variable]


def _is_struct(value: Any) -> bool:
    return hasattr(value, "_fieldnames")


def struct_list(value: Any, path: Path, name: str) -> list[Any]:
    """Normalise scipy's struct quirks: one struct → [struct]; struct array → list; empty → []."""
    if _is_struct(value):
        return [value]
    if isinstance(value, np.ndarray):
        items = list(value.ravel())
        if all(_is_struct(v) for v in items):
            return items
    raise DataFormatError(path, name, "a MATLAB struct or struct array", type(value).__name__)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, np.ndarray) and value.size == 0)


def _field(struct: Any, name: str) -> Any:
    """Field value, or None when the field is absent."""
    return getattr(struct, name) if name in struct._fieldnames else None


def _number(value: Any, path: Path, name: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not is_real(arr):
        raise DataFormatError(path, name, "a single real number", value)
    return float(arr.reshape(()))


def _flag(struct: Any, path: Path, name: str, prefix: str) -> bool:
    value = _field(struct, name)
    if _is_empty(value):
        raise DataFormatError(path, f"{prefix}.{name}", "a 0/1 flag", "missing or empty")
    number = _number(value, path, f"{prefix}.{name}")
    if number not in (0.0, 1.0):
        raise DataFormatError(path, f"{prefix}.{name}", "a 0/1 flag", number)
    return bool(number)


def _string(value: Any, path: Path, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.size == 1:
        return str(value.reshape(()))
    raise DataFormatError(path, name, "a string", value)


def _resolve_image(image_dir: Path, filename: str | None, image_id: str, mat_path: Path) -> Path:
    if filename:
        image = image_dir / Path(filename).name
        if not image.is_file():
            raise DataFormatError(image, "image",
                                  f"an existing image file (record.filename of {mat_path})",
                                  "missing")
        return image
    for ext in IMAGE_EXTENSIONS:
        image = image_dir / f"{image_id}{ext}"
        if image.is_file():
            return image
    raise DataFormatError(image_dir / f"{image_id}.JPEG", "image",
                          f"an existing image file for {mat_path} (tried {IMAGE_EXTENSIONS})",
                          "missing")


_CONTINUOUS = ("azimuth", "elevation", "theta")
#: ObjectRecord field -> field name in the .mat object struct (for error messages).
_MAT_FIELD = {
    "category": "class",
    **{k: f"viewpoint.{k}" for k in ("azimuth", "elevation", "theta", "distance", "px", "py",
                                     "focal", "viewport")},
}
_CAMERA = ("focal", "viewport", "px", "py")


def _viewpoint(obj: Any, path: Path, prefix: str) -> tuple[dict[str, float] | None, str]:
    """Viewpoint numbers (degrees as stored), or (None, reason) when the object must be skipped."""
    vp = _field(obj, "viewpoint")
    if _is_empty(vp):
        return None, "no viewpoint annotation: empty 'viewpoint'"
    if not _is_struct(vp):
        raise DataFormatError(path, f"{prefix}.viewpoint", "a struct", type(vp).__name__)
    coarse = {k: _field(vp, f"{k}_coarse") for k in ("azimuth", "elevation")}
    coarse_txt = ", ".join(f"{k}_coarse={v}" for k, v in coarse.items() if not _is_empty(v))
    distance = _field(vp, "distance")
    if _is_empty(distance):
        return None, f"only coarse viewpoint: distance missing ({coarse_txt or 'no coarse angles'})"
    d = _number(distance, path, f"{prefix}.viewpoint.distance")
    if d == 0:
        return None, f"only coarse viewpoint: distance == 0 ({coarse_txt or 'no coarse angles'})"
    out = {"distance": d}
    for key in _CONTINUOUS:
        value = _field(vp, key)
        if _is_empty(value):
            return None, f"only coarse viewpoint: continuous {key} missing ({coarse_txt})"
        out[key] = _number(value, path, f"{prefix}.viewpoint.{key}")
    for key in _CAMERA:
        value = _field(vp, key)
        if _is_empty(value):
            return None, f"incomplete viewpoint: {key} missing"
        out[key] = _number(value, path, f"{prefix}.viewpoint.{key}")
    return out, ""


def record_image_size(record: Any, mat_path: Path) -> tuple[int, int] | None:
    """(H, W) from ``record.imgsize`` [W H D] of a loaded ``record`` struct; None when empty.

    Raises:
        DataFormatError: imgsize is not numbers, or width/height not finite and positive.
    """
    imgsize = _field(record, "imgsize")
    if _is_empty(imgsize):
        return None
    arr = np.asarray(imgsize)
    # Check the type before converting: a string would fail inside numpy, unexplained.
    if not is_real(arr):
        raise DataFormatError(mat_path, "record.imgsize", "[width height depth] (real numbers)",
                              imgsize)
    arr = arr.astype(np.float64).ravel()
    if arr.size < 2 or not np.all(np.isfinite(arr[:2])) or np.any(arr[:2] <= 0):
        raise DataFormatError(mat_path, "record.imgsize", "[width height depth]", imgsize)
    return (int(arr[1]), int(arr[0]))


def box_outside_image(bbox: tuple[float, ...], image_size: tuple[int, int]) -> str | None:
    """Why a 0-based box (x1, y1, x2, y2, pixel centres) does not fit an image of (H, W), or None.

    The last pixel's centre is (W - 1, H - 1); one pixel beyond it is let pass as rounding in
    the annotation. A box further out marks a wrong box or a wrong image size (the readers keep
    it: a crop pads what lies outside; ``nvsm data verify`` reports it).
    """
    height, width = image_size
    if bbox[2] > width or bbox[3] > height:
        return (f"bbox outside the image: (x2, y2) = ({bbox[2]:g}, {bbox[3]:g}) (0-based) beyond "
                f"the last pixel ({width - 1}, {height - 1}) of a {width}x{height} image")
    return None


class ParsedFile(NamedTuple):
    """Result of ``parse_record_file``: records, skipped objects and the image file."""

    records: list[ObjectRecord]
    skipped: list[SkippedObject]
    image_path: Path


def parse_record_file(
    mat_path: Path,
    image_dir: Path,
    *,
    categories: Iterable[str] | None,
    source: str,
    image_id: str | None = None,
    objects: ObjectsMode = "all",
    occlusion_level: int = 0,
    image_path: Path | None = None,
    object_mask_path: Path | None = None,
    occluder_mask_path: Path | None = None,
) -> ParsedFile:
    """Parse one PASCAL3D+-style annotation file into records.

    Args:
        mat_path: ``.mat`` file holding the struct ``record`` (fields ``filename``, ``imgsize``
            [W H D], ``objects``; each object ``class``, ``bbox``, ``truncated``, ``occluded``,
            ``difficult``, ``cad_index`` (1-based), ``viewpoint``).
        image_dir: folder of the image named by ``record.filename``.
        categories: classes to keep (others are ignored); None keeps every object.
        source: dataset name written into the records.
        image_id: defaults to the annotation's stem.
        objects: ``"all"`` objects of the kept classes, or only the ``"first"`` per class
            (the reference's choice); the others are reported as skipped.
        occlusion_level, object_mask_path, occluder_mask_path: copied into the records.
        image_path: the image to use instead of ``record.filename`` (Occluded PASCAL3D+).
    Returns:
        ``ParsedFile(records, skipped objects with reasons, image path)``.
    Raises:
        DataFormatError: unreadable file, missing image (also when no object is kept),
            malformed field.
    """
    mat_path = Path(mat_path)
    image_id = image_id or mat_path.stem
    record = load_mat_struct(mat_path, "record")
    if not _is_struct(record):
        raise DataFormatError(mat_path, "record", "a MATLAB struct", type(record).__name__)
    if "objects" not in record._fieldnames:
        raise DataFormatError(mat_path, "record.objects", "a struct array of objects", "missing")
    objs = [] if _is_empty(record.objects) else struct_list(record.objects, mat_path,
                                                             "record.objects")
    image_size = record_image_size(record, mat_path)
    filename = _field(record, "filename")
    filename = None if _is_empty(filename) else _string(filename, mat_path, "record.filename")

    wanted = None if categories is None else set(categories)
    records: list[ObjectRecord] = []
    skipped: list[SkippedObject] = []
    seen: set[str] = set()
    resolved_image = image_path or _resolve_image(Path(image_dir), filename, image_id, mat_path)
    for index, obj in enumerate(objs):
        prefix = f"objects[{index}]"
        if "class" not in obj._fieldnames:
            raise DataFormatError(mat_path, f"{prefix}.class", "a class name", "missing")
        cls = _string(getattr(obj, "class"), mat_path, f"{prefix}.class")
        if wanted is not None and cls not in wanted:
            continue  # another class: ignored, not skipped
        if objects == "first" and cls in seen:
            skipped.append(SkippedObject(mat_path, index, cls,
                                         "not the first object of its class (objects='first')"))
            continue
        seen.add(cls)
        bbox = _field(obj, "bbox")
        if _is_empty(bbox):
            raise DataFormatError(mat_path, f"{prefix}.bbox", "[x1 y1 x2 y2]", "missing or empty")
        box = np.asarray(bbox)
        if box.size != 4 or not is_real(box):
            raise DataFormatError(mat_path, f"{prefix}.bbox", "[x1 y1 x2 y2] (4 real numbers)",
                                  bbox)
        flags = {k: _flag(obj, mat_path, k, prefix) for k in ("truncated", "occluded", "difficult")}
        vp, reason = _viewpoint(obj, mat_path, prefix)
        if vp is None:
            skipped.append(SkippedObject(mat_path, index, cls, reason))
            continue
        cad = _field(obj, "cad_index")
        cad_index = None
        if not _is_empty(cad):
            number = _number(cad, mat_path, f"{prefix}.cad_index")
            # Finite first: int() of NaN or inf raises on its own, naming no file.
            if not math.isfinite(number) or number != int(number) or number < 1:
                raise DataFormatError(mat_path, f"{prefix}.cad_index", "a 1-based integer", cad)
            cad_index = int(number) - 1
        box_xyxy = tuple(float(v) - MATLAB_PIXEL_OFFSET for v in box.ravel())
        deg = {k: vp[k] for k in _CONTINUOUS}
        for k, v in deg.items():
            if not math.isfinite(v):
                raise DataFormatError(mat_path, f"{prefix}.viewpoint.{k}", "finite degrees", v)
        try:
            rec = ObjectRecord(
                image_path=resolved_image, category=cls, bbox=box_xyxy,  # type: ignore[arg-type]
                azimuth=math.radians(deg["azimuth"]), elevation=math.radians(deg["elevation"]),
                theta=math.radians(deg["theta"]), distance=vp["distance"],
                px=vp["px"] - MATLAB_PIXEL_OFFSET, py=vp["py"] - MATLAB_PIXEL_OFFSET,
                focal=vp["focal"], viewport=vp["viewport"], cad_index=cad_index,
                truncated=flags["truncated"], occluded=flags["occluded"],
                difficult=flags["difficult"], occlusion_level=occlusion_level, source=source,
                image_id=image_id, object_index=index, object_mask_path=object_mask_path,
                occluder_mask_path=occluder_mask_path, annotation_path=mat_path,
                image_size=image_size,
            )
        except DataFormatError as exc:  # name the field as it is spelled in the .mat file
            name = _MAT_FIELD.get(exc.field, exc.field)
            got = obj.bbox if exc.field == "bbox" else exc.got
            raise DataFormatError(mat_path, f"{prefix}.{name}", exc.expected, got) from None
        records.append(rec)
    return ParsedFile(records, skipped, resolved_image)
