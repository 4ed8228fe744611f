"""A small synthetic pose dataset in the PASCAL3D+ release-1.1 layout, rendered locally.

``generate_synthetic_dataset`` renders procedural CAD models (``nvsm.data.shapes``: car,
aeroplane and chair, five or six sub-types each) with nvsm's rasteriser over real photographs,
and writes::

    <out>/
      Images/<cat>_imagenet/<id>.JPEG            RGB, JPEG quality 92
      Annotations/<cat>_imagenet/<id>.mat        MATLAB struct `record` (PASCAL3D+ fields)
      Masks/<cat>_imagenet/<id>.png              object mask, 8-bit grey, 255 = object
      CAD/<cat>/<NN>.off                         one OFF per sub-type, NN = cad_index (01, 02..)
      Image_sets/<cat>_imagenet_{train,val}.txt  ids, one per line
      OccludedPASCAL3D/                          occluded copies of the val images
        images/<cat>FGL<k>_BGL<k>/<id>.JPEG
        annotations/<cat>FGL<k>_BGL<k>/<id>.npz  source, mask, occluder_mask, box, occluder_box
        lists/<cat>FGL<k>_BGL<k>.txt             image file names (<id>.JPEG), one per line
      synthetic_manifest.json                    counts, seed, size, generator version

Conventions (exactly those of the PASCAL3D+ files; see ``nvsm.pose.convention``):

* ``record`` fields: ``filename``, ``folder``, ``database``, ``imgsize`` [W H 3], ``size``
  {width, height, depth}, ``segmented`` (0) and ``objects`` (1×N struct array; one object per
  image here) with ``class``, ``bbox``, ``truncated``, ``occluded`` (0: nothing covers it),
  ``difficult`` (0), ``cad_index`` (1-based), ``subtype`` (the sub-type's name; extra field) and
  ``viewpoint`` {azimuth, elevation, theta (DEGREES), distance, focal = 1, px, py,
  viewport = 3000, azimuth_coarse, elevation_coarse (the angles rounded to 15°)}.
* MATLAB pixels: ``bbox`` [x1 y1 x2 y2] is 1-based and inclusive (the first and last object
  pixel columns/rows, + 1) and ``px``, ``py`` are 1-based as well (0-based OpenCV value + 1), so
  nvsm's readers subtract 1 from both.
* The object mask is the set of pixel centres covered by the CAD model projected at the annotated
  pose (nvsm's rasteriser), so the box is the mask's tight box. Objects are placed wholly inside
  the image (``truncated`` is computed from the projected vertices and is 0 by construction).
* CAD frame (``nvsm.data.shapes``): z up, bounding box centred at the origin, longest side 1, the
  object's front towards −y, mirror-symmetric about x = 0. Azimuth 0 therefore shows the FRONT
  of every object (camera at −y), 90° its +x side, 180° its back.
* Occluded PASCAL3D+ ``.npz``: ``source`` (the PASCAL3D+ id), ``mask`` (object mask, uint8
  0/255), ``occluder_mask`` (bool), ``box`` [y0, y1, x0, x1, H, W] of the object and
  ``occluder_box`` (n, 6) of each occluder, 0-based with exclusive ends (``mask[y0:y1, x0:x1]``),
  plus ``occluded_fraction`` and ``level``. Level k ∈ {1, 2, 3} covers 20–40 %, 40–60 %,
  60–80 % of the object mask (checked for every image).
* Ids: ``<synset>_1NNNNN`` (train) and ``<synset>_2NNNNN`` (val), with the WordNet synsets
  ImageNet uses (car n02958343, aeroplane n02691156, chair n03001627).

Determinism: every image draws from its own ``numpy.random.Generator(PCG64)`` seeded by
``SeedSequence(seed, spawn_key=(category, split, index, purpose))``, so a fixed seed gives
byte-identical files (JPEG quality and subsampling are explicit; the ``.mat`` and ``.npz`` files
come from ``nvsm.data.writers``, whose headers and zip entries carry fixed text and timestamps)
whatever the number of workers, and a category's
images do not depend on which other categories are generated. Every file is written atomically;
the manifest is written last, so a dataset with a manifest is complete.
"""

from __future__ import annotations

import glob
import io
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer
from PIL import Image
from rich.console import Console
from scipy.ndimage import gaussian_filter

