"""Cropped training/evaluation images, and the batch augmentations that keep their cameras
exact.

Crops are cut once (``build_cropset``) and stored as uint8, in memory or in a memory-mapped
temporary file (``on_disk``: only the rows a batch asks for are read, so a large unlabelled
pool never needs to fit in RAM); subsets, concatenations and mirrors are index operations
(``CropImages``) that copy no crop. Every augmentation below edits the image AND its
camera/pose together, so the pose annotation stays exact:

* horizontal flip about the crop's centre column: x → (W − 1) − x, so the principal point
  becomes (W − 1 − cx) and the pose is mirrored, (a, e, θ) → (−a, e, −θ) (``mirror_pose``);
* scale/translation jitter: crop_xy → s·crop_xy + t about the crop centre: K ← (s·f, s·c + t);
* colour jitter (kornia) and synthetic occluders, which leave the camera alone.

The pixels that show no image are returned as hidden, so that the loss treats the vertices
projected there as invisible: pasted occluders, and the zero padding, both the crop's own
(where the crop reaches past the original image: ``CropSet.image_box``) and the jitter's. The
padding is also reported on its own: it is not part of any scene, so the clutter (background)
features are not drawn from it either, while a pasted occluder is clutter.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, NamedTuple

import kornia.augmentation as KA
import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.conversions import normalize_pixel_coordinates
from rich.progress import Progress

from nvsm.config import AugmentConfig
from nvsm.data.crops import crop_object, default_crop_size, image_box_in_crop
from nvsm.data.images import load_image
from nvsm.data.record import ObjectRecord
from nvsm.pose.convention import PASCAL3D_VIEWPORT, mirror_pose


@dataclass(frozen=True)
class CropImages:
    """(N, 3, H, W) uint8 crops read by index: crop i is row ``rows[i]`` of
    ``sources[origin[i]]``, flipped left-right where ``flip[i]``.

    ``subset``, ``concat`` and ``mirrored`` change only these (N,) index vectors, never a
    source, so crops held in memory-mapped files (``build_cropset(on_disk=True)``) are read
    from disk only when indexed, and only the rows asked for: the unlabelled pool's crops are
    never all in memory, however many EM rounds train on subsets of them.

    Attributes:
        sources: (M_j, 3, H, W) uint8 tensors of one (H, W), in memory or memory-mapped.
        origin: (N,) int64 index into ``sources``.
        rows: (N,) int64 row in that source.
        flip: (N,) bool.
    """

    sources: tuple[torch.Tensor, ...]
    origin: torch.Tensor
    rows: torch.Tensor
    flip: torch.Tensor

    @staticmethod
    def of(images: torch.Tensor) -> CropImages:
        """Every row of one (N, 3, H, W) uint8 tensor, unflipped."""
        n = int(images.shape[0])
        return CropImages(
            sources=(images,),
            origin=torch.zeros(n, dtype=torch.long),
            rows=torch.arange(n),
            flip=torch.zeros(n, dtype=torch.bool),
        )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.sources[0].shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The crops at ``index`` (an int: one (3, H, W) crop; a slice, sequence or index /
        bool tensor: (B, 3, H, W)), as a new uint8 tensor in memory. Indices follow torch's
        rules (negative ones count from the end; out of range: IndexError)."""
        sel = torch.arange(len(self))[index]
        if sel.dim() == 0:
            return self[sel[None]][0]
        origin, rows, flip = self.origin[sel], self.rows[sel], self.flip[sel]
        if len(self.sources) == 1:
            out = self.sources[0][rows]
        else:
            out = torch.empty((len(sel), *self.shape[1:]), dtype=torch.uint8)
            for j, source in enumerate(self.sources):
                mask = origin == j
                if bool(mask.any()):
                    out[mask] = source[rows[mask]]
        if bool(flip.any()):
            out[flip] = out[flip].flip(-1)
        return out

    def subset(self, index: torch.Tensor) -> CropImages:
        return replace(self, origin=self.origin[index], rows=self.rows[index],
                       flip=self.flip[index])

    def mirrored(self) -> CropImages:
        return replace(self, flip=~self.flip)

    @staticmethod
    def concat(parts: Sequence[CropImages]) -> CropImages:
        """The crops of ``parts`` in turn; a source they share stays one source."""
        sources: list[torch.Tensor] = []
        origins = []
        for part in parts:
            ids = []
            for source in part.sources:
                j = next((i for i, known in enumerate(sources) if known is source), len(sources))
                if j == len(sources):
                    sources.append(source)
                ids.append(j)
            origins.append(torch.tensor(ids, dtype=torch.long)[part.origin])
        return CropImages(
            sources=tuple(sources),
            origin=torch.cat(origins),
            rows=torch.cat([p.rows for p in parts]),
            flip=torch.cat([p.flip for p in parts]),
        )


