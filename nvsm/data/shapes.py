"""Procedural CAD models of the synthetic dataset: car, aeroplane and chair sub-types.

Every model is a union of closed convex primitives (boxes, general hexahedra such as tapered boxes
and swept wings, and surfaces of revolution such as cylinders, cones and fuselages) triangulated
with counter-clockwise outward faces, in the PASCAL3D+ CAD frame of ``nvsm.pose.convention``:

* z is up, the centre of the model's bounding box is the origin, and the longest side of the
  bounding box is 1 (PASCAL3D+ CAD models are unit-sized, which is what NeMo's distance-5
  normalisation assumes);
* the object's FRONT faces −y: the car's bonnet and headlights, the aeroplane's nose and the
  side of the chair one sits down from (the backrest is at +y). The camera of azimuth 0 sits at
  −y (``camera_centre``), so **azimuth 0 shows the front** and azimuth 180° the back; azimuth
  90° looks at the object's +x side;
* every model is mirror-symmetric about the plane x = 0 (parts are built in mirrored pairs, and
  parts on the plane are symmetric themselves), so a horizontally flipped image shows the mirrored
  pose (a, e, θ) → (−a, e, −θ) (``nvsm.pose.mirror_pose``).

Each face carries a *role* (``"body"``, ``"glass"``, ``"headlight"``, ...) that the renderer maps
to a per-image colour, and a fixed albedo multiplier from a mirror-symmetric 3D procedural pattern,
so the texture is consistent across views. Front and back differ in shape and in roles
(headlights vs tail lights, windscreen vs rear-window slant, cockpit vs tail fin, backrest), while
the left/right symmetry of real objects is kept.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from nvsm.mesh import Mesh

__all__ = [
    "CATEGORY_BUILDERS",
    "ROLES",
    "PartMesh",
    "SubType",
    "category_subtypes",
]

#: Face roles of each category (index = the role id stored in ``PartMesh.roles``).
ROLES: dict[str, tuple[str, ...]] = {
    "car": ("body", "glass", "tyre", "rim", "headlight", "taillight", "grille", "plate", "bumper",
            "bed"),
    "aeroplane": ("fuselage", "wing", "tail", "cockpit", "window", "engine", "intake", "prop",
                  "gear"),
    "chair": ("frame", "seat", "cushion", "caster"),
}

_GRID = 0.05  # target edge length of the face grids (model units; models are ~1 long)

RoleSpec = str | Mapping[str, str]
RoleFn = Callable[[np.ndarray, np.ndarray], list[str | None]]


@dataclass(frozen=True)
class PartMesh:
    """A triangle mesh whose faces carry colour roles.

    Attributes:
        vertices: (V, 3) float64 CAD coordinates.
        faces: (F, 3) int64, counter-clockwise seen from outside.
        roles: (F,) int64 index into ``role_names``.
        role_names: the category's roles (``ROLES[category]``).
        texture: (F,) float64 albedo multiplier (fixed 3D pattern, symmetric in x).
    """

    vertices: np.ndarray
    faces: np.ndarray
    roles: np.ndarray
    role_names: tuple[str, ...]
    texture: np.ndarray

    def mesh(self) -> Mesh:
        """The geometry as an ``nvsm.mesh.Mesh`` (float32 vertices, int64 faces)."""
        return Mesh(
            torch.as_tensor(self.vertices, dtype=torch.float32),
            torch.as_tensor(self.faces, dtype=torch.int64),
        )

    def face_normals(self) -> np.ndarray:
        """(F, 3) unit outward face normals."""
        tri = self.vertices[self.faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class SubType:
    """One CAD model of a category (``cad_index`` is 1-based, as in PASCAL3D+)."""

    category: str
    cad_index: int
    name: str
    part_mesh: PartMesh


# ----------------------------------------------------------------------------- primitives
def _quad_grid(
    p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear grid on the quad (p0, p1, p2, p3); triangle normals follow (p1−p0) × (p3−p0)."""
    ns = max(1, math.ceil(max(np.linalg.norm(p1 - p0), np.linalg.norm(p2 - p3)) / spacing))
    nt = max(1, math.ceil(max(np.linalg.norm(p3 - p0), np.linalg.norm(p2 - p1)) / spacing))
    s = np.linspace(0.0, 1.0, ns + 1)[:, None, None]
    t = np.linspace(0.0, 1.0, nt + 1)[None, :, None]
    verts = ((1 - s) * (1 - t) * p0 + s * (1 - t) * p1 + s * t * p2 + (1 - s) * t * p3)
    verts = verts.reshape(-1, 3)
    idx = np.arange((ns + 1) * (nt + 1)).reshape(ns + 1, nt + 1)
    v00, v10 = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel()
    v11, v01 = idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    tris = np.concatenate([np.stack([v00, v10, v11], 1), np.stack([v00, v11, v01], 1)])
    return verts, tris


