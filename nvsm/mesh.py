"""Cuboid neural meshes: construction, OFF input/output, normals and per-pose visibility.

A NeMo cuboid is a box whose six faces each carry their own regular vertex grid (edges and
corners are duplicated, once per face, exactly as the reference does), with about N vertices
in total: the grid spacing is e = sqrt(A / N) for a box of surface area A, and a face of side
lengths (L1, L2) gets int(L1/e + 1) × int(L2/e + 1) vertices. Triangles are wound
counter-clockwise seen from outside, so their normals point outwards.

Coordinates are the object (CAD) frame of ``nvsm.pose.convention`` (z up).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nvsm.io import atomic_write_text


class MeshFormatError(ValueError):
    """A mesh file or mesh argument that does not have the expected form."""


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh.

    Attributes:
        vertices: (V, 3) float32 object coordinates.
        faces: (F, 3) int64 (or int32) vertex indices, counter-clockwise seen from outside.
    """

    vertices: torch.Tensor
    faces: torch.Tensor

    def __post_init__(self) -> None:
        v, f = self.vertices, self.faces
        if v.ndim != 2 or v.shape[1] != 3:
            raise MeshFormatError(f"Mesh.vertices must have shape (V, 3), got {tuple(v.shape)}")
        if f.ndim != 2 or f.shape[1] != 3:
            raise MeshFormatError(f"Mesh.faces must have shape (F, 3), got {tuple(f.shape)}")
        if not v.dtype.is_floating_point:
            raise MeshFormatError(f"Mesh.vertices must be floating point, got {v.dtype}")
        if not torch.isfinite(v).all():
            raise MeshFormatError("Mesh.vertices must be finite, got NaN or inf")
        # Rendering indexes with the faces and torch only indexes with int32/int64: any other
        # dtype fails there, far from here (and uint8 would even be taken for a bool mask).
        if f.dtype not in (torch.int32, torch.int64):
            raise MeshFormatError(
                f"Mesh.faces must be int32 or int64 vertex indices, got {f.dtype} "
                "(convert with faces.long())"
            )
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= v.shape[0]):
            raise MeshFormatError(f"Mesh.faces index outside [0, {v.shape[0]})")

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    def to(self, device: torch.device | str) -> Mesh:
        return Mesh(self.vertices.to(device), self.faces.to(device))