@dataclass
class CropSet:
    """N object crops with exact cameras and (possibly pseudo-) poses.

    Attributes:
        images: the (N, 3, H, W) uint8 crops (``CropImages``; index it for tensors).
        k: (N, 3, 3) float64 crop intrinsics (OpenCV).
        poses: (N, 4) float64 (azimuth, elevation, θ, distance) — labels, pseudo-labels or the
            ground truth kept for evaluation.
        weights: (N,) float32 training weight (1 for labels, the confidence for pseudo-labels).
        categories: the category of each crop.
        uids: ``ObjectRecord.uid`` of each crop.
        occlusion_levels: (N,) int64.
        reference_distance: (N,) float64 ``CropCamera.reference_distance`` (inference start).
        image_box: (N, 4) float64 (x_lo, y_lo, x_hi, y_hi), where each crop's original image
            lies in it (``image_box_in_crop``); outside it the crop is zero padding.
        normalized_focal: the crops' ``CropCamera.normalized_focal``.
    """

    images: CropImages
    k: torch.Tensor
    poses: torch.Tensor
    weights: torch.Tensor
    categories: list[str]
    uids: list[str]
    occlusion_levels: torch.Tensor
    reference_distance: torch.Tensor
    image_box: torch.Tensor
    normalized_focal: float = PASCAL3D_VIEWPORT

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int] | torch.Tensor) -> CropSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        il = idx.tolist()
        return replace(
            self,
            images=self.images.subset(idx),
            k=self.k[idx],
            poses=self.poses[idx],
            weights=self.weights[idx],
            categories=[self.categories[i] for i in il],
            uids=[self.uids[i] for i in il],
            occlusion_levels=self.occlusion_levels[idx],
            reference_distance=self.reference_distance[idx],
            image_box=self.image_box[idx],
        )

    def with_poses(self, poses: torch.Tensor, weights: torch.Tensor) -> CropSet:
        """The same crops with other poses (pseudo-labels) and weights."""
        return replace(self, poses=poses.to(torch.float64), weights=weights.float())

    def mirrored(self) -> CropSet:
        """The horizontally flipped crops with exact cameras and mirrored poses
        (``mirror_cameras``); uids are kept, so a mirror is still excluded from matching its own
        source image."""
        flip = torch.ones(len(self), dtype=torch.bool)
        k, poses, box = mirror_cameras(self.k, self.poses, self.image_box, flip,
                                       self.images.shape[-1])
        return replace(self, images=self.images.mirrored(), k=k, poses=poses, image_box=box)

    @staticmethod
    def concat(sets: Sequence[CropSet]) -> CropSet:
        if not sets:
            raise ValueError("CropSet.concat needs at least one set")
        if len({s.normalized_focal for s in sets}) != 1:
            raise ValueError("CropSet.concat: crops with different normalized_focal")
        sizes = {tuple(s.images.shape[-2:]) for s in sets}
        if len(sizes) != 1:
            raise ValueError(
                f"CropSet.concat: crops of different sizes {sorted(sizes)}; give one crop size "
                "(data.crop_size) to train several categories together"
            )
        return CropSet(
            images=CropImages.concat([s.images for s in sets]),
            k=torch.cat([s.k for s in sets]),
            poses=torch.cat([s.poses for s in sets]),
            weights=torch.cat([s.weights for s in sets]),
            categories=[c for s in sets for c in s.categories],
            uids=[u for s in sets for u in s.uids],
            occlusion_levels=torch.cat([s.occlusion_levels for s in sets]),
            normalized_focal=sets[0].normalized_focal,
            reference_distance=torch.cat([s.reference_distance for s in sets]),
            image_box=torch.cat([s.image_box for s in sets]),
        )


def crop_size_for(category: str, crop_scale: float, stride: int = 8) -> tuple[int, int]:
    """Default crop (H, W) of a category scaled by ``crop_scale``, rounded to the stride."""
    h, w = default_crop_size(category)
    return (
        max(stride, round(h * crop_scale / stride) * stride),
        max(stride, round(w * crop_scale / stride) * stride),
    )


