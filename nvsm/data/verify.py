"""Check a local copy of a dataset against its manifest (``data_manifests/<name>.yaml``).

``verify_dataset`` walks the whole copy once and returns **every** problem it finds — missing
folders, missing or unreadable images and annotation files, malformed annotation fields, count
mismatches, an annotation's ``imgsize`` or boxes that do not fit its image — each naming the
file. Objects the readers skip on purpose (coarse-only viewpoints, KITTI filters) are not
problems.

Manifest fields used (see the YAML files for the full description): ``categories``,
``layout.folders``, ``layout.files``, ``layout.per_category.{folders,files,cad}``,
``layout.lists``, ``levels``/``layout.per_level`` (Occluded PASCAL3D+) and ``counts`` entries
``{pattern, measure: lines|files, per_category | sum_over_categories | total, source}`` checked
where the expected number is not null.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nvsm.data.cad import load_cad_models
from nvsm.data.categories import register_categories
from nvsm.data.datasets import DATASET_NAMES, synthetic_categories
from nvsm.data.errors import DataFormatError, id_sample
from nvsm.data.images import check_image
from nvsm.data.kitti import (
    KittiConfig,
    kitti_frame_id,
    kitti_records,
    read_kitti_calib,
    read_kitti_label,
)
from nvsm.data.matlab import (
    ParsedFile,
    ReadResult,
    box_outside_image,
    load_mat_struct,
    parse_record_file,
    record_image_size,
)
from nvsm.data.occluded import (
    OCCLUDED_SUBFOLDER,
    occluded_folder,
    occluded_image_path,
    read_occluded_entry,
    read_occluded_npz,
)
from nvsm.data.pascal3d import pascal3d_mask_dir, read_image_set

__all__ = [
    "PROBLEM_KINDS", "Problem", "check_dataset_root", "load_manifest", "manifest_dir",
    "verify_dataset",
]

PROBLEM_KINDS: tuple[str, ...] = (
    "missing_folder", "missing_file", "unreadable", "bad_field", "count_mismatch",
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a local dataset copy.

    Attributes:
        kind: one of ``PROBLEM_KINDS``.
        path: the file or folder concerned.
        message: what is wrong and what was expected.
        field: the annotation field, when there is one.
    """

    kind: str
    path: Path
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field else ""
        return f"{self.kind}: {self.path}{where}: {self.message}"


