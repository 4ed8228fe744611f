"""THE camera/pose convention of nvsm: PASCAL3D+ viewpoints. Every other module asks this one.

==========================================================================================
  PASCAL3D+ viewpoint convention (angles in RADIANS everywhere in nvsm's Python API)
==========================================================================================

Object coordinates are the CAD frame of PASCAL3D+: z is up, the object origin is its centre.

  a  azimuth     rotation of the camera about the object's z axis
  e  elevation   height angle of the camera above the object's xy plane
  θ  theta       in-plane rotation of the image about the optical axis
  d  distance    camera-to-origin distance (object units)

  camera centre      C = d · (cos e · sin a,  −cos e · cos a,  sin e)
  world→camera       R(a, e) = Rx(e − π/2) · Rz(−a)
  projection         (u, v) = f·M · (R(X − C))_xy / −(R(X − C))_z      (camera looks along −z)
                     (u, v) ← R2(θ) · (u, v);   v ← −v;   pixel (x, y) = (u + px, v + py)
  evaluation         R_eval(a, e, θ) = Rz(θ) · R(a, e)     (what rotation errors compare)

with f = focal (1 in PASCAL3D+) and M = viewport (3000), so the focal length is f·M pixels,
and (px, py) is the pixel where the object origin projects.

Equivalent OpenCV camera (x right, y down, z forward; pixel centres at integer coordinates),
used by the renderers and by the crop cameras:

  R_cv = diag(1, −1, −1) · R_eval(a, e, θ)        t_cv = (0, 0, d)         X_cv = R_cv · X + t_cv
  K    = [[f·M, 0, px], [0, f·M, py], [0, 0, 1]]   pixel = (K · X_cv)_xy / (X_cv)_z

so the object origin always sits on the optical axis at depth d and projects to (px, py).

Inverse (``pose_from_rotation``): R_eval = Rz(θ)·Rx(e − π/2)·Rz(−a) is a z-x-z Euler
decomposition and is exact away from the poles. At e = ±90° azimuth and θ turn about the same
axis; there nvsm defines a = 0 and puts the whole turn into θ, so the rotation is preserved.

Every function accepts numpy arrays, Python floats or torch tensors (batched, broadcast), and
returns torch tensors for torch input and numpy arrays otherwise. Torch paths are differentiable.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)
ArrayLike = Any  # float | np.ndarray | torch.Tensor

#: Viewport of PASCAL3D+ annotations: focal·viewport is the focal length in pixels.
PASCAL3D_VIEWPORT = 3000.0
#: Distance a ``gt-normalized`` crop rescales every object to (NeMo protocol).
NORMALIZED_DISTANCE = 5.0
#: |cos e| below which a rotation is treated as a pole (azimuth and θ degenerate).
POLE_EPS = 1e-7

_FLIP_YZ = (1.0, -1.0, -1.0)


def _to_torch(*values: ArrayLike) -> tuple[list[torch.Tensor], bool]:
    """Return the values as torch tensors and whether the caller passed any torch tensor.

    Numpy/float input is computed in float64 and handed back as numpy by ``_back``. With torch
    input, the rest follows the first floating tensor's dtype (the default dtype if none is
    floating: an integer tensor must not truncate the other values) and the first tensor's
    device.
    """
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in values], False
    floating = next((v for v in tensors if v.is_floating_point()), None)
    dtype = floating.dtype if floating is not None else torch.get_default_dtype()
    device = tensors[0].device
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v if v.dtype == dtype else v.to(dtype))  # float32 beside float64 too
        else:
            out.append(torch.as_tensor(np.asarray(v), dtype=dtype, device=device))
    return out, True


def _back(x: torch.Tensor, is_torch: bool) -> Any:
    return x if is_torch else x.detach().cpu().numpy()


def _rz(phi: torch.Tensor) -> torch.Tensor:
    """Rotation about z by phi, shape (..., 3, 3)."""
    c, s = torch.cos(phi), torch.sin(phi)
    o, z = torch.ones_like(phi), torch.zeros_like(phi)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(*phi.shape, 3, 3)


def _rx(phi: torch.Tensor) -> torch.Tensor:
    """Rotation about x by phi, shape (..., 3, 3)."""
    c, s = torch.cos(phi), torch.sin(phi)
    o, z = torch.ones_like(phi), torch.zeros_like(phi)
    return torch.stack([o, z, z, z, c, -s, z, s, c], dim=-1).reshape(*phi.shape, 3, 3)


def _rotation_torch(
    azimuth: torch.Tensor, elevation: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    a, e, t = torch.broadcast_tensors(azimuth, elevation, theta)
    return _rz(t) @ _rx(e - math.pi / 2) @ _rz(-a)


def rotation_matrix(azimuth: ArrayLike, elevation: ArrayLike, theta: ArrayLike) -> Any:
    """Evaluation rotation R_eval = Rz(θ) · Rx(e − π/2) · Rz(−a).

    Args:
        azimuth, elevation, theta: radians, any broadcastable shape (...).
    Returns:
        (..., 3, 3) rotation matrices (torch if any input is torch, else numpy).
    """
    (a, e, t), is_torch = _to_torch(azimuth, elevation, theta)
    return _back(_rotation_torch(a, e, t), is_torch)


def camera_centre(azimuth: ArrayLike, elevation: ArrayLike, distance: ArrayLike) -> Any:
    """Camera centre in object coordinates, C = d·(cos e sin a, −cos e cos a, sin e); (..., 3)."""
    (a, e, d), is_torch = _to_torch(azimuth, elevation, distance)
    a, e, d = torch.broadcast_tensors(a, e, d)
    c = torch.stack([torch.cos(e) * torch.sin(a), -torch.cos(e) * torch.cos(a), torch.sin(e)], -1)
    return _back(c * d[..., None], is_torch)


def opencv_extrinsics(
    azimuth: ArrayLike, elevation: ArrayLike, theta: ArrayLike, distance: ArrayLike
) -> tuple[Any, Any]:
    """OpenCV world→camera extrinsics of a PASCAL3D+ pose: ``X_cv = R_cv · X + t_cv``.

    Returns:
        R_cv (..., 3, 3) = diag(1, −1, −1)·R_eval and t_cv (..., 3) = (0, 0, d).
    """
    (a, e, t, d), is_torch = _to_torch(azimuth, elevation, theta, distance)
    a, e, t, d = torch.broadcast_tensors(a, e, t, d)
    flip = torch.tensor(_FLIP_YZ, dtype=a.dtype, device=a.device)
    r_cv = flip[:, None] * _rotation_torch(a, e, t)
    t_cv = torch.stack([torch.zeros_like(d), torch.zeros_like(d), d], dim=-1)
    return _back(r_cv, is_torch), _back(t_cv, is_torch)


def intrinsics(focal_px: ArrayLike, px: ArrayLike, py: ArrayLike) -> Any:
    """Pinhole K (..., 3, 3) = [[f, 0, px], [0, f, py], [0, 0, 1]], pixel centres at integers."""
    (f, cx, cy), is_torch = _to_torch(focal_px, px, py)
    f, cx, cy = torch.broadcast_tensors(f, cx, cy)
    z, o = torch.zeros_like(f), torch.ones_like(f)
    k = torch.stack([f, z, cx, z, f, cy, z, z, o], dim=-1).reshape(*f.shape, 3, 3)
    return _back(k, is_torch)


def project_opencv(points: Array, r_cv: Array, t_cv: Array, k: Array) -> tuple[Array, Array]:
    """Project object points with an OpenCV camera.

    Args:
        points: (..., N, 3) object coordinates.
        r_cv: (..., 3, 3); t_cv: (..., 3); k: (..., 3, 3) — batch dims broadcast with points'.
    Returns:
        pixels (..., N, 2) as (x, y), and depth (..., N) along the optical axis (z of X_cv).
        A point at (near) zero depth, |w| <= eps of its dtype, projects to the plain quotient
        (inf or NaN at exactly 0) and gets zero gradient.
    """
    (p, r, t, kk), is_torch = _to_torch(points, r_cv, t_cv, k)
    x_cv = p @ r.transpose(-1, -2) + t[..., None, :]
    uvw = x_cv @ kk.transpose(-1, -2)
    uv, w = uvw[..., :2], uvw[..., 2:3]
    # Renderers cull such points, so their upstream gradient is 0, but the backward of uv / w
    # would still form 0 · inf = NaN there and spread it to the pose: divide by 1 instead, and
    # put the (detached) plain quotient back so that the forward values are unchanged.
    at_zero = w.abs() <= torch.finfo(w.dtype).eps
    pix = torch.where(at_zero, (uv / w).detach(), uv / torch.where(at_zero, 1.0, w))
    return _back(pix, is_torch), _back(x_cv[..., 2], is_torch)


def project_pascal3d(
    points: ArrayLike,
    azimuth: ArrayLike,
    elevation: ArrayLike,
    theta: ArrayLike,
    distance: ArrayLike,
    px: ArrayLike,
    py: ArrayLike,
    focal: ArrayLike = 1.0,
    viewport: ArrayLike = PASCAL3D_VIEWPORT,
) -> Any:
    """Project object points to image pixels exactly as PASCAL3D+ annotations define it.

    Args:
        points: (..., N, 3) object (CAD) coordinates.
        azimuth, elevation, theta: radians, shape (...) or scalars.
        distance: camera distance, (...) or scalar; PASCAL3D+'s d = 0 is NOT patched here
            (the readers reject or fix it explicitly).
        px, py: pixel where the object origin projects; focal, viewport: focal = focal·viewport px.
    Returns:
        (..., N, 2) pixel coordinates (x, y).
    """
    (pts, a, e, t, d, cx, cy, f, m), is_torch = _to_torch(
        points, azimuth, elevation, theta, distance, px, py, focal, viewport
    )
    r_cv, t_cv = opencv_extrinsics(a, e, t, d)
    k = intrinsics(f * m, cx, cy)
    pix, _ = project_opencv(pts, r_cv, t_cv, k)
    return _back(pix, is_torch)


def pose_from_rotation(rotation: ArrayLike) -> tuple[Any, Any, Any]:
    """Invert ``rotation_matrix``: R_eval (..., 3, 3) → (azimuth, elevation, theta) in radians.

    Azimuth is returned in [0, 2π), elevation in [−π/2, π/2], theta in (−π, π]. At the poles
    (|cos e| < POLE_EPS) azimuth is defined as 0 and the turn goes into theta.
    """
    (r,), is_torch = _to_torch(rotation)
    r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    cos_e = torch.hypot(r20, r21)
    elevation = torch.atan2(r22, cos_e)
    pole = cos_e < POLE_EPS
    # sin(e − π/2) = −cos e < 0 flips the signs of the row/column read-outs.
    azimuth = torch.where(pole, torch.zeros_like(r20), -torch.atan2(-r20, -r21))
    theta = torch.where(
        pole, torch.atan2(r[..., 1, 0], r[..., 0, 0]), torch.atan2(-r[..., 0, 2], r[..., 1, 2])
    )
    return (
        _back(wrap_azimuth(azimuth), is_torch),
        _back(elevation, is_torch),
        _back(wrap_angle(theta), is_torch),
    )


def pose_from_opencv(r_cv: ArrayLike, t_cv: ArrayLike) -> tuple[Any, Any, Any, Any]:
    """Invert ``opencv_extrinsics``: (R_cv, t_cv) → (azimuth, elevation, theta, distance).

    The distance is ‖t_cv‖ (the object origin's distance from the camera).
    """
    (r, t), is_torch = _to_torch(r_cv, t_cv)
    flip = torch.tensor(_FLIP_YZ, dtype=r.dtype, device=r.device)
    a, e, th = pose_from_rotation(flip[:, None] * r)
    return a, e, th, _back(torch.linalg.norm(t, dim=-1), is_torch)


def mirror_pose(azimuth: Array, elevation: Array, theta: Array) -> tuple[Array, Array, Array]:
    """Pose of the horizontally flipped image: (a, e, θ) → (−a mod 2π, e, −θ wrapped to (−π, π]).

    Valid for objects that are mirror-symmetric about their x = 0 plane (PASCAL3D+ CAD models:
    the left/right plane), with the flip taken about the column of the principal point. Both
    angles come back in the ranges every pose function uses, so θ = π mirrors to π, not −π.
    """
    return wrap_azimuth(-azimuth), elevation, wrap_angle(-theta)


def wrap_angle(x: Array) -> Array:
    """Wrap radians to (−π, π]."""
    return math.pi - wrap_azimuth(math.pi - x)


def wrap_azimuth(x: Array) -> Array:
    """Wrap radians to [0, 2π). The remainder alone rounds a tiny negative angle (such as the
    −2e−16 that 2π comes back as from atan2) up to 2π itself."""
    if isinstance(x, torch.Tensor):
        r = torch.remainder(x, 2 * math.pi)
        return torch.where(r >= 2 * math.pi, r - 2 * math.pi, r)
    r = np.mod(np.asarray(x), 2 * math.pi)
    return np.where(r >= 2 * math.pi, r - 2 * math.pi, r)
