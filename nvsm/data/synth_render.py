"""Image formation of the synthetic dataset: rasterising, shading, backgrounds and occluders.

Geometry goes through nvsm's own renderer (``nvsm.render.project_vertices`` and a
``Rasterizer``; one face per pixel centre, z-buffered), in the OpenCV camera of a PASCAL3D+ pose
(``nvsm.pose.opencv_extrinsics``, pixel centres at integer 0-based coordinates). Colour is
looked up per face through ``pix_to_face``: per-role albedo × the model's fixed texture pattern,
lit by an ambient hemisphere term plus one directional light (Lambert on the flat face normals)
with a Blinn-Phong highlight and a little emission for lamps. Everything is numpy/torch on the CPU
and deterministic for a given ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import colorsys
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.draw import ellipse as draw_ellipse
from skimage.draw import polygon as draw_polygon

from nvsm.data.images import IMAGE_READ_ERRORS, IMAGE_SUFFIXES
from nvsm.data.shapes import PartMesh
from nvsm.pose.convention import PASCAL3D_VIEWPORT, intrinsics, opencv_extrinsics
from nvsm.render import Rasterizer, project_vertices

__all__ = [
    "SKIMAGE_BACKGROUNDS",
    "BackgroundBank",
    "Lighting",
    "OcclusionResult",
    "RenderMesh",
    "ViewPose",
    "camera_matrices",
    "occlude",
    "project_points",
    "rasterize",
    "sample_colours",
    "sample_lighting",
    "shade",
]

#: Photographs shipped inside scikit-image (file name, is colour). Read from the installed
#: package directory, never downloaded; missing files are skipped.
SKIMAGE_BACKGROUNDS: tuple[tuple[str, bool], ...] = (
    ("astronaut.png", True),
    ("coffee.png", True),
    ("chelsea.png", True),
    ("rocket.jpg", True),
    ("motorcycle_left.png", True),
    ("hubble_deep_field.jpg", True),
    ("camera.png", False),
    ("brick.png", False),
    ("grass.png", False),
    ("gravel.png", False),
    ("moon.png", False),
    ("coins.png", False),
)


@dataclass(frozen=True)
class ViewPose:
    """A PASCAL3D+ viewpoint (radians, object units) with the 0-based OpenCV principal point."""

    azimuth: float
    elevation: float
    theta: float
    distance: float
    px: float
    py: float
    focal_px: float = PASCAL3D_VIEWPORT


@dataclass(frozen=True)
class RenderMesh:
    """A ``PartMesh`` prepared for rendering (torch geometry, cached face data)."""

    vertices: torch.Tensor  # (V, 3) float64
    faces: torch.Tensor  # (F, 3) int64
    roles: np.ndarray  # (F,)
    normals: np.ndarray  # (F, 3) unit outward normals, object frame
    centroids: np.ndarray  # (F, 3)
    texture: np.ndarray  # (F,)
    role_names: tuple[str, ...]

    @classmethod
    def from_part_mesh(cls, part: PartMesh) -> RenderMesh:
        """Prepare a ``PartMesh``."""
        return cls(
            vertices=torch.as_tensor(part.vertices, dtype=torch.float64),
            faces=torch.as_tensor(part.faces, dtype=torch.int64),
            roles=part.roles,
            normals=part.face_normals(),
            centroids=part.vertices[part.faces].mean(1),
            texture=part.texture,
            role_names=part.role_names,
        )


def camera_matrices(pose: ViewPose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV (R_cv (3, 3), t_cv (3,), K (3, 3)) of a pose, float64."""
    r_cv, t_cv = opencv_extrinsics(pose.azimuth, pose.elevation, pose.theta, pose.distance)
    k = intrinsics(pose.focal_px, pose.px, pose.py)
    return np.asarray(r_cv), np.asarray(t_cv), np.asarray(k)


