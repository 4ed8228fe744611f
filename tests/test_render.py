"""Tests of nvsm.render: rasteriser backends, differentiable feature interpolation, visibility."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from nvsm.mesh import Mesh, cuboid_mesh, facing_visibility, vertex_normals
from nvsm.pose import camera_centre, feature_intrinsics, intrinsics, opencv_extrinsics
from nvsm.render import (
    Pytorch3dRasterizer,
    Rasterizer,
    TorchRasterizer,
    default_rasterizer,
    get_rasterizer,
    interpolate_vertex_features,
    project_vertices,
    pytorch3d_available,
    render_features,
    render_pose,
    visible_vertices,
)
from nvsm.render import rasterizer as rasterizer_module

HAS_P3D = pytorch3d_available()
needs_p3d = pytest.mark.skipif(not HAS_P3D, reason="pytorch3d is not importable")

#: Feature map of a 256x672 crop at stride 8 (NeMo's car setting): focal 3000/8 = 375.
FEAT_SIZE = (32, 84)
FEAT_K = feature_intrinsics(np.asarray(intrinsics(3000.0, 671 / 2, 255 / 2)), 8)
#: A 4.5 m x 1.8 m x 1.5 m car scaled to unit length (PASCAL3D+ CAD scale), centred.
CAR_MIN, CAR_MAX = (-0.2, -0.5, -0.167), (0.2, 0.5, 0.167)


def _backends() -> list[object]:
    return [
        pytest.param(TorchRasterizer(), id="torch"),
        pytest.param(TorchRasterizer(max_candidates=7), id="torch-chunked"),
        pytest.param(Pytorch3dRasterizer() if HAS_P3D else None, id="pytorch3d", marks=needs_p3d),
    ]


def _car() -> Mesh:
    return cuboid_mesh(CAR_MIN, CAR_MAX, n_vertices=1000)


def _unit_cube() -> Mesh:
    """Welded cube [-0.5, 0.5]^3: 8 vertices, 12 triangles wound CCW seen from outside."""
    v = torch.tensor(
        [[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]
    )  # index = 4·[x>0] + 2·[y>0] + [z>0]
    quads = [
        (0, 1, 3, 2),  # x = -0.5
        (4, 6, 7, 5),  # x = +0.5
        (0, 4, 5, 1),  # y = -0.5
        (2, 3, 7, 6),  # y = +0.5
        (0, 2, 6, 4),  # z = -0.5
        (1, 5, 7, 3),  # z = +0.5
    ]
    f = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
    mesh = Mesh(v.float(), torch.tensor(f, dtype=torch.int64))
    # Outward winding check: (v1 - v0) x (v2 - v0) points away from the centre.
    tri = mesh.vertices[mesh.faces]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert ((n * tri.mean(1)).sum(-1) > 0).all()
    return mesh


def _random_poses(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g) * 2 * math.pi
    e = (torch.rand(n, generator=g) - 0.3) * 1.2
    t = (torch.rand(n, generator=g) - 0.5) * 0.6
    d = 4.5 + torch.rand(n, generator=g)
    return a, e, t, d


def _screen(mesh: Mesh, a: torch.Tensor, e: torch.Tensor, t: torch.Tensor, d: torch.Tensor):
    r, tt = opencv_extrinsics(a, e, t, d)
    return project_vertices(mesh.vertices, r, tt, FEAT_K)


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def test_get_rasterizer_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(get_rasterizer("torch"), TorchRasterizer)
    assert get_rasterizer("torch").name == "torch"
    assert isinstance(get_rasterizer("torch"), Rasterizer)
    assert get_rasterizer("auto", "cpu").name == default_rasterizer("cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown rasterizer 'opengl'"):
        get_rasterizer("opengl")
    if HAS_P3D:
        r = get_rasterizer("pytorch3d")
        assert r.name == "pytorch3d" and isinstance(r, Rasterizer)
        assert default_rasterizer("cuda").name == "pytorch3d"
    monkeypatch.setattr(rasterizer_module, "pytorch3d_available", lambda: False)
    with pytest.raises(ImportError, match="pytorch3d"):
        get_rasterizer("pytorch3d")
    assert default_rasterizer("cuda").name == "torch"  # falls back without pytorch3d


# --------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rast", _backends())
def test_quad_covers_expected_pixels(rast: Rasterizer) -> None:
    # Axis-aligned quad x in [1.5, 5.5], y in [2.5, 4.5] at depth 2; its diagonal passes through
    # no pixel centre, so the owner of every pixel is unambiguous.
    verts = torch.tensor([[[1.5, 2.5, 2.0], [5.5, 2.5, 2.0], [5.5, 4.5, 2.0], [1.5, 4.5, 2.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    p2f = rast.rasterize(verts, faces, (7, 8))
    assert p2f.shape == (1, 7, 8) and p2f.dtype == torch.int64
    expected = torch.full((7, 8), -1)
    for i in (3, 4):
        for j in (2, 3, 4, 5):
            # Above the diagonal y = 2.5 + (x - 1.5)/2 (smaller y) is face 0.
            expected[i, j] = 0 if i < 2.5 + (j - 1.5) / 2 else 1
    assert torch.equal(p2f[0], expected)


@pytest.mark.parametrize("rast", _backends())
def test_nearest_face_wins_and_near_plane(rast: Rasterizer) -> None:
    # Two overlapping triangles at different depths, in both orders, plus a face crossing the
    # near plane which must be ignored even though it would be nearest.
    # The hypotenuse x + y = 9.2 passes through no pixel centre: inside iff i + j <= 9.
    near_tri = [[-0.5, -0.5, 2.0], [9.7, -0.5, 2.0], [-0.5, 9.7, 2.0]]
    far_tri = [[-0.5, -0.5, 3.0], [9.7, -0.5, 3.0], [-0.5, 9.7, 3.0]]
    behind = [[-0.5, -0.5, 1.0], [9.7, -0.5, -1.0], [-0.5, 9.7, 1.0]]
    verts = torch.tensor([far_tri + near_tri + behind, near_tri + far_tri + behind])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    p2f = rast.rasterize(verts, faces, (11, 11))
    ii, jj = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    inside = (ii + jj) <= 9
    assert torch.equal(p2f[0] >= 0, inside) and torch.equal(p2f[1] >= 0, inside)
    assert (p2f[0][inside] == 1).all() and (p2f[1][inside] == 0).all()


@pytest.mark.parametrize("rast", _backends())
def test_non_finite_vertices_are_ignored(rast: Rasterizer) -> None:
    good = [[-0.5, -0.5, 2.0], [9.7, -0.5, 2.0], [-0.5, 9.7, 2.0]]
    nan = [[0.0, 0.0, 1.0], [float("nan"), 3.0, 1.0], [0.0, 9.0, 1.0]]
    inf = [[0.0, 0.0, 1.0], [float("inf"), 3.0, 1.0], [0.0, 9.0, 1.0]]
    verts = torch.tensor([good + nan + inf])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    p2f = rast.rasterize(verts, faces, (11, 11))
    ii, jj = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    assert torch.equal(p2f[0], torch.where(ii + jj <= 9, 0, -1))


def test_square_through_camera_known_mask() -> None:
    # A square X, Y in [-0.4, 0.4] at depth 2 seen by f = 10, principal point (9.5, 7.5) spans
    # x in 9.5 ± 2 and y in 7.5 ± 2, i.e. columns 8..11 and rows 6..9 exactly.
    v = torch.tensor([[-0.4, -0.4, 0.0], [0.4, -0.4, 0.0], [0.4, 0.4, 0.0], [-0.4, 0.4, 0.0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    k = torch.tensor([[10.0, 0.0, 9.5], [0.0, 10.0, 7.5], [0.0, 0.0, 1.0]])
    r, t = torch.eye(3)[None], torch.tensor([[0.0, 0.0, 2.0]])
    out = render_features(mesh, torch.ones(4, 1), r, t, k, (16, 20), TorchRasterizer())
    expected = torch.zeros(16, 20, dtype=torch.bool)
    expected[6:10, 8:12] = True
    assert torch.equal(out.mask[0], expected)
    assert torch.equal(out.features[0, 0] != 0, expected)


@pytest.mark.parametrize("rast", _backends())
def test_constant_features_are_constant_over_mask(rast: Rasterizer) -> None:
    mesh = _car()
    a, e, t, d = _random_poses(4, seed=1)
    feats = torch.tensor([0.25, -1.5, 3.0]).expand(mesh.num_vertices, 3)
    out = render_pose(mesh, feats, a, e, t, d, FEAT_K, FEAT_SIZE, rast)
    assert out.features.shape == (4, 3, *FEAT_SIZE)
    assert out.mask.float().mean() > 0.2
    m = out.mask[:, None].expand_as(out.features)
    want = torch.tensor([0.25, -1.5, 3.0]).view(1, 3, 1, 1).expand_as(out.features)
    torch.testing.assert_close(out.features[m], want[m], rtol=0, atol=1e-5)
    assert (out.features[~m] == 0).all()


def test_interpolation_is_perspective_correct() -> None:
    # Render each vertex's camera-space coordinates (batched features); the interpolated point
    # must re-project onto the pixel centre it was rendered at and lie on the owning face.
    mesh = _unit_cube()
    a, e, t, d = _random_poses(3, seed=2)
    d = d - 2.5  # close, so perspective is strong
    r, tt = opencv_extrinsics(a, e, t, d)
    x_cam = mesh.vertices @ r.transpose(-1, -2) + tt[:, None, :]  # (B, V, 3)
    k = torch.tensor(FEAT_K, dtype=torch.float32)
    out = render_features(mesh, x_cam, r, tt, k, FEAT_SIZE, TorchRasterizer())
    assert out.mask.float().mean() > 0.1
    p = out.features.permute(0, 2, 3, 1)[out.mask]  # (N, 3) camera points
    ii, jj = torch.meshgrid(torch.arange(FEAT_SIZE[0]), torch.arange(FEAT_SIZE[1]), indexing="ij")
    bi = torch.arange(3)[:, None, None].expand_as(out.mask)[out.mask]
    u = k[0, 0] * p[:, 0] / p[:, 2] + k[0, 2]
    v = k[1, 1] * p[:, 1] / p[:, 2] + k[1, 2]
    torch.testing.assert_close(u, jj.expand_as(out.mask)[out.mask].float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(v, ii.expand_as(out.mask)[out.mask].float(), atol=2e-3, rtol=0)
    # The point lies on the plane of its face (affine interpolation would leave it).
    f = out.pix_to_face[out.mask]
    tri = x_cam[bi[:, None], mesh.faces[f]]  # (N, 3, 3)
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    off = ((p - tri[:, 0]) * torch.nn.functional.normalize(n, dim=-1)).sum(-1)
    assert off.abs().max() < 1e-4


def test_visibility_of_cube_back_face() -> None:
    mesh = _car()
    n = vertex_normals(mesh)  # unwelded cuboid: each vertex carries its box face's normal
    # a = e = θ = 0: the camera is at -y and sees exactly the y = min face.
    out = render_pose(mesh, torch.zeros(mesh.num_vertices, 1), 0.0, 0.0, 0.0, 5.0, FEAT_K,
                      FEAT_SIZE, TorchRasterizer())
    vis = out.vertex_visible[0]
    front = n[:, 1] < -0.99
    back = n[:, 1] > 0.99
    assert back.sum() > 10 and not vis[back].any()
    assert vis[front].float().mean() > 0.9
    assert torch.equal(vis, vis & front)  # nothing but the front face
    # Welded hand-made cube: the back face's own vertices are hidden.
    cube = _unit_cube()
    out = render_pose(cube, torch.zeros(8, 1), 0.0, 0.0, 0.0, 4.0, FEAT_K, FEAT_SIZE,
                      TorchRasterizer())
    assert out.vertex_visible[0].tolist() == [True, True, False, False] * 2  # y < 0 visible


@pytest.mark.parametrize("rast", _backends())
def test_visible_vertices_subset_of_front_facing(rast: Rasterizer) -> None:
    mesh = _car()
    a, e, t, d = _random_poses(6, seed=3)
    out = render_pose(mesh, torch.zeros(mesh.num_vertices, 1), a, e, t, d, FEAT_K, FEAT_SIZE,
                      rast)
    facing = facing_visibility(mesh, camera_centre(a, e, d))
    assert not (out.vertex_visible & ~facing).any()
    assert out.vertex_visible.sum() > 0.7 * facing.sum()


def test_visible_vertices_direct() -> None:
    faces = torch.tensor([[0, 1, 2], [2, 3, 4], [5, 6, 7]])
    p2f = torch.tensor([[[-1, 1], [1, -1]], [[-1, -1], [-1, -1]], [[2, 0], [-1, -1]]])
    vis = visible_vertices(p2f, faces, 9)
    assert vis.tolist() == [
        [False, False, True, True, True, False, False, False, False],
        [False] * 9,
        [True, True, True, False, False, True, True, True, False],
    ]


@pytest.mark.parametrize("rast", _backends())
def test_mask_matches_convex_hull_silhouette(rast: Rasterizer) -> None:
    scipy_spatial = pytest.importorskip("scipy.spatial")
    mesh = _car()
    a, e, t, d = _random_poses(5, seed=4)
    out = render_pose(mesh, torch.zeros(mesh.num_vertices, 1), a, e, t, d, FEAT_K, FEAT_SIZE,
                      rast)
    vs = _screen(mesh, a, e, t, d).double().numpy()
    ii, jj = np.meshgrid(np.arange(FEAT_SIZE[0]), np.arange(FEAT_SIZE[1]), indexing="ij")
    pts = np.stack([jj.ravel(), ii.ravel()], 1).astype(np.float64)
    for b in range(5):
        hull = scipy_spatial.ConvexHull(vs[b, :, :2])
        inside = (pts @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(1)
        hull_mask = inside.reshape(FEAT_SIZE)
        mask = out.mask[b].numpy()
        iou = (mask & hull_mask).sum() / (mask | hull_mask).sum()
        assert hull_mask.sum() > 200 and iou > 0.98, (b, iou)


def test_empty_and_offscreen() -> None:
    mesh = _car()
    # Object far to the side: nothing in view.
    r, t = opencv_extrinsics(torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([0.0]),
                             torch.tensor([5.0]))
    t = t + torch.tensor([[50.0, 0.0, 0.0]])
    feats = torch.randn(mesh.num_vertices, 5, requires_grad=True)
    out = render_features(mesh, feats, r, t, FEAT_K, FEAT_SIZE, TorchRasterizer())
    assert not out.mask.any() and (out.pix_to_face == -1).all()
    assert not out.vertex_visible.any() and (out.features == 0).all()
    out.features.sum().backward()
    assert feats.grad is not None and (feats.grad == 0).all()
    # Camera inside the box: every face crosses or lies behind the near plane on one side;
    # faces entirely in front are still drawn, and nothing crashes.
    out = render_pose(mesh, feats, 0.0, 0.0, 0.0, 0.0, FEAT_K, FEAT_SIZE, TorchRasterizer())
    assert out.features.shape == (1, 5, *FEAT_SIZE)


def test_chunked_torch_rasterizer_matches_unchunked() -> None:
    mesh = _car()
    vs = _screen(mesh, *_random_poses(7, seed=5))
    ref = TorchRasterizer().rasterize(vs, mesh.faces, FEAT_SIZE)
    for m in (1, 50, 1000):
        assert torch.equal(TorchRasterizer(max_candidates=m).rasterize(vs, mesh.faces, FEAT_SIZE),
                           ref)


def test_shared_and_batched_features_agree() -> None:
    mesh = _car()
    a, e, t, d = _random_poses(3, seed=6)
    feats = torch.randn(mesh.num_vertices, 8)
    shared = render_pose(mesh, feats, a, e, t, d, FEAT_K, FEAT_SIZE, TorchRasterizer())
    batched = render_pose(mesh, feats.expand(3, -1, -1), a, e, t, d, FEAT_K, FEAT_SIZE,
                          TorchRasterizer())
    torch.testing.assert_close(shared.features, batched.features)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def test_interpolation_gradcheck() -> None:
    mesh = _unit_cube()
    vs = _screen(mesh, *(x.double() for x in _random_poses(2, seed=7)))
    vs[..., :2] = vs[..., :2] / 6 + torch.tensor([4.0, 3.0], dtype=torch.float64)  # small image
    p2f = TorchRasterizer().rasterize(vs, mesh.faces, (7, 9))
    assert (p2f >= 0).sum() > 10
    feats = torch.randn(8, 3, dtype=torch.float64)
    for f in (feats, torch.randn(2, 8, 3, dtype=torch.float64)):
        assert torch.autograd.gradcheck(
            lambda v, f: interpolate_vertex_features(v, mesh.faces, p2f, f),
            (vs.clone().requires_grad_(), f.clone().requires_grad_()),
        )


def test_pose_gradients_match_finite_differences() -> None:
    mesh = _car()
    mesh = Mesh(mesh.vertices.double(), mesh.faces)
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(mesh.num_vertices, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(1, 4, *FEAT_SIZE, generator=g, dtype=torch.float64)
    rast = TorchRasterizer()
    pose0 = torch.tensor([0.7, 0.25, 0.1, 5.0], dtype=torch.float64)

    def render(pose: torch.Tensor):
        return render_pose(mesh, feats, pose[0], pose[1], pose[2], pose[3], FEAT_K, FEAT_SIZE,
                           rast)

    pose = pose0.clone().requires_grad_()
    out = render(pose)
    (out.features * weight).sum().backward()
    assert out.features.dtype == torch.float64 and out.mask.sum() > 500
    eps = 1e-6
    for i in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[i] = eps
        hi, lo = render(pose0 + step), render(pose0 - step)
        assert torch.equal(hi.pix_to_face, out.pix_to_face)  # no pixel changes owner
        assert torch.equal(lo.pix_to_face, out.pix_to_face)
        fd = ((hi.features - lo.features) * weight).sum() / (2 * eps)
        assert pose.grad is not None
        assert abs(float(pose.grad[i]) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), i
        assert abs(float(fd)) > 1e-3  # the loss actually depends on every pose parameter


def test_feature_gradients() -> None:
    mesh = _car()
    a, e, t, d = _random_poses(2, seed=9)
    feats = torch.randn(mesh.num_vertices, 3, requires_grad=True)
    weight = torch.randn(2, 3, *FEAT_SIZE)
    out = render_pose(mesh, feats, a, e, t, d, FEAT_K, FEAT_SIZE, TorchRasterizer())
    (out.features * weight).sum().backward()
    assert feats.grad is not None
    # The loss is linear in the features: the gradient reproduces it exactly.
    torch.testing.assert_close((feats.grad * feats.detach()).sum(),
                               (out.features * weight).sum().detach(), rtol=1e-4, atol=1e-3)
    # Only vertices of faces that own pixels receive gradient.
    has_grad = (feats.grad != 0).any(1)
    assert not (has_grad & ~out.vertex_visible.any(0)).any()


# --------------------------------------------------------------------------------------------
# Backend parity
# --------------------------------------------------------------------------------------------


def _edge_distance(tri: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Distance (N,) from pixel centres (px, py) to the nearest edge of triangles (N, 3, 2)."""
    p = torch.stack([px, py], -1)[:, None].double()
    a, b = tri.double(), tri.double().roll(-1, dims=1)
    ab = b - a
    s = ((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)
    q = a + s.clamp(0, 1)[..., None] * ab
    return (p - q).norm(dim=-1).amin(1)


@needs_p3d
@pytest.mark.parametrize("mesh_kind", ["car", "cube"])
def test_backends_agree(mesh_kind: str) -> None:
    mesh = _car() if mesh_kind == "car" else _unit_cube()
    a, e, t, d = _random_poses(8, seed=10)
    if mesh_kind == "cube":
        d = d - 1.5
    vs = _screen(mesh, a, e, t, d)
    p3d = Pytorch3dRasterizer()
    p_t = TorchRasterizer().rasterize(vs, mesh.faces, FEAT_SIZE)
    p_p, bary = p3d.rasterize_fragments(vs, mesh.faces, FEAT_SIZE)
    assert (p_t >= 0).float().mean() > 0.1
    same = p_t == p_p
    assert same.float().mean() >= 0.99
    # Every disagreement is a pixel centre within 0.5 px of an edge of a face either one chose.
    bi, ii, jj = torch.nonzero(~same, as_tuple=True)
    for p2f in (p_t, p_p):
        f = p2f[bi, ii, jj]
        fg = f >= 0
        dist = _edge_distance(vs[bi[fg, None], mesh.faces[f[fg]], :2], jj[fg].float(),
                              ii[fg].float())
        assert (dist <= 0.5).all()

    # Interpolated features agree with pytorch3d's own perspective-correct barycentrics.
    feats = torch.randn(mesh.num_vertices, 16)
    ours = interpolate_vertex_features(vs, mesh.faces, p_p, feats).permute(0, 2, 3, 1)
    m = p_p >= 0
    theirs = (bary[m][..., None] * feats[mesh.faces[p_p[m]]]).sum(1)
    torch.testing.assert_close(ours[m], theirs, atol=1e-4, rtol=1e-4)
    assert (ours[~m] == 0).all()


@needs_p3d
def test_backends_agree_on_big_triangle_non_square() -> None:
    # One big triangle partly outside a non-square image (checks the NDC conversion: flips,
    # aspect ratio and half-pixel offsets), in both aspect orientations.
    verts = torch.tensor([[[-3.3, -2.2, 2.0], [30.7, 4.1, 3.0], [5.2, 40.9, 4.0]]])
    faces = torch.tensor([[0, 1, 2]])
    for size in ((17, 29), (29, 17)):
        p_t = TorchRasterizer().rasterize(verts, faces, size)
        p_p = Pytorch3dRasterizer().rasterize(verts, faces, size)
        assert 50 < int((p_t >= 0).sum()) < size[0] * size[1]
        assert torch.equal(p_t, p_p), size


@needs_p3d
def test_backends_agree_on_edges_through_pixel_centres() -> None:
    # With blur_radius=0 pytorch3d dropped pixel centres lying exactly on an edge (shared or
    # not): a square split along its diagonal lost the diagonal, a face-on cube 57 of 121 px.
    verts = torch.tensor([[[1.0, 1.0, 2.0], [6.0, 1.0, 2.0], [6.0, 6.0, 2.0], [1.0, 6.0, 2.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    expected = torch.zeros(8, 9, dtype=torch.bool)
    expected[1:7, 1:7] = True
    for rast in (TorchRasterizer(), Pytorch3dRasterizer()):
        assert torch.equal(rast.rasterize(verts, faces, (8, 9))[0] >= 0, expected), rast.name
    cube = cuboid_mesh((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5), 1000)
    k = torch.tensor([[20.0, 0.0, 15.0], [0.0, 20.0, 15.0], [0.0, 0.0, 1.0]])
    masks = [render_pose(cube, torch.zeros(cube.num_vertices, 1), 0.0, 0.0, 0.0, 2.5, k,
                         (31, 31), rast).mask[0]
             for rast in (TorchRasterizer(), Pytorch3dRasterizer())]
    assert int(masks[0].sum()) == 121 and torch.equal(masks[0], masks[1])


@pytest.mark.slow
def test_runs_without_pytorch3d(tiny_synthetic, tmp_path):
    """nvsm must install and run where pytorch3d is absent: block its import in a fresh
    interpreter, then run `nvsm info` and a one-round few-shot loop end to end."""
    script = (
        "import sys\n"
        "sys.modules['pytorch3d'] = None  # any `import pytorch3d...` now raises ImportError\n"
        "from nvsm.cli import app\n"
        "from nvsm.render.rasterizer import pytorch3d_available\n"
        "assert not pytorch3d_available()\n"
        "app(sys.argv[1:])\n"
    )
    run = tmp_path / "run"
    args = ["fewshot", "-r", "synthetic-car-tiny", "-s", f"data.root={tiny_synthetic}",
            "--rounds", "1", "--no-baselines", "--out", str(run)]
    for argv in (["info"], args):
        res = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["nvsm"]) == {"L0", "L2"} and metrics["nvsm"]["L0"]["n"] == 4


@pytest.mark.parametrize("rast", _backends())
def test_an_empty_batch_renders_to_empty_maps(rast: Rasterizer) -> None:
    # The rasterisers took B = 0, but the visibility step's reshape(0, -1) raised.
    mesh = _car()
    none = torch.zeros(0)
    out = render_pose(mesh, torch.randn(mesh.num_vertices, 3), none, none, none, none + 5,
                      FEAT_K, FEAT_SIZE, rast)
    assert out.features.shape == (0, 3, *FEAT_SIZE) and out.mask.shape == (0, *FEAT_SIZE)


# --------------------------------------------------------------------------------------------
# Input checks and robustness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rast", _backends())
@pytest.mark.parametrize("size", [(0, 5), (5, 0), (-32, 84), (4.7, 6.2), (True, 4), (3,), 7])
def test_bad_image_sizes_are_refused(rast: Rasterizer, size: Any) -> None:
    # These gave empty maps or were truncated (4.7 → 4) without a word.
    mesh = _unit_cube()
    vs = _screen(mesh, *_random_poses(1, seed=11))
    with pytest.raises(ValueError, match=r"image_size must be two positive ints \(H, W\)"):
        rast.rasterize(vs, mesh.faces, size)
    with pytest.raises(ValueError, match=r"image_size must be two positive ints \(H, W\)"):
        render_pose(mesh, torch.ones(8, 1), 0.3, 0.1, 0.0, 5.0, FEAT_K, size, rast)
    # numpy integers are integers.
    numpy_size: Any = (np.int64(4), 5)
    assert rast.rasterize(vs, mesh.faces, numpy_size).shape == (1, 4, 5)


@pytest.mark.parametrize("bad", [2.5, 0, -3, True])
def test_max_candidates_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_candidates must be None or an int >= 1"):
        TorchRasterizer(max_candidates=bad)


def test_interpolation_refuses_mismatched_batches() -> None:
    # verts_screen for 2 cameras with pix_to_face for 1 silently used camera 0's geometry.
    mesh = _car()
    vs = _screen(mesh, *_random_poses(2, seed=12))
    p2f = TorchRasterizer().rasterize(vs, mesh.faces, FEAT_SIZE)
    feats = torch.randn(mesh.num_vertices, 3)
    with pytest.raises(ValueError, match=r"\(2, \d+, 3\), got \(1, 32, 84\)"):
        interpolate_vertex_features(vs, mesh.faces, p2f[1:], feats)
    with pytest.raises(ValueError, match=r"\(1, \d+, 3\), got \(2, 32, 84\)"):
        interpolate_vertex_features(vs[:1], mesh.faces, p2f, feats)


@pytest.mark.parametrize("rast", _backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_screen_vertices_rasterize_like_float32(
    rast: Rasterizer, dtype: torch.dtype
) -> None:
    # The signed area of a face a few hundred pixels wide overflowed float16 (and the face
    # vanished). Coordinates below are exact in both half formats.
    faces = torch.tensor([[0, 1, 2]])
    for verts, size in (
        ([[-300.0, -300.0, 2.0], [400.0, -300.0, 2.0], [-300.0, 400.0, 2.0]], (20, 20)),
        ([[0.0, 0.0, 2.0], [300.0, 0.0, 2.0], [0.0, 300.0, 2.0]], (320, 310)),
    ):
        vs = torch.tensor([verts])
        ref = rast.rasterize(vs, faces, size)
        assert (ref >= 0).sum() >= 400
        assert torch.equal(rast.rasterize(vs.to(dtype), faces, size), ref)
        # Barycentric interpolation: constant features stay constant (up to the rounding of
        # the weights to ``dtype``); they were NaN.
        out = interpolate_vertex_features(vs.to(dtype), faces, ref, torch.ones(3, 1, dtype=dtype))
        fg = out[0, 0][ref[0] >= 0]
        assert out.dtype == dtype
        torch.testing.assert_close(fg, torch.ones_like(fg), rtol=0, atol=2e-2)


def test_half_precision_render_pose_matches_float32() -> None:
    # A float16 mesh and pose (e.g. under .half()) rendered an empty mask.
    v = torch.tensor([[-0.5, 0.0, -0.5], [0.5, 0.0, -0.5], [0.5, 0.0, 0.5], [-0.5, 0.0, 0.5]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    k = torch.tensor([[1200.0, 0.0, 319.5], [0.0, 1200.0, 239.5], [0.0, 0.0, 1.0]])
    masks = []
    for dtype in (torch.float32, torch.float16):
        z = torch.zeros((), dtype=dtype)
        out = render_pose(Mesh(v.to(dtype), faces), torch.ones(4, 1, dtype=dtype), z, z, z,
                          z + 4.0, k.to(dtype), (480, 640), TorchRasterizer())
        masks.append(out.mask)
        fg = out.features[0, 0][out.mask[0]]
        torch.testing.assert_close(fg, torch.ones_like(fg), rtol=0, atol=2e-2)
    assert int(masks[0].sum()) == 300 * 300 and torch.equal(masks[0], masks[1])


def test_pose_gradient_is_finite_with_a_vertex_at_depth_zero() -> None:
    # At distance 0 the camera sits inside the car and two vertices are at depth exactly 0:
    # they are culled, yet the backward of their projection turned the whole pose grad NaN.
    mesh = _car()
    feats = torch.randn(mesh.num_vertices, 4, generator=torch.Generator().manual_seed(13))
    pose = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    out = render_pose(mesh, feats, pose[0], pose[1], pose[2], pose[3], FEAT_K, FEAT_SIZE,
                      TorchRasterizer())
    r, t = opencv_extrinsics(*pose.detach())
    assert (project_vertices(mesh.vertices, r, t, FEAT_K)[..., 2] == 0).any()
    assert out.mask.sum() > 100
    out.features.sum().backward()
    assert pose.grad is not None and torch.isfinite(pose.grad).all() and (pose.grad != 0).any()
