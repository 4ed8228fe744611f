"""Differentiable feature rendering shared by all rasteriser backends.

The rasteriser (any ``Rasterizer``) decides which face owns each pixel without gradients; the
barycentric weights are then recomputed here in torch from the projected vertices, so gradients
flow to the pose (through ``verts_screen``) and to the vertex features. As in NeMo the rendering
is hard: a pixel changing owner is not differentiated (no silhouette gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from nvsm.pose.convention import opencv_extrinsics, project_opencv
from nvsm.render.rasterizer import Rasterizer, check_image_size, default_rasterizer


class MeshLike(Protocol):
    """Anything with ``vertices`` (V, 3) float and ``faces`` (F, 3) int64 (``nvsm.mesh.Mesh``)."""

    @property
    def vertices(self) -> torch.Tensor: ...

    @property
    def faces(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class RenderOutput:
    """Result of ``render_features``.

    Attributes:
        features: (B, D, H, W) interpolated vertex features, 0 on the background. Stored
            channels-last (it is a permuted view of a (B, H, W, D) tensor).
        mask: (B, H, W) bool, True where a face owns the pixel.
        vertex_visible: (B, V) bool, see ``visible_vertices``.
        pix_to_face: (B, H, W) int64 face index per pixel, -1 on the background.
    """

    features: torch.Tensor
    mask: torch.Tensor
    vertex_visible: torch.Tensor
    pix_to_face: torch.Tensor


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _float_dtype(*xs: Any) -> torch.dtype:
    """Promoted floating dtype of the tensor arguments (float32 if none is a float tensor)."""
    dtype: torch.dtype | None = None
    for x in xs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return dtype or torch.float32


def project_vertices(
    vertices: torch.Tensor, r_cv: torch.Tensor, t_cv: torch.Tensor, k: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Project object-space vertices to screen space with OpenCV cameras.

    Args:
        vertices: (V, 3) or (B, V, 3) object coordinates.
        r_cv: (B, 3, 3) world→camera rotations (``nvsm.pose.opencv_extrinsics``); (3, 3) is
            treated as B = 1.
        t_cv: (B, 3) translations; (3,) is treated as B = 1.
        k: (B, 3, 3) or (3, 3) intrinsics (torch or numpy).
    Returns:
        verts_screen: (B, V, 3) = (x_pixel, y_pixel, depth), pixel centres at integer (x, y);
        dtype promoted over the float tensor inputs, device of ``vertices``. Differentiable in
        every tensor argument.
    """
    device = vertices.device
    dtype = _float_dtype(vertices, r_cv, t_cv, k)
    v = vertices.to(dtype)
    r = _as_tensor(r_cv, dtype, device)
    t = _as_tensor(t_cv, dtype, device)
    kk = _as_tensor(k, dtype, device)
    if r.ndim == 2:
        r = r[None]
    if t.ndim == 1:
        t = t[None]
    pix, depth = project_opencv(v, r, t, kk)
    out = torch.cat([pix, depth[..., None]], dim=-1)
    return out if out.ndim == 3 else out[None]