def project_points(points: np.ndarray, pose: ViewPose) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 2) (0-based x, y) and depths (N,) of object points under a pose."""
    r_cv, t_cv, k = camera_matrices(pose)
    cam = np.asarray(points, np.float64) @ r_cv.T + t_cv
    uvw = cam @ k.T
    return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]


def rasterize(
    mesh: RenderMesh,
    pose: ViewPose,
    image_size: tuple[int, int],
    rasterizer: Rasterizer,
    cull_back_faces: bool = True,
) -> np.ndarray:
    """(H, W) int64 face index per pixel (−1 background) with nvsm's renderer.

    Args:
        cull_back_faces: rasterise only the faces turned towards the camera. Exact for meshes
            made of closed, outward-oriented primitives (all ``nvsm.data.shapes`` models): a
            back face always lies behind a front face of its own primitive. Halves the work.
    """
    r_cv, t_cv, k = camera_matrices(pose)
    faces = mesh.faces
    keep: np.ndarray | None = None
    if cull_back_faces:
        centre = -r_cv.T @ t_cv  # camera centre in object coordinates
        keep = np.nonzero(np.einsum("ij,ij->i", centre - mesh.centroids, mesh.normals) > 0)[0]
        faces = faces[torch.as_tensor(keep)]
    # float32 screen coordinates: ~1e-5 px precision at these image sizes, and faster.
    screen = project_vertices(
        mesh.vertices, torch.as_tensor(r_cv), torch.as_tensor(t_cv), torch.as_tensor(k)
    ).float()
    pix = rasterizer.rasterize(screen, faces, (int(image_size[0]), int(image_size[1])))
    out = pix[0].cpu().numpy()
    if keep is not None:
        out = np.where(out >= 0, keep[np.maximum(out, 0)], -1)
    return out


# ----------------------------------------------------------------------------- appearance
@dataclass(frozen=True)
class Lighting:
    """Ambient hemisphere + one directional light, in the OpenCV camera frame.

    Attributes:
        ambient: ambient strength (scaled by 0.8 + 0.2·n_z, more light from the sky).
        diffuse: directional strength.
        direction: (3,) unit vector from the surface towards the light (camera frame).
        colour: (3,) light colour (mean 1).
        specular: scale of the highlights.
    """

    ambient: float
    diffuse: float
    direction: np.ndarray
    colour: np.ndarray
    specular: float


def sample_lighting(rng: np.random.Generator) -> Lighting:
    """Random light: mostly from above and from the camera side, slight colour cast."""
    d = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-1.0, -0.1), rng.uniform(-1.0, 0.35)])
    colour = 1.0 + rng.normal(0.0, 0.05, 3)
    return Lighting(
        ambient=float(rng.uniform(0.25, 0.55)),
        diffuse=float(rng.uniform(0.45, 0.95)),
        direction=d / np.linalg.norm(d),
        colour=colour / colour.mean(),
        specular=float(rng.uniform(0.3, 1.0)),
    )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _pick(rng: np.random.Generator, options: Sequence[Sequence[float]]) -> np.ndarray:
    return np.array(options[int(rng.integers(len(options)))], dtype=np.float64)


_CAR_PAINT = (
    (0.92, 0.92, 0.91), (0.05, 0.05, 0.06), (0.62, 0.63, 0.66), (0.33, 0.34, 0.37),
    (0.68, 0.05, 0.05), (0.07, 0.16, 0.50), (0.04, 0.07, 0.22), (0.10, 0.32, 0.15),
    (0.88, 0.72, 0.08), (0.85, 0.35, 0.05), (0.74, 0.67, 0.50), (0.35, 0.22, 0.12),
)
_WOOD = ((0.45, 0.28, 0.15), (0.60, 0.42, 0.25), (0.30, 0.18, 0.10), (0.75, 0.60, 0.42))
_METAL = ((0.06, 0.06, 0.07), (0.60, 0.61, 0.63), (0.88, 0.88, 0.87))


def sample_colours(
    role_names: Sequence[str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-role (albedo (R, 3), specular (R,), emission (R, 3)) for one object instance."""
    n = len(role_names)
    albedo = np.zeros((n, 3))
    spec = np.full(n, 0.05)
    emit = np.zeros((n, 3))
    paint = _pick(rng, _CAR_PAINT) + rng.normal(0.0, 0.03, 3)
    livery = _hsv(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 0.9))
    fuselage = (_pick(rng, ((0.92, 0.92, 0.92), (0.8, 0.81, 0.83), (0.45, 0.48, 0.5)))
                if rng.uniform() < 0.8 else livery)
    frame = _pick(rng, _WOOD if rng.uniform() < 0.55 else _METAL)
    fabric = _hsv(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.8))
    seat = frame if rng.uniform() < 0.4 else fabric * rng.uniform(0.75, 0.95)
    glass = np.array([0.06, 0.08, 0.11]) * rng.uniform(0.8, 1.4)
    table: dict[str, tuple[np.ndarray, float, float]] = {
        # car
        "body": (paint, 0.35, 0.0),
        "glass": (glass, 0.9, 0.0),
        "tyre": (np.full(3, rng.uniform(0.03, 0.07)), 0.05, 0.0),
        "rim": (np.full(3, rng.uniform(0.5, 0.8)), 0.5, 0.0),
        "headlight": (np.array([0.95, 0.95, 0.88]), 0.8, 0.25),
        "taillight": (np.array([0.8, 0.04, 0.04]), 0.6, 0.15),
        "grille": (np.full(3, 0.06), 0.2, 0.0),
        "plate": (np.array([0.93, 0.93, 0.88]) if rng.uniform() < 0.7
                  else np.array([0.95, 0.8, 0.1]), 0.1, 0.0),
        "bumper": (np.full(3, 0.1) if rng.uniform() < 0.5 else paint, 0.2, 0.0),
        "bed": (np.full(3, 0.12), 0.05, 0.0),
        # aeroplane
        "fuselage": (fuselage, 0.35, 0.0),
        "wing": (fuselage * rng.uniform(0.85, 1.0), 0.3, 0.0),
        "tail": (livery, 0.3, 0.0),
        "cockpit": (np.array([0.04, 0.05, 0.07]), 0.9, 0.0),
        "window": (np.array([0.08, 0.09, 0.11]), 0.6, 0.0),
        "engine": (livery if rng.uniform() < 0.3 else np.full(3, rng.uniform(0.45, 0.7)), 0.4,
                   0.0),
        "intake": (np.full(3, 0.05), 0.1, 0.0),
        "prop": (np.full(3, 0.06), 0.2, 0.0),
        "gear": (np.full(3, 0.08), 0.1, 0.0),
        # chair
        "frame": (frame, 0.25, 0.0),
        "seat": (seat, 0.15, 0.0),
        "cushion": (fabric, 0.05, 0.0),
        "caster": (np.full(3, 0.05), 0.1, 0.0),
    }
    for i, name in enumerate(role_names):
        colour, ks, em = table[name]
        albedo[i] = np.clip(colour, 0.0, 1.0)
        spec[i] = ks
        emit[i] = em * albedo[i]
    return albedo, spec, emit


