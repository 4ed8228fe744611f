"""PASCAL3D+ release 1.1 reader (also used for nvsm's synthetic set, which writes the same layout).

Published layout (root = ``PASCAL3D+_release1.1``)::

    Images/<cat>_imagenet/<id>.JPEG          Images/<cat>_pascal/<id>.jpg
    Annotations/<cat>_imagenet/<id>.mat      Annotations/<cat>_pascal/<id>.mat
    Image_sets/<cat>_imagenet_train.txt      Image_sets/<cat>_imagenet_val.txt
    CAD/<cat>.mat                            (nvsm's synthetic set: CAD/<cat>/<NN>.off)
    PASCAL/VOCdevkit/VOC2012/ImageSets/Main/<cat>_{train,val}.txt   (splits of the PASCAL subset)
    Masks/<cat>_imagenet/<id>.png            (nvsm's synthetic set only: object masks, 255 = object;
                                              records point ``object_mask_path`` at them)

Each ``.mat`` holds a struct ``record``; see ``nvsm.data.matlab`` for the fields, the conversion
of MATLAB pixels (−1) and degrees (→ radians), and which objects are skipped (and reported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from nvsm.data.categories import PASCAL3D_CATEGORIES
from nvsm.data.errors import DataFormatError
from nvsm.data.matlab import (
    ErrorMode,
    ObjectsMode,
    ReadResult,
    SkippedObject,
    parse_record_file,
)
from nvsm.errors import check_choice

__all__ = [
    "load_pascal3d",
    "pascal3d_annotation_dir",
    "pascal3d_image_dir",
    "pascal3d_image_set",
    "pascal3d_mask_dir",
    "read_image_set",
    "read_pascal3d_annotation",
]

Subset = Literal["imagenet", "pascal"]
_VOC_SETS = Path("PASCAL/VOCdevkit/VOC2012/ImageSets/Main")


def pascal3d_image_dir(root: Path, category: str, subset: Subset = "imagenet") -> Path:
    """``<root>/Images/<category>_<subset>``."""
    return Path(root) / "Images" / f"{category}_{subset}"


def pascal3d_annotation_dir(root: Path, category: str, subset: Subset = "imagenet") -> Path:
    """``<root>/Annotations/<category>_<subset>``."""
    return Path(root) / "Annotations" / f"{category}_{subset}"


def pascal3d_mask_dir(root: Path, category: str, subset: Subset = "imagenet") -> Path:
    """``<root>/Masks/<category>_<subset>`` (object masks: nvsm's synthetic set only)."""
    return Path(root) / "Masks" / f"{category}_{subset}"


def pascal3d_image_set(root: Path, category: str, split: str, subset: Subset = "imagenet") -> Path:
    """The list file of a split: ``Image_sets/<cat>_imagenet_<split>.txt`` for the ImageNet subset,
    VOC's ``ImageSets/Main/<cat>_<split>.txt`` for the PASCAL subset."""
    if subset == "imagenet":
        return Path(root) / "Image_sets" / f"{category}_imagenet_{split}.txt"
    return Path(root) / _VOC_SETS / f"{category}_{split}.txt"


def read_image_set(path: Path, *, voc_flags: bool = False) -> list[str]:
    """Ids listed in an image-set file, in file order.

    Lines are ``<id>`` (PASCAL3D+ ``Image_sets``, Occluded PASCAL3D+ ``lists``) or, with
    ``voc_flags``, ``<id> <flag>`` (VOC per-class lists; flag −1 = class absent, such lines are
    dropped). Blank lines are ignored.

    Raises:
        DataFormatError: missing/unreadable file, a malformed line or an id listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "<file>", "an existing image-set list", "missing")
    try:
        # utf-8-sig: a byte-order mark (written by some editors) would otherwise become an
        # invisible part of the first id, which then matches no annotation file.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "<file>", "a readable UTF-8 text file", str(exc)) from exc
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        # A flag outside a VOC list would drop its image without a word.
        if not voc_flags and len(parts) > 1:
            raise DataFormatError(path, f"line {lineno}", "one id per line", line)
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("-1", "0", "1")):
            raise DataFormatError(path, f"line {lineno}", "'<id>' or '<id> <-1|0|1>'", line)
        # A repeated id would make two records with one id (and count the image twice).
        if parts[0] in first_line:
            raise DataFormatError(path, f"line {lineno}",
                                  f"each id once ({parts[0]!r} is already on line "
                                  f"{first_line[parts[0]]})", line)
        first_line[parts[0]] = lineno
        if len(parts) == 1 or parts[1] != "-1":
            ids.append(parts[0])
    return ids


def read_pascal3d_annotation(
    mat_path: Path,
    category: str,
    *,
    image_dir: Path | None = None,
    source: str = "pascal3d",
    objects: ObjectsMode = "all",
) -> ReadResult:
    """Read one PASCAL3D+ annotation file; keeps the objects of ``category``.

    Args:
        mat_path: ``Annotations/<cat>_<subset>/<id>.mat``.
        category: class to keep (objects of other classes are ignored).
        image_dir: image folder; default ``Images/<same folder name>`` beside ``Annotations``.
        source: dataset name written into the records.
        objects: ``"all"`` or ``"first"`` object of the class per image.
    Raises:
        DataFormatError: see ``nvsm.data.matlab.parse_record_file``.
    """
    mat_path = Path(mat_path)
    if image_dir is None:
        image_dir = mat_path.parent.parent.parent / "Images" / mat_path.parent.name
    records, skipped, _ = parse_record_file(mat_path, image_dir, categories=[category],
                                         source=source, objects=objects)
    return ReadResult(records, skipped)


def load_pascal3d(
    root: Path,
    categories: list[str] | tuple[str, ...] | None = None,
    *,
    split: str | None = "train",
    subset: Subset = "imagenet",
    objects: ObjectsMode = "all",
    errors: ErrorMode = "raise",
    source: str = "pascal3d",
) -> ReadResult:
    """Read PASCAL3D+ (or a dataset in its layout) into ``ObjectRecord``s.

    Args:
        root: dataset root (``PASCAL3D+_release1.1``).
        categories: default: the 12 PASCAL3D+ classes.
        split: ``"train"`` / ``"val"`` (the ``Image_sets`` lists; for ``subset="pascal"`` VOC's
            lists), or None for every annotation file in the category folder.
        subset: ``"imagenet"`` (NeMo's data) or ``"pascal"``.
        objects: keep ``"all"`` objects of the class or only the ``"first"`` per image (the
            reference uses the first); the others are reported in ``skipped``.
        errors: ``"raise"`` the first ``DataFormatError``, or ``"collect"`` them in the result
            and go on with the next file.
        source: dataset name written into the records.
    Returns:
        ``ReadResult`` with records sorted by (category, list order, object index), the skipped
        objects with reasons (e.g. distance == 0, coarse viewpoint only; ``object_index`` None
        for an image holding no object of its class) and collected errors.
    """
    check_choice(subset, Subset, "subset")
    root = Path(root)
    result = ReadResult()
    for category in categories or PASCAL3D_CATEGORIES:
        ann_dir = pascal3d_annotation_dir(root, category, subset)
        img_dir = pascal3d_image_dir(root, category, subset)
        try:
            if split is None:
                if not ann_dir.is_dir():
                    raise DataFormatError(ann_dir, "<folder>", "an annotation folder", "missing")
                ids = sorted(p.stem for p in ann_dir.glob("*.mat"))
            else:
                ids = read_image_set(pascal3d_image_set(root, category, split, subset),
                                     voc_flags=subset == "pascal")
        except DataFormatError as exc:
            if errors == "raise":
                raise
            result.errors.append(exc)
            continue
        mask_dir = pascal3d_mask_dir(root, category, subset)
        for image_id in ids:
            mask = mask_dir / f"{image_id}.png"
            try:
                records, skipped, _ = parse_record_file(
                    ann_dir / f"{image_id}.mat", img_dir, categories=[category], source=source,
                    image_id=image_id, objects=objects,
                    object_mask_path=mask if mask.is_file() else None)
            except DataFormatError as exc:
                if errors == "raise":
                    raise
                result.errors.append(exc)
                continue
            if not records and not skipped:
                # Reported, not dropped: an image of the class folder is expected to show it.
                skipped = [SkippedObject(ann_dir / f"{image_id}.mat", None, category,
                                         f"image without an object of class {category}")]
            result.records.extend(records)
            result.skipped.extend(skipped)
    result.log_summary(f"{source} ({subset}, split={split})")
    return result
