"""Pure-torch z-buffer rasteriser (CPU or GPU, no compiled extension).

Algorithm (vectorised over faces and pixels; Python loops only over size buckets and chunks):

1. Every (batch, face) pair gets the integer pixel centres of its bounding box clipped to the
   image, ``nx`` columns by ``ny`` rows (nothing for culled faces).
2. Faces are bucketed by (next power of two of nx, next power of two of ny). Inside a bucket all
   faces are evaluated on the same padded (bh, bw) grid of pixel offsets by broadcasting their
   per-face coefficients: no per-candidate gathers, and at most 4x padding (typically ~1.4x).
3. Barycentrics come from edge functions pre-divided by the face's signed area; the
   perspective-correct inverse depth ``Σ_k l_k / z_k`` is affine in screen space, so it is one
   plane per face.
4. Depth and face index are packed into one int64 key (float32 depth bits, which order like the
   depths for positive floats, in the high word; face index in the low word) and reduced per
   pixel with ``scatter_reduce_(..., 'amin')``: the nearest face wins, ties go to the lower face
   index, deterministically on every device.
"""

from __future__ import annotations

import numbers

import torch

from nvsm.render.rasterizer import NEAR_PLANE, check_image_size

# Pixel centres within this barycentric tolerance of an edge count as inside, so that pixels on
# an edge shared by two triangles are never dropped by rounding (the z-buffer picks one).
_INSIDE_EPS = 1e-6
_EMPTY = torch.iinfo(torch.int64).max
_BUCKET_BASE = 64  # bucket id = log2(bw) · 64 + log2(bh)