def interpolate_vertex_features(
    verts_screen: torch.Tensor,
    faces: torch.Tensor,
    pix_to_face: torch.Tensor,
    features: torch.Tensor,
) -> torch.Tensor:
    """Perspective-correct barycentric interpolation of vertex features at pixel centres.

    For a pixel (x = j, y = i) owned by face (v0, v1, v2), the screen-space barycentrics l_k of
    the pixel centre give the perspective-correct weights w_k = (l_k / z_k) / Σ_m (l_m / z_m),
    and the pixel's feature is Σ_k w_k · features[v_k]. Beyond that perspective-correct
    normalisation (Σ w_k = 1) the weights are not clamped or re-normalised (as NeMo: pytorch3d
    with clip_barycentric_coords=False), and there is no blending between faces.

    Args:
        verts_screen: (B, V, 3) (x_pixel, y_pixel, depth); gradients flow through it.
        faces: (F, 3) int64.
        pix_to_face: (B, H, W) int64 face index per pixel, -1 on the background.
        features: (V, D) shared by the batch, or (B, V, D); gradients flow to it.
    Returns:
        (B, D, H, W) features (channels-last memory layout), 0 on the background; dtype promoted
        over ``verts_screen`` and ``features``.
    Raises:
        ValueError: when the shapes of the arguments do not match.
    """
    if verts_screen.ndim != 3 or verts_screen.shape[-1] != 3:
        raise ValueError(f"verts_screen must be (B, V, 3), got {tuple(verts_screen.shape)}")
    if pix_to_face.ndim != 3 or pix_to_face.shape[0] != verts_screen.shape[0]:
        raise ValueError(
            f"pix_to_face must be (B, H, W) with the B of verts_screen "
            f"{tuple(verts_screen.shape)}, got {tuple(pix_to_face.shape)}"
        )
    b, h, w = pix_to_face.shape
    n_verts = verts_screen.shape[1]
    if features.ndim not in (2, 3) or features.shape[-2] != n_verts:
        raise ValueError(
            f"features must be (V, D) or (B, V, D) with V = {n_verts}, got {tuple(features.shape)}"
        )
    if features.ndim == 3 and features.shape[0] != b:
        raise ValueError(f"features batch {features.shape[0]} != pix_to_face batch {b}")
    device = verts_screen.device
    dtype = torch.promote_types(verts_screen.dtype, features.dtype)
    # Barycentrics in at least float32: the products of pixel coordinates below overflow
    # float16 for faces a few hundred pixels wide (the weights themselves fit in ``dtype``).
    geom_dtype = torch.promote_types(dtype, torch.float32)
    d = features.shape[-1]
    faces = faces.to(device)

    flat = pix_to_face.reshape(-1)
    fg = torch.nonzero(flat >= 0).squeeze(1)  # (N,) linear pixel ids b·H·W + i·W + j
    face = flat[fg]
    bi = torch.div(fg, h * w, rounding_mode="floor")
    rem = fg - bi * (h * w)
    py = torch.div(rem, w, rounding_mode="floor")
    px = rem - py * w

    vid = faces[face]  # (N, 3)
    tri = verts_screen.to(geom_dtype)[bi[:, None], vid]  # (N, 3, 3)
    x, y, z = tri.unbind(-1)  # (N, 3) each
    dx = x - px.to(geom_dtype)[:, None]
    dy = y - py.to(geom_dtype)[:, None]
    dxn, dyn = dx.roll(-1, dims=1), dy.roll(-1, dims=1)  # vertex k+1
    dxp, dyp = dx.roll(1, dims=1), dy.roll(1, dims=1)  # vertex k+2
    sub = dxn * dyp - dxp * dyn  # (N, 3) twice the signed sub-area opposite vertex k
    q = sub / z  # ∝ l_k / z_k (the common 1/area factor cancels)
    weights = (q / q.sum(1, keepdim=True)).to(dtype)

    feats = features.to(dtype)
    if feats.ndim == 3:
        table = feats.reshape(b * n_verts, d)
        idx = vid + (bi * n_verts)[:, None]
    else:
        table, idx = feats, vid
    out = _InterpolateRows.apply(weights, table, idx, fg, b * h * w)  # (B·H·W, D)
    return out.view(b, h, w, d).permute(0, 3, 1, 2)


def _chunk_rows(device: torch.device) -> int:
    """Rows per chunk in the backward pass: cache-sized on CPU, few launches on GPU."""
    return 8192 if device.type == "cpu" else 1 << 18