def manifest_dir() -> Path:
    """Folder of the manifests: ``$NVSM_MANIFEST_DIR`` or the repository's ``data_manifests``."""
    env = os.environ.get("NVSM_MANIFEST_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data_manifests"


def load_manifest(name: str, directory: Path | None = None) -> dict[str, Any]:
    """Load ``<directory>/<name>.yaml`` (a mapping with at least ``name`` and ``layout``)."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    path = Path(directory or manifest_dir()) / f"{name}.yaml"
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or data.get("name") != name or "layout" not in data:
        raise ValueError(f"{path}: not a manifest for {name!r} (needs 'name' and 'layout')")
    return data


def check_dataset_root(root: Path) -> None:
    """Raise ``NotADirectoryError`` unless ``root`` is a folder; the message says whether it
    does not exist or is a file (a root that is no folder is no copy to check or read)."""
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise NotADirectoryError(f"the dataset root {root} {state}")


def _from_error(exc: DataFormatError) -> Problem:
    # ``got`` is whatever was found, often an array: compare only a string with the marker.
    missing = isinstance(exc.got, str) and exc.got == "missing"
    if exc.field == "<folder>":
        kind = "missing_folder" if missing else "unreadable"
    elif exc.field in ("<file>", "image"):
        kind = "missing_file" if missing else "unreadable"
    else:
        kind = "missing_file" if missing and exc.field in ("source",) else "bad_field"
    return Problem(kind, exc.path, exc.detail(), None if exc.field.startswith("<") else exc.field)


class _Collector:
    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.problems: list[Problem] = []
        self.progress = progress

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; a ``DataFormatError`` becomes a problem (returns None)."""
        try:
            return fn(*args, **kwargs)
        except DataFormatError as exc:
            self.add(_from_error(exc))
            return None

    def folder(self, path: Path) -> bool:
        if path.is_dir():
            return True
        self.add(Problem("missing_folder", path, "required folder is missing"))
        return False

    def file(self, path: Path) -> bool:
        if path.is_file():
            return True
        self.add(Problem("missing_file", path, "required file is missing"))
        return False

    def image(self, path: Path, decode: bool) -> tuple[int, int] | None:
        """Check an image; its (H, W), or None when it is missing or unreadable (reported)."""
        return self.run(check_image, path, decode)


def _count(root: Path, pattern: str, measure: str) -> int:
    if measure == "files":
        return sum(1 for _ in root.glob(pattern))
    path = root / pattern
    if not path.is_file():
        return 0
    return sum(1 for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
               if ln.strip())


def _check_counts(root: Path, manifest: dict[str, Any], categories: list[str],
                  all_categories: bool, out: _Collector) -> None:
    for entry in manifest.get("counts") or []:
        pattern, measure = entry["pattern"], entry.get("measure", "lines")
        source = entry.get("source", "")
        if entry.get("total") is not None:
            got = _count(root, pattern, measure)
            if got != entry["total"]:
                out.add(Problem("count_mismatch", root / pattern,
                                f"{entry.get('what', pattern)}: expected {entry['total']} "
                                f"({source}), found {got}"))
        for cat, expected in (entry.get("per_category") or {}).items():
            if expected is None or cat not in categories:
                continue
            got = _count(root, pattern.format(category=cat), measure)
            if got != expected:
                out.add(Problem("count_mismatch", root / pattern.format(category=cat),
                                f"expected {expected} ({source}), found {got}"))
        if entry.get("sum_over_categories") is not None and all_categories:
            got = sum(_count(root, pattern.format(category=c), measure) for c in categories)
            if got != entry["sum_over_categories"]:
                out.add(Problem("count_mismatch", root / pattern,
                                f"{entry.get('what', pattern)}: expected "
                                f"{entry['sum_over_categories']} ({source}), found {got}"))


def _verify_pascal_layout(root: Path, manifest: dict[str, Any], categories: list[str],
                          decode: bool, out: _Collector) -> None:
    layout = manifest["layout"]
    per_cat = layout.get("per_category", {})
    source = manifest["name"]
    for cat in categories:
        if out.progress:
            out.progress(f"{source}: {cat}")
        for folder in per_cat.get("folders", []):
            out.folder(root / folder.format(category=cat))
        for file in per_cat.get("files", []):
            out.file(root / file.format(category=cat))
        cad_patterns = [p.format(category=cat) for p in per_cat.get("cad", [])]
        if cad_patterns:
            if not any(any(root.glob(p)) for p in cad_patterns):
                out.add(Problem("missing_file", root / cad_patterns[0],
                                f"no CAD model: expected one of {cad_patterns}"))
            else:
                out.run(load_cad_models, root, cat)
        img_dir = root / layout["image_dir"].format(category=cat)
        ann_dir = root / layout["annotation_dir"].format(category=cat)
        mask_dir = pascal3d_mask_dir(root, cat)
        listed: dict[str, tuple[Path, list[str]]] = {}
        images: dict[str, dict[Path, Path]] = {}
        for split, pattern in (layout.get("lists") or {}).items():
            list_path = root / pattern.format(category=cat)
            if not list_path.is_file():
                continue  # reported above
            ids = out.run(read_image_set, list_path) or []
            listed[split] = (list_path, ids)
            images[split] = {}
            for image_id in ids:
                result = out.run(parse_record_file, ann_dir / f"{image_id}.mat", img_dir,
                                 categories=[cat], source=source, image_id=image_id)
                mask = mask_dir / f"{image_id}.png"
                if mask_dir.is_dir() and not mask.is_file():  # the reader goes on without it
                    out.add(Problem("missing_file", mask, f"object mask of {image_id} missing "
                                    f"from {mask_dir.name} (the other images have one)"))
                if result is None:
                    continue
                images[split][result.image_path.resolve()] = ann_dir / f"{image_id}.mat"
                if not result.records and not result.skipped:
                    out.add(Problem("bad_field", ann_dir / f"{image_id}.mat",
                                    f"listed in {list_path.name} ({split}) but has no object of "
                                    f"class {cat!r}", "record.objects"))
                _check_against_image(ann_dir / f"{image_id}.mat", result,
                                     out.image(result.image_path, decode), out)
        _check_lists_disjoint(listed, out, images)


def _check_against_image(mat_path: Path, result: ParsedFile, size: tuple[int, int] | None,
                         out: _Collector) -> None:
    """Compare an annotation with its image: ``record.imgsize`` with the real size (``size``,
    read from the header anyway; None when the image is missing or unreadable, which the image
    check reports) and every box with the image's bounds (the real size, else imgsize)."""
    declared = next((r.image_size for r in result.records if r.image_size is not None), None)
    if declared is None and result.skipped:  # no record to carry imgsize: read it again
        record = out.run(load_mat_struct, mat_path, "record")
        declared = None if record is None else out.run(record_image_size, record, mat_path)
    if size is not None and declared is not None and declared != size:
        out.add(Problem("bad_field", mat_path,
                        f"[width height] = [{declared[1]} {declared[0]}], but "
                        f"{result.image_path.name} is {size[1]}x{size[0]}", "record.imgsize"))
    bounds, source = (size, result.image_path.name) if size else (declared, "record.imgsize")
    if bounds is None:
        return
    for record in result.records:
        outside = box_outside_image(record.bbox, bounds)
        if outside:
            out.add(Problem("bad_field", mat_path, f"{outside} ({source})",
                            f"objects[{record.object_index}].bbox"))


def _check_lists_disjoint(listed: dict[str, tuple[Path, list[str]]], out: _Collector,
                          images: dict[str, dict[Path, Path]]) -> None:
    """An id in both the train and the val (test) list would be trained on and tested on; so
    would an image that annotations of both lists name (``images``: split → {image: the
    annotation naming it})."""
    if "train" not in listed or "val" not in listed:
        return
    (train_path, train_ids), (val_path, val_ids) = listed["train"], listed["val"]
    shared = sorted(set(train_ids) & set(val_ids))
    if shared:
        out.add(Problem("bad_field", train_path,
                        f"{len(shared)} id(s) also in {val_path.name} (the test list): "
                        f"{id_sample(shared)}", "ids"))
        return
    train_images, val_images = images.get("train", {}), images.get("val", {})
    for image in sorted(train_images.keys() & val_images.keys()):
        out.add(Problem("bad_field", train_images[image],
                        f"names {image.name}, which {val_images[image]} of the test list "
                        "names too", "record.filename"))


def _verify_occluded(root: Path, manifest: dict[str, Any], categories: list[str], decode: bool,
                     pascal3d_root: Path | None, out: _Collector) -> None:
    layout = manifest["layout"]
    levels = [int(k) for k in manifest.get("levels", {1: 0, 2: 0, 3: 0})]
    for cat in categories:
        if out.progress:
            out.progress(f"occluded_pascal3d: {cat}")
        for level in levels:
            folder = occluded_folder(cat, level)
            for f in layout["per_level"].get("folders", []):
                out.folder(root / f.format(folder=folder))
            list_path = root / layout["list"].format(folder=folder)
            if not out.file(list_path):
                continue
            for name in out.run(read_image_set, list_path) or []:
                stem = Path(name).stem
                image = occluded_image_path(root, folder, name)
                out.image(image, decode)
                npz = root / layout["annotation"].format(folder=folder, stem=stem)
                ann = out.run(read_occluded_npz, npz, check_masks=decode)
                if ann is not None and pascal3d_root is not None and image.is_file():
                    # The loader's own reading: the source annotation and its object.
                    out.run(read_occluded_entry, root, pascal3d_root, cat, folder, level, name,
                            ReadResult())


def _verify_kitti(root: Path, manifest: dict[str, Any], decode: bool, out: _Collector) -> None:
    base = root / "training"
    label_dir = base / "label_2"
    if not label_dir.is_dir():
        return  # reported by the folder check
    for label in sorted(label_dir.glob("*.txt")):
        frame = out.run(kitti_frame_id, label)
        objects = out.run(read_kitti_label, label)
        size = out.image(base / "image_2" / f"{label.stem}.png", decode)
        calib = out.run(read_kitti_calib, base / "calib" / f"{label.stem}.txt")
        if frame is None or objects is None or calib is None:
            continue
        # The loader's own conversion: what would stop `nvsm data split` is reported here.
        result = ReadResult()
        out.run(kitti_records, label, objects, calib["P2"], KittiConfig(), result)
        for record in result.records:
            outside = None if size is None else box_outside_image(record.bbox, size)
            if outside:
                out.add(Problem("bad_field", label, f"{outside} ({record.image_path.name})",
                                f"line {record.object_index + 1} bbox"))


def _verify_objectnet3d(root: Path, manifest: dict[str, Any], decode: bool,
                        out: _Collector) -> None:
    classes = root / "Image_sets" / "classes.txt"
    if classes.is_file():
        names = out.run(read_image_set, classes) or []
        out.run(register_categories, names)
    listed: dict[str, tuple[Path, list[str]]] = {}
    images: dict[str, dict[Path, Path]] = {}
    for split, pattern in (manifest["layout"].get("lists") or {}).items():
        list_path = root / pattern
        if not list_path.is_file():
            continue
        ids = out.run(read_image_set, list_path) or []
        listed[split] = (list_path, ids)
        images[split] = {}
        for image_id in ids:
            result = out.run(parse_record_file, root / "Annotations" / f"{image_id}.mat",
                             root / "Images", categories=None, source="objectnet3d",
                             image_id=image_id)
            if result is not None:
                images[split][result.image_path.resolve()] = (
                    root / "Annotations" / f"{image_id}.mat")
                _check_against_image(root / "Annotations" / f"{image_id}.mat", result,
                                     out.image(result.image_path, decode), out)
    _check_lists_disjoint(listed, out, images)


def verify_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    categories: Iterable[str] | None = None,
    manifest_directory: Path | None = None,
    decode_images: bool = False,
    pascal3d_root: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Problem]:
    """Check the local copy at ``root`` against the manifest of dataset ``name``.

    Args:
        name: one of ``nvsm.data.datasets.DATASET_NAMES``.
        root: dataset root.
        categories: restrict the per-category checks (sums over categories are then skipped).
        manifest_directory: default ``manifest_dir()``.
        decode_images: fully decode every image (slow) instead of checking headers.
        pascal3d_root: Occluded PASCAL3D+ only: also check each ``source`` annotation exists.
        progress: optional callback receiving a short status line per stage.
    Returns:
        every problem found, in walk order (empty list = the copy matches the manifest).
    Raises:
        NotADirectoryError: ``root`` does not exist or is a file (``check_dataset_root``).
    """
    manifest = load_manifest(name, manifest_directory)
    root = Path(root)
    check_dataset_root(root)
    out = _Collector(progress)
    layout = manifest["layout"]
    for folder in layout.get("folders", []):
        out.folder(root / folder)
    for file in layout.get("files", []):
        out.file(root / file)

    known = manifest.get("categories")
    if name == "synthetic" and not known:
        known = synthetic_categories(root)
    if name == "objectnet3d":
        known = None
    cats = list(categories) if categories is not None else list(known or [])
    all_categories = categories is None or set(cats) >= set(known or [])
    if progress:
        progress(f"checking {name} at {root}")

    if name in ("pascal3d", "synthetic"):
        _verify_pascal_layout(root, manifest, cats, decode_images, out)
    if name == "synthetic" and (root / OCCLUDED_SUBFOLDER).is_dir():
        # The built-in dataset carries its own occluded test levels, which fewshot reads.
        _verify_occluded(root / OCCLUDED_SUBFOLDER, load_manifest("occluded_pascal3d",
                                                                  manifest_directory),
                         cats, decode_images, root, out)
    elif name == "occluded_pascal3d":
        _verify_occluded(root, manifest, cats, decode_images,
                         None if pascal3d_root is None else Path(pascal3d_root), out)
    elif name == "kitti":
        _verify_kitti(root, manifest, decode_images, out)
    elif name == "objectnet3d":
        _verify_objectnet3d(root, manifest, decode_images, out)
    _check_counts(root, manifest, cats, all_categories, out)
    return out.problems