from nvsm.data.matlab import MATLAB_PIXEL_OFFSET
from nvsm.data.occluded import OCCLUDED_SUBFOLDER
from nvsm.data.shapes import CATEGORY_BUILDERS, SubType, category_subtypes
from nvsm.data.synth_render import (
    BackgroundBank,
    RenderMesh,
    ViewPose,
    occlude,
    project_points,
    rasterize,
    sample_colours,
    sample_lighting,
    shade,
)
from nvsm.data.writers import occluded_npz_bytes, pascal3d_record_bytes
from nvsm.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    move_entries,
    staging_folder,
)
from nvsm.mesh import write_off
from nvsm.pose.convention import PASCAL3D_VIEWPORT
from nvsm.runtime import path_option

if sys.platform != "win32":
    import fcntl

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_SIZE",
    "MATLAB_PIXEL_OFFSET",
    "OCCLUSION_LEVELS",
    "SIZE_PRESETS",
    "SYNSETS",
    "SynthSummary",
    "generate_synthetic_dataset",
    "render_view",
    "synth_command",
]

GENERATOR_VERSION = "1.0.0"
#: (H, W) of every generated image.
IMAGE_SIZE: tuple[int, int] = (360, 480)
JPEG_QUALITY = 92
#: WordNet synsets used as id prefixes (as in PASCAL3D+'s ImageNet subset).
SYNSETS: dict[str, str] = {"car": "n02958343", "aeroplane": "n02691156", "chair": "n03001627"}
#: Occlusion level k → range of the occluded fraction of the object mask.
OCCLUSION_LEVELS: dict[int, tuple[float, float]] = {1: (0.2, 0.4), 2: (0.4, 0.6), 3: (0.6, 0.8)}
SynthSize = Literal["tiny", "default"]
#: Named sizes (``SynthSize``): category → (train images, val images).
SIZE_PRESETS: dict[SynthSize, dict[str, tuple[int, int]]] = {
    "tiny": {"car": (6, 4), "aeroplane": (2, 1), "chair": (2, 1)},
    "default": {"car": (400, 150), "aeroplane": (150, 60), "chair": (150, 60)},
}
SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class _PoseSampling:
    """Per-category pose distribution (degrees) and image fill range."""

    elevation_mean: float
    elevation_std: float
    elevation_clip: tuple[float, float]
    theta_std: float = 5.0
    theta_clip: float = 15.0
    fill: tuple[float, float] = (0.45, 0.9)


_POSES: dict[str, _PoseSampling] = {
    "car": _PoseSampling(8.0, 9.0, (-10.0, 40.0)),
    "aeroplane": _PoseSampling(8.0, 14.0, (-25.0, 50.0)),
    "chair": _PoseSampling(15.0, 10.0, (-10.0, 45.0)),
}


@dataclass
class SynthSummary:
    """What ``generate_synthetic_dataset`` wrote.

    Attributes:
        out: dataset root.
        seed: the seed.
        size: preset name or ``"custom"``.
        counts: category → {"train": n, "val": n}.
        occluded: category → {level k: n images}.
        cad_models: category → number of CAD models.
        seconds: wall-clock time of the generation.
        files: number of files written.
    """

    out: Path
    seed: int
    size: str
    counts: dict[str, dict[str, int]]
    occluded: dict[str, dict[int, int]]
    cad_models: dict[str, int]
    seconds: float = 0.0
    files: int = 0
    manifest: Path = field(default_factory=Path)


# ----------------------------------------------------------------------------- image encoders
def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY,
                                       subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- sampling
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _sample_pose(
    vertices: np.ndarray, sampling: _PoseSampling, image_size: tuple[int, int],
    rng: np.random.Generator, margin: float = 2.0,
) -> ViewPose:
    """Random PASCAL3D+-like pose with the object wholly inside the image."""
    h, w = image_size
    az = rng.uniform(0.0, 2 * math.pi)
    el = math.radians(float(np.clip(rng.normal(sampling.elevation_mean, sampling.elevation_std),
                                    *sampling.elevation_clip)))
    th = math.radians(float(np.clip(rng.normal(0.0, sampling.theta_std),
                                    -sampling.theta_clip, sampling.theta_clip)))
    fill = rng.uniform(*sampling.fill)

    def extent(d: float) -> np.ndarray:
        pix, _ = project_points(vertices, ViewPose(az, el, th, d, 0.0, 0.0))
        return np.concatenate([pix.min(0), pix.max(0)])  # x0, y0, x1, y1 around (0, 0)

    d_ref = 10.0
    x0, y0, x1, y1 = extent(d_ref)
    distance = d_ref * max((x1 - x0) / w, (y1 - y0) / h) / fill
    for _ in range(50):
        x0, y0, x1, y1 = extent(distance)
        px_lo, px_hi = margin - x0, w - 1 - margin - x1
        py_lo, py_hi = margin - y0, h - 1 - margin - y1
        if px_lo <= px_hi and py_lo <= py_hi:
            return ViewPose(az, el, th, distance, rng.uniform(px_lo, px_hi),
                            rng.uniform(py_lo, py_hi))
        distance *= 1.1
    raise RuntimeError("could not place the object inside the image")