def shade(
    mesh: RenderMesh,
    pix_to_face: np.ndarray,
    pose: ViewPose,
    albedo: np.ndarray,
    specular: np.ndarray,
    emission: np.ndarray,
    light: Lighting,
) -> np.ndarray:
    """(H, W, 3) float32 linear colour of the object pixels (0 on the background)."""
    r_cv, t_cv, _ = camera_matrices(pose)
    n_cam = mesh.normals @ r_cv.T
    view = -(mesh.centroids @ r_cv.T + t_cv)
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    lam = np.clip(n_cam @ light.direction, 0.0, None)
    half = view + light.direction
    half /= np.maximum(np.linalg.norm(half, axis=1, keepdims=True), 1e-12)
    highlight = np.clip(np.einsum("ij,ij->i", n_cam, half), 0.0, None) ** 24
    hemi = 0.8 + 0.2 * mesh.normals[:, 2]
    base = albedo[mesh.roles] * mesh.texture[:, None]
    lit = base * (light.ambient * hemi + light.diffuse * lam)[:, None] * light.colour
    colour = lit + (light.specular * specular[mesh.roles] * highlight)[:, None] * light.colour
    colour = colour + emission[mesh.roles]
    table = np.concatenate([colour, np.zeros((1, 3))]).astype(np.float32)
    return table[pix_to_face]  # index −1 picks the zero row


# ----------------------------------------------------------------------------- backgrounds
def _skimage_data_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