def _face_grid(
    origin: np.ndarray, u: np.ndarray, v: np.ndarray, nu: int, nv: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (nu·nv, 3) and triangles (2(nu−1)(nv−1), 3) of a planar grid, normal u × v."""
    s = np.linspace(0.0, 1.0, nu)[:, None, None]
    t = np.linspace(0.0, 1.0, nv)[None, :, None]
    verts = (origin + s * u + t * v).reshape(-1, 3)
    idx = np.arange(nu * nv).reshape(nu, nv)
    p00, p10 = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel()
    p11, p01 = idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    tris = np.concatenate([np.stack([p00, p10, p11], 1), np.stack([p00, p11, p01], 1)])
    return verts, tris


def cuboid_mesh(box_min: Sequence[float], box_max: Sequence[float], n_vertices: int = 1000) -> Mesh:
    """NeMo cuboid of about ``n_vertices`` vertices spanning the box [box_min, box_max].

    Args:
        box_min, box_max: (3,) opposite corners (object coordinates), box_max > box_min.
        n_vertices: target vertex count N (the result has roughly N to 1.15 N vertices).
    """
    lo, hi = np.asarray(box_min, np.float64), np.asarray(box_max, np.float64)
    if lo.shape != (3,) or hi.shape != (3,) or not np.all(hi > lo):
        raise MeshFormatError(f"cuboid_mesh needs box_max > box_min in 3D, got {lo}, {hi}")
    if n_vertices < 8:
        raise MeshFormatError(f"cuboid_mesh needs n_vertices >= 8, got {n_vertices}")
    size = hi - lo
    area = 2 * (size[0] * size[1] + size[1] * size[2] + size[0] * size[2])
    spacing = math.sqrt(area / n_vertices)
    counts = [max(2, int(length / spacing + 1)) for length in size]
    eye = np.eye(3)
    all_v, all_f, offset = [], [], 0
    for k in range(3):
        a, b = (k + 1) % 3, (k + 2) % 3
        for side in (1, -1):
            # Outward normal side·e_k = u × v: cyclic (a, b) for +, swapped for −.
            ua, ub = (a, b) if side == 1 else (b, a)
            origin = lo.copy()
            origin[k] = hi[k] if side == 1 else lo[k]
            verts, tris = _face_grid(
                origin, eye[ua] * size[ua], eye[ub] * size[ub], counts[ua], counts[ub]
            )
            all_v.append(verts)
            all_f.append(tris + offset)
            offset += len(verts)
    return Mesh(
        torch.as_tensor(np.concatenate(all_v), dtype=torch.float32),
        torch.as_tensor(np.concatenate(all_f), dtype=torch.int64),
    )


def coverage_interval(values: np.ndarray, coverage: float = 0.99) -> tuple[float, float]:
    """Shortest interval [lo, hi] containing ``coverage`` of ``values`` (1-D)."""
    x = np.sort(np.asarray(values, np.float64).ravel())
    if x.size == 0:
        raise MeshFormatError("coverage_interval of an empty vertex set")
    k = max(1, math.ceil(coverage * x.size))
    widths = x[k - 1 :] - x[: x.size - k + 1]
    i = int(np.argmin(widths))
    return float(x[i]), float(x[i + k - 1])


def cuboid_from_vertices(
    vertices: np.ndarray, coverage: float = 0.99, n_vertices: int = 1000
) -> Mesh:
    """Cuboid whose extent on each axis is the shortest interval covering ``coverage`` of the
    given CAD vertices (the reference's 99 % rule). ``vertices``: (N, 3)."""
    v = np.asarray(vertices, np.float64).reshape(-1, 3)
    bounds = [coverage_interval(v[:, k], coverage) for k in range(3)]
    return cuboid_mesh([b[0] for b in bounds], [b[1] for b in bounds], n_vertices)


def single_cuboid(
    cad_vertices: Sequence[np.ndarray], coverage: float = 0.99, n_vertices: int = 1000
) -> Mesh:
    """One cuboid for a category, from the pooled vertices of all its CAD models."""
    return cuboid_from_vertices(
        np.concatenate([np.asarray(v).reshape(-1, 3) for v in cad_vertices]), coverage, n_vertices
    )


def multi_cuboids(
    cad_vertices: Sequence[np.ndarray], coverage: float = 0.99, n_vertices: int = 1000
) -> list[Mesh]:
    """One cuboid per CAD model (the reference's "multi" meshes, one per sub-type)."""
    return [cuboid_from_vertices(v, coverage, n_vertices) for v in cad_vertices]


def vertex_normals(mesh: Mesh) -> torch.Tensor:
    """Unit vertex normals (V, 3): area-weighted mean of the normals of adjacent faces.

    For an (unwelded) NeMo cuboid every vertex lies on one box face, so this is that face's
    exact outward normal.
    """
    v, f = mesh.vertices, mesh.faces
    tri = v[f]  # (F, 3, 3)
    face_n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2·area
    acc = torch.zeros_like(v).index_add_(0, f.reshape(-1), face_n.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(acc, dim=-1)


def facing_visibility(
    mesh: Mesh, camera_centres: torch.Tensor, normals: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pose vertex visibility by the normal test: visible iff (C − v)·n > 0.

    Exact for convex meshes such as cuboids (a front-facing point of a convex body is never
    hidden by another part of it); for other meshes it is only back-face culling.

    Args:
        camera_centres: (B, 3) camera centres in object coordinates
            (``nvsm.pose.camera_centre``).
        normals: optional precomputed ``vertex_normals(mesh)``.
    Returns:
        (B, V) bool.
    """
    n = vertex_normals(mesh) if normals is None else normals
    c = camera_centres.to(mesh.vertices.dtype)
    to_cam = c[:, None, :] - mesh.vertices[None]
    return (to_cam * n[None]).sum(-1) > 1e-9


def write_off(path: str | os.PathLike[str], mesh: Mesh) -> None:
    """Write an OFF file atomically."""
    v = mesh.vertices.detach().cpu().double().numpy()
    f = mesh.faces.cpu().numpy()
    lines = ["OFF", f"{len(v)} {len(f)} 0"]
    lines += [f"{x:.9g} {y:.9g} {z:.9g}" for x, y, z in v]
    lines += [f"3 {a} {b} {c}" for a, b, c in f]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_off(path: str | os.PathLike[str]) -> Mesh:
    """Read an OFF mesh (triangles; polygons are fan-triangulated).

    Raises:
        MeshFormatError naming the file and what was wrong.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshFormatError(f"{path}: cannot read OFF file ({exc})") from exc
    # (1-based line number, tokens) of each non-empty line, comments dropped, so that errors
    # can point at the line.
    lines = [(no, toks) for no, line in enumerate(text.splitlines(), 1)
             if (toks := line.split("#", 1)[0].split())]
    if not lines or not lines[0][1][0].startswith("OFF"):
        raise MeshFormatError(f"{path}: header: expected 'OFF' on the first line")
    # The counts may share the header line ("OFF 8 12 0") or follow it.
    head = lines[0][1][1:] if len(lines[0][1]) > 1 else lines[1][1] if len(lines) > 1 else []
    body = lines[1:] if len(lines[0][1]) > 1 else lines[2:]
    try:
        nv, nf = int(head[0]), int(head[1])
        if nv < 0 or nf < 0:
            raise ValueError(f"negative counts {nv} {nf} in the header")
        verts = np.array([[float(x) for x in body[i][1][:3]] for i in range(nv)], np.float64)
        faces: list[list[int]] = []
        for i in range(nv, nv + nf):
            toks = body[i][1]
            n, idx = int(toks[0]), [int(x) for x in toks[1 : 1 + int(toks[0])]]
            if len(idx) != n or n < 3:
                raise ValueError(f"face line {i - nv} lists {len(idx)} of {n} indices")
            faces += [[idx[0], idx[j], idx[j + 1]] for j in range(1, n - 1)]
    except (IndexError, ValueError) as exc:
        raise MeshFormatError(
            f"{path}: vertex/face list: expected the counts of the header, got {exc}"
        ) from exc
    # The header's counts are the file's own declaration: more data lines than declared means
    # the counts (or the file) are wrong, and reading only the first ones would drop geometry.
    if len(body) > nv + nf:
        no, toks = body[nv + nf]
        raise MeshFormatError(
            f"{path}: line {no}: expected the end of the file after the {nv} vertices and {nf} "
            f"faces declared in the header, got {' '.join(toks)[:60]!r} "
            f"({len(body) - nv - nf} extra line(s))"
        )
    if verts.shape != (nv, 3) or not np.isfinite(verts).all():
        raise MeshFormatError(f"{path}: vertices: expected {nv} finite xyz triples")
    try:
        return Mesh(
            torch.as_tensor(verts, dtype=torch.float32),
            torch.as_tensor(np.array(faces, np.int64).reshape(-1, 3)),
        )
    except MeshFormatError as exc:
        raise MeshFormatError(f"{path}: {exc}") from exc