# ----------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _Post:
    """Global photometric changes shared by an image and its occluded copies."""

    gain: np.ndarray
    gamma: float
    blur: float
    noise: np.ndarray


def _sample_post(rng: np.random.Generator, size: tuple[int, int]) -> _Post:
    gain = rng.uniform(0.85, 1.15) * (1.0 + rng.normal(0.0, 0.03, 3))
    blur = rng.uniform(0.3, 0.9) if rng.uniform() < 0.5 else 0.0
    noise = rng.standard_normal((*size, 3), dtype=np.float32) * np.float32(rng.uniform(0.0, 0.02))
    return _Post(gain.astype(np.float32), float(rng.uniform(0.9, 1.1)), float(blur), noise)


def _finish(image: np.ndarray, post: _Post) -> np.ndarray:
    img = np.clip(image * post.gain[None, None], 0.0, 1.0) ** post.gamma
    if post.blur > 0:
        img = gaussian_filter(img, sigma=(post.blur, post.blur, 0.0))
    img = img + post.noise
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_view(
    mesh: RenderMesh,
    pose: ViewPose,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    bank: BackgroundBank,
    rasterizer: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one object over a random background.

    Returns:
        (composite image (H, W, 3) float32 in [0, 1] before the global photometric changes,
        object mask (H, W) bool).
    """
    pix = rasterize(mesh, pose, image_size, rasterizer)
    mask = pix >= 0
    albedo, spec, emit = sample_colours(mesh.role_names, rng)
    obj = shade(mesh, pix, pose, albedo, spec, emit, sample_lighting(rng))
    background = bank.sample(rng, image_size)
    # Soften the silhouette on its inner side only (no dark halo outside the object).
    alpha = np.where(mask, gaussian_filter(mask.astype(np.float32), 0.6), 0.0)[..., None]
    return background * (1.0 - alpha) + np.clip(obj, 0.0, 1.0) * alpha, mask


def _box_rows(mask: np.ndarray) -> list[int]:
    """[y0, y1, x0, x1, H, W], 0-based, exclusive ends."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return [int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1, h, w]


@dataclass(frozen=True)
class _Task:
    seed: int
    category: str
    cat_code: int
    split: int  # 0 train, 1 val
    index: int
    image_id: str
    image_size: tuple[int, int]
    occlusion: bool


class _Worker:
    """Per-process state: CAD models, backgrounds and the rasteriser."""

    def __init__(self, backgrounds: Path | None, use_skimage: bool) -> None:
        from nvsm.render import default_rasterizer

        self.bank = BackgroundBank.default(backgrounds, use_skimage=use_skimage)
        self.rasterizer = default_rasterizer("cpu")
        self.meshes: dict[str, list[tuple[SubType, RenderMesh]]] = {}

    def subtypes(self, category: str) -> list[tuple[SubType, RenderMesh]]:
        if category not in self.meshes:
            self.meshes[category] = [(s, RenderMesh.from_part_mesh(s.part_mesh))
                                     for s in category_subtypes(category)]
        return self.meshes[category]

    def run(self, task: _Task) -> dict[str, bytes]:
        """All files of one image: relative path → bytes."""
        key = (task.cat_code, task.split, task.index)
        rng = _rng(task.seed, *key, 0)
        subtypes = self.subtypes(task.category)
        sub, mesh = subtypes[int(rng.integers(len(subtypes)))]
        sampling = _POSES[task.category]
        for _ in range(20):
            pose = _sample_pose(sub.part_mesh.vertices, sampling, task.image_size, rng)
            clean, mask = render_view(mesh, pose, task.image_size, rng, self.bank,
                                      self.rasterizer)
            if mask.sum() >= 64:
                break
        else:  # pragma: no cover - the fill range makes tiny objects impossible
            raise RuntimeError(f"{task.image_id}: object mask stays empty")
        post = _sample_post(_rng(task.seed, *key, 1), task.image_size)
        h, w = task.image_size
        pix, _ = project_points(sub.part_mesh.vertices, pose)
        truncated = bool((pix < -0.5).any() or (pix[:, 0] > w - 0.5).any()
                         or (pix[:, 1] > h - 0.5).any())
        ys, xs = np.nonzero(mask)
        o = MATLAB_PIXEL_OFFSET
        az, el, th = (math.degrees(v) for v in (pose.azimuth, pose.elevation, pose.theta))
        viewpoint = {
            "azimuth": az, "elevation": el, "theta": th, "distance": pose.distance,
            "focal": 1.0, "px": pose.px + o, "py": pose.py + o, "viewport": PASCAL3D_VIEWPORT,
            "azimuth_coarse": float(round(az / 15.0) * 15 % 360),
            "elevation_coarse": float(round(el / 15.0) * 15),
        }
        obj = {
            "class": task.category,
            "bbox": np.array([xs.min() + o, ys.min() + o, xs.max() + o, ys.max() + o],
                             dtype=np.float64),
            "truncated": float(truncated), "occluded": 0.0, "difficult": 0.0,
            "cad_index": float(sub.cad_index), "subtype": sub.name, "viewpoint": viewpoint,
        }
        folder = f"{task.category}_imagenet"
        record = pascal3d_record_bytes(
            f"{task.image_id}.JPEG", [obj], imgsize=(w, h, 3), folder=folder,
            database="nvsm-synthetic", size={"width": float(w), "height": float(h), "depth": 3.0},
            segmented=0.0)
        files = {
            f"Images/{folder}/{task.image_id}.JPEG": _jpeg(_finish(clean, post)),
            f"Annotations/{folder}/{task.image_id}.mat": record,
            f"Masks/{folder}/{task.image_id}.png": _png(mask),
        }
        if task.occlusion:
            mask_u8 = np.where(mask, 255, 0).astype(np.uint8)
            for level, frange in OCCLUSION_LEVELS.items():
                res = occlude(clean, mask, frange, _rng(task.seed, *key, 10 + level), self.bank)
                name = f"{task.category}FGL{level}_BGL{level}"
                occ_boxes = [_box_rows(res.occluder_mask & lab) for lab in
                             _components(res.occluder_mask)]
                files[f"{OCCLUDED_SUBFOLDER}/images/{name}/{task.image_id}.JPEG"] = _jpeg(
                    _finish(res.image, post))
                files[f"{OCCLUDED_SUBFOLDER}/annotations/{name}/{task.image_id}.npz"] = (
                    occluded_npz_bytes(
                        task.image_id, mask_u8, res.occluder_mask.astype(bool), _box_rows(mask),
                        np.array(occ_boxes, dtype=np.int64),
                        occluded_fraction=np.array(res.fraction, dtype=np.float64),
                        level=np.array(level, dtype=np.int64)))
        return files


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-connected) of a bool mask, in label order."""
    from scipy.ndimage import label

    labels, n = label(mask, structure=np.ones((3, 3), dtype=bool))
    return [labels == i for i in range(1, n + 1)]


_WORKER: _Worker | None = None


def _init_worker(backgrounds: Path | None, use_skimage: bool) -> None:
    import torch

    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Worker(backgrounds, use_skimage)


def _run_task(task: _Task) -> dict[str, bytes]:
    assert _WORKER is not None
    return _WORKER.run(task)


# ----------------------------------------------------------------------------- the generator
#: Most images of one category and split (a million renders take days on a laptop).
MAX_IMAGES = 1_000_000


def _resolve_counts(
    size: str | Mapping[str, tuple[int, int]], categories: Sequence[str]
) -> tuple[str, dict[str, tuple[int, int]]]:
    name: str
    if isinstance(size, str):
        if size not in SIZE_PRESETS:
            raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZE_PRESETS)} "
                             "or a mapping category -> (train, val)")
        preset, name = SIZE_PRESETS[size], size
    else:
        preset, name = dict(size), "custom"
    counts: dict[str, tuple[int, int]] = {}
    for cat in categories:
        if cat not in CATEGORY_BUILDERS:
            raise ValueError(f"no procedural models for category {cat!r}; expected one of "
                             f"{', '.join(CATEGORY_BUILDERS)}")
        if cat not in preset:
            raise ValueError(f"size {name!r} gives no (train, val) counts for {cat!r}")
        n_train, n_val = (int(v) for v in preset[cat])
        # The task list is built before rendering: an absurd count filled the memory first.
        if not (0 <= n_train <= MAX_IMAGES and 0 <= n_val <= MAX_IMAGES) or n_train + n_val == 0:
            raise ValueError(f"{cat}: counts must be in [0, {MAX_IMAGES}] and not both 0, got "
                             f"{preset[cat]}")
        counts[cat] = (n_train, n_val)
    return name, counts


def _image_id(category: str, split: int, index: int) -> str:
    return f"{SYNSETS[category]}_{split + 1}{index + 1:05d}"


_OWNED = ("Images", "Annotations", "Masks", "CAD", "Image_sets", OCCLUDED_SUBFOLDER)
MANIFEST_NAME = "synthetic_manifest.json"


#: The file in a generation's staging folder (``staging_folder``: ``.partial-*`` inside
#: ``out``, ``.<out name>.partial-*`` beside it) that the generation holds an exclusive
#: ``flock`` on while it runs. The lock goes with the process, ``kill -9`` included, so a
#: staging folder whose lock no one holds is a killed run's leftover.
OWNER_LOCK = "owner.lock"

StagingState = Literal["dead", "live", "unknown"]


@contextmanager
def _owning(staging: Path) -> Iterator[None]:
    """Hold the ``OWNER_LOCK`` of ``staging`` within. The file takes its name only once locked,
    so that no other run ever sees it unlocked while this one lives. Without flock (Windows,
    or a file system that refuses it) the folder is left unmarked: ``unknown`` to others."""
    if sys.platform == "win32":
        yield
        return
    claim = staging / f"{OWNER_LOCK}.new"
    with open(claim, "w") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            claim.rename(staging / OWNER_LOCK)
        except OSError:  # no locks here: a later run names this folder rather than removes it
            pass
        yield


def _staging_state(folder: Path) -> StagingState:
    """``dead``: ``folder`` is the staging folder of a generation that was killed (its lock is
    free); ``live``: of one running now; ``unknown``: no lock to tell by (another nvsm command
    or version, a run killed before it took its lock, or no flock here)."""
    if sys.platform == "win32":
        return "unknown"
    try:
        fd = os.open(folder / OWNER_LOCK, os.O_RDWR)
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "live"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)
    return "dead"


def _staging_folders(out: Path) -> list[Path]:
    """The folders named as ``staging_folder(out)`` names them, inside ``out`` and beside it."""
    inside = sorted(out.glob(".partial-*")) if out.is_dir() else []
    beside = (sorted(out.parent.glob(f"{glob.escape('.' + out.name)}.partial-*"))
              if out.parent.is_dir() else [])
    return [p for p in inside + beside if p.is_dir()]


def _remove_killed_runs(out: Path) -> None:
    """Remove the staging folders that generations into ``out`` killed by a signal no one can
    catch (``kill -9``, the OOM killer, a power cut) left: hidden from ``ls``, the one inside
    ``out`` made every later run refuse ``out`` as not empty, and the one beside it held a
    whole partial dataset. Only the folders whose ``OWNER_LOCK`` no one holds are removed."""
    for folder in _staging_folders(out):
        if _staging_state(folder) == "dead":
            shutil.rmtree(folder, ignore_errors=True)


def _staging_note(folders: list[Path], out: Path) -> str:
    """What the hidden staging folders ``folders`` in ``out`` are, and what to do with them."""
    notes = []
    for folder in folders:
        if _staging_state(folder) == "live":
            notes.append(f"{folder}, the hidden staging folder of a generation into {out} "
                         "running now: wait for it to end or choose another --out")
        else:
            notes.append(f"{folder}, the hidden staging folder of an nvsm command that was "
                         "interrupted or is running now: delete it (unless an nvsm command is "
                         f"writing into {out}) and run again")
    return "; ".join(notes)


def _check_out(out: Path, overwrite: bool) -> None:
    """Raise unless ``out`` can take the dataset: missing or empty, or, with ``overwrite``, an
    earlier synthetic dataset. Hidden staging folders (``ls`` does not show them) that make it
    not empty are named in the error, with what to do. Touches nothing."""
    check_output_folder(out)  # ValueError: out, or a folder above it, is a file
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    staging = [p for p in _staging_folders(out) if p.parent == out]
    if len(staging) == len(entries):  # --overwrite would not help: there is no dataset
        raise FileExistsError(f"{out} is not empty: it holds {_staging_note(staging, out)}")
    note = f" (it also holds {_staging_note(staging, out)})" if staging else ""
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite (overwrite=True in "
                              f"Python) to replace a synthetic dataset there{note}")
    if not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out} is not empty and holds no {MANIFEST_NAME}: refusing to "
                              f"overwrite a folder nvsm did not generate{note}")


def _move_into_place(build: Path, out: Path, overwrite: bool) -> None:
    """Move the complete dataset in ``build`` (made by ``staging_folder(out)``) to ``out`` by
    renames.

    A missing ``out`` is ``build`` renamed. Into an existing one (a mount point, perhaps) the
    entries move one by one; with ``overwrite`` an earlier dataset's own folders are replaced,
    its manifest going first and the new one coming last, so that ``out`` holds a manifest
    only when its dataset is whole. Without it, ``out`` must still hold nothing but the
    staging folder (a concurrent run may have filled it: FileExistsError)."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build.rename(out)
        return
    if not overwrite and any(entry != build.parent for entry in out.iterdir()):
        raise FileExistsError(f"{out} was filled while this dataset was generated")
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for name in _OWNED:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    move_entries(build, out, last=MANIFEST_NAME)