def build_cropset(
    records: Sequence[ObjectRecord],
    protocol: str = "gt-normalized",
    crop_scale: float = 1.0,
    crop_size: tuple[int, int] | None = None,
    description: str = "cropping",
    show_progress: bool = True,
    on_disk: bool = False,
) -> CropSet:
    """Crop every record once (exact cameras) into a ``CropSet``.

    Args:
        records: objects (one category per crop size: all records must share a crop size).
        protocol: ``gt-normalized`` or ``bbox`` (see ``nvsm.pose.camera``).
        crop_scale: crops and the normalised focal are scaled by this (1 = NeMo's 3000 px).
        crop_size: (H, W); default the category's NeMo size times ``crop_scale``.
        on_disk: keep the crops in a memory-mapped anonymous temporary file (in ``TMPDIR``)
            instead of in memory: the OS pages them in as they are read and may drop them
            again. The file has no name to leave behind (on POSIX it is unlinked at once) and
            is gone when the last view of it is.
    """
    if not records:
        raise ValueError("build_cropset: no records")
    normalized_focal = PASCAL3D_VIEWPORT * crop_scale
    sizes = {crop_size or crop_size_for(r.category, crop_scale) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"build_cropset: records need one crop size, got {sorted(sizes)}")
    size = sizes.pop()
    images = crop_storage(len(records), size, on_disk)
    ks, ref, boxes = [], [], []
    cache: dict[str, np.ndarray] = {}
    # A bar that stops on leaving the block, an unreadable image included (``track``'s went on
    # redrawing over the error message).
    with Progress(*Progress.get_default_columns(), disable=not show_progress) as progress:
        for i, rec in enumerate(progress.track(records, description=description)):
            key = str(rec.image_path)
            if key not in cache:
                cache = {key: load_image(rec.image_path)}  # objects of one image are adjacent
            crop, cam = crop_object(cache[key], rec, protocol, size,
                                    normalized_focal=normalized_focal)
            images[i] = (crop * 255).round().to(torch.uint8)
            ks.append(torch.as_tensor(cam.k))
            ref.append(cam.reference_distance())
            boxes.append(image_box_in_crop(cam, cache[key].shape[:2]))
    return CropSet(
        images=CropImages.of(images),
        k=torch.stack(ks).double(),
        poses=torch.tensor([r.pose for r in records], dtype=torch.float64),
        weights=torch.ones(len(records)),
        categories=[r.category for r in records],
        uids=[r.uid for r in records],
        occlusion_levels=torch.tensor([r.occlusion_level for r in records], dtype=torch.long),
        normalized_focal=normalized_focal,
        reference_distance=torch.tensor(ref, dtype=torch.float64),
        image_box=torch.as_tensor(np.stack(boxes)),
    )


def crop_storage(n: int, size: tuple[int, int], on_disk: bool) -> torch.Tensor:
    """An uninitialised (n, 3, H, W) uint8 tensor for crops: in memory, or (``on_disk``) in a
    memory-mapped anonymous file in ``TMPDIR`` (``mapped_empty``)."""
    shape = (n, 3, *size)
    if not on_disk:
        return torch.empty(shape, dtype=torch.uint8)
    return mapped_empty(shape, np.dtype(np.uint8), None, f"{n} crops")