# Quads of a hexahedron whose corner i has bits (ix, iy, iz) = (i & 1, i >> 1 & 1, i >> 2 & 1),
# ordered so that (p1 − p0) × (p3 − p0) points outwards.
_HEXA_QUADS: dict[str, tuple[int, int, int, int]] = {
    "-z": (0, 2, 3, 1),
    "+z": (4, 5, 7, 6),
    "-y": (0, 1, 5, 4),
    "+y": (2, 6, 7, 3),
    "-x": (0, 4, 6, 2),
    "+x": (1, 3, 7, 5),
}


class _Builder:
    """Accumulates primitives (and their mirror images about x = 0) into a ``PartMesh``."""

    def __init__(self, category: str, spacing: float = _GRID) -> None:
        self.role_names = ROLES[category]
        self.spacing = spacing
        self.verts: list[np.ndarray] = []
        self.faces: list[np.ndarray] = []
        self.roles: list[np.ndarray] = []
        self.count = 0

    def _role_ids(self, names: Sequence[str]) -> np.ndarray:
        return np.array([self.role_names.index(n) for n in names], dtype=np.int64)

    def _add(
        self, verts: np.ndarray, faces: np.ndarray, roles: Sequence[str], mirror: bool
    ) -> None:
        parts = [(verts, faces)]
        if mirror:
            parts.append((verts * np.array([-1.0, 1.0, 1.0]), faces[:, [0, 2, 1]]))
        ids = self._role_ids(roles)
        for v, f in parts:
            self.verts.append(v)
            self.faces.append(f + self.count)
            self.roles.append(ids)
            self.count += len(v)

    def hexa(self, corners: np.ndarray, roles: RoleSpec, mirror: bool = False) -> None:
        """Hexahedron from 8 corners (corner i at bits x = i & 1, y = i >> 1 & 1, z = i >> 2 & 1).

        Args:
            roles: one role, or a mapping from side ("-x", "+x", "-y", "+y", "-z", "+z") to role
                with key "*" for the other sides.
            mirror: also add the mirror image about x = 0.
        """
        corners = np.asarray(corners, dtype=np.float64).reshape(8, 3)
        all_v, all_f, all_r, offset = [], [], [], 0
        for side, (a, b, c, d) in _HEXA_QUADS.items():
            role = roles if isinstance(roles, str) else roles.get(side, roles.get("*", ""))
            v, f = _quad_grid(corners[a], corners[b], corners[c], corners[d], self.spacing)
            all_v.append(v)
            all_f.append(f + offset)
            all_r += [role] * len(f)
            offset += len(v)
        self._add(np.concatenate(all_v), np.concatenate(all_f), all_r, mirror)

    def box(self, lo: Sequence[float], hi: Sequence[float], roles: RoleSpec,
            mirror: bool = False) -> None:
        """Axis-aligned box [lo, hi]."""
        self.hexa(_box_corners(lo, hi), roles, mirror)

    def lathe(
        self,
        start: Sequence[float],
        end: Sequence[float],
        profile: Sequence[tuple[float, float]],
        roles: RoleSpec,
        u: Sequence[float] = (1.0, 0.0, 0.0),
        scale: tuple[float, float] = (1.0, 1.0),
        segments: int = 20,
        role_fn: RoleFn | None = None,
        mirror: bool = False,
    ) -> None:
        """Surface of revolution (cylinder, cone, fuselage) around the segment start → end.

        Args:
            profile: (t, r) pairs, t ∈ [0, 1] along the axis (increasing), r ≥ 0 the radius;
                an end with r = 0 is a tip, otherwise it is closed by a flat cap.
            roles: one role, or a mapping with keys "side", "cap0" (at start), "cap1" (at end).
            u: a direction perpendicular to the axis; the cross-section is
                r·(scale[0]·cos φ·u + scale[1]·sin φ·v) with v = axis × u and φ = π/2 + 2πk/n, so a
                lathe with u = ±x whose axis lies in the plane x = 0 is symmetric about it.
            role_fn: optional override: (face centroids, face normals) → role or None per face.
            mirror: also add the mirror image about x = 0.
        """
        p0, p1 = np.asarray(start, np.float64), np.asarray(end, np.float64)
        axis = (p1 - p0) / np.linalg.norm(p1 - p0)
        uu = np.asarray(u, np.float64)
        uu = uu - axis * (uu @ axis)
        uu /= np.linalg.norm(uu)
        vv = np.cross(axis, uu)
        phi = math.pi / 2 + 2 * math.pi * np.arange(segments) / segments
        ring = scale[0] * np.cos(phi)[:, None] * uu + scale[1] * np.sin(phi)[:, None] * vv
        # Subdivide the profile so that rings are at most ~spacing apart along the axis.
        length = float(np.linalg.norm(p1 - p0))
        ts, rs = [profile[0][0]], [profile[0][1]]
        for (t0, r0), (t1, r1) in itertools.pairwise(profile):
            n = max(1, math.ceil((t1 - t0) * length / self.spacing))
            for j in range(1, n + 1):
                ts.append(t0 + (t1 - t0) * j / n)
                rs.append(r0 + (r1 - r0) * j / n)
        centres = p0 + np.outer(ts, p1 - p0)
        verts_list: list[np.ndarray] = []
        ring_ids: list[np.ndarray] = []
        count = 0
        for c, r in zip(centres, rs, strict=True):
            if r <= 0:
                verts_list.append(c[None])
                ring_ids.append(np.full(segments, count))
                count += 1
            else:
                verts_list.append(c + r * ring)
                ring_ids.append(count + np.arange(segments))
                count += segments
        faces: list[list[int]] = []
        kinds: list[str] = []
        for a, b in itertools.pairwise(ring_ids):
            for k in range(segments):
                k1 = (k + 1) % segments
                quad = [a[k], a[k1], b[k1], b[k]]
                for corners in ([quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]):
                    if len(set(corners)) == 3:
                        faces.append(corners)
                        kinds.append("side")
        for end_i, name in ((0, "cap0"), (len(ring_ids) - 1, "cap1")):
            if rs[end_i] > 0:
                centre_id = count
                verts_list.append(centres[end_i][None])
                count += 1
                ids = ring_ids[end_i]
                for k in range(segments):
                    faces.append([centre_id, ids[k], ids[(k + 1) % segments]])
                    kinds.append(name)
        verts = np.concatenate(verts_list)
        tris = np.array(faces, dtype=np.int64)
        # Orient every face outwards: side faces away from the axis, caps along ∓axis.
        tri = verts[tris]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        centroid = tri.mean(1)
        radial = centroid - (p0 + np.outer((centroid - p0) @ axis, axis))
        kind = np.array(kinds)
        want = np.where(kind[:, None] == "side", radial,
                        np.where(kind[:, None] == "cap0", -axis, axis))
        flip = np.einsum("ij,ij->i", normal, want) < 0
        tris[flip] = tris[flip][:, [0, 2, 1]]
        if isinstance(roles, str):
            names = [roles] * len(tris)
        else:
            default = roles.get("*", roles.get("side", ""))
            names = [roles.get(k, default) for k in kinds]
        if role_fn is not None:
            unit = normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
            unit[flip] *= -1
            override = role_fn(centroid, unit)
            names = [o if o is not None else n for o, n in zip(override, names, strict=True)]
        self._add(verts, tris, names, mirror)

    def finish(self) -> PartMesh:
        """Centre the bounding box at the origin, scale its longest side to 1, add the texture."""
        verts = np.concatenate(self.verts)
        faces = np.concatenate(self.faces)
        roles = np.concatenate(self.roles)
        lo, hi = verts.min(0), verts.max(0)
        centre = (lo + hi) / 2
        centre[0] = 0.0  # symmetric by construction; keep x exactly mirror-symmetric
        verts = (verts - centre) / float((hi - lo).max())
        cen = verts[faces].mean(1)
        ax, y, z = np.abs(cen[:, 0]), cen[:, 1], cen[:, 2]
        texture = (
            1.0
            + 0.045 * np.sin(37.0 * ax + 11.0 * y + 3.0) * np.sin(29.0 * z - 7.0 * y + 1.0)
            + 0.035 * np.sin(61.0 * y + 17.0 * z + 13.0 * ax)
        )
        return PartMesh(verts, faces, roles, self.role_names, texture)


