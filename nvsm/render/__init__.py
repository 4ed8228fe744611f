"""Feature rendering of neural meshes: swappable rasterisers and differentiable interpolation.

``Rasterizer`` backends decide which face owns each pixel (``TorchRasterizer``: pure torch;
``Pytorch3dRasterizer``: pytorch3d); ``features`` holds the differentiable parts shared by all.
Screen convention: OpenCV pixels of ``nvsm.pose`` (pixel centres at integer coordinates).
"""

from nvsm.render.features import (
    MeshLike,
    RenderOutput,
    interpolate_vertex_features,
    project_vertices,
    render_features,
    render_pose,
    visible_vertices,
)
from nvsm.render.pytorch3d_backend import Pytorch3dRasterizer
from nvsm.render.rasterizer import (
    NEAR_PLANE,
    RASTERIZER_NAMES,
    Rasterizer,
    RasterizerName,
    default_rasterizer,
    get_rasterizer,
    pytorch3d_available,
)
from nvsm.render.torch_backend import TorchRasterizer

__all__ = [
    "NEAR_PLANE",
    "RASTERIZER_NAMES",
    "MeshLike",
    "Pytorch3dRasterizer",
    "Rasterizer",
    "RasterizerName",
    "RenderOutput",
    "TorchRasterizer",
    "default_rasterizer",
    "get_rasterizer",
    "interpolate_vertex_features",
    "project_vertices",
    "pytorch3d_available",
    "render_features",
    "render_pose",
    "visible_vertices",
]