class BackgroundBank:
    """Background photographs: scikit-image's shipped photos plus an optional folder of images.

    Images are decoded lazily once; ``sample`` draws random crops, scales, flips and (for
    grey-scale photos) tints. Without any photo it falls back to procedural gradients + noise.
    """

    def __init__(self, paths: Sequence[tuple[str, Path, bool]]) -> None:
        self.entries = list(paths)
        self._cache: dict[int, Image.Image] = {}

    @classmethod
    def default(
        cls, extra_dir: Path | None = None, use_skimage: bool = True, check: bool = False
    ) -> BackgroundBank:
        """scikit-image photos (when ``use_skimage``) plus every image file under ``extra_dir``
        (sorted by path, recursively); with ``check``, each of those files is decoded once, so
        that an unreadable one is named before any rendering (ValueError)."""
        entries: list[tuple[str, Path, bool]] = []
        data_dir = _skimage_data_dir() if use_skimage else None
        if data_dir is not None:
            for name, colour in SKIMAGE_BACKGROUNDS:
                if (data_dir / name).is_file():
                    entries.append((f"skimage:{name}", data_dir / name, colour))
        if extra_dir is not None:
            extra = Path(extra_dir)
            if not extra.is_dir():
                state = "is a file, not a folder" if extra.exists() else "does not exist"
                raise FileNotFoundError(f"backgrounds folder {extra} {state}")
            files = sorted(
                p for p in extra.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not files:
                raise FileNotFoundError(
                    f"backgrounds folder {extra} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
            entries += [(f"dir:{p.relative_to(extra).as_posix()}", p, True) for p in files]
            for path in files if check else ():
                try:
                    with Image.open(path) as im:
                        im.load()
                except IMAGE_READ_ERRORS as exc:
                    raise ValueError(f"background photo {path} cannot be read "
                                     f"({type(exc).__name__}: {exc})") from exc
        return cls(entries)

    @property
    def names(self) -> list[str]:
        """Names of the photos in the bank (``skimage:<file>`` or ``dir:<relative path>``)."""
        return [e[0] for e in self.entries]

    def _image(self, index: int) -> Image.Image:
        if index not in self._cache:
            with Image.open(self.entries[index][1]) as im:
                mode = "RGB" if self.entries[index][2] else "L"
                self._cache[index] = im.convert(mode) if im.mode != mode else im.copy()
        return self._cache[index]

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) float32 background in [0, 1]."""
        h, w = size
        if not self.entries:
            return _procedural_background(rng, size)
        index = int(rng.integers(len(self.entries)))
        img = self._image(index)
        pw, ph = img.size
        zoom = max(h / ph, w / pw) * rng.uniform(1.0, 2.2)
        cw, ch = w / zoom, h / zoom
        left, top = rng.uniform(0.0, pw - cw), rng.uniform(0.0, ph - ch)
        crop = img.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            tint = 1.0 + rng.normal(0.0, 0.1, 3)
            arr = arr[..., None] * (tint / tint.mean()).astype(np.float32)[None, None]
        if rng.uniform() < 0.5:
            arr = arr[:, ::-1]
        if rng.uniform() < 0.3:
            arr = gaussian_filter(arr, sigma=(rng.uniform(0.5, 2.0),) * 2 + (0.0,))
        return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def _procedural_background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    noise = gaussian_filter(rng.standard_normal((h, w, 3), dtype=np.float32) * 0.15,
                            sigma=(3.0, 3.0, 0.0))
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- occluders
@dataclass(frozen=True)
class OcclusionResult:
    """An occluded image: the image (H, W, 3) float32, the occluder mask (H, W) bool and the
    occluded fraction of the object mask."""

    image: np.ndarray
    occluder_mask: np.ndarray
    fraction: float


def _occluder_shape(
    rng: np.random.Generator, centre: tuple[float, float], radius: float, size: tuple[int, int]
) -> np.ndarray:
    """Random polygon / ellipse / rotated rectangle mask (H, W) bool."""
    h, w = size
    mask = np.zeros((h, w), dtype=bool)
    cy, cx = centre
    kind = int(rng.integers(3))
    if kind == 0:  # star-shaped random polygon
        n = int(rng.integers(3, 9))
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = radius * rng.uniform(0.5, 1.3, n)
        rr, cc = draw_polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape=(h, w))
    elif kind == 1:  # ellipse
        r_a, r_b = radius * rng.uniform(0.5, 1.2), radius * rng.uniform(0.5, 1.2)
        rr, cc = draw_ellipse(cy, cx, r_a, r_b, shape=(h, w),
                              rotation=rng.uniform(-math.pi, math.pi))
    else:  # rotated rectangle / bar
        half_l, half_w = radius * rng.uniform(0.8, 1.6), radius * rng.uniform(0.25, 0.9)
        a = rng.uniform(0, math.pi)
        ca, sa = math.cos(a), math.sin(a)
        xs = np.array([-half_l, half_l, half_l, -half_l])
        ys = np.array([-half_w, -half_w, half_w, half_w])
        rr, cc = draw_polygon(cy + xs * sa + ys * ca, cx + xs * ca - ys * sa, shape=(h, w))
    mask[rr, cc] = True
    return mask


def _occluder_texture(
    rng: np.random.Generator, bank: BackgroundBank, size: tuple[int, int]
) -> np.ndarray:
    """(h, w, 3) float32 fill for an occluder: a photo patch, a noisy gradient or stripes."""
    h, w = size
    kind = int(rng.integers(3))
    if kind == 0:
        tex = bank.sample(rng, size)
    elif kind == 1:
        tex = _procedural_background(rng, size)
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, math.pi)
        period = rng.uniform(6.0, 24.0)
        s = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0)
        c0, c1 = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
        tex = np.where(s[..., None], c0[None, None], c1[None, None]).astype(np.float32)
    return np.clip(tex * rng.uniform(0.6, 1.1), 0.0, 1.0).astype(np.float32)


def occlude(
    image: np.ndarray,
    object_mask: np.ndarray,
    fraction_range: tuple[float, float],
    rng: np.random.Generator,
    bank: BackgroundBank,
    max_attempts: int = 40,
) -> OcclusionResult:
    """Paste random occluders until the occluded fraction of ``object_mask`` is in range.

    Occluders are added one at a time, centred on random object pixels and sized from the
    object's area; one that would push the fraction above the range is shrunk and retried, then
    dropped. A configuration that ends outside [lo, hi] is discarded and a new one is drawn.

    Args:
        image: (H, W, 3) float image the occluders are pasted on.
        object_mask: (H, W) bool full (amodal) object mask.
        fraction_range: (lo, hi), e.g. (0.2, 0.4).
    Raises:
        RuntimeError: when no configuration lands in range after ``max_attempts`` draws.
    """
    lo, hi = fraction_range
    h, w = object_mask.shape
    area = int(object_mask.sum())
    if area == 0:
        raise ValueError("cannot occlude an empty object mask")
    ys, xs = np.nonzero(object_mask)
    for _ in range(max_attempts):
        target = rng.uniform(lo, hi)
        occ = np.zeros((h, w), dtype=bool)
        layers: list[np.ndarray] = []
        frac = 0.0
        for _ in range(16):
            if frac >= lo:
                break
            need = max(target - frac, 0.05)
            i = int(rng.integers(area))
            radius = math.sqrt(need * area / math.pi) * rng.uniform(0.7, 1.4)
            for _shrink in range(4):
                shape = _occluder_shape(rng, (float(ys[i]), float(xs[i])), max(radius, 2.0),
                                        (h, w))
                new = occ | shape
                new_frac = float((new & object_mask).sum()) / area
                if new_frac <= hi:
                    if new_frac > frac:
                        occ, frac = new, new_frac
                        layers.append(shape)
                    break
                radius *= 0.7
        if lo <= frac <= hi:
            out = image.copy()
            for shape in layers:
                rows, cols = np.nonzero(shape)
                r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
                tex = _occluder_texture(rng, bank, (int(r1 - r0), int(c1 - c0)))
                sub = shape[r0:r1, c0:c1]
                out[r0:r1, c0:c1][sub] = tex[sub]
            return OcclusionResult(out, occ, frac)
    raise RuntimeError(
        f"could not reach an occluded fraction in [{lo}, {hi}] after {max_attempts} attempts"
    )
