"""Prediction files of ``nvsm infer``: rows, CSV / JSON-lines writers and readers, raw-image crops.

One row per crop, the same keys in both formats (``ROW_FIELDS``):

    image, uid, category, azimuth_deg, elevation_deg, theta_deg, distance, score, seconds, error

* angles in **degrees** (the files' only departure from nvsm's radians, hence the ``_deg``
  keys), canonicalised through the evaluation rotation: azimuth in [0, 360), elevation in
  [−90, 90], θ in (−180, 180];
* ``distance`` in object units (for ``bbox`` crops of raw images: relative to an assumed
  3000 px focal length, see ``image_cropset``);
* ``score`` = 1 − loss of the chosen hypothesis (the mean clutter-aware foreground evidence);
* ``seconds``: inference time per image; ``error``: "" or the failure message, in which case
  the pose, distance and score are NaN (CSV ``nan``; JSON ``null``, since JSON has no NaN).

The pure part (rows, writers, readers, raw-image crops) is separate from ``run_inference``, the
orchestration behind the CLI command.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvsm.data.errors import DataFormatError
from nvsm.data.images import IMAGE_SUFFIXES
from nvsm.infer.evaluate import Predictions
from nvsm.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    check_output_folder,
    run_record,
    staged_writes,
)
from nvsm.pose.camera import bbox_crop
from nvsm.pose.convention import PASCAL3D_VIEWPORT, pose_from_rotation, rotation_matrix
from nvsm.train.cropset import CropImages, CropSet, crop_storage

ROW_FIELDS: tuple[str, ...] = (
    "image",
    "uid",
    "category",
    "azimuth_deg",
    "elevation_deg",
    "theta_deg",
    "distance",
    "score",
    "seconds",
    "error",
)
_FLOAT_FIELDS = ("azimuth_deg", "elevation_deg", "theta_deg", "distance", "score", "seconds")
_POSE_FIELDS = ("azimuth_deg", "elevation_deg", "theta_deg", "distance")
#: Focal length (px) assumed for raw images, whose camera is unknown (PASCAL3D+'s viewport).
ASSUMED_FOCAL_PX = PASCAL3D_VIEWPORT

Row = dict[str, Any]


# ----------------------------------------------------------------------------- rows


def canonical_degrees(pose: torch.Tensor | np.ndarray) -> tuple[float, float, float]:
    """(azimuth, elevation, θ) of a (4,) or (3,) radian pose, in degrees, canonicalised through
    its evaluation rotation: azimuth [0, 360), elevation [−90, 90], θ (−180, 180]. NaN in,
    NaN out."""
    p = np.asarray(pose.detach().cpu() if isinstance(pose, torch.Tensor) else pose, np.float64)
    if not np.isfinite(p[:3]).all():
        return (math.nan, math.nan, math.nan)
    a, e, t = pose_from_rotation(rotation_matrix(p[0], p[1], p[2]))
    az = float(np.degrees(a)) % 360.0
    return (0.0 if az >= 360.0 else az, float(np.degrees(e)), float(np.degrees(t)))


def prediction_rows(
    data: CropSet, predictions: Predictions, images: Sequence[str] | None = None
) -> list[Row]:
    """One row per crop (keys ``ROW_FIELDS``).

    Args:
        data: the N crops that were solved (uids, and the given categories).
        predictions: their ``Predictions``: poses (N, 4) radians, loss (N,), seconds (N,),
            errors, and the categories they were solved as (given or inferred).
        images: N image paths (default: the uids).
    Returns:
        N dicts; a failed crop has its message in ``error`` and NaN pose, distance and score.
    """
    n = len(data)
    images = list(images) if images is not None else list(data.uids)
    if len(images) != n or len(predictions.errors) != n:
        raise ValueError(
            f"prediction_rows: {n} crops, {len(images)} images, "
            f"{len(predictions.errors)} predictions"
        )
    cats = predictions.categories or list(data.categories)
    rows = []
    for i in range(n):
        err = predictions.errors[i]
        pose = predictions.poses[i].double()
        ok = err is None and bool(torch.isfinite(pose).all())
        az, el, th = canonical_degrees(pose) if ok else (math.nan,) * 3
        loss = float(predictions.loss[i])
        rows.append(
            {
                "image": str(images[i]),
                "uid": data.uids[i],
                "category": cats[i],
                "azimuth_deg": az,
                "elevation_deg": el,
                "theta_deg": th,
                "distance": float(pose[3]) if ok else math.nan,
                "score": 1.0 - loss if ok and math.isfinite(loss) else math.nan,
                "seconds": float(predictions.seconds[i]),
                "error": "" if ok else (err or "non-finite prediction"),
            }
        )
    return rows


def mark_failed(predictions: Predictions, failed: dict[int, str]) -> Predictions:
    """A copy of ``predictions`` where the crops ``failed`` (index → message) are failures:
    NaN pose and loss, the message as error (e.g. images that could not be read)."""
    if not failed:
        return predictions
    poses, loss = predictions.poses.clone(), predictions.loss.clone()
    errors = list(predictions.errors)
    for i, message in failed.items():
        poses[i] = math.nan
        loss[i] = math.nan
        errors[i] = message
    return replace(predictions, poses=poses, loss=loss, errors=errors)


# ----------------------------------------------------------------------------- files


def _plain(value: Any) -> Any:
    """``value`` with a real number as a plain ``float``: a numpy scalar was written as its
    repr (``np.float64(10.0)``) in the CSV, and stopped ``json.dumps`` (``np.float32``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _clean(value: Any) -> Any:
    """JSON value: ``_plain``, non-finite floats becoming null."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_predictions_csv(path: str | os.PathLike[str], rows: Iterable[Row]) -> Path:
    """Write rows as CSV with the ``ROW_FIELDS`` header, atomically: numbers unquoted (``repr``
    of a float; NaN is ``nan``), every other field quoted."""
    path = Path(path)
    with atomic_open(path, "w") as fh:
        fh.write(",".join(ROW_FIELDS) + "\n")  # plain names, nothing to quote
        # Strings are all quoted: with "\n" line ends csv quotes only what holds "\n", the
        # delimiter or a quote, and a bare "\r" in a uid ended the row for every reader.
        writer = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        for row in rows:
            writer.writerow([_plain(row[k]) for k in ROW_FIELDS])
    return path


def write_predictions_jsonl(path: str | os.PathLike[str], rows: Iterable[Row]) -> Path:
    """Write rows as JSON lines (one object per line, keys ``ROW_FIELDS``), atomically; NaN is
    written ``null`` (strict JSON)."""
    path = Path(path)
    with atomic_open(path, "w") as fh:
        for row in rows:
            obj = {k: _clean(row[k]) for k in ROW_FIELDS}
            fh.write(json.dumps(obj, allow_nan=False) + "\n")
    return path


#: A number as the CSV writer writes it (``repr`` of a float; any case of inf and nan). Stricter
#: than ``float``, which also took " 1_0 " (spaces, underscores) and non-ASCII digits.
_CSV_NUMBER = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf(?:inity)?|nan)",
    re.IGNORECASE | re.ASCII,
)


def _csv_number(text: str, path: Path, field: str) -> float:
    """A float field of a CSV row: NaN for none (empty or ``nan``), else a number."""
    if text == "":
        return math.nan
    if _CSV_NUMBER.fullmatch(text):
        return float(text)
    raise DataFormatError(path, field, "a number (e.g. 12.5, 1e-05; empty or nan for none)", text)


def _json_number(value: Any, path: Path, field: str) -> float:
    """A float field of a JSON row: NaN for null, else a JSON number (not a string: the writer
    writes numbers, and ``float`` also took "1_0"; not a boolean)."""
    if value is None:
        return math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the floats
            pass
    raise DataFormatError(path, field, "a number (null for none)", value)


def _typed(
    row: dict[str, Any], path: Path, line: int, number: Callable[[Any, Path, str], float]
) -> Row:
    """A row read back (keys exactly ``ROW_FIELDS``), checked: numbers (as ``number``, the
    format's ``_csv_number`` or ``_json_number``, reads them), strings, and an error message
    exactly where the pose is missing, as the writers leave them."""
    where = f"line {line}"
    out: Row = dict(row)
    for k in _FLOAT_FIELDS:
        out[k] = number(row[k], path, f"{where} {k}")
    for k in ("image", "uid", "category", "error"):
        if not isinstance(out[k], str):
            raise DataFormatError(path, f"{where} {k}", "a string", out[k])
    failed = not all(math.isfinite(out[k]) for k in _POSE_FIELDS)
    if failed != bool(out["error"]):
        raise DataFormatError(path, f"{where} error", "a message exactly where the pose is "
                              "missing (a failure)", out["error"])
    return out


def _read_text(path: Path) -> str:
    """The file's text, line ends untranslated: ``read_text`` turned a quoted "\\r" into "\\n"."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "<file>", "a readable UTF-8 predictions file",
                              f"{type(exc).__name__}: {exc}") from exc


def read_predictions_csv(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a file written by ``write_predictions_csv`` (floats parsed, ``nan`` → NaN).

    Raises:
        DataFormatError: naming the file, line and field of what is not such a row: a header
            other than ``ROW_FIELDS``, a row of fewer or more fields, a number written
            otherwise than ``repr`` writes it, an error message without a failed pose or a
            failed pose without one.
    """
    path = Path(path)
    # strict: a stray quote inside a field was read as part of it
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    try:
        header = next(reader, [])
        if tuple(header) != ROW_FIELDS:
            raise DataFormatError(path, "line 1 (header)",
                                  f"the columns {','.join(ROW_FIELDS)}", ",".join(header))
        rows = []
        start = reader.line_num + 1  # the line a row starts on (a quoted field may span lines)
        for fields in reader:
            if fields:  # not a blank line
                rows.append(_typed(_csv_row(fields, path, start), path, start, _csv_number))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataFormatError(path, f"line {reader.line_num}", "CSV fields (a field with "
                              "a quote, comma or line break quoted, its quotes doubled)",
                              str(exc)) from None
    return rows


def _csv_row(fields: list[str], path: Path, line: int) -> dict[str, str]:
    """The fields of a CSV data row by column, refusing a row of fewer or more fields than the
    header (``csv.DictReader`` filled the missing ones with None and kept the extra)."""
    n = len(ROW_FIELDS)
    if len(fields) < n:
        raise DataFormatError(path, f"line {line} {ROW_FIELDS[len(fields)]}",
                              f"{n} fields, as the header", f"{len(fields)} fields")
    if len(fields) > n:
        raise DataFormatError(path, f"line {line} (after {ROW_FIELDS[-1]})",
                              f"{n} fields, as the header", f"{len(fields)} fields")
    return dict(zip(ROW_FIELDS, fields, strict=True))


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s object hook: refuses a key given twice (the last one was kept)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"the key {key!r} twice")
        obj[key] = value
    return obj


def _json_constant(name: str) -> Any:
    """``json.loads``'s hook for NaN and Infinity, which are not JSON (the writer writes
    null)."""
    raise ValueError(f"{name}, which is not JSON (null for none)")


def read_predictions_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a file written by ``write_predictions_jsonl`` (``null`` → NaN).

    Raises:
        DataFormatError: naming the file, line and field of what is not such a row: not one
            JSON object, a missing or unknown field, a number given as a string, a non-string
            text field, an error message without a failed pose or a failed pose without one.
    """
    path = Path(path)
    rows = []
    # Lines end at "\n" alone: str.splitlines also split at characters (U+2028, \x1c, ...)
    # that a JSON string may hold.
    for n, text in enumerate(_read_text(path).split("\n"), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
        except ValueError as exc:
            raise DataFormatError(path, f"line {n}", "a JSON object", f"{exc}") from None
        if not isinstance(row, dict):
            raise DataFormatError(path, f"line {n}",
                                  f"an object with the fields {', '.join(ROW_FIELDS)}",
                                  type(row).__name__)
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            raise DataFormatError(path, f"line {n} {missing[0]}",
                                  f"the fields {', '.join(ROW_FIELDS)}", f"fields {sorted(row)}")
        unknown = [k for k in row if k not in ROW_FIELDS]
        if unknown:
            raise DataFormatError(path, f"line {n} {unknown[0]}",
                                  f"only the fields {', '.join(ROW_FIELDS)}", "an unknown field")
        rows.append(_typed({k: row[k] for k in ROW_FIELDS}, path, n, _json_number))
    return rows


# ----------------------------------------------------------------------------- raw images


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders' images (``IMAGE_SUFFIXES``,
    not recursive, sorted). Raises ``FileNotFoundError`` for a path that does not exist."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def image_cropset(
    paths: Sequence[str | os.PathLike[str]],
    size: tuple[int, int],
    category: str = "",
    normalized_focal: float = PASCAL3D_VIEWPORT,
    fill: float = 0.8,
) -> tuple[CropSet, dict[int, str]]:
    """``bbox``-protocol crops of raw images, assuming ONE roughly centred object per image.

    There is no annotation, so the object's box is taken to be the whole image, (0, 0,
    W − 1, H − 1): the image is centred in the crop and its longer (aspect-corrected) side fills
    ``fill`` of it, exactly as the ``bbox`` protocol treats a box. The camera is unknown too: a
    focal length of ``ASSUMED_FOCAL_PX`` with the principal point at the image centre, so the
    estimated distance is relative to that assumption (the rotation is not affected by it).

    Args:
        paths: N image files.
        size: crop (H, W), a multiple of the backbone stride.
        category: the category of every image ("" when it is to be inferred).
        normalized_focal: the model's normalised focal (``PASCAL3D_VIEWPORT · crop_scale``).
    Returns:
        the ``CropSet`` (N crops (3, H, W) uint8, poses NaN: there is no ground truth; uids
        ``<stem>:0``) and {index: message} for images that could not be read (their crops are
        black).
    """
    from nvsm.data.crops import image_box_in_crop, warp_to_crop
    from nvsm.data.images import load_image

    images = crop_storage(len(paths), size, on_disk=True)  # as build_cropset's
    ks, ref, boxes = [], [], []
    failed: dict[int, str] = {}
    h, w = size
    for i, path in enumerate(paths):
        try:
            image = load_image(Path(path))
        except Exception as exc:
            failed[i] = f"{type(exc).__name__}: {exc}"
            image = np.zeros((h, w, 3), dtype=np.uint8)
        ih, iw = image.shape[:2]
        box = (0.0, 0.0, float(max(iw - 1, 1)), float(max(ih - 1, 1)))
        cam = bbox_crop(
            box, ((iw - 1) / 2, (ih - 1) / 2), ASSUMED_FOCAL_PX, (h, w), fill, normalized_focal
        )
        chw = torch.as_tensor(image).permute(2, 0, 1).float() / 255.0
        crop = warp_to_crop(chw, cam).clamp(0.0, 1.0)
        images[i] = (crop * 255).round().to(torch.uint8)
        ks.append(torch.as_tensor(cam.k))
        ref.append(cam.reference_distance())
        boxes.append(torch.as_tensor(image_box_in_crop(cam, (ih, iw))))
    n = len(paths)
    data = CropSet(
        images=CropImages.of(images),
        k=torch.stack(ks).double() if n else torch.zeros(0, 3, 3, dtype=torch.float64),
        poses=torch.full((n, 4), math.nan, dtype=torch.float64),
        weights=torch.ones(n),
        categories=[category] * n,
        uids=[f"{Path(p).stem}:0" for p in paths],
        occlusion_levels=torch.zeros(n, dtype=torch.long),
        reference_distance=torch.tensor(ref, dtype=torch.float64),
        image_box=torch.stack(boxes) if n else torch.zeros(0, 4, dtype=torch.float64),
        normalized_focal=normalized_focal,
    )
    return data, failed


