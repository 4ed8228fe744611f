"""The rasteriser interface and backend selection.

A rasteriser only decides WHICH face owns each pixel; everything differentiable (barycentric
interpolation, gradients to the pose and to the features) lives in ``nvsm.render.features`` and is
shared by all backends.

Screen-space convention (shared by every backend):

* ``verts_screen[b, v] = (x, y, z)``: (x, y) are OpenCV pixel coordinates of ``nvsm.pose`` (the
  centre of pixel row i, column j is x = j, y = i) and z is the camera-space depth (> 0 in
  front of the camera).
* A pixel belongs to a triangle when its CENTRE lies inside the projected triangle. Among the
  triangles covering a pixel, the nearest one wins (z-buffer on the perspective-correct depth of
  the triangle at the pixel centre). One face per pixel, no blur.
* Triangles with any vertex at depth <= ``NEAR_PLANE`` (or with a non-finite vertex) are ignored;
  they are not clipped.
* Front and back faces are both rasterised (no culling); the z-buffer hides back faces of a
  closed mesh.
"""

from __future__ import annotations

import importlib.util
import numbers
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch

#: Faces with any vertex at camera depth <= NEAR_PLANE are not rasterised.
NEAR_PLANE = 1e-4

RasterizerName = Literal["torch", "pytorch3d", "auto"]
RASTERIZER_NAMES: tuple[str, ...] = get_args(RasterizerName)


@runtime_checkable
class Rasterizer(Protocol):
    """Decides which face owns each pixel.

    Implementations: ``TorchRasterizer`` (pure torch, always available) and
    ``Pytorch3dRasterizer`` (pytorch3d's C++/CUDA kernels).
    """

    name: str

    def rasterize(
        self, verts_screen: torch.Tensor, faces: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Rasterise a batch of meshes sharing one face list.

        Args:
            verts_screen: (B, V, 3) float (x_pixel, y_pixel, depth) per vertex; see the module
                docstring for the convention. Not differentiated through.
            faces: (F, 3) int64 vertex indices.
            image_size: (H, W), two positive ints (``check_image_size``).
        Returns:
            pix_to_face: (B, H, W) int64, the index in [0, F) of the face owning each pixel,
            -1 for background.
        """
        ...


def check_image_size(image_size: Any) -> tuple[int, int]:
    """Validate an (H, W) image size and return it as two Python ints.

    Every rendering entry point calls this, so that a float, zero or negative size is refused
    here instead of being truncated (4.7 → 4) or giving empty maps.

    Raises:
        ValueError: unless ``image_size`` is a pair of positive integers (Python or numpy;
            bools are refused).
    """
    try:
        pair = tuple(image_size)
    except TypeError:
        pair = ()
    if (
        len(pair) != 2
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in pair)
        or min(pair) < 1
    ):
        raise ValueError(f"image_size must be two positive ints (H, W), got {image_size!r}")
    return int(pair[0]), int(pair[1])


def pytorch3d_available() -> bool:
    """Whether pytorch3d's mesh rasteriser can be imported (its compiled extension included)."""
    if importlib.util.find_spec("pytorch3d") is None:
        return False
    try:
        from pytorch3d import _C  # noqa: F401
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes  # noqa: F401
    except Exception:
        return False
    return True


def default_rasterizer(device: torch.device | str = "cpu") -> Rasterizer:
    """The faster available backend for a device type.

    CPU: ``TorchRasterizer``. ``benchmarks/bench_render.py`` (1000-vertex cuboid, 32x84 map, 2-core
    CPU) measured rasterisation at ~1-3 ms/view (batch 1) and ~0.6-0.9 ms/view (batch 144) for
    torch against ~30-48 ms/view for pytorch3d's CPU kernel, which tests every face at every
    pixel. CUDA: ``Pytorch3dRasterizer`` when pytorch3d is importable (its CUDA kernel avoids
    the tens of kernel launches per call of the torch backend; NOT measured here, no GPU was
    available: re-run the benchmark with ``--device cuda`` to confirm), else ``TorchRasterizer``.
    """
    from nvsm.render.pytorch3d_backend import Pytorch3dRasterizer
    from nvsm.render.torch_backend import TorchRasterizer

    dev = torch.device(device)
    if dev.type == "cuda" and pytorch3d_available():
        return Pytorch3dRasterizer()
    return TorchRasterizer()


def get_rasterizer(name: str = "auto", device: torch.device | str = "cpu") -> Rasterizer:
    """Backend by name: ``'torch'``, ``'pytorch3d'`` or ``'auto'`` (``default_rasterizer``).

    Raises:
        ValueError: for an unknown name.
        ImportError: when ``'pytorch3d'`` is asked for but cannot be imported.
    """
    from nvsm.render.pytorch3d_backend import Pytorch3dRasterizer
    from nvsm.render.torch_backend import TorchRasterizer

    key = name.strip().lower() if isinstance(name, str) else name
    if key == "torch":
        return TorchRasterizer()
    if key == "pytorch3d":
        if not pytorch3d_available():
            raise ImportError(
                "rasterizer 'pytorch3d' was requested but pytorch3d (with its compiled extension) "
                "cannot be imported; install it with `pip install nvsm[pytorch3d]` or use "
                "rasterizer 'torch'"
            )
        return Pytorch3dRasterizer()
    if key == "auto":
        return default_rasterizer(device)
    raise ValueError(f"unknown rasterizer {name!r}; expected one of {', '.join(RASTERIZER_NAMES)}")
