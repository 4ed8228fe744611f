"""pytorch3d rasteriser backend (imported lazily; pytorch3d is an optional dependency).

nvsm screen coordinates are converted to pytorch3d's NDC: +X points left, +Y up, the shorter
image side spans [-1, 1] and pixel centres sit at odd multiples of 1/min(H, W). With
s = min(H, W), the centre of OpenCV pixel (x = j, y = i) is pytorch3d's pixel (i, j) at

    ndc_x = (W − 1 − 2x) / s,        ndc_y = (H − 1 − 2y) / s,

and z (camera depth) is passed unchanged with ``perspective_correct=True``, so pytorch3d's
z-buffer compares the same perspective-correct depth as ``TorchRasterizer``.
"""

from __future__ import annotations

import torch

from nvsm.render.rasterizer import NEAR_PLANE, check_image_size

#: pytorch3d's default max_faces_per_bin is max(10000, F / 5): with at most this many faces per
#: mesh, coarse-to-fine bins can never overflow, so binning is exact.
_NO_OVERFLOW_FACES = 10000
#: Squared NDC distance within which a pixel centre outside a face still counts as covered.
#: With blur_radius=0 pytorch3d treats a centre exactly on an edge as outside BOTH faces that
#: share the edge (holes along a mesh's diagonals); this admits such centres, as
#: ``TorchRasterizer``'s barycentric tolerance does, without widening faces visibly
#: (1e-6 NDC ≈ 1e-6·min(H, W)/2 pixels).
_EDGE_BLUR = 1e-12


class Pytorch3dRasterizer:
    """Rasterise with ``pytorch3d.renderer.mesh.rasterize_meshes.rasterize_meshes``.

    faces_per_pixel=1, blur_radius=``_EDGE_BLUR`` (pixel centres on an edge are covered),
    perspective_correct=True, no culling. Faces with a vertex at depth <= ``near`` (or a
    non-finite vertex) are redirected to a dummy vertex behind the camera and outside the image,
    i.e. they become degenerate and are culled.

    Args:
        near: faces with any vertex at depth <= ``near`` are ignored.
        bin_size: passed to pytorch3d when given (0 = naive per-pixel loop over all faces).
            None (default) picks: 0 on CPU (pytorch3d has no binned CPU path, so None and 0 are
            the same there); on CUDA pytorch3d's coarse-to-fine heuristic when the mesh has at
            most 10000 faces (bins cannot overflow, so the result is exact), else 0.
    """

    name: str = "pytorch3d"

    def __init__(self, near: float = NEAR_PLANE, bin_size: int | None = None) -> None:
        self.near = float(near)
        self.bin_size = bin_size

    def __repr__(self) -> str:
        return f"Pytorch3dRasterizer(near={self.near}, bin_size={self.bin_size})"

    def _bin_size(self, device: torch.device, n_faces: int) -> int | None:
        if self.bin_size is not None:
            return self.bin_size
        if device.type == "cuda" and n_faces <= _NO_OVERFLOW_FACES:
            return None
        return 0

    def rasterize(
        self, verts_screen: torch.Tensor, faces: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """See ``Rasterizer.rasterize``: (B, V, 3) screen vertices → (B, H, W) int64 face ids."""
        return self.rasterize_fragments(verts_screen, faces, image_size)[0]

    @torch.no_grad()
    def rasterize_fragments(
        self, verts_screen: torch.Tensor, faces: torch.Tensor, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``rasterize`` but also returns pytorch3d's perspective-correct barycentrics.

        Returns:
            pix_to_face (B, H, W) int64 (-1 background) and barycentrics (B, H, W, 3) float32
            (weights of the face's vertices 0, 1, 2; -1 on the background).
        """
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
        from pytorch3d.structures import Meshes

        h, w = check_image_size(image_size)
        if verts_screen.ndim != 3 or verts_screen.shape[-1] != 3:
            raise ValueError(f"verts_screen must be (B, V, 3), got {tuple(verts_screen.shape)}")
        if faces.ndim != 2 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
        device = verts_screen.device
        b, n_verts = verts_screen.shape[:2]
        n_faces = faces.shape[0]
        if b == 0 or n_faces == 0:
            return (
                torch.full((b, h, w), -1, dtype=torch.int64, device=device),
                torch.full((b, h, w, 3), -1.0, device=device),
            )
        faces = faces.to(device)

        vs = verts_screen.detach().float()
        x, y, z = vs.unbind(-1)
        s = float(min(h, w))
        ndc = torch.stack([(w - 1 - 2 * x) / s, (h - 1 - 2 * y) / s, z], dim=-1)
        good_vert = torch.isfinite(vs).all(-1) & (z > self.near)  # (B, V)
        ndc = torch.where(good_vert[..., None], ndc, 0.0)
        # Dummy vertex V: behind the camera and far outside the image.
        dummy = torch.tensor([1e4, 1e4, -1.0], device=device).expand(b, 1, 3)
        ndc = torch.cat([ndc, dummy], dim=1)  # (B, V + 1, 3)
        good_face = good_vert[:, faces].all(-1)  # (B, F)
        faces_b = torch.where(good_face[..., None], faces, n_verts)  # (B, F, 3)

        meshes = Meshes(verts=ndc, faces=faces_b)
        pix_to_face, _, bary, _ = rasterize_meshes(
            meshes,
            image_size=(h, w),
            blur_radius=_EDGE_BLUR,
            faces_per_pixel=1,
            bin_size=self._bin_size(device, n_faces),
            perspective_correct=True,
            clip_barycentric_coords=False,
            cull_backfaces=False,
        )
        p2f = pix_to_face[..., 0]  # (B, H, W) packed index b·F + f
        offset = torch.arange(b, device=device).view(b, 1, 1) * n_faces
        return torch.where(p2f >= 0, p2f - offset, -1).long(), bary[..., 0, :]