# ----------------------------------------------------------------------------- orchestration


@dataclass
class InferencePart:
    """Crops solved together (one crop size): the crops, their image paths, images that
    could not be read (index → message), and whether the category is inferred."""

    data: CropSet
    images: list[str]
    failed: dict[int, str]
    infer_category: bool


#: What ``run_inference`` writes into its output folder (``overlays/`` with --overlays).
OUTPUT_NAMES = ("predictions.csv", "predictions.jsonl", "infer_info.json", "overlays")


def _check_output_names(out: Path) -> None:
    """Refuse, before any work, an output folder that holds an inference's outputs already (or
    anything by their names): a new inference there replaced the predictions but left the old
    overlays beside them (a first run with --overlays, a second without, or on fewer images),
    which then passed for the new run's."""
    check_output_folder(out)
    taken = [str(out / name) for name in OUTPUT_NAMES if (out / name).exists()]
    if taken:
        raise ValueError(f"{out} holds an inference already ({', '.join(taken)}): choose "
                         "another folder (--out) or delete it")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def run_inference(
    checkpoint: Path,
    paths: Sequence[str | os.PathLike[str]] = (),
    out: Path = Path("predictions"),
    dataset_split: str | None = None,
    category: str | None = None,
    infer_category: bool = False,
    overlays: bool = False,
    overrides: Sequence[str] = (),
    show_progress: bool = True,
) -> dict[str, Any]:
    """``nvsm infer``: predict poses and write OUT/predictions.csv, OUT/predictions.jsonl,
    OUT/infer_info.json (and OUT/overlays/*.png, one per image solved), into an OUT that holds
    none of them yet.

    Args:
        checkpoint: ``model.pt``.
        paths: image files / folders; empty: the checkpoint's dataset split instead.
        dataset_split: without ``paths``, ``test`` (= ``val``, the dataset's test list; the
            default, None) or ``train``.
        category: the images' category (skips inference); with a dataset split, keep only it.
        infer_category: with a dataset split, infer the category instead of using the
            annotation (images given as ``paths`` are always inferred unless ``category``).
        overrides: ``key=value`` config overrides (e.g. ``data.root=...``, ``device=cpu``,
            ``infer.schedule=reference``: the schedule is the config's).

    Raw images are cropped at ``data.crop_size`` when the config sets one, else at the default
    size of ``category`` (or, when inferring, of the model's first category); every category's
    mesh is then solved on that same crop, with templates rendered for that size.
    Returns:
        summary dict (the content of infer_info.json).
    """
    from nvsm.config import config_to_dict
    from nvsm.infer.evaluate import predict, resolve_schedule
    from nvsm.infer.overlay import render_overlays
    from nvsm.pipeline import check_run_config, checkpoint_config, load_splits
    from nvsm.render import get_rasterizer
    from nvsm.train.cropset import build_cropset, crop_size_for
    from nvsm.train.model import NeMoModel

    _check_output_names(Path(out))
    model, _ = NeMoModel.load(checkpoint)
    config = checkpoint_config(model, overrides, checkpoint)
    sched = resolve_schedule(config.infer.schedule)
    if category is not None and category not in model.meshes:
        raise ValueError(f"category {category!r} is not in the model ({model.categories})")
    # Both options name what to do with a dataset split: beside images they did nothing.
    if paths and dataset_split is not None:
        raise ValueError("--dataset-split: applies without PATHS only (a split of the "
                         "checkpoint's dataset instead of image files)")
    if paths and infer_category:
        raise ValueError("--infer-category: applies without PATHS only (images given as PATHS "
                         "have their category inferred unless --category names it)")
    split = {"val": "test", None: "test"}.get(dataset_split, dataset_split)
    if not paths and split not in ("test", "train"):
        raise ValueError(f"dataset split must be test, val or train, got {dataset_split!r}")
    device = check_run_config(config)
    model = model.to(device)
    rasterizer = get_rasterizer(config.model.rasterizer, device)
    crop_scale = config.data.crop_scale
    fixed_size = config.data.crop_hw()
    parts: list[InferencePart] = []
    if paths:
        files = find_images(paths)
        if not files:
            raise ValueError(f"no images found in {[str(p) for p in paths]}")
        size = fixed_size or crop_size_for(category or model.categories[0], crop_scale)
        data, failed = image_cropset(
            files,
            size,
            category or "",
            PASCAL3D_VIEWPORT * crop_scale,
        )
        parts.append(InferencePart(data, [str(f) for f in files], failed, category is None))
        protocol, source = "bbox", "images"
    else:
        splits = load_splits(config, (0,) if split == "test" else ())
        records = splits.test[0] if split == "test" else splits.train
        if category is not None:
            records = [r for r in records if r.category == category]
        if not records:
            raise ValueError(f"no records in the {split} split of {config.data.dataset}")
        for cat in sorted({r.category for r in records}):
            recs = [r for r in records if r.category == cat]
            data = build_cropset(
                recs,
                config.data.crop_protocol,
                crop_scale,
                fixed_size,
                f"cropping {cat}",
                show_progress,
                on_disk=True,  # a whole split: see cropsets
            )
            parts.append(InferencePart(data, [str(r.image_path) for r in recs], {}, infer_category))
        protocol, source = config.data.crop_protocol, f"{config.data.dataset}:{split}"
    # Written aside and moved into OUT at the end, so that an error or Ctrl-C part way
    # (overlays are written image by image) leaves OUT as it was.
    with staged_writes(out, last="infer_info.json") as staged:
        rows: list[Row] = []
        n_overlays = 0
        for part in parts:
            preds = predict(
                model,
                part.data,
                sched,
                config.infer.batch_size,
                device,
                rasterizer,
                show_progress,
                infer_category=part.infer_category,
            )
            preds = mark_failed(preds, part.failed)
            part_rows = prediction_rows(part.data, preds, part.images)
            if overlays:
                pictures = render_overlays(
                    model, part.data, preds, device, rasterizer, config.infer.batch_size
                )
                for j, (row, picture) in enumerate(zip(part_rows, pictures, strict=True)):
                    if picture is None:  # a failed crop: no pose to draw
                        continue
                    buf = io.BytesIO()
                    picture.save(buf, format="PNG")
                    name = f"{len(rows) + j:05d}_{_safe_name(row['uid'])}.png"
                    atomic_write_bytes(staged / "overlays" / name, buf.getvalue())
                    n_overlays += 1
            rows += part_rows
        write_predictions_csv(staged / "predictions.csv", rows)
        write_predictions_jsonl(staged / "predictions.jsonl", rows)
        summary: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "source": source,
            "protocol": protocol,
            "schedule": config.infer.schedule,
            "category": "inferred" if any(p.infer_category for p in parts) else "given",
            "images": len(rows),
            "failures": sum(bool(r["error"]) for r in rows),
            "failed": [{k: r[k] for k in ("image", "uid", "error")} for r in rows if r["error"]],
            "overlays": n_overlays,
            "units": {"angles": "degrees", "distance": "object units", "score": "1 - loss"},
            "files": ["predictions.csv", "predictions.jsonl"],
            "run": run_record(config_to_dict(config), config.seed),
        }
        if paths:
            summary["assumption"] = (
                "one roughly centred object per image: the whole image is the object's box (bbox "
                f"protocol, fill 0.8) and the focal length is {ASSUMED_FOCAL_PX:g} px"
            )
        atomic_write_json(staged / "infer_info.json", summary)
    return summary


__all__ = [
    "ASSUMED_FOCAL_PX",
    "ROW_FIELDS",
    "InferencePart",
    "canonical_degrees",
    "find_images",
    "image_cropset",
    "mark_failed",
    "prediction_rows",
    "read_predictions_csv",
    "read_predictions_jsonl",
    "run_inference",
    "write_predictions_csv",
    "write_predictions_jsonl",
]
