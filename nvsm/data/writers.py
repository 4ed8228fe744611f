"""Writers for the published on-disk formats nvsm reads (tests, and the synthetic generator).

Every writer is atomic (temp file + ``os.replace`` via ``nvsm.io``). The PASCAL3D+ writer takes
values *as stored in the files* (1-based MATLAB pixels, degrees, 1-based ``cad_index``);
``mat_object_from_record`` converts an ``ObjectRecord`` (nvsm conventions) to that form.

Output is deterministic: equal content gives equal bytes. ``mat_bytes`` writes a fixed ``.mat``
header text (scipy's carries the creation time) and ``npz_bytes`` fixed zip entry timestamps
(``numpy.savez``'s carry the current time), with the entries in key order. The ``*_bytes``
functions return a file's bytes without writing it (the synthetic generator renders in worker
processes and writes in the parent).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from nvsm.data.matlab import MATLAB_PIXEL_OFFSET
from nvsm.data.record import ObjectRecord
from nvsm.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "mat_bytes",
    "mat_object_from_record",
    "npz_bytes",
    "occluded_npz_bytes",
    "pascal3d_record_bytes",
    "write_kitti_calib",
    "write_kitti_label",
    "write_occluded_npz",
    "write_pascal3d_record",
]

_EMPTY = np.zeros((0, 0))
#: Replaces scipy's ``.mat`` header text (which carries the creation time); 116 bytes.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: nvsm"
#: Modification time of every ``.npz`` entry (the earliest a zip can hold).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def mat_bytes(variables: Mapping[str, Any]) -> bytes:
    """A MATLAB 5 ``.mat`` file (``scipy.io.savemat``, uncompressed) with a fixed header text,
    so equal content gives equal bytes."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, dict(variables), do_compression=False)
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    return bytes(data)


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """An ``.npz`` (readable by ``numpy.load``; deflate-compressed, no pickles) with fixed zip
    timestamps and the entries in key order, so equal content gives equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.asarray(value), allow_pickle=False)
            zf.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def _struct_array(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A 1×N MATLAB struct array (numpy structured object array) with the union of the keys."""
    names: list[str] = []
    for item in items:
        names.extend(k for k in item if k not in names)
    arr = np.empty((1, len(items)), dtype=[(n, object) for n in names])
    for i, item in enumerate(items):
        for n in names:
            value = item.get(n)
            if value is None:
                value = _EMPTY
            elif isinstance(value, Mapping):
                value = _struct_array([value])
            arr[n][0, i] = value
    return arr


def pascal3d_record_bytes(
    filename: str,
    objects: Sequence[Mapping[str, Any]],
    imgsize: tuple[int, int, int] | None = None,
    **extra: Any,
) -> bytes:
    """The bytes of a PASCAL3D+ annotation ``.mat`` (struct ``record``); arguments as for
    ``write_pascal3d_record``. Fields in order: ``filename``, ``extra`` (in the order given),
    ``imgsize``, ``objects``."""
    record: dict[str, Any] = {"filename": filename, **extra}
    if imgsize is not None:
        record["imgsize"] = np.asarray(imgsize, dtype=np.float64)
    record["objects"] = _struct_array(objects) if objects else _EMPTY
    return mat_bytes({"record": record})


def write_pascal3d_record(
    path: Path,
    filename: str,
    objects: Sequence[Mapping[str, Any]],
    imgsize: tuple[int, int, int] | None = None,
    **extra: Any,
) -> Path:
    """Write a PASCAL3D+ annotation ``.mat`` (struct ``record``).

    Args:
        path: ``Annotations/<cat>_imagenet/<id>.mat``.
        filename: image file name (``record.filename``).
        objects: one mapping per object with ``class``, ``bbox`` [x1 y1 x2 y2] (1-based),
            ``truncated``, ``occluded``, ``difficult`` (0/1), ``cad_index`` (1-based) and
            ``viewpoint`` (a mapping with ``azimuth``, ``elevation``, ``theta`` in degrees,
            ``distance``, ``focal``, ``px``, ``py`` (1-based), ``viewport``, optionally
            ``azimuth_coarse``/``elevation_coarse``; None = empty viewpoint); more keys become
            more fields. Mapping values become structs, None empty arrays.
        imgsize: (width, height, depth).
        extra: more ``record`` fields (e.g. ``folder``, ``database``, ``size``).
    """
    atomic_write_bytes(path, pascal3d_record_bytes(filename, objects, imgsize, **extra))
    return Path(path)