def mapped_empty(
    shape: tuple[int, ...], dtype: np.dtype, folder: Path | None, what: str
) -> torch.Tensor:
    """An uninitialised tensor viewing a memory-mapped anonymous temporary file in ``folder``
    (default: ``TMPDIR``). The OS pages it in as it is read and may drop it again; the file has
    no name to leave behind (on POSIX it is unlinked at once) and is gone with the last view.

    Raises:
        ValueError: the folder has no room for it (naming ``what``, the folder and the size).
    """
    if math.prod(shape) == 0:  # an empty file cannot be mapped, and holds nothing anyway
        return torch.from_numpy(np.empty(shape, dtype=dtype))
    where = f"the temporary folder {tempfile.gettempdir()}" if folder is None else str(folder)
    nbytes = math.prod(shape) * dtype.itemsize
    with tempfile.TemporaryFile(dir=folder) as file:  # the map keeps its own handle of it
        # Reserved now: a sparse file that cannot grow fails later, as a SIGBUS on writing
        # into the map, which kills the process without a word.
        try:
            reserve_file(file, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            advice = ("set TMPDIR to a folder with more free space" if folder is None
                      else "free some space there")
            raise ValueError(f"no room for {what} ({nbytes / 1e6:.1f} MB) in {where}: "
                             f"{exc.strerror}; {advice}") from None
        return torch.from_numpy(np.memmap(file, dtype=dtype, mode="w+", shape=shape))


def reserve_file(file: IO[bytes], nbytes: int) -> None:
    """Give ``file`` ``nbytes`` of allocated disk blocks: ``posix_fallocate`` where the OS has
    it (Linux, the BSDs), zeros written in 16 MiB chunks elsewhere (macOS, Windows), so that
    either way a full disk raises OSError here rather than later inside a memory map."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(file.fileno(), 0, nbytes)
        return
    chunk = bytes(min(nbytes, 16 << 20))
    file.seek(0)
    for start in range(0, nbytes, len(chunk)):
        file.write(memoryview(chunk)[: nbytes - start])
    file.flush()


def flip_batch(
    images: torch.Tensor,
    k: torch.Tensor,
    poses: torch.Tensor,
    image_box: torch.Tensor,
    flip: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip the selected images horizontally with exact camera, mirrored pose and image box.

    Args:
        images: (B, C, H, W); k: (B, 3, 3); poses: (B, 4); image_box: (B, 4) (``CropSet``);
        flip: (B,) bool.
    """
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    k, poses, image_box = mirror_cameras(k, poses, image_box, flip, images.shape[-1])
    return images, k, poses, image_box


def mirror_cameras(
    k: torch.Tensor, poses: torch.Tensor, image_box: torch.Tensor, flip: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The intrinsics, poses and image boxes of the selected crops flipped horizontally
    (``flip_batch`` without the images): x → (W − 1) − x, so cx → (W − 1) − cx and the box's
    x_lo, x_hi → (W − 1) − x_hi, (W − 1) − x_lo; (a, e, θ) → (−a, e, −θ).

    Args:
        k: (B, 3, 3); poses: (B, 4); image_box: (B, 4); flip: (B,) bool; width: the crops' W.
    """
    k = k.clone()
    k[:, 0, 2] = torch.where(flip, (width - 1) - k[:, 0, 2], k[:, 0, 2])
    a, e, t = mirror_pose(poses[:, 0], poses[:, 1], poses[:, 2])
    mirrored = torch.stack([a, e, t, poses[:, 3]], dim=1)
    x_lo, y_lo, x_hi, y_hi = image_box.unbind(1)
    box = torch.stack([(width - 1) - x_hi, y_lo, (width - 1) - x_lo, y_hi], dim=1)
    return (
        k,
        torch.where(flip[:, None], mirrored, poses),
        torch.where(flip[:, None], box, image_box),
    )


#: Slack when rounding an image box to pixel centres: the box is computed, so a side that the
#: image fills exactly may land a hair inside the outermost centre.
_BOX_SLACK = 1e-6


def reads_outside(
    src: torch.Tensor, image_box: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """(B, H, W) bool: the sample points ``src`` (B, H, W, 2) (x, y crop pixels) whose bilinear
    read touches a crop pixel that is not image: off the crop, or outside ``image_box`` (B, 4)
    rounded inwards to pixel centres."""
    h, w = size
    box = image_box.to(src.dtype)
    lo = torch.ceil(box[:, :2] - _BOX_SLACK).clamp(min=0)
    hi = torch.minimum(
        torch.floor(box[:, 2:] + _BOX_SLACK), torch.tensor([w - 1, h - 1], dtype=src.dtype)
    )
    return ((src < lo[:, None, None]) | (src > hi[:, None, None])).any(-1)


def _pixel_grid(h: int, w: int) -> torch.Tensor:
    """(1, H, W, 2) float64 (x, y) pixel centres."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([xs, ys], -1)[None]


def outside_image(image_box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool: the pixels of crops of ``size`` (H, W) that are (at least in part) zero
    padding, outside their ``image_box`` (B, 4) (``CropSet.image_box``)."""
    return reads_outside(_pixel_grid(*size), image_box.cpu(), size)


def hidden_cells(hidden: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H/s, W/s) bool: the stride-``stride`` feature cells with any hidden pixel of
    ``hidden`` (B, H, W) bool; a vertex projected into such a cell is not trained as seen."""
    return F.max_pool2d(hidden[:, None].float(), stride)[:, 0] > 0.5


def affine_jitter(
    images: torch.Tensor,
    k: torch.Tensor,
    image_box: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zoom by ``scale`` (B,) about the crop centre and shift by ``shift`` (B, 2) pixels:
    new_xy = s·(xy − c0) + c0 + t, with the intrinsics changed the same way (exact).

    Returns the images, the intrinsics and the (B, H, W) bool mask of the pixels read (at
    least in part) from outside the crop or from outside its ``image_box`` (B, 4), which are
    padding (zeros), not image."""
    _b, _, h, w = images.shape
    c0 = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=k.dtype, device=k.device)
    s = scale.to(k.dtype)
    t = shift.to(k.dtype)
    k = k.clone()
    k[:, 0, 0] = k[:, 0, 0] * s
    k[:, 1, 1] = k[:, 1, 1] * s
    k[:, :2, 2] = s[:, None] * (k[:, :2, 2] - c0) + c0 + t
    # Sampling grid: output pixel p reads input pixel (p − c0 − t)/s + c0.
    pix = _pixel_grid(h, w)
    src = (pix - c0.cpu() - t.cpu()[:, None, None]) / s.cpu()[:, None, None, None] + c0.cpu()
    grid = normalize_pixel_coordinates(src, h, w)
    out = F.grid_sample(
        images, grid.to(images), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    padded = reads_outside(src, image_box.cpu(), (h, w))
    return out, k, padded.to(images.device)


class AugmentedBatch(NamedTuple):
    """One augmented batch: images (B, 3, H, W) float in [0, 1], intrinsics k (B, 3, 3), poses
    (B, 4), and two (B, H, W) bool masks of the pixels that show none of the object's image:
    ``padding`` (zeros from outside the crop or its ``image_box``) and ``occluded`` (pasted
    occluders)."""

    images: torch.Tensor
    k: torch.Tensor
    poses: torch.Tensor
    padding: torch.Tensor
    occluded: torch.Tensor

    @property
    def hidden(self) -> torch.Tensor:
        """(B, H, W) bool: padding or occluder, the pixels where no vertex is seen."""
        return self.padding | self.occluded


class BatchAugmenter:
    """Applies ``AugmentConfig`` to float image batches in [0, 1] with exact camera updates."""

    def __init__(self, config: AugmentConfig, seed: int = 0) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        c = config.color_jitter
        self.color = KA.ColorJitter(c, c, c, min(0.1, c / 3), p=1.0) if c > 0 else None

    def __call__(
        self, images: torch.Tensor, k: torch.Tensor, poses: torch.Tensor, image_box: torch.Tensor
    ) -> AugmentedBatch:
        """images (B, 3, H, W) float, image_box (B, 4) (``CropSet.image_box``)."""
        cfg, g = self.config, self.generator
        b, _, h, w = images.shape
        if cfg.flip:
            images, k, poses, image_box = flip_batch(
                images, k, poses, image_box, torch.rand(b, generator=g) < 0.5
            )
        # Padding hides the object as an occluder does: vertices projected onto it would be
        # sampled from its zeros and trained into the bank as visible.
        if cfg.scale_jitter > 0 or cfg.translate_jitter > 0:
            scale = 1 + (torch.rand(b, generator=g) * 2 - 1) * cfg.scale_jitter
            shift = (torch.rand(b, 2, generator=g) * 2 - 1) * cfg.translate_jitter
            shift = shift * torch.tensor([w, h], dtype=shift.dtype)
            images, k, padding = affine_jitter(images, k, image_box, scale, shift)
        else:
            padding = outside_image(image_box, (h, w)).to(images.device)
        if self.color is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            images = self.color(images).clamp(0, 1)
        occluded = torch.zeros_like(padding)
        if cfg.occluders > 0:
            images, pasted = paste_occluders(images, cfg.occluders, g)
            occluded = pasted.to(padding.device)
        return AugmentedBatch(images, k, poses, padding, occluded)


def paste_occluders(
    images: torch.Tensor, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one rectangle cut from another image of the batch onto each selected image
    (covering 5–25 % of the crop); returns the images and the (B, H, W) occluder masks."""
    b, _, h, w = images.shape
    out = images.clone()
    occluded = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        if float(torch.rand(1, generator=generator)) >= probability or b < 2:
            continue
        area = float(torch.empty(1).uniform_(0.05, 0.25, generator=generator)) * h * w
        aspect = math.exp(float(torch.empty(1).uniform_(-0.7, 0.7, generator=generator)))
        ph = min(h, max(4, int(math.sqrt(area / aspect))))
        pw = min(w, max(4, int(math.sqrt(area * aspect))))
        y0 = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
        donor = (i + 1 + int(torch.randint(0, b - 1, (1,), generator=generator))) % b
        sy = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
        sx = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
        out[i, :, y0 : y0 + ph, x0 : x0 + pw] = images[donor, :, sy : sy + ph, sx : sx + pw]
        occluded[i, y0 : y0 + ph, x0 : x0 + pw] = True
    return out, occluded
