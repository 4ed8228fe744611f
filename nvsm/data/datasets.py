"""Dataset names → readers, and the train/test records the ``split`` command uses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

from nvsm.data.categories import register_categories
from nvsm.data.errors import DataFormatError, id_sample
from nvsm.data.kitti import KITTI_N_FOLDS, KITTI_TEST_FOLD, KittiConfig, kitti_folds, load_kitti
from nvsm.data.matlab import ErrorMode, ReadResult
from nvsm.data.objectnet3d import load_objectnet3d
from nvsm.data.occluded import load_occluded_pascal3d
from nvsm.data.pascal3d import load_pascal3d, pascal3d_image_set

__all__ = [
    "DATASET_NAMES",
    "load_dataset",
    "split_list_file",
    "synthetic_categories",
    "train_test_records",
]

DatasetName = Literal["pascal3d", "occluded_pascal3d", "kitti", "objectnet3d", "synthetic"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)


def synthetic_categories(root: Path) -> list[str]:
    """Categories of a synthetic set in PASCAL3D+ layout: those with ``Image_sets/<cat>_imagenet_*``
    lists (registered as known categories)."""
    pattern = re.compile(r"^(.+)_imagenet_[A-Za-z0-9]+\.txt$")
    cats = sorted({m.group(1) for p in (Path(root) / "Image_sets").glob("*_imagenet_*.txt")
                   if (m := pattern.match(p.name))})
    register_categories(cats)
    return cats


def load_dataset(
    name: str,
    root: Path,
    *,
    split: str | None = "train",
    categories: list[str] | None = None,
    errors: ErrorMode = "raise",
    **kwargs: Any,
) -> ReadResult:
    """Read a dataset by name.

    Args:
        name: one of ``DATASET_NAMES``.
        root: dataset root.
        split: list name (``"train"``/``"val"``; ignored for KITTI and Occluded PASCAL3D+).
        categories: classes to keep (default: the dataset's).
        errors: ``"raise"`` or ``"collect"``.
        kwargs: reader-specific (``pascal3d_root`` and ``levels`` for occluded_pascal3d, each
            level read once however often it is given; ``config`` for kitti, ``objects`` for
            the MATLAB family).
    """
    root = Path(root)
    if name == "pascal3d":
        return load_pascal3d(root, categories, split=split, errors=errors, **kwargs)
    if name == "synthetic":
        cats = categories or synthetic_categories(root)
        return load_pascal3d(root, cats, split=split, errors=errors, source="synthetic", **kwargs)
    if name == "objectnet3d":
        return load_objectnet3d(root, categories, split=split, errors=errors, **kwargs)
    if name == "kitti":
        config = kwargs.pop("config", None) or KittiConfig()
        return load_kitti(root, config, errors=errors, **kwargs)
    if name == "occluded_pascal3d":
        p3d = kwargs.pop("pascal3d_root", None)
        if p3d is None:
            raise ValueError("occluded_pascal3d needs pascal3d_root (the PASCAL3D+ release) for "
                             "the poses")
        return load_occluded_pascal3d(root, p3d, categories, errors=errors,
                                      **_unique_levels(kwargs))
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")


def _unique_levels(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Occluded PASCAL3D+ reader arguments with each level (each (``levels``, ``bg_levels``)
    pair) once, in the order first given: a level given twice (``nvsm evaluate -l 1 -l 1``) was
    read twice, doubling its records and so the ``n`` and failures of its scores."""
    levels, bgs = kwargs.get("levels"), kwargs.get("bg_levels")
    if levels is None:
        return kwargs
    if bgs is None:
        return {**kwargs, "levels": tuple(dict.fromkeys(levels))}
    if len(bgs) != len(levels):  # the reader says what is wrong
        return kwargs
    pairs = tuple(dict.fromkeys(zip(levels, bgs, strict=True)))
    return {**kwargs, "levels": tuple(fg for fg, _ in pairs),
            "bg_levels": tuple(bg for _, bg in pairs)}


def split_list_file(name: str, root: Path, category: str, split: str) -> Path:
    """The image-set list a PASCAL3D+-layout set or ObjectNet3D reads ``split`` from."""
    if name == "objectnet3d":
        return Path(root) / "Image_sets" / f"{split}.txt"
    return pascal3d_image_set(root, category, split)


def _check_disjoint(name: str, root: Path, train: ReadResult, test: ReadResult) -> None:
    """Raise ``DataFormatError`` when an image gives records to both sides: its objects would be
    trained on (labelled or unlabelled) and then counted in the test scores."""
    test_keys = {(r.category, r.image_id) for r in test.records}
    shared = sorted({(r.category, r.image_id) for r in train.records} & test_keys)
    if not shared:
        # Ids differ, but an annotation's record.filename may still name the other side's image.
        test_images = {r.image_path.resolve(): r for r in test.records}
        for rec in train.records:
            other = test_images.get(rec.image_path.resolve())
            if other is not None:
                raise DataFormatError(
                    rec.annotation_path or rec.image_path, "record.filename",
                    f"an image no annotation of the test list uses ({other.annotation_path} "
                    "uses it)", rec.image_path.name)
        return
    category = shared[0][0]
    ids = [image_id for cat, image_id in shared if cat == category]
    raise DataFormatError(
        split_list_file(name, root, category, "train"), f"{category} image ids",
        f"no id that {split_list_file(name, root, category, 'val')} (the test list) also holds",
        f"{len(ids)} shared id(s): {id_sample(ids)}")


def train_test_records(
    name: str,
    root: Path,
    categories: list[str] | None = None,
    *,
    test_fold: int = KITTI_TEST_FOLD,
    n_folds: int = KITTI_N_FOLDS,
) -> tuple[ReadResult, ReadResult]:
    """(train, test) records for few-shot splits.

    PASCAL3D+-layout sets: the ``train`` and ``val`` lists. ObjectNet3D: ``train`` and ``val``.
    KITTI (no public test labels): frame number mod ``n_folds`` == ``test_fold`` is the test set.
    Occluded PASCAL3D+ is a test-only benchmark (its images are PASCAL3D+ val): split PASCAL3D+.

    Raises:
        DataFormatError: a malformed file, or an image listed for both training and testing.
        ValueError: occluded_pascal3d, or ``test_fold`` outside [0, n_folds).
    """
    if name == "occluded_pascal3d":
        raise ValueError("occluded_pascal3d is test-only (PASCAL3D+ val with occluders); "
                         "make splits of pascal3d and test on the occluded levels")
    if name == "kitti":
        if not 0 <= test_fold < n_folds:
            raise ValueError(f"test fold: expected an integer in [0, {n_folds - 1}] (frame "
                             f"number mod {n_folds}), got {test_fold}")
        full = load_dataset("kitti", root)
        folds = kitti_folds(full.records, n_folds)
        if categories:
            folds = {k: [r for r in v if r.category in categories] for k, v in folds.items()}
        train = ReadResult([r for k, v in sorted(folds.items()) if k != test_fold for r in v],
                           list(full.skipped))
        return train, ReadResult(list(folds[test_fold]))
    train = load_dataset(name, root, split="train", categories=categories)
    test = load_dataset(name, root, split="val", categories=categories)
    _check_disjoint(name, root, train, test)
    return train, test