def _box_corners(lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    lo_, hi_ = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    return np.array([[hi_[0] if i & 1 else lo_[0], hi_[1] if i >> 1 & 1 else lo_[1],
                      hi_[2] if i >> 2 & 1 else lo_[2]] for i in range(8)])


def _section_hexa(
    x_bottom: float,
    x_top: float,
    y_bottom: tuple[float, float],
    y_top: tuple[float, float],
    z_bottom: tuple[float, float],
    z_top: tuple[float, float],
    x_centre: float = 0.0,
) -> np.ndarray:
    """Corners of a tapered box: half-widths x_bottom / x_top, y ranges of the bottom and top
    faces, and z heights (at the −y end, at the +y end) of the bottom and top faces."""
    out = np.zeros((8, 3))
    for i in range(8):
        ix, iy, iz = i & 1, i >> 1 & 1, i >> 2 & 1
        half = x_top if iz else x_bottom
        out[i] = (x_centre + (half if ix else -half),
                  (y_top if iz else y_bottom)[iy],
                  (z_top if iz else z_bottom)[iy])
    return out


def _slab(
    x: tuple[float, float],
    y_root: tuple[float, float],
    y_tip: tuple[float, float],
    z_root: float,
    z_tip: float,
    thick_root: float,
    thick_tip: float,
) -> np.ndarray:
    """Corners of a wing-like slab from x[0] (root) to x[1] (tip), chord y ranges at root and
    tip, centre heights z and thicknesses at root and tip."""
    out = np.zeros((8, 3))
    for i in range(8):
        ix, iy, iz = i & 1, i >> 1 & 1, i >> 2 & 1
        zc, th = (z_tip, thick_tip) if ix else (z_root, thick_root)
        out[i] = (x[ix], (y_tip if ix else y_root)[iy], zc + (th / 2 if iz else -th / 2))
    return out


def _fin(
    x_half: float,
    y_bottom: tuple[float, float],
    y_top: tuple[float, float],
    z: tuple[float, float],
    x_centre: float = 0.0,
    x_shift_top: float = 0.0,
) -> np.ndarray:
    """Corners of a vertical fin (thickness 2·x_half), bottom chord y_bottom at z[0] and top chord
    y_top at z[1]; the top is shifted by x_shift_top (canted fins)."""
    out = np.zeros((8, 3))
    for i in range(8):
        ix, iy, iz = i & 1, i >> 1 & 1, i >> 2 & 1
        xc = x_centre + (x_shift_top if iz else 0.0)
        out[i] = (xc + (x_half if ix else -x_half), (y_top if iz else y_bottom)[iy], z[iz])
    return out


def _rotated_box_z(lo: Sequence[float], hi: Sequence[float], angle: float) -> np.ndarray:
    """Corners of the box [lo, hi] rotated by ``angle`` about the z axis (orientation kept)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return _box_corners(lo, hi) @ rot.T


# ----------------------------------------------------------------------------- cars
@dataclass(frozen=True)
class _CarSpec:
    name: str
    width: float  # full width (length is 1, from y = −0.5 at the front to +0.5)
    clearance: float
    z_front: float  # top of the body at the nose
    z_back: float  # top of the body at the tail
    wheel_r: float
    axles: tuple[float, float]
    cabin_bottom: tuple[float, float]  # y of the windscreen base and of the rear-window base
    cabin_top: tuple[float, float]  # y of the roof's front and back edges
    roof_z: float
    roof_width: float
    kind: str = "car"  # "car", "pickup" or "van"


_CARS: tuple[_CarSpec, ...] = (
    _CarSpec("sedan", 0.40, 0.035, 0.165, 0.185, 0.072, (-0.31, 0.30), (-0.15, 0.26),
             (-0.04, 0.14), 0.30, 0.33),
    _CarSpec("hatchback", 0.44, 0.04, 0.19, 0.215, 0.08, (-0.30, 0.31), (-0.13, 0.46),
             (-0.01, 0.40), 0.37, 0.37),
    _CarSpec("suv", 0.42, 0.06, 0.24, 0.25, 0.088, (-0.31, 0.31), (-0.17, 0.49),
             (-0.06, 0.47), 0.43, 0.37),
    _CarSpec("sports", 0.42, 0.025, 0.12, 0.15, 0.068, (-0.32, 0.31), (-0.10, 0.33),
             (0.03, 0.15), 0.24, 0.32),
    _CarSpec("pickup", 0.40, 0.06, 0.22, 0.23, 0.085, (-0.32, 0.29), (-0.18, 0.06),
             (-0.10, 0.05), 0.41, 0.35, kind="pickup"),
    _CarSpec("van", 0.38, 0.05, 0.23, 0.26, 0.075, (-0.33, 0.31), (-0.39, 0.49),
             (-0.28, 0.485), 0.52, 0.35, kind="van"),
)


def _car(spec: _CarSpec) -> PartMesh:
    b = _Builder("car")
    w2, g = spec.width / 2, spec.clearance
    zf, zb = spec.z_front, spec.z_back
    # Body: vertical front and back faces, top sloping from the bonnet to the boot.
    b.hexa(_section_hexa(w2, w2 * 0.96, (-0.5, 0.5), (-0.5, 0.5), (g, g), (zf, zb)), "body")
    # Cabin (greenhouse): glass all round, body-coloured roof.
    y0, y1 = spec.cabin_bottom
    base = min(zf, zb) - 0.01
    glass = {"+z": "body", "-z": "body", "*": "glass"}
    if spec.kind == "van":
        # Glazed cab up front, panelled cargo box behind with a rear window.
        split = y0 + 0.28
        b.hexa(_section_hexa(w2 * 0.96, spec.roof_width / 2, (y0, split), (spec.cabin_top[0],
               split), (base, base), (spec.roof_z, spec.roof_z)), glass)
        b.hexa(_section_hexa(w2 * 0.96, spec.roof_width / 2, (split, y1), (split,
               spec.cabin_top[1]), (base, base), (spec.roof_z, spec.roof_z)),
               {"+y": "glass", "*": "body"})
    else:
        b.hexa(_section_hexa(w2 * 0.96, spec.roof_width / 2, (y0, y1), spec.cabin_top,
                             (base, base), (spec.roof_z, spec.roof_z)), glass)
    if spec.kind == "pickup":
        # Load bed: side walls, tailgate and a dark floor behind the cab.
        wall = 0.07
        b.box((w2 - 0.02, y1 + 0.02, zb - 0.01), (w2, 0.5, zb + wall), "body", mirror=True)
        b.box((-w2, 0.48, zb - 0.01), (w2, 0.5, zb + wall), "body")
        b.box((-(w2 - 0.02), y1 + 0.02, zb - 0.01), (w2 - 0.02, 0.48, zb + 0.005), "bed")
    # Wheels: black tyres with silver rims, slightly proud of the body sides.
    r = spec.wheel_r
    for ya in spec.axles:
        b.lathe((w2 - 0.06, ya, r), (w2 + 0.004, ya, r), [(0.0, r), (1.0, r)], "tyre",
                u=(0, 0, 1), segments=20, mirror=True)
        b.lathe((w2 + 0.003, ya, r), (w2 + 0.009, ya, r), [(0.0, 0.62 * r), (1.0, 0.55 * r)],
                "rim", u=(0, 0, 1), segments=20, mirror=True)
    # Front: headlights at the corners, grille, number plate and bumper.
    hz = (zf - 0.05, zf - 0.012)
    b.box((w2 - 0.12, -0.507, hz[0]), (w2 - 0.02, -0.49, hz[1]), "headlight", mirror=True)
    b.box((-0.09, -0.504, g + 0.06), (0.09, -0.49, zf - 0.02), "grille")
    b.box((-0.055, -0.514, g + 0.012), (0.055, -0.49, g + 0.042), "plate")
    b.box((-w2, -0.511, g - 0.005), (w2, -0.47, g + 0.035), "bumper")
    # Back: red tail lights, plate and bumper.
    tz = (zb - 0.055, zb - 0.015)
    b.box((w2 - 0.10, 0.49, tz[0]), (w2 - 0.015, 0.506, tz[1]), "taillight", mirror=True)
    b.box((-0.055, 0.49, g + 0.05), (0.055, 0.512, g + 0.08), "plate")
    b.box((-w2, 0.47, g - 0.005), (w2, 0.51, g + 0.035), "bumper")
    # Side mirrors just behind the windscreen base.
    b.box((w2 - 0.01, y0 + 0.02, base + 0.02), (w2 + 0.035, y0 + 0.05, base + 0.05), "body",
          mirror=True)
    return b.finish()


# ----------------------------------------------------------------------------- aeroplanes
def _fuselage_roles(
    cockpit: tuple[float, float], windows: tuple[float, float] | None, radius: float,
    z_centre: float = 0.0,
) -> RoleFn:
    """Cockpit glazing on the upper nose, a cabin-window band along the sides."""

    def fn(centroid: np.ndarray, normal: np.ndarray) -> list[str | None]:
        out: list[str | None] = []
        for c, n in zip(centroid, normal, strict=True):
            role = None
            if cockpit[0] <= c[1] <= cockpit[1] and n[2] > 0.25 and n[1] < 0.2:
                role = "cockpit"
            elif (windows is not None and windows[0] <= c[1] <= windows[1]
                  and abs(n[0]) > 0.75 and 0.1 * radius < c[2] - z_centre < 0.5 * radius):
                role = "window"
            out.append(role)
        return out

    return fn


def _engine(b: _Builder, x: float, y: float, z: float, r: float, length: float) -> None:
    b.lathe((x, y - length / 2, z), (x, y + length / 2, z),
            [(0.0, r), (0.15, r * 1.08), (0.8, r * 0.95), (1.0, r * 0.6)],
            {"side": "engine", "cap0": "intake", "cap1": "intake"}, segments=14, mirror=True)


def _airliner(four_engines: bool) -> PartMesh:
    b = _Builder("aeroplane")
    r = 0.055 if four_engines else 0.05
    b.lathe((0, -0.5, 0), (0, 0.5, 0),
            [(0.0, 0.0), (0.015, 0.45 * r), (0.04, 0.75 * r), (0.09, r), (0.72, r), (0.9, 0.6 * r),
             (1.0, 0.2 * r)],
            {"side": "fuselage", "cap1": "fuselage"}, u=(1, 0, 0), segments=24,
            role_fn=_fuselage_roles((-0.49, -0.43), (-0.38, 0.2), r))
    span = 0.5 if four_engines else 0.47
    b.hexa(_slab((0.03, span), (-0.08, 0.11), (0.16, 0.21), -0.35 * r, 0.02, 0.02, 0.006),
           "wing", mirror=True)
    engines = (0.16, 0.30) if four_engines else (0.17,)
    for x in engines:
        yw = -0.08 + (0.16 + 0.08) * (x - 0.03) / (span - 0.03)
        _engine(b, x, yw - 0.02, -0.35 * r - 0.04, 0.022, 0.13)
        b.box((x - 0.004, yw - 0.03, -0.35 * r - 0.03), (x + 0.004, yw + 0.05, -0.35 * r),
              "engine", mirror=True)
    b.hexa(_slab((0.01, 0.17), (0.36, 0.45), (0.44, 0.48), 0.005, 0.03, 0.012, 0.004), "tail",
           mirror=True)
    b.hexa(_fin(0.006, (0.30, 0.49), (0.44, 0.50), (0.3 * r, 0.21)), "tail")
    # Landing-gear fairing under the centre section.
    b.box((-0.025, -0.05, -1.05 * r), (0.025, 0.12, -0.6 * r), "fuselage")
    return b.finish()


def _fighter() -> PartMesh:
    b = _Builder("aeroplane")
    b.lathe((0, -0.5, 0), (0, 0.5, 0),
            [(0.0, 0.0), (0.12, 0.025), (0.3, 0.045), (0.85, 0.045), (1.0, 0.035)],
            {"side": "fuselage", "cap1": "intake"}, u=(1, 0, 0), scale=(1.1, 0.8), segments=20)
    b.lathe((0, -0.33, 0.028), (0, -0.1, 0.028), [(0.0, 0.0), (0.3, 0.024), (1.0, 0.0)],
            "cockpit", u=(1, 0, 0), scale=(1.0, 0.9), segments=16)
    b.hexa(_slab((0.03, 0.33), (-0.12, 0.33), (0.24, 0.36), 0.0, -0.01, 0.014, 0.004), "wing",
           mirror=True)
    b.hexa(_slab((0.03, 0.15), (0.38, 0.47), (0.45, 0.49), 0.0, -0.005, 0.008, 0.004), "wing",
           mirror=True)
    b.hexa(_fin(0.005, (0.27, 0.46), (0.40, 0.49), (0.025, 0.19), x_centre=0.05,
                x_shift_top=0.035), "tail", mirror=True)
    b.box((0.04, -0.15, -0.035), (0.075, 0.1, 0.015), {"-y": "intake", "*": "fuselage"},
          mirror=True)
    return b.finish()


def _propliner(twin: bool) -> PartMesh:
    b = _Builder("aeroplane")
    r = 0.055
    b.lathe((0, -0.45, 0), (0, 0.5, 0),
            [(0.0, 0.6 * r), (0.06, 0.9 * r), (0.15, r), (0.6, r), (1.0, 0.25 * r)],
            {"side": "fuselage", "cap0": "fuselage", "cap1": "fuselage"}, u=(1, 0, 0),
            segments=22, role_fn=_fuselage_roles((-0.42, -0.33), (-0.3, 0.15) if twin else None,
                                                 r))
    zw = 0.95 * r
    span = 0.6
    b.hexa(_slab((0.0, span), (-0.2, -0.06), (-0.18, -0.08), zw, zw + 0.01, 0.018, 0.01), "wing",
           mirror=True)
    if twin:
        for x in (0.17,):
            b.lathe((x, -0.3, zw - 0.01), (x, -0.05, zw - 0.01),
                    [(0.0, 0.012), (0.15, 0.028), (0.8, 0.026), (1.0, 0.01)], "engine",
                    segments=14, mirror=True)
            b.lathe((x, -0.31, zw - 0.01), (x, -0.305, zw - 0.01), [(0.0, 0.075), (1.0, 0.075)],
                    "prop", segments=16, mirror=True)
        b.hexa(_fin(0.006, (0.28, 0.49), (0.41, 0.47), (0.5 * r, 0.2)), "tail")
        b.hexa(_slab((0.0, 0.15), (0.40, 0.47), (0.44, 0.48), 0.2, 0.2, 0.01, 0.005), "tail",
               mirror=True)
    else:
        b.lathe((0, -0.5, 0), (0, -0.45, 0), [(0.0, 0.0), (1.0, 0.5 * r)], "engine",
                segments=16)
        b.box((-0.16, -0.475, -0.012), (0.16, -0.468, 0.012), "prop")
        b.box((-0.012, -0.475, -0.16), (0.012, -0.468, 0.16), "prop")
        # Wing struts and a fixed landing gear.
        b.hexa(np.array([[0.045, -0.15, -0.5 * r], [0.05, -0.15, -0.5 * r],
                         [0.045, -0.14, -0.5 * r], [0.05, -0.14, -0.5 * r],
                         [0.3, -0.15, zw - 0.01], [0.305, -0.15, zw - 0.01],
                         [0.3, -0.14, zw - 0.01], [0.305, -0.14, zw - 0.01]]), "wing",
               mirror=True)
        b.box((0.05, -0.15, -0.15), (0.06, -0.13, -0.5 * r), "gear", mirror=True)
        b.lathe((0.055, -0.14, -0.15), (0.075, -0.14, -0.15), [(0.0, 0.03), (1.0, 0.03)], "gear",
                u=(0, 0, 1), segments=12, mirror=True)
        b.hexa(_fin(0.006, (0.3, 0.49), (0.43, 0.5), (0.5 * r, 0.19)), "tail")
        b.hexa(_slab((0.0, 0.17), (0.38, 0.47), (0.42, 0.47), 0.01, 0.01, 0.01, 0.005), "tail",
               mirror=True)
    return b.finish()


# ----------------------------------------------------------------------------- chairs
def _legs(b: _Builder, x: float, ys: Sequence[float], z_top: float, size: float,
          role: str = "frame") -> None:
    for y in ys:
        b.box((x - size / 2, y - size / 2, 0.0), (x + size / 2, y + size / 2, z_top), role,
              mirror=True)


def _dining_chair() -> PartMesh:
    b = _Builder("chair")
    w, d, zs = 0.22, 0.22, 0.45
    _legs(b, w - 0.02, (-d + 0.02,), zs - 0.04, 0.036)
    b.box((w - 0.038, d - 0.038, 0.0), (w - 0.002, d - 0.002, 0.98), "frame", mirror=True)
    b.box((-w, -d, zs - 0.05), (w, d, zs), {"+z": "seat", "*": "frame"})
    b.box((-w + 0.002, d - 0.036, 0.86), (w - 0.002, d - 0.004, 0.96), "frame")
    b.box((-0.02, d - 0.03, zs), (0.02, d - 0.01, 0.86), "frame")
    b.box((0.07, d - 0.03, zs), (0.11, d - 0.01, 0.86), "frame", mirror=True)
    b.box((-w + 0.02, -d + 0.01, 0.12), (w - 0.02, -d + 0.03, 0.15), "frame")
    return b.finish()


def _armchair() -> PartMesh:
    b = _Builder("chair")
    _legs(b, 0.29, (-0.26, 0.3), 0.06, 0.05)
    b.box((-0.32, -0.29, 0.06), (0.32, 0.34, 0.2), "frame")
    b.box((-0.24, -0.29, 0.2), (0.24, 0.22, 0.34), {"+z": "cushion", "-y": "cushion",
                                                    "*": "seat"})
    b.hexa(_section_hexa(0.24, 0.24, (0.2, 0.34), (0.26, 0.38), (0.2, 0.2), (0.82, 0.82)),
           {"-y": "cushion", "*": "seat"})
    b.box((0.24, -0.29, 0.2), (0.32, 0.34, 0.52), {"+z": "cushion", "*": "seat"}, mirror=True)
    return b.finish()


def _office_chair() -> PartMesh:
    b = _Builder("chair")
    for k in range(5):
        angle = -math.pi / 2 + 2 * math.pi * k / 5
        if math.cos(angle) < -1e-9:
            continue  # the legs on the −x side are the mirror images of those on +x
        corners = _rotated_box_z((0.0, -0.02, 0.04), (0.3, 0.02, 0.075), angle)
        tip = np.array([0.28 * math.cos(angle), 0.28 * math.sin(angle)])
        mirror = abs(math.cos(angle)) > 1e-9
        b.hexa(corners, "frame", mirror=mirror)
        b.lathe((tip[0] - 0.015, tip[1], 0.02), (tip[0] + 0.015, tip[1], 0.02),
                [(0.0, 0.02), (1.0, 0.02)], "caster", u=(0, 0, 1), segments=10, mirror=mirror)
    b.lathe((0, 0, 0.06), (0, 0, 0.44), [(0.0, 0.035), (0.5, 0.03), (1.0, 0.025)], "frame",
            u=(1, 0, 0), segments=14)
    b.box((-0.25, -0.25, 0.44), (0.25, 0.22, 0.52), {"+z": "cushion", "*": "seat"})
    b.box((-0.03, 0.15, 0.46), (0.03, 0.29, 0.56), "frame")
    b.hexa(_section_hexa(0.23, 0.2, (0.22, 0.28), (0.29, 0.35), (0.56, 0.56), (1.0, 1.0)),
           {"-y": "cushion", "*": "seat"})
    b.box((0.22, -0.08, 0.52), (0.24, -0.04, 0.66), "frame", mirror=True)
    b.box((0.2, -0.16, 0.66), (0.26, 0.12, 0.69), "seat", mirror=True)
    return b.finish()


def _bar_chair() -> PartMesh:
    b = _Builder("chair")
    zs = 0.7
    b.lathe((0, 0, zs - 0.04), (0, 0, zs), [(0.0, 0.18), (1.0, 0.19)],
            {"cap1": "cushion", "*": "seat"}, u=(1, 0, 0), segments=20)
    for y_top, y_bot in ((-0.11, -0.19), (0.11, 0.19)):
        x_top, x_bot = 0.11, 0.19
        t = 0.018
        corners = np.array([[x_bot - t, y_bot - t, 0.0], [x_bot + t, y_bot - t, 0.0],
                            [x_bot - t, y_bot + t, 0.0], [x_bot + t, y_bot + t, 0.0],
                            [x_top - t, y_top - t, zs - 0.04], [x_top + t, y_top - t, zs - 0.04],
                            [x_top - t, y_top + t, zs - 0.04], [x_top + t, y_top + t, zs - 0.04]])
        b.hexa(corners, "frame", mirror=True)
    b.box((-0.17, -0.18, 0.24), (0.17, -0.16, 0.26), "frame")
    b.box((-0.17, 0.16, 0.24), (0.17, 0.18, 0.26), "frame")
    b.box((0.16, -0.17, 0.24), (0.18, 0.17, 0.26), "frame", mirror=True)
    b.box((0.1, 0.12, zs), (0.12, 0.15, 0.98), "frame", mirror=True)
    b.hexa(_section_hexa(0.16, 0.16, (0.12, 0.16), (0.13, 0.17), (0.84, 0.84), (0.99, 0.99)),
           {"-y": "cushion", "*": "frame"})
    return b.finish()


def _plastic_chair() -> PartMesh:
    b = _Builder("chair")
    zs = 0.42
    t = 0.02
    for y_top, y_bot in ((-0.2, -0.25), (0.18, 0.25)):
        x_top, x_bot = 0.2, 0.25
        corners = np.array([[x_bot - t, y_bot - t, 0.0], [x_bot + t, y_bot - t, 0.0],
                            [x_bot - t, y_bot + t, 0.0], [x_bot + t, y_bot + t, 0.0],
                            [x_top - t, y_top - t, zs], [x_top + t, y_top - t, zs],
                            [x_top - t, y_top + t, zs], [x_top + t, y_top + t, zs]])
        b.hexa(corners, "seat", mirror=True)
    b.hexa(_section_hexa(0.24, 0.23, (-0.24, 0.2), (-0.25, 0.2), (zs - 0.02, zs - 0.01),
                         (zs + 0.01, zs + 0.02)), "seat")
    b.hexa(_section_hexa(0.23, 0.25, (0.18, 0.22), (0.28, 0.32), (zs, zs), (0.9, 0.9)),
           {"-y": "cushion", "*": "seat"})
    b.box((0.22, -0.12, zs), (0.25, -0.09, 0.62), "seat", mirror=True)
    b.box((0.22, -0.14, 0.6), (0.27, 0.22, 0.64), "seat", mirror=True)
    return b.finish()


#: Sub-type builders per category, in ``cad_index`` order (1-based in the dataset).
CATEGORY_BUILDERS: dict[str, tuple[tuple[str, Callable[[], PartMesh]], ...]] = {
    "car": tuple((spec.name, functools.partial(_car, spec)) for spec in _CARS),
    "aeroplane": (
        ("airliner", lambda: _airliner(False)),
        ("jumbo", lambda: _airliner(True)),
        ("fighter", _fighter),
        ("highwing", lambda: _propliner(False)),
        ("turboprop", lambda: _propliner(True)),
    ),
    "chair": (
        ("dining", _dining_chair),
        ("armchair", _armchair),
        ("office", _office_chair),
        ("barstool", _bar_chair),
        ("plastic", _plastic_chair),
    ),
}


@cache
def category_subtypes(category: str) -> tuple[SubType, ...]:
    """The CAD models of a category (deterministic, independent of any seed).

    Raises:
        ValueError: for a category without a procedural model.
    """
    if category not in CATEGORY_BUILDERS:
        raise ValueError(
            f"no procedural models for category {category!r}; "
            f"expected one of {', '.join(CATEGORY_BUILDERS)}"
        )
    return tuple(
        SubType(category, i + 1, name, build())
        for i, (name, build) in enumerate(CATEGORY_BUILDERS[category])
    )
