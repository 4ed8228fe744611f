"""Occluded PASCAL3D+ reader (Angtian/OccludedPASCAL3D): occluders pasted on PASCAL3D+ ImageNet val.

Published layout (root = the folder holding ``images``, ``annotations`` and ``lists``)::

    images/<cat>FGL<k>_BGL<j>/<name>.JPEG
    annotations/<cat>FGL<k>_BGL<j>/<name>.npz    keys: source, mask, occluder_mask, box,
                                                 occluder_box (boxes as [y0, y1, x0, x1, h, w])
    lists/<cat>FGL<k>_BGL<j>.txt                 one image file name per line

The images keep the size of their PASCAL3D+ source, so the pose, box and camera come unchanged from
the PASCAL3D+ annotation ``Annotations/<cat>_imagenet/<stem of source>.mat``. NeMo's occlusion
levels L1, L2, L3 are ``FGL1_BGL1``, ``FGL2_BGL2``, ``FGL3_BGL3``; records carry
``occlusion_level = k`` and point both mask paths at the ``.npz`` (``nvsm.data.images.load_masks``).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nvsm.data.categories import PASCAL3D_CATEGORIES
from nvsm.data.errors import DataFormatError, check_items
from nvsm.data.matlab import ErrorMode, ReadResult, SkippedObject, parse_record_file
from nvsm.data.pascal3d import pascal3d_annotation_dir, pascal3d_image_dir, read_image_set
from nvsm.data.record import ObjectRecord

__all__ = [
    "NEMO_OCCLUSION_LEVELS",
    "OCCLUDED_NPZ_KEYS",
    "OCCLUDED_SUBFOLDER",
    "OccludedAnnotation",
    "load_occluded_pascal3d",
    "occluded_folder",
    "occluded_image_path",
    "read_occluded_entry",
    "read_occluded_npz",
]

#: The folder, inside a PASCAL3D+-layout root, that holds its Occluded PASCAL3D+ levels when
#: they come with it (the built-in synthetic set; the published release is a download of its
#: own, usually elsewhere).
OCCLUDED_SUBFOLDER = "OccludedPASCAL3D"
#: Keys every Occluded PASCAL3D+ annotation ``.npz`` has.
OCCLUDED_NPZ_KEYS: tuple[str, ...] = ("source", "mask", "occluder_mask", "box", "occluder_box")
#: NeMo's L1..L3 → (foreground level, background level).
NEMO_OCCLUSION_LEVELS: dict[int, tuple[int, int]] = {1: (1, 1), 2: (2, 2), 3: (3, 3)}


def occluded_folder(category: str, fg_level: int, bg_level: int | None = None) -> str:
    """``"<cat>FGL<k>_BGL<j>"`` (``bg_level`` defaults to ``fg_level``, NeMo's L1..L3)."""
    if fg_level not in (1, 2, 3) or (bg_level is not None and bg_level not in (1, 2, 3)):
        raise ValueError(f"occlusion levels are 1..3, got FGL{fg_level} BGL{bg_level}")
    return f"{category}FGL{fg_level}_BGL{fg_level if bg_level is None else bg_level}"


@dataclass(frozen=True)
class OccludedAnnotation:
    """The light fields of one Occluded PASCAL3D+ ``.npz`` (masks are read on demand).

    Attributes:
        path: the ``.npz``.
        source: stem of the PASCAL3D+ source image (e.g. ``"n02814533_1006"``).
        box: (6,) the object box as stored, [y0, y1, x0, x1, img_h, img_w].
        occluder_box: (n, 6) occluder boxes as stored.
    """

    path: Path
    source: str
    box: np.ndarray
    occluder_box: np.ndarray


def read_occluded_npz(path: Path, check_masks: bool = False) -> OccludedAnnotation:
    """Read and check one annotation ``.npz`` (no pickles are loaded).

    Args:
        path: ``annotations/<folder>/<name>.npz``.
        check_masks: also load ``mask`` and ``occluder_mask`` and check they are 2-D and of the
            image's size (``box[4:6]``).
    Raises:
        DataFormatError: missing/truncated file, missing key, malformed value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "<file>", "an existing .npz annotation", "missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in OCCLUDED_NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataFormatError(path, missing[0], f"keys {OCCLUDED_NPZ_KEYS}",
                                      f"keys {sorted(npz.files)}")
            source = npz["source"]
            box = np.asarray(npz["box"])
            occluder_box = np.asarray(npz["occluder_box"])
            masks = {k: npz[k] for k in ("mask", "occluder_mask")} if check_masks else {}
    except DataFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataFormatError(path, "<file>", "a readable .npz without pickled objects",
                              f"{type(exc).__name__}: {exc}") from exc
    if source.dtype.kind not in "US" or source.size != 1:
        raise DataFormatError(path, "source", "the source image name (a string)", source)
    value = source.reshape(()).item()
    try:  # a bytes name (numpy 'S') is text too; str() of it read "b'...'"
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, "source", "a UTF-8 image name", repr(value)) from exc
    stem = Path(text.replace("\\", "/")).stem
    if not stem:
        raise DataFormatError(path, "source", "a non-empty image name", text)
    if box.shape != (6,):
        raise DataFormatError(path, "box", "shape (6,): [y0, y1, x0, x1, img_h, img_w]",
                              f"shape {box.shape}")
    _check_finite_numbers(path, "box", box)
    # An image without occluders may store an empty array of any shape; otherwise one row per box.
    if occluder_box.size:
        if occluder_box.ndim != 2 or occluder_box.shape[1] != 6:
            raise DataFormatError(path, "occluder_box",
                                  "shape (n, 6): one [y0, y1, x0, x1, img_h, img_w] per occluder",
                                  f"shape {occluder_box.shape}")
        _check_finite_numbers(path, "occluder_box", occluder_box)
    image_hw = (int(box[4]), int(box[5]))
    for key, mask in masks.items():
        if mask.ndim not in (2, 3) or mask.size == 0:
            raise DataFormatError(path, key, "an (H, W) mask", f"shape {mask.shape}")
        # The generator cut the masks at the image's size, which 'box' records.
        if mask.shape[:2] != image_hw:
            raise DataFormatError(path, key, f"an (H, W) mask of the image's size {image_hw} "
                                  "(box[4:6])", f"shape {mask.shape}")
    return OccludedAnnotation(path, stem, box.astype(np.float64),
                              occluder_box.reshape(-1, 6).astype(np.float64))


def _check_finite_numbers(path: Path, field: str, values: np.ndarray) -> None:
    """Boxes are pixel coordinates: a bool/str dtype or a NaN/inf would silently corrupt the
    box matching and the crops downstream."""
    if values.dtype.kind not in "iuf":
        raise DataFormatError(path, field, "numbers (an int or float array)",
                              f"dtype {values.dtype}")
    check_items(path, field, values, ~np.isfinite(values.astype(np.float64)), "a finite number")


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pick_object(records: list[ObjectRecord], box: np.ndarray) -> ObjectRecord:
    """The record whose box best overlaps the ``.npz`` box. The generator fed PASCAL3D+'s
    [x1 y1 x2 y2] to BboxTools in (y0, x0, y1, x1) order, so both readings are tried."""
    y0, y1, x0, x1 = (float(v) for v in box[:4])
    readings = [(x0, y0, x1, y1), (y0, x0, y1, x1)]
    return max(records, key=lambda r: max(_iou(r.bbox, c) for c in readings))


def load_occluded_pascal3d(
    root: Path,
    pascal3d_root: Path,
    categories: list[str] | tuple[str, ...] | None = None,
    *,
    levels: tuple[int, ...] = (1, 2, 3),
    bg_levels: tuple[int, ...] | None = None,
    errors: ErrorMode = "raise",
) -> ReadResult:
    """Read Occluded PASCAL3D+ (source ``"occluded_pascal3d"``).

    Args:
        root: Occluded PASCAL3D+ root (``images``, ``annotations``, ``lists``).
        pascal3d_root: PASCAL3D+ release root, for the poses.
        categories: default: the 12 PASCAL3D+ classes.
        levels: foreground levels k (NeMo's L1..L3).
        bg_levels: background level per entry of ``levels``; default equal (``FGLk_BGLk``).
        errors: ``"raise"`` or ``"collect"`` ``DataFormatError``s.
    Returns:
        records (one per listed image: the object the occluders were placed around), skipped
        objects with reasons, and collected errors.
    """
    root, pascal3d_root = Path(root), Path(pascal3d_root)
    bgs = levels if bg_levels is None else bg_levels
    if len(bgs) != len(levels):
        raise ValueError("bg_levels must have one entry per level")
    result = ReadResult()
    for category in categories or PASCAL3D_CATEGORIES:
        for fg, bg in zip(levels, bgs, strict=True):
            folder = occluded_folder(category, fg, bg)
            try:
                names = read_image_set(root / "lists" / f"{folder}.txt")
            except DataFormatError as exc:
                if errors == "raise":
                    raise
                result.errors.append(exc)
                continue
            for name in names:
                try:
                    read_occluded_entry(root, pascal3d_root, category, folder, fg, name, result)
                except DataFormatError as exc:
                    if errors == "raise":
                        raise
                    result.errors.append(exc)
    result.log_summary("occluded_pascal3d")
    return result


def occluded_image_path(root: Path, folder: str, name: str) -> Path:
    """The image of list entry ``name`` of ``lists/<folder>.txt`` (``.JPEG`` when it has no
    extension)."""
    image = Path(root) / "images" / folder / Path(name).name
    return image if image.suffix else image.with_suffix(".JPEG")


def read_occluded_entry(root: Path, p3d_root: Path, category: str, folder: str, level: int,
                        name: str, result: ReadResult) -> None:
    """Read list entry ``name`` of ``lists/<folder>.txt`` into ``result``: its image, its
    ``.npz`` and the object of its PASCAL3D+ source annotation the occluders surround.
    ``nvsm data verify --pascal3d-root`` runs it too, so that it reports what would stop the
    loader.

    Raises:
        DataFormatError: a missing image or source annotation, a malformed ``.npz`` or ``.mat``.
    """
    stem = Path(name).stem
    image = occluded_image_path(root, folder, name)
    if not image.is_file():
        raise DataFormatError(image, "image", f"an existing image listed in lists/{folder}.txt",
                              "missing")
    npz_path = root / "annotations" / folder / f"{stem}.npz"
    ann = read_occluded_npz(npz_path)
    mat = pascal3d_annotation_dir(p3d_root, category) / f"{ann.source}.mat"
    if not mat.is_file():
        raise DataFormatError(npz_path, "source",
                              f"a PASCAL3D+ annotation {mat} for the source image", "missing")
    records, skipped, _ = parse_record_file(
        mat, pascal3d_image_dir(p3d_root, category), categories=[category],
        source="occluded_pascal3d", image_id=stem, occlusion_level=level, image_path=image,
        object_mask_path=npz_path, occluder_mask_path=npz_path)
    result.skipped.extend(skipped)
    if not records:
        if not skipped:
            raise DataFormatError(mat, "record.objects", f"an object of class {category}", "none")
        return
    chosen = _pick_object(records, ann.box)
    result.records.append(chosen)
    result.skipped.extend(
        SkippedObject(mat, r.object_index, category,
                      f"not the object annotated in {npz_path.name}")
        for r in records if r is not chosen)