class _InterpolateRows(torch.autograd.Function):
    """out[fg[n]] = Σ_k weights[n, k] · table[idx[n, k]], other rows 0.

    Forward: one ``embedding_bag`` over all P output rows (empty bags give the zero background),
    so the large (P, D) output is written exactly once. Backward: chunked gathers and one
    ``index_add_`` per chunk (much faster than ``embedding_bag``'s sort-based backward).

    Args (forward): weights (N, 3) float; table (T, D) float (same dtype); idx (N, 3) int64 rows
    of ``table``; fg (N,) int64 strictly increasing output rows; num_rows P.
    """

    @staticmethod
    def forward(
        ctx: Any,
        weights: torch.Tensor,
        table: torch.Tensor,
        idx: torch.Tensor,
        fg: torch.Tensor,
        num_rows: int,
    ) -> torch.Tensor:
        per_row = torch.zeros(num_rows, dtype=torch.int64, device=table.device)
        per_row[fg] = 3
        offsets = torch.cumsum(per_row, 0) - per_row
        out = F.embedding_bag(
            idx.reshape(-1), table, offsets, mode="sum", per_sample_weights=weights.reshape(-1)
        )
        ctx.save_for_backward(weights, table, idx, fg)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        weights, table, idx, fg = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.empty_like(weights) if need_w else None
        grad_t = torch.zeros_like(table) if need_t else None
        n, d = weights.shape[0], table.shape[1]
        chunk = _chunk_rows(table.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            g = grad_out.index_select(0, fg[s:e])  # (c, D)
            rows = idx[s:e].reshape(-1)
            if grad_w is not None:
                t = table.index_select(0, rows).view(e - s, 3, d)
                grad_w[s:e] = torch.bmm(t, g[:, :, None])[..., 0]
            if grad_t is not None:
                contrib = weights[s:e, :, None] * g[:, None, :]  # (c, 3, D)
                grad_t.index_add_(0, rows, contrib.reshape(-1, d))
        return grad_w, grad_t, None, None, None


def visible_vertices(
    pix_to_face: torch.Tensor, faces: torch.Tensor, num_vertices: int
) -> torch.Tensor:
    """Vertices of faces that own at least one pixel.

    Args:
        pix_to_face: (B, H, W) int64, -1 on the background.
        faces: (F, 3) int64.
        num_vertices: V.
    Returns:
        (B, V) bool.
    """
    b = pix_to_face.shape[0]
    n_faces = faces.shape[0]
    device = pix_to_face.device
    flat = pix_to_face.flatten(1)  # reshape(b, -1) is ambiguous for an empty batch
    packed = flat + torch.arange(b, device=device)[:, None] * n_faces
    packed = packed[flat >= 0]
    face_seen = torch.zeros(b * n_faces, dtype=torch.bool, device=device)
    face_seen[packed] = True
    face_seen = face_seen.view(b, n_faces)
    vert_ids = faces.to(device).reshape(-1)
    hits = torch.zeros(b, num_vertices, dtype=torch.int32, device=device)
    hits.index_add_(1, vert_ids, face_seen.repeat_interleave(3, dim=1).to(torch.int32))
    return hits > 0


def render_features(
    mesh: MeshLike,
    features: torch.Tensor,
    r_cv: torch.Tensor,
    t_cv: torch.Tensor,
    k: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    rasterizer: Rasterizer | None = None,
) -> RenderOutput:
    """Render vertex features of a mesh seen by B OpenCV cameras.

    Args:
        mesh: ``vertices`` (V, 3) and ``faces`` (F, 3).
        features: (V, D) or (B, V, D) vertex features.
        r_cv: (B, 3, 3); t_cv: (B, 3); k: (B, 3, 3) or (3, 3) — see ``project_vertices``.
        image_size: (H, W) of the rendered map.
        rasterizer: backend; ``default_rasterizer`` of the vertices' device when None.
    Returns:
        ``RenderOutput`` with features (B, D, H, W), differentiable in the cameras and features.
    Raises:
        ValueError: unless ``image_size`` is two positive ints.
    """
    verts = mesh.vertices.to(features.device)
    faces = mesh.faces.to(features.device)
    if rasterizer is None:
        rasterizer = default_rasterizer(verts.device)
    size = check_image_size(image_size)
    verts_screen = project_vertices(verts, r_cv, t_cv, k)
    pix_to_face = rasterizer.rasterize(verts_screen.detach(), faces, size)
    rendered = interpolate_vertex_features(verts_screen, faces, pix_to_face, features)
    return RenderOutput(
        features=rendered,
        mask=pix_to_face >= 0,
        vertex_visible=visible_vertices(pix_to_face, faces, verts.shape[0]),
        pix_to_face=pix_to_face,
    )


def render_pose(
    mesh: MeshLike,
    features: torch.Tensor,
    azimuth: torch.Tensor | float,
    elevation: torch.Tensor | float,
    theta: torch.Tensor | float,
    distance: torch.Tensor | float,
    k: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    rasterizer: Rasterizer | None = None,
) -> RenderOutput:
    """Render vertex features at PASCAL3D+ poses (radians), differentiable in the pose tensors.

    Args:
        mesh: ``vertices`` (V, 3) and ``faces`` (F, 3).
        features: (V, D) or (B, V, D).
        azimuth, elevation, theta, distance: broadcastable to (B,) (scalars give B = 1).
        k: (3, 3) or (B, 3, 3) intrinsics of the rendered map (e.g. ``feature_intrinsics``).
        image_size: (H, W).
        rasterizer: backend; ``default_rasterizer`` when None.
    Returns:
        ``RenderOutput`` (see ``render_features``).
    """
    device = features.device
    dtype = _float_dtype(azimuth, elevation, theta, distance, mesh.vertices)
    a, e, t, d = (_as_tensor(p, dtype, device) for p in (azimuth, elevation, theta, distance))
    r_cv, t_cv = opencv_extrinsics(a, e, t, d)
    return render_features(
        mesh, features, r_cv.reshape(-1, 3, 3), t_cv.reshape(-1, 3), k, image_size, rasterizer
    )