def mat_object_from_record(record: ObjectRecord) -> dict[str, Any]:
    """The ``record.objects`` entry (file conventions) that reads back as ``record``."""
    o = MATLAB_PIXEL_OFFSET
    return {
        "class": record.category,
        "bbox": np.asarray(record.bbox, dtype=np.float64) + o,
        "truncated": int(record.truncated), "occluded": int(record.occluded),
        "difficult": int(record.difficult),
        "cad_index": None if record.cad_index is None else record.cad_index + 1,
        "viewpoint": {
            "azimuth": math.degrees(record.azimuth), "elevation": math.degrees(record.elevation),
            "theta": math.degrees(record.theta), "distance": record.distance,
            "focal": record.focal, "px": record.px + o, "py": record.py + o,
            "viewport": record.viewport,
            "azimuth_coarse": math.degrees(record.azimuth),
            "elevation_coarse": math.degrees(record.elevation),
        },
    }


def write_kitti_label(path: Path, objects: Sequence[Mapping[str, Any]]) -> Path:
    """Write a KITTI ``label_2`` file; each mapping has the 15 fields
    (type truncated occluded alpha bbox=(x1,y1,x2,y2) dimensions=(h,w,l) location=(x,y,z)
    rotation_y)."""
    rows = []
    for o in objects:
        vals = [o["type"], f"{o['truncated']:.2f}", str(int(o["occluded"])), f"{o['alpha']:.2f}",
                *(f"{v:.2f}" for v in o["bbox"]), *(f"{v:.2f}" for v in o["dimensions"]),
                *(f"{v:.2f}" for v in o["location"]), f"{o['rotation_y']:.2f}"]
        rows.append(" ".join(vals))
    atomic_write_text(path, "\n".join(rows) + "\n")
    return Path(path)


def write_kitti_calib(path: Path, p2: np.ndarray, **others: np.ndarray) -> Path:
    """Write a KITTI calib file with P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo
    (P0, P1, P3 default to P2 with zero translation; R0_rect to I; Tr_* to [I | 0])."""
    p2 = np.asarray(p2, dtype=np.float64).reshape(3, 4)
    k0 = np.concatenate([p2[:, :3], np.zeros((3, 1))], axis=1)
    eye34 = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)
    mats = {"P0": k0, "P1": k0, "P2": p2, "P3": k0, "R0_rect": np.eye(3),
            "Tr_velo_to_cam": eye34, "Tr_imu_to_velo": eye34}
    mats.update({k: np.asarray(v, dtype=np.float64) for k, v in others.items()})
    text = "".join(f"{k}: {' '.join(f'{x:.12e}' for x in np.ravel(v))}\n" for k, v in mats.items())
    atomic_write_text(path, text + "\n")
    return Path(path)


def occluded_npz_bytes(
    source: str,
    mask: np.ndarray,
    occluder_mask: np.ndarray,
    box: Sequence[float],
    occluder_box: np.ndarray,
    **extra: Any,
) -> bytes:
    """The bytes of an Occluded PASCAL3D+ ``.npz``; arguments as for ``write_occluded_npz``."""
    return npz_bytes({
        "source": np.asarray(source), "mask": np.asarray(mask),
        "occluder_mask": np.asarray(occluder_mask), "box": np.asarray(box, dtype=np.int64),
        "occluder_box": np.asarray(occluder_box, dtype=np.int64).reshape(-1, 6),
        **{key: np.asarray(value) for key, value in extra.items()},
    })


def write_occluded_npz(
    path: Path,
    source: str,
    mask: np.ndarray,
    occluder_mask: np.ndarray,
    box: Sequence[float],
    occluder_box: np.ndarray,
    **extra: Any,
) -> Path:
    """Write one Occluded PASCAL3D+ annotation ``.npz``.

    Args:
        path: ``annotations/<cat>FGL<k>_BGL<k>/<id>.npz``.
        source: the PASCAL3D+ id.
        mask: object mask (H, W).
        occluder_mask: occluder mask (H, W).
        box: [y0, y1, x0, x1, H, W] of the object (0-based, exclusive ends).
        occluder_box: (n, 6) boxes of the occluders, same convention.
        extra: more arrays (e.g. the synthetic set's ``occluded_fraction``, ``level``), stored
            after the published keys in the order given.
    """
    atomic_write_bytes(path, occluded_npz_bytes(source, mask, occluder_mask, box, occluder_box,
                                                **extra))
    return Path(path)
