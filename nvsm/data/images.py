"""Image and mask loading with errors that name the file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nvsm.data.errors import DataFormatError
from nvsm.data.record import ObjectRecord

__all__ = [
    "IMAGE_READ_ERRORS", "IMAGE_SUFFIXES", "check_image", "load_image", "load_mask", "load_masks",
]

#: What Pillow raises for a file it cannot read, truncated data and a header declaring more
#: pixels than Pillow's decompression-bomb limit included (that one is no OSError).
IMAGE_READ_ERRORS: tuple[type[Exception], ...] = (
    OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
)
#: Files taken for images when a folder is searched for them (case-insensitive suffixes):
#: ``nvsm infer`` on a folder, the synthetic generator's backgrounds folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Integer masks (e.g. Occluded PASCAL3D+'s JPEG-derived object masks, 0..255) are foreground
#: where the value exceeds this (the generator's own threshold); float/bool masks above 0.5.
INT_MASK_THRESHOLD = 10
#: Pillow's modes of integer greyscale wider than 8 bits (16-bit PNG and TIFF, 32-bit TIFF):
#: ``convert("RGB")`` clips their values to 255, so that a 16-bit photograph comes out white.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB (greyscale, CMYK, palette converted; 16-bit
    greyscale scaled to 8 bits).

    Raises:
        DataFormatError: missing or undecodable file, floating-point pixels, or integer pixels
            outside 16 bits.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "image", "an existing image file", "missing")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in (*_WIDE_GREY_MODES, "F"):
                return np.array(im.convert("RGB"), dtype=np.uint8)
            grey = np.asarray(im)
    except IMAGE_READ_ERRORS as exc:
        raise DataFormatError(path, "image", "a decodable image", f"{type(exc).__name__}: {exc}") \
            from exc
    if mode == "F":
        raise DataFormatError(path, "image", "8- or 16-bit pixels",
                              "32-bit floating-point pixels (mode F)")
    grey = grey.astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise DataFormatError(path, "image", "8- or 16-bit pixels",
                              f"values {grey.min()}..{grey.max()} (mode {mode})")
    grey8 = np.rint(grey / 257.0).astype(np.uint8)  # 65535 → 255
    return np.repeat(grey8[..., None], 3, axis=2)


def check_image(path: Path, decode: bool = False) -> tuple[int, int]:
    """Check an image without keeping it; returns its (H, W).

    Args:
        decode: fully decode (catches truncated data) instead of only parsing the header.
    Raises:
        DataFormatError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "image", "an existing image file", "missing")
    try:
        with Image.open(path) as im:
            size = (im.height, im.width)
            if decode:
                im.load()
            else:
                im.verify()
        return size
    except IMAGE_READ_ERRORS as exc:
        raise DataFormatError(path, "image", "a readable image", f"{type(exc).__name__}: {exc}") \
            from exc


def _binarise(mask: np.ndarray) -> np.ndarray:
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask > (INT_MASK_THRESHOLD if mask.max(initial=0) > 1 else 0)
    return mask > 0.5


def load_mask(path: Path, key: str = "mask") -> np.ndarray:
    """Read a mask as (H, W) bool: from an ``.npz`` (entry ``key``) or an image file.

    Raises:
        DataFormatError: missing file or key, or not a 2-D array.
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataFormatError(path, key, "an existing .npz", "missing")
        try:
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz.files:
                    raise DataFormatError(path, key, f"a '{key}' entry", f"keys {npz.files}")
                mask = np.asarray(npz[key])
        except DataFormatError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataFormatError(path, key, "a readable .npz", str(exc)) from exc
    else:
        if not path.is_file():
            raise DataFormatError(path, "mask", "an existing mask image", "missing")
        try:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("L"))
        except IMAGE_READ_ERRORS as exc:
            raise DataFormatError(path, "mask", "a decodable image", str(exc)) from exc
    if mask.ndim not in (2, 3) or mask.size == 0:
        raise DataFormatError(path, key, "an (H, W) mask", f"shape {mask.shape}")
    return _binarise(mask)


def load_masks(record: ObjectRecord) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(object mask, occluder mask) of a record as (H, W) bool arrays, None where absent.

    For ``.npz`` paths (Occluded PASCAL3D+) the entries ``mask`` and ``occluder_mask`` are read.
    """
    obj = None if record.object_mask_path is None else load_mask(record.object_mask_path, "mask")
    occ = None if record.occluder_mask_path is None else load_mask(record.occluder_mask_path,
                                                                   "occluder_mask")
    return obj, occ