def generate_synthetic_dataset(
    out: Path,
    size: str | Mapping[str, tuple[int, int]] = "default",
    seed: int = 0,
    backgrounds: Path | None = None,
    categories: Sequence[str] = ("car", "aeroplane", "chair"),
    *,
    image_size: tuple[int, int] = IMAGE_SIZE,
    occlusion: bool = True,
    workers: int = 1,
    overwrite: bool = False,
    use_skimage_backgrounds: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Render a synthetic pose dataset in the PASCAL3D+ layout (see the module docstring).

    Args:
        out: dataset root (created; must be empty unless ``overwrite``). The hidden staging
            folders that earlier generations into ``out`` killed by ``kill -9`` (or a crash)
            left, inside or beside it, are removed first; another one there (a generation
            running now, or an nvsm run that left no mark of its own) is named in the error.
        size: ``"tiny"`` (a few images per category, seconds), ``"default"`` (car 400/150,
            aeroplane and chair 150/60 train/val) or a mapping category → (train, val).
        seed: seed of every random choice; equal seeds give byte-identical files.
        backgrounds: optional folder of extra background photos (searched recursively).
        categories: any of ``"car"``, ``"aeroplane"``, ``"chair"``.
        image_size: (H, W) of the images.
        occlusion: also write the ``OccludedPASCAL3D`` levels 1–3 built from the val images.
        workers: processes rendering in parallel (``render_processes``: at most the CPUs, and
            this process alone for fewer than 64 images); the output is identical whatever
            the number.
        overwrite: replace an earlier synthetic dataset in ``out`` (only folders it owns).
        use_skimage_backgrounds: include scikit-image's shipped photos.
        progress: called as ``progress(0, total)`` when rendering starts (every option has
            been checked by then) and ``progress(done, total)`` after each image.
    Returns:
        ``SynthSummary``.
    Raises:
        ValueError: unknown size or category, bad counts.
        FileExistsError: ``out`` is not empty (and not an earlier synthetic dataset with
            ``overwrite``), naming the hidden staging folders that it holds.
    """
    start = time.perf_counter()
    out = Path(out)
    categories = tuple(dict.fromkeys(categories))
    size_name, counts = _resolve_counts(size, categories)
    if seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers: expected an integer >= 1, got {workers}")
    _remove_killed_runs(out)
    _check_out(out, overwrite)
    # Every option is checked before anything is written; the photos here, not mid-render.
    bank_names = BackgroundBank.default(backgrounds, use_skimage_backgrounds, check=True).names
    # Rendered into a hidden staging folder and moved into place when complete: a failure or
    # an interruption leaves ``out`` as it was (an earlier dataset there included).
    with staging_folder(out) as staging, _owning(staging):
        build = staging / "out"
        n_files = _render_dataset(build, seed, backgrounds, categories, counts, image_size,
                                  occlusion, workers, use_skimage_backgrounds, progress)
        occluded = {c: ({k: counts[c][1] for k in OCCLUSION_LEVELS} if occlusion else {})
                    for c in categories}
        manifest = _manifest(seed, size_name, image_size, categories, counts, occluded,
                             bank_names, n_files + 1)
        atomic_write_json(build / MANIFEST_NAME, manifest)
        _move_into_place(build, out, overwrite)
    cad_models = {c: len(category_subtypes(c)) for c in categories}
    return SynthSummary(
        out=out, seed=int(seed), size=size_name,
        counts={c: {"train": counts[c][0], "val": counts[c][1]} for c in categories},
        occluded=occluded, cad_models=cad_models, seconds=time.perf_counter() - start,
        files=n_files + 1, manifest=out / MANIFEST_NAME,
    )


def _render_dataset(
    out: Path,
    seed: int,
    backgrounds: Path | None,
    categories: tuple[str, ...],
    counts: dict[str, tuple[int, int]],
    image_size: tuple[int, int],
    occlusion: bool,
    workers: int,
    use_skimage_backgrounds: bool,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write every file of the dataset but its manifest into ``out``; returns their number."""
    cat_codes = {c: i for i, c in enumerate(CATEGORY_BUILDERS)}
    tasks = [
        _Task(seed, cat, cat_codes[cat], split, i, _image_id(cat, split, i),
              (int(image_size[0]), int(image_size[1])), occlusion and split == 1)
        for cat in categories for split in (0, 1) for i in range(counts[cat][split])
    ]
    if progress is not None:
        progress(0, len(tasks))
    n_files = 0
    for i, (done, files) in enumerate(_run_all(tasks, backgrounds, use_skimage_backgrounds,
                                               workers)):
        assert done == tasks[i]
        for rel, data in files.items():
            atomic_write_bytes(out / rel, data)
        n_files += len(files)
        if progress is not None:
            progress(i + 1, len(tasks))

    for cat in categories:
        subtypes = category_subtypes(cat)
        for sub in subtypes:
            write_off(out / "CAD" / cat / f"{sub.cad_index:02d}.off", sub.part_mesh.mesh())
        n_files += len(subtypes)
        for split, name in enumerate(SPLITS):
            ids = [_image_id(cat, split, i) for i in range(counts[cat][split])]
            atomic_write_text(out / "Image_sets" / f"{cat}_imagenet_{name}.txt",
                              "".join(f"{x}\n" for x in ids))
            n_files += 1
        if occlusion and counts[cat][1] > 0:
            val_ids = [_image_id(cat, 1, i) for i in range(counts[cat][1])]
            for level in OCCLUSION_LEVELS:
                atomic_write_text(out / OCCLUDED_SUBFOLDER / "lists" /
                                  f"{cat}FGL{level}_BGL{level}.txt",
                                  "".join(f"{x}.JPEG\n" for x in val_ids))
                n_files += 1
    return n_files


def _manifest(
    seed: int,
    size_name: str,
    image_size: tuple[int, int],
    categories: tuple[str, ...],
    counts: dict[str, tuple[int, int]],
    occluded: dict[str, dict[int, int]],
    bank_names: list[str],
    files: int,
) -> dict[str, Any]:
    """``synthetic_manifest.json``: what was generated, how, and the conventions it follows."""
    return {
        "generator": "nvsm.data.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": size_name,
        "image_size": {"height": int(image_size[0]), "width": int(image_size[1])},
        "categories": {
            c: {"synset": SYNSETS[c], "train": counts[c][0], "val": counts[c][1],
                "cad_models": [f"{s.cad_index:02d}: {s.name}" for s in category_subtypes(c)],
                "occluded": {f"FGL{k}_BGL{k}": n for k, n in occluded[c].items()}}
            for c in categories
        },
        "occlusion_levels": {f"FGL{k}_BGL{k}": list(r) for k, r in OCCLUSION_LEVELS.items()},
        "backgrounds": bank_names,
        "conventions": {
            "angles": "degrees in the .mat files (PASCAL3D+); azimuth 0 shows the object's front",
            "cad_frame": "z up, bbox centred at origin, longest side 1, front towards -y, "
                         "mirror-symmetric about x = 0",
            "pixels": "bbox [x1 y1 x2 y2] 1-based inclusive; px, py 1-based (MATLAB)",
            "masks": "Masks/<cat>_imagenet/<id>.png, 255 = object (projected CAD model)",
            "occluded_boxes": "[y0, y1, x0, x1, H, W], 0-based, exclusive ends",
            "jpeg_quality": JPEG_QUALITY,
        },
        "files": files,
    }


def render_processes(workers: int, n_images: int) -> int:
    """How many processes render ``n_images`` when ``workers`` are asked for: 1 (this process)
    for fewer than 64 images, which do not pay for starting workers (~seconds each), and never
    more than the CPUs this process may run on, since each worker holds a renderer and extra
    ones only fill the memory (``--workers 100000`` started processes until it ran out)."""
    if n_images < 64:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(workers, cpus or 1)


def _run_all(
    tasks: list[_Task], backgrounds: Path | None, use_skimage: bool, workers: int
) -> Iterator[tuple[_Task, dict[str, bytes]]]:
    """Render tasks in order, in this process or in a spawn-started process pool
    (``render_processes``)."""
    workers = render_processes(workers, len(tasks))
    if workers == 1:
        worker = _Worker(backgrounds, use_skimage)
        for task in tasks:
            yield task, worker.run(task)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(backgrounds, use_skimage))
    chunk = max(1, min(8, len(tasks) // (4 * workers)))
    try:
        # Ctrl-C reaches every process of the terminal's process group. The workers start with
        # SIGINT blocked (map submits every task, which starts them; a spawned interpreter
        # keeps the signal mask it is started with), so that this process alone stops, in one
        # line, instead of each worker printing a KeyboardInterrupt traceback and the pool one
        # more; a Ctrl-C while they start is held until they have.
        with _sigint_deferred():
            results = pool.map(_run_task, tasks, chunksize=chunk)
        yield from zip(tasks, results, strict=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # not every queued task first
        raise
    pool.shutdown()


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """SIGINT blocked within, in this thread and so in the processes it starts, and a SIGINT
    that comes within raised as ``KeyboardInterrupt`` on leaving. Blocking alone is not
    enough: the signal may go to another thread of this process (torch's), whose default
    handling stopped this process while a worker was starting (that worker then printed an
    ``EOFError`` traceback); ignoring it instead lost a Ctrl-C that came then. Only in the main
    thread, where handlers can be set, and where signal masks exist (not on Windows)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    caught: list[int] = []
    handler = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a held SIGINT reaches the recorder
        signal.signal(signal.SIGINT, handler)
    if caught:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- CLI
def _parse_counts(values: Sequence[str]) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for item in values:
        try:
            cat, nums = item.split("=", 1)
            n_train, n_val = (int(v) for v in nums.split(":", 1))
        except ValueError as exc:
            raise ValueError(f"--counts: expected CATEGORY=TRAIN:VAL, got {item!r}") from exc
        counts[cat.strip()] = (n_train, n_val)
    return counts


#: Where ``synth_command``'s option parsers report a bad value.
_CONSOLE = Console()


def synth_command(
    out: Annotated[
        Path,
        typer.Option("--out", help="Dataset root to create.", **path_option(_CONSOLE, "--out")),
    ],
    tiny: Annotated[bool, typer.Option("--tiny", help="A few images per category.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    backgrounds: Annotated[
        Path | None,
        typer.Option("--backgrounds", help="Folder of extra background photos.",
                     **path_option(_CONSOLE, "--backgrounds")),
    ] = None,
    categories: Annotated[
        list[str] | None, typer.Option("--category", "-c", help="Category (repeatable).")
    ] = None,
    counts: Annotated[
        list[str] | None,
        typer.Option("--counts", help="Override sizes: CATEGORY=TRAIN:VAL (repeatable)."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1,
                                              help="Rendering processes (at most the CPUs).")] = 2,
    no_occlusion: Annotated[
        bool, typer.Option("--no-occlusion", help="Skip the OccludedPASCAL3D levels.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier synthetic dataset in --out.")
    ] = False,
) -> None:
    """Render a synthetic pose dataset (car, aeroplane, chair) in the PASCAL3D+ layout.

    Writes Images/, Annotations/ (.mat), Masks/, CAD/<cat>/<NN>.off, Image_sets/,
    OccludedPASCAL3D/ (levels FGL1..3) and synthetic_manifest.json.

    Example:
        nvsm data synth --out data/synthetic
        nvsm data synth --out /tmp/syn --tiny --seed 1 -c car
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from nvsm.runtime import exit_interrupted, exit_with_error

    size: str | dict[str, tuple[int, int]] = "tiny" if tiny else "default"
    categories = categories or ["car", "aeroplane", "chair"]
    console = Console()
    if counts:
        try:
            asked = _parse_counts(counts)
        except ValueError as exc:
            exit_with_error(console, str(exc), 2)
        unused = sorted(set(asked) - set(categories))
        if unused:  # they were ignored without a word
            exit_with_error(console, f"--counts names {', '.join(unused)}, which the categories "
                            f"rendered ({', '.join(categories)}; --category) do not include", 2)
        size = {**SIZE_PRESETS["tiny" if tiny else "default"], **asked}
    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    job = bar.add_task("rendering", total=None)

    def report(done: int, total: int) -> None:
        bar.start()  # at the first report, once every option has passed its checks
        bar.update(job, completed=done, total=total)

    try:
        try:
            summary = generate_synthetic_dataset(
                out, size, seed, backgrounds, categories, occlusion=not no_occlusion,
                workers=workers, overwrite=overwrite, progress=report)
        finally:
            if bar.live.is_started:  # an error before rendering prints no empty bar
                bar.stop()
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        exit_with_error(console, str(exc), 2)
    except KeyboardInterrupt as exc:  # the dataset is built aside and moved into place whole
        exit_interrupted(console, exc, out)
    for cat, c in summary.counts.items():
        console.print(f"{cat}: {c['train']} train, {c['val']} val, "
                      f"{summary.cad_models[cat]} CAD models")
    console.print(f"wrote {summary.files} files to {summary.out} in {summary.seconds:.1f} s",
                  markup=False, soft_wrap=True)