class TorchRasterizer:
    """Vectorised pure-torch rasteriser; see the module docstring for the algorithm.

    Args:
        max_candidates: upper bound on padded (face, pixel) candidates evaluated at once, which
            bounds the temporary memory to roughly ``max_candidates · 40`` bytes (a single face
            covering the whole image may exceed it). None: 2^18 on CPU (cache-friendly),
            2^22 on other devices (fewer kernel launches).
        near: faces with any vertex at depth <= ``near`` are ignored.
    """

    name: str = "torch"

    def __init__(self, max_candidates: int | None = None, near: float = NEAR_PLANE) -> None:
        if max_candidates is not None and (
            not isinstance(max_candidates, numbers.Integral)
            or isinstance(max_candidates, bool)
            or max_candidates < 1
        ):
            raise ValueError(f"max_candidates must be None or an int >= 1, got {max_candidates!r}")
        self.max_candidates = None if max_candidates is None else int(max_candidates)
        self.near = float(near)

    def __repr__(self) -> str:
        return f"TorchRasterizer(max_candidates={self.max_candidates}, near={self.near})"

    def _budget(self, device: torch.device) -> int:
        if self.max_candidates is not None:
            return self.max_candidates
        return 1 << 18 if device.type == "cpu" else 1 << 22

    @torch.no_grad()
    def rasterize(
        self, verts_screen: torch.Tensor, faces: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """See ``Rasterizer.rasterize``: (B, V, 3) screen vertices → (B, H, W) int64 face ids."""
        h, w = check_image_size(image_size)
        if verts_screen.ndim != 3 or verts_screen.shape[-1] != 3:
            raise ValueError(f"verts_screen must be (B, V, 3), got {tuple(verts_screen.shape)}")
        if faces.ndim != 2 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
        device = verts_screen.device
        b, n_faces = verts_screen.shape[0], faces.shape[0]
        empty = torch.full((b, h, w), -1, dtype=torch.int64, device=device)
        if b == 0 or n_faces == 0:
            return empty

        # At least float32: in float16 the signed area (a product of pixel coordinates)
        # overflows for faces a few hundred pixels wide, which then silently vanish, and
        # bfloat16's 8-bit mantissa misplaces edges by whole pixels.
        vs = verts_screen.detach()
        vs = vs.to(torch.promote_types(vs.dtype, torch.float32))
        flat_faces = faces.to(device).reshape(-1)
        finite_v = torch.isfinite(vs).all(-1)  # (B, V)
        vs = torch.where(finite_v[..., None], vs, 1.0)  # keep garbage out of the boxes
        tri = vs.index_select(1, flat_faces).view(b, n_faces, 3, 3)  # (B, F, vertex, xyz)
        x, y, z = tri.unbind(-1)  # each (B, F, 3)
        area = (x[..., 1] - x[..., 0]) * (y[..., 2] - y[..., 0]) - (x[..., 2] - x[..., 0]) * (
            y[..., 1] - y[..., 0]
        )
        finite = finite_v.index_select(1, flat_faces).view(b, n_faces, 3).all(-1)
        valid = finite & (z > self.near).all(-1) & (area != 0)

        # Bounding boxes of integer pixel centres, clipped to the image (clamped before the
        # integer conversion so that nothing overflows).
        x0 = torch.ceil(x.amin(-1).clamp(-1.0, w)).long().clamp_(min=0)
        x1 = torch.floor(x.amax(-1).clamp(-1.0, w)).long().clamp_(max=w - 1)
        y0 = torch.ceil(y.amin(-1).clamp(-1.0, h)).long().clamp_(min=0)
        y1 = torch.floor(y.amax(-1).clamp(-1.0, h)).long().clamp_(max=h - 1)
        nx = (x1 - x0 + 1).reshape(-1)
        ny = (y1 - y0 + 1).reshape(-1)
        keep = valid.reshape(-1) & (nx > 0) & (ny > 0)
        sel = torch.nonzero(keep).squeeze(1)  # (S,) flat (b·F + f) ids of faces to draw
        if sel.numel() == 0:
            return empty

        # Bucket by padded grid size; sorting makes every bucket a contiguous run of faces.
        nx, ny = nx.index_select(0, sel), ny.index_select(0, sel)
        log_w = torch.ceil(torch.log2(nx.to(torch.float64))).long()
        log_h = torch.ceil(torch.log2(ny.to(torch.float64))).long()
        bucket, order = torch.sort(log_w * _BUCKET_BASE + log_h)
        sel, nx, ny = sel[order], nx[order], ny[order]
        ids, runs = torch.unique_consecutive(bucket, return_counts=True)

        sel_x0 = x0.reshape(-1).index_select(0, sel)
        sel_y0 = y0.reshape(-1).index_select(0, sel)
        # Vertex coordinates relative to the box corner (x0, y0): offsets are then (dx, dy).
        xs = x.reshape(-1, 3).index_select(0, sel) - sel_x0[:, None].to(x.dtype)
        ys = y.reshape(-1, 3).index_select(0, sel) - sel_y0[:, None].to(y.dtype)
        inv_z = 1.0 / z.reshape(-1, 3).index_select(0, sel)
        inv_area = 1.0 / area.reshape(-1).index_select(0, sel)
        xn, yn = xs.roll(-1, dims=1), ys.roll(-1, dims=1)  # vertex k+1
        xp, yp = xs.roll(1, dims=1), ys.roll(1, dims=1)  # vertex k+2
        # l_k = cross(v_{k+1} − p, v_{k+2} − p) / area = ea_k·dx + eb_k·dy + ec_k.
        ea = (yn - yp) * inv_area[:, None]
        eb = (xp - xn) * inv_area[:, None]
        ec = (xn * yp - xp * yn) * inv_area[:, None]
        # Inverse depth Σ_k l_k / z_k is the plane za·dx + zb·dy + zc.
        za, zb, zc = (ea * inv_z).sum(1), (eb * inv_z).sum(1), (ec * inv_z).sum(1)

        sel_b = torch.div(sel, n_faces, rounding_mode="floor")
        first_pix = sel_b * (h * w) + sel_y0 * w + sel_x0
        face_id = sel - sel_b * n_faces

        out = torch.full((b * h * w,), _EMPTY, dtype=torch.int64, device=device)
        budget = self._budget(device)
        start = 0
        for bucket_id, run in zip(ids.tolist(), runs.tolist(), strict=True):
            bw, bh = 1 << (bucket_id // _BUCKET_BASE), 1 << (bucket_id % _BUCKET_BASE)
            step = max(1, budget // (bw * bh))
            dx = torch.arange(bw, device=device)
            dy = torch.arange(bh, device=device)[:, None]
            dxf, dyf = dx.to(xs.dtype), dy.to(xs.dtype)
            offset = dy * w + dx  # (bh, bw)
            for s in range(start, start + run, step):
                e = min(s + step, start + run)
                # (c, 3, bh, bw) barycentrics of the padded grid.
                lam = torch.addcmul(
                    torch.addcmul(ec[s:e, :, None, None], ea[s:e, :, None, None], dxf),
                    eb[s:e, :, None, None],
                    dyf,
                )
                inside = lam.amin(1) >= -_INSIDE_EPS  # (c, bh, bw)
                inside &= dx < nx[s:e, None, None]
                inside &= dy < ny[s:e, None, None]
                inv_depth = torch.addcmul(
                    torch.addcmul(zc[s:e, None, None], za[s:e, None, None], dxf),
                    zb[s:e, None, None],
                    dyf,
                )
                inside &= inv_depth > 0
                depth = torch.reciprocal(inv_depth).float()
                # Positive float32 bit patterns order like the floats: (depth, face) in 1 int64.
                key = (depth.view(torch.int32).long() << 32) | face_id[s:e, None, None]
                key = torch.where(inside, key, _EMPTY)
                pix = torch.where(inside, first_pix[s:e, None, None] + offset, 0)
                out.scatter_reduce_(0, pix.reshape(-1), key.reshape(-1), reduce="amin")
            start += run

        return torch.where(out == _EMPTY, -1, out & 0xFFFFFFFF).view(b, h, w)
