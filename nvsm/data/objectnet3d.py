"""ObjectNet3D reader: PASCAL3D+-style ``record`` structs, one flat folder for all 100 classes.

Published layout (root = ``ObjectNet3D``)::

    Images/<id>.JPEG
    Annotations/<id>.mat            struct ``record`` as in PASCAL3D+ (see ``nvsm.data.matlab``)
    Image_sets/classes.txt          the 100 class names
    Image_sets/{train,val,trainval,test}.txt
    CAD/cads.mat, CAD/off/<cat>/<NN>.off

The parser is the one PASCAL3D+ uses (``nvsm.data.matlab.parse_record_file``).
"""

from __future__ import annotations

from pathlib import Path

from nvsm.data.categories import register_categories
from nvsm.data.errors import DataFormatError
from nvsm.data.matlab import ErrorMode, ObjectsMode, ReadResult, parse_record_file
from nvsm.data.pascal3d import read_image_set

__all__ = ["load_objectnet3d", "objectnet3d_classes"]


def objectnet3d_classes(root: Path) -> list[str]:
    """Class names from ``Image_sets/classes.txt`` (registered as known categories)."""
    names = read_image_set(Path(root) / "Image_sets" / "classes.txt")
    register_categories(names)
    return names


def load_objectnet3d(
    root: Path,
    categories: list[str] | tuple[str, ...] | None = None,
    *,
    split: str | None = "train",
    objects: ObjectsMode = "all",
    errors: ErrorMode = "raise",
) -> ReadResult:
    """Read ObjectNet3D into ``ObjectRecord``s (source ``"objectnet3d"``).

    Args:
        root: dataset root.
        categories: classes to keep; None keeps every annotated object.
        split: an ``Image_sets/<split>.txt`` list, or None for every file in ``Annotations``.
        objects, errors: as in ``nvsm.data.pascal3d.load_pascal3d``.
    """
    root = Path(root)
    result = ReadResult()
    if (root / "Image_sets" / "classes.txt").is_file():
        objectnet3d_classes(root)
    try:
        if split is None:
            ann_dir = root / "Annotations"
            if not ann_dir.is_dir():
                raise DataFormatError(ann_dir, "<folder>", "an annotation folder", "missing")
            ids = sorted(p.stem for p in ann_dir.glob("*.mat"))
        else:
            ids = read_image_set(root / "Image_sets" / f"{split}.txt")
    except DataFormatError as exc:
        if errors == "raise":
            raise
        result.errors.append(exc)
        return result
    for image_id in ids:
        try:
            records, skipped, _ = parse_record_file(
                root / "Annotations" / f"{image_id}.mat", root / "Images",
                categories=categories, source="objectnet3d", image_id=image_id, objects=objects)
        except DataFormatError as exc:
            if errors == "raise":
                raise
            result.errors.append(exc)
            continue
        result.records.extend(records)
        result.skipped.extend(skipped)
    result.records.sort(key=lambda r: (r.category, r.image_id, r.object_index))
    result.log_summary(f"objectnet3d (split={split})")
    return result
