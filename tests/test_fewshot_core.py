"""Tests of the NVSM E-step core: view synthesis, matching (torch / FAISS), pseudo-labels."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvsm.fewshot import (
    AcceptanceRule,
    AcceptanceSchedule,
    BestMatch,
    FaissMatcher,
    Matcher,
    PseudoLabel,
    TorchMatcher,
    apply_acceptance,
    best_pose_and_margin,
    canonical_pose,
    encode_targets,
    encode_views,
    exclusion_mask,
    expanding_shift_grid,
    faiss_available,
    make_pseudo_labels,
    nvsm_similarity,
    nvsm_similarity_pairs,
    sample_anchor_vertex_features,
    shift_grid,
    synthesize_images,
    synthesize_views,
    top_scores,
    view_hubness,
)
from nvsm.mesh import Mesh, cuboid_mesh, vertex_normals
from nvsm.pose import camera_centre, intrinsics, opencv_extrinsics, project_opencv, rotation_matrix
from nvsm.render import render_pose
from nvsm.train.loss import sample_vertex_features
from nvsm.train.trainer import project_mesh_vertices

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not importable")

SIZE = (24, 32)
K = torch.as_tensor(np.asarray(intrinsics(110.0, (SIZE[1] - 1) / 2, (SIZE[0] - 1) / 2))).float()


def _mesh() -> Mesh:
    return cuboid_mesh((-0.2, -0.5, -0.167), (0.2, 0.5, 0.167), n_vertices=300)


def _deg_pose(a: float, e: float, t: float, d: float = 5.0) -> list[float]:
    return [math.radians(a), math.radians(e), math.radians(t), d]


# ------------------------------------------------------------------------------------------
# Synthesis
# ------------------------------------------------------------------------------------------


def test_shift_grids() -> None:
    g = shift_grid([-10, 0, 10], [0, 5], [0])
    assert g.shape == (6, 3) and g.dtype == torch.float64
    assert torch.allclose(g[1], torch.tensor([-10.0, 5.0, 0.0], dtype=torch.float64).deg2rad())
    r0 = expanding_shift_grid(0)
    assert r0.shape == (7 * 3, 3)
    assert math.isclose(float(r0[:, 0].abs().max()), math.radians(30))
    r1 = expanding_shift_grid(1)
    assert r1.shape == (13 * 3, 3)
    full = expanding_shift_grid(9, elevation_deg=(0,))
    az = torch.rad2deg(full[:, 0]).round().long().tolist()
    assert len(az) == 36 and len({a % 360 for a in az}) == 36  # ±180 kept once


def test_canonical_pose_folds_elevation_past_the_pole() -> None:
    a = torch.tensor([0.3, 2.0, 6.0], dtype=torch.float64)
    e = torch.tensor([math.radians(95), math.radians(-100), 0.2], dtype=torch.float64)
    t = torch.tensor([0.1, -3.0, 0.4], dtype=torch.float64)
    ca, ce, ct = canonical_pose(a, e, t)
    assert bool((ce.abs() <= math.pi / 2 + 1e-12).all())
    assert bool(((ca >= 0) & (ca < 2 * math.pi)).all())
    assert torch.allclose(rotation_matrix(ca, ce, ct), rotation_matrix(a, e, t), atol=1e-12)


def test_synthesis_at_zero_shift_reproduces_sampled_features() -> None:
    """Δ = 0: the rendered map, sampled at a seen vertex's projection, gives back its feature.

    The anchor map is linear in pixel position, so vertex features and bilinear samples of the
    rendered map agree up to the (small) perspective-correct interpolation error.
    """
    mesh = _mesh()
    d = 5
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(d, 3, generator=g)
    ys, xs = torch.meshgrid(
        torch.arange(SIZE[0], dtype=torch.float32),
        torch.arange(SIZE[1], dtype=torch.float32),
        indexing="ij",
    )
    fmap = coef[:, 0, None, None] + 0.1 * (
        coef[:, 1, None, None] * xs + coef[:, 2, None, None] * ys
    )
    pose = torch.tensor([_deg_pose(35, 15, 5)])
    feats, vis = sample_anchor_vertex_features(fmap[None], pose, K, mesh, renormalize=False)
    assert feats.shape == (1, mesh.num_vertices, d) and vis.shape == (1, mesh.num_vertices)
    assert 0 < int(vis.sum()) < mesh.num_vertices
    assert bool((feats[~vis] == 0).all())

    views = synthesize_views(feats, vis, pose, torch.zeros(1, 3), mesh, K, SIZE)
    assert views.features.shape == (1, d, *SIZE) and views.mask.shape == (1, *SIZE)
    assert torch.allclose(views.poses, pose)

    vpx = project_mesh_vertices(mesh.vertices, pose.double(), K[None].double())  # (1, V, 2)
    # Keep seen vertices whose four bilinear neighbour cells are all usable pixels.
    x0 = torch.floor(vpx[0, :, 0]).long()
    y0 = torch.floor(vpx[0, :, 1]).long()
    inside = (x0 >= 0) & (x0 + 1 < SIZE[1]) & (y0 >= 0) & (y0 + 1 < SIZE[0])
    m = views.mask[0]
    xc, yc = x0.clamp(0, SIZE[1] - 2), y0.clamp(0, SIZE[0] - 2)
    ok = m[yc, xc] & m[yc, xc + 1] & m[yc + 1, xc] & m[yc + 1, xc + 1]
    keep = vis[0] & inside & ok
    assert int(keep.sum()) >= 20
    resampled = sample_vertex_features(views.features, vpx, renormalize=False)[0]
    err = (resampled[keep] - feats[0, keep]).abs().max()
    assert float(err) < 2e-3 * float(fmap.abs().max())


def test_synthesis_equals_direct_rendering_of_the_anchor_bank() -> None:
    mesh = _mesh()
    g = torch.Generator().manual_seed(1)
    fmaps = F.normalize(torch.randn(2, 6, *SIZE, generator=g), dim=1)
    poses = torch.tensor([_deg_pose(20, 10, 0), _deg_pose(200, 30, -10)])
    kk = K[None].repeat(2, 1, 1)
    feats, vis = sample_anchor_vertex_features(fmaps, poses, kk, mesh)
    shifts = shift_grid([-40, 0, 25, 180], [0, 10], [0, 5])
    views = synthesize_views(feats, vis, poses, shifts, mesh, kk, SIZE, chunk=5)
    n_s = shifts.shape[0]
    assert len(views) == 2 * n_s
    assert views.source.tolist() == [0] * n_s + [1] * n_s
    assert torch.equal(views.shift[:n_s], shifts)

    p = views.poses
    bank = (feats * vis[..., None])[views.source]
    direct = render_pose(mesh, bank, p[:, 0], p[:, 1], p[:, 2], p[:, 3], K, SIZE)
    assert torch.equal(views.features, direct.features)
    assert torch.equal(views.silhouette, direct.mask)
    face_seen = vis[views.source][:, mesh.faces].all(-1)  # (B, F)
    ptf = direct.pix_to_face
    expected = torch.stack(
        [(ptf[b] >= 0) & face_seen[b][ptf[b].clamp(min=0)] for b in range(len(views))]
    )
    assert torch.equal(views.mask, expected)
    # Holes are explicit: at Δa = 180° the anchor saw only the top (or bottom) face.
    assert not bool((views.mask & ~views.silhouette).any())
    zero = (views.shift == 0).all(1)
    back = (views.shift[:, 0] - math.pi).abs() < 1e-9
    covered, sil = views.mask.sum((1, 2)), views.silhouette.sum((1, 2))
    assert bool((covered[zero] == sil[zero]).all())
    assert bool((covered[back] < sil[back]).all())
    assert int(covered[back].min()) < 0.25 * int(sil[back].max())
    # Poses = anchor + shift (azimuth wrapped), same rotations.
    raw = poses.double()[views.source, :3] + views.shift
    assert torch.allclose(
        rotation_matrix(p[:, 0].double(), p[:, 1].double(), p[:, 2].double()),
        rotation_matrix(raw[:, 0], raw[:, 1], raw[:, 2]),
        atol=1e-6,
    )
    # Half-precision features keep full-precision poses and cameras: their poses were rounded
    # (up to 0.05° in float16), and the rounded poses became the pseudo-labels.
    for low in (torch.float16, torch.bfloat16):
        views_low = synthesize_views(feats.to(low), vis, poses, shifts, mesh, kk, SIZE, chunk=5)
        assert views_low.poses.dtype == torch.float32 and torch.equal(views_low.poses, p)
        assert torch.equal(views_low.silhouette, views.silhouette)


IMAGE_SIZE = (48, 64)
IMAGE_K = torch.as_tensor(
    np.asarray(intrinsics(220.0, (IMAGE_SIZE[1] - 1) / 2, (IMAGE_SIZE[0] - 1) / 2))
).double()
#: Colour = linear function of the object point: perspective-correct barycentric interpolation
#: reproduces it exactly inside every face, so a rendered crop holds c(X) at each pixel's point.
COLOUR_OFFSET = torch.tensor([128.0, 120.0, 110.0], dtype=torch.float64)
COLOUR_GRADIENT = torch.tensor(
    [[150.0, -60.0, 30.0], [-40.0, 80.0, 60.0], [50.0, 40.0, -150.0]], dtype=torch.float64
)


def _colour(points: torch.Tensor) -> torch.Tensor:
    return COLOUR_OFFSET + points @ COLOUR_GRADIENT.T


def _textured_crop(mesh: Mesh, pose: list[float], background: float = 20.0) -> torch.Tensor:
    """(3, H, W) uint8 crop of the cuboid coloured by ``_colour`` on a flat background."""
    p = torch.tensor(pose, dtype=torch.float64)
    m = Mesh(mesh.vertices.double(), mesh.faces)
    out = render_pose(m, _colour(m.vertices), p[0], p[1], p[2], p[3], IMAGE_K, IMAGE_SIZE)
    img = torch.where(out.mask, out.features, torch.full_like(out.features, background))
    return img[0].round().clamp(0, 255).to(torch.uint8)


def _rendered_points(
    mesh: Mesh, pose: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, W, 3) object point and (H, W, 3) outward normal shown at each pixel, (H, W) mask."""
    m = Mesh(mesh.vertices.double(), mesh.faces)
    data = torch.cat([m.vertices, vertex_normals(m)], 1)
    out = render_pose(m, data, pose[0], pose[1], pose[2], pose[3], IMAGE_K, IMAGE_SIZE)
    both = out.features[0].permute(1, 2, 0)
    return both[..., :3], both[..., 3:], out.mask[0]


def _whole_image(n: int) -> torch.Tensor:
    """(n, 4) image boxes of crops that lie wholly inside their images."""
    h, w = IMAGE_SIZE
    return torch.tensor([[0.0, 0.0, w - 1, h - 1]] * n, dtype=torch.float64)


def test_image_synthesis_at_zero_shift_returns_the_crop() -> None:
    mesh = _mesh()
    pose = _deg_pose(40, 20, 5)
    crop = _textured_crop(mesh, pose)
    p = torch.tensor([pose], dtype=torch.float64)
    images, poses, seen = synthesize_images(
        crop[None], IMAGE_K[None], p, _whole_image(1), torch.zeros(1, 3), mesh
    )
    assert images.dtype == torch.uint8 and images.shape == (1, 3, *IMAGE_SIZE)
    assert torch.allclose(poses, p)
    _, _, silhouette = _rendered_points(mesh, p[0])
    # Every pixel of the silhouette shows a face that looks at the camera, and it looks itself up.
    assert torch.equal(seen[0], silhouette)
    assert torch.equal(images[0][:, seen[0]], crop[:, seen[0]])
    # Off the object: the crop blurred (flat background here, so unchanged far from it).
    assert not bool(seen[0, 0, 0]) and int(images[0, 0, 0, 0]) == int(crop[0, 0, 0])


def test_image_synthesis_equals_rendering_at_the_shifted_pose() -> None:
    """Each synthesised pixel the crop saw holds the colour of the cuboid point it shows at the
    shifted pose, as if the textured cuboid had been rendered there."""
    mesh = _mesh()
    source = [_deg_pose(40, 20, 5), _deg_pose(200, 10, -5)]
    crops = torch.stack([_textured_crop(mesh, p) for p in source])
    p = torch.tensor(source, dtype=torch.float64)
    shifts = torch.tensor([[math.radians(25), math.radians(-10), 0.0], [math.radians(-30), 0, 0]])
    images, poses, seen = synthesize_images(
        crops, IMAGE_K.expand(2, 3, 3), p, _whole_image(2), shifts, mesh
    )
    raw = p[:, :3] + shifts.double()
    assert torch.allclose(
        rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2]),
        rotation_matrix(raw[:, 0], raw[:, 1], raw[:, 2]),
        atol=1e-9,
    )
    assert torch.equal(poses[:, 3], p[:, 3])
    for b in range(2):
        points, normals, silhouette = _rendered_points(mesh, poses[b])
        centre = camera_centre(p[b, 0], p[b, 1], p[b, 3])
        facing = ((centre - points) * normals).sum(-1) > 0
        assert torch.equal(seen[b], silhouette & facing)
        assert int(seen[b].sum()) > 0.3 * int(silhouette.sum())
        # Where the four source pixels of the bilinear lookup all show the looked-up point's
        # box face, the colour field is linear across them (up to perspective, far below a
        # level over one pixel), so the result is exact up to the uint8 rounding of the crop
        # and of the result: half a level each.
        r_cv, t_cv = opencv_extrinsics(p[b, 0], p[b, 1], p[b, 2], p[b, 3])
        pix, _ = project_opencv(points.reshape(-1, 3), r_cv, t_cv, IMAGE_K)
        _, src_normals, src_mask = _rendered_points(mesh, p[b])
        x0 = pix[:, 0].floor().long().clamp(0, IMAGE_SIZE[1] - 2)
        y0 = pix[:, 1].floor().long().clamp(0, IMAGE_SIZE[0] - 2)
        check = seen[b].reshape(-1).clone()
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            same_face = (src_normals[y0 + dy, x0 + dx] * normals.reshape(-1, 3)).sum(-1) > 0.999
            check &= src_mask[y0 + dy, x0 + dx] & same_face
        assert int(check.sum()) > 0.5 * int(seen[b].sum())
        expected = _colour(points.reshape(-1, 3)[check]).clamp(0, 255)
        got = images[b].reshape(3, -1)[:, check].T.double()
        assert float((got - expected).abs().max()) <= 1.05
    # Half a turn from a view at 15° elevation: only the top face is seen by both cameras.
    crop = _textured_crop(mesh, _deg_pose(30, 15, 0))
    p = torch.tensor([_deg_pose(30, 15, 0)], dtype=torch.float64)
    _, poses, seen = synthesize_images(
        crop[None], IMAGE_K[None], p, _whole_image(1), torch.tensor([[math.pi, 0.0, 0.0]]), mesh
    )
    _, normals, silhouette = _rendered_points(mesh, poses[0])
    top = normals[..., 2] > 0.99
    assert bool(seen[0].any()) and torch.equal(seen[0], silhouette & top)


def test_synthesize_images_checks_shapes() -> None:
    crop = torch.zeros(2, 3, *IMAGE_SIZE, dtype=torch.uint8)
    with pytest.raises(ValueError, match=re.escape("expected k (N, 3, 3), poses (N, 4)")):
        synthesize_images(
            crop, IMAGE_K.expand(2, 3, 3), torch.zeros(2, 4), _whole_image(2), torch.zeros(1, 3),
            _mesh(),
        )  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("image_box (N, 4)")):
        synthesize_images(
            crop, IMAGE_K.expand(2, 3, 3), torch.zeros(2, 4), _whole_image(1), torch.zeros(2, 3),
            _mesh(),
        )  # fmt: skip


def test_image_synthesis_takes_no_texture_from_the_padding() -> None:
    """Where the crop reached past its original image (left of ``image_box``'s x_lo) it holds
    zeros, not object: a synthesised pixel whose cuboid point projects there is not seen."""
    mesh = _mesh()
    pose = _deg_pose(40, 20, 5)
    crop = _textured_crop(mesh, pose)
    p = torch.tensor([pose], dtype=torch.float64)
    shifts = torch.tensor([[math.radians(20), 0.0, 0.0]])
    _, _, seen_all = synthesize_images(crop[None], IMAGE_K[None], p, _whole_image(1), shifts, mesh)
    cut = float(IMAGE_K[0, 2])  # the principal point's column: the object spans it
    box = _whole_image(1)
    box[0, 0] = cut
    _, poses, seen = synthesize_images(crop[None], IMAGE_K[None], p, box, shifts, mesh)
    points, _, _ = _rendered_points(mesh, poses[0])
    r_cv, t_cv = opencv_extrinsics(p[0, 0], p[0, 1], p[0, 2], p[0, 3])
    pix, _ = project_opencv(points.reshape(-1, 3), r_cv, t_cv, IMAGE_K)
    on_image = (pix[:, 0] >= math.ceil(cut)).reshape(IMAGE_SIZE)
    assert torch.equal(seen[0], seen_all[0] & on_image)
    assert bool((seen_all[0] & ~on_image).any()) and bool(seen[0].any())


# ------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------


def _match_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m, t, d, h, w = 40, 15, 8, 6, 7
    views = torch.randn(m, d, h, w, generator=g) * 0.7
    masks = torch.rand(m, h, w, generator=g) < 0.5
    masks[3] = False  # a view without usable pixels
    targets = F.normalize(torch.randn(t, d, h, w, generator=g), dim=1)
    # Make a few targets resemble views so the scores spread out.
    targets[:5] = F.normalize(targets[:5] + 2 * views[10:15], dim=1)
    clutter = F.normalize(torch.randn(d, generator=g), dim=0)
    return views, masks, targets, clutter


def test_similarity_matches_its_definition() -> None:
    views, masks, targets, clutter = _match_data()
    lin = nvsm_similarity(views, masks, targets)
    clu = nvsm_similarity(views, masks, targets, clutter)
    assert lin.shape == clu.shape == (15, 40)
    vn, tn = F.normalize(views, dim=1), F.normalize(targets, dim=1)
    for ti in (0, 7):
        for mi in (0, 11, 39):
            cos = (vn[mi] * tn[ti]).sum(0)[masks[mi]]
            bg = torch.einsum("d,dhw->hw", clutter, tn[ti])[masks[mi]]
            assert math.isclose(float(lin[ti, mi]), float(cos.mean()), abs_tol=1e-5)
            ref = torch.relu(cos - bg).mean()
            assert math.isclose(float(clu[ti, mi]), float(ref), abs_tol=1e-5)
    assert bool((lin[:, 3] == -math.inf).all()) and bool((clu[:, 3] == -math.inf).all())
    # Size normalisation: the score does not grow with the view's scale or silhouette size.
    assert torch.allclose(nvsm_similarity(3 * views, masks, targets), lin, atol=1e-5)
    # The linear encoding is exact; chunking changes nothing.
    enc_v, support = encode_views(views, masks)
    linear = encode_targets(targets, support) @ enc_v.T
    keep = masks.flatten(1).any(1)
    assert torch.allclose(linear[:, keep], lin[:, keep], atol=1e-5)
    assert bool((enc_v[~keep] == 0).all())
    assert torch.allclose(nvsm_similarity(views, masks, targets, clutter, chunk_elements=50), clu)
    cand = torch.tensor([[0, 3, -1, 11]]).repeat(15, 1)
    pairs = nvsm_similarity_pairs(views, masks, targets, cand, clutter)
    assert torch.allclose(pairs[:, [0, 3]], clu[:, [0, 11]], atol=1e-6)
    assert bool((pairs[:, [1, 2]] == -math.inf).all())


def test_similarity_with_areas_divides_the_sum_by_them() -> None:
    views, masks, targets, clutter = _match_data()
    counts = masks.flatten(1).sum(1).double()
    areas = counts + torch.arange(40).double() % 7  # e.g. silhouettes with holes
    areas[3] = 9.0  # a view without usable pixels stays unmatched whatever its area
    lin = nvsm_similarity(views, masks, targets)
    clu = nvsm_similarity(views, masks, targets, clutter)
    lin_a = nvsm_similarity(views, masks, targets, areas=areas)
    clu_a = nvsm_similarity(views, masks, targets, clutter, areas=areas)
    keep = counts > 0
    scale = (counts / areas).float()
    assert torch.allclose(lin_a[:, keep], lin[:, keep] * scale[keep], atol=1e-6)
    assert torch.allclose(clu_a[:, keep], clu[:, keep] * scale[keep], atol=1e-6)
    assert bool((lin_a[:, 3] == -math.inf).all())
    # Holes pull a view down: with half its silhouette unseen, a perfect match scores 0.5.
    one = F.normalize(torch.randn(1, 8, 6, 7), dim=1)
    half = torch.zeros(1, 6, 7, dtype=torch.bool)
    half[:, :3] = True
    assert math.isclose(float(nvsm_similarity(one, half, one)), 1.0, abs_tol=1e-6)
    s = nvsm_similarity(one, half, one, areas=torch.tensor([42.0]))
    assert math.isclose(float(s), 0.5, abs_tol=1e-6)
    # The linear encoding, the pair scores and the matcher use the same denominators.
    enc_v, support = encode_views(views, masks, areas)
    assert torch.allclose((encode_targets(targets, support) @ enc_v.T)[:, keep], lin_a[:, keep],
                          atol=1e-5)
    cand = torch.tensor([[0, 11, 39]]).repeat(15, 1)
    pairs = nvsm_similarity_pairs(views, masks, targets, cand, clutter, areas=areas)
    assert torch.allclose(pairs, clu_a[:, [0, 11, 39]], atol=1e-6)
    vals, idx = TorchMatcher(query_batch=4).search(views, masks, targets, 5, clutter=clutter,
                                                   areas=areas)
    ref_v, ref_i = clu_a.topk(5, dim=1)
    assert torch.allclose(vals, ref_v) and torch.equal(idx, ref_i)
    with pytest.raises(ValueError, match="areas must be"):
        nvsm_similarity(views, masks, targets, areas=areas[:5])
    with pytest.raises(ValueError, match="areas must be >="):
        nvsm_similarity(views, masks, targets, areas=counts - 1)


@needs_faiss
def test_faiss_with_areas_matches_brute_force() -> None:
    views, masks, targets, clutter = _match_data()
    areas = masks.flatten(1).sum(1).double() + torch.arange(40).double() % 5
    torch_m = TorchMatcher()
    for clu in (None, clutter):
        ref = torch_m.search(views, masks, targets, 5, clutter=clu, areas=areas)
        got = FaissMatcher("flat", shortlist=40).search(
            views, masks, targets, 5, clutter=clu, areas=areas
        )
        _assert_same_topk(got, ref)


def _assert_same_topk(
    got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]
) -> None:
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape
    assert torch.allclose(got[0].float(), ref[0].float(), atol=1e-4)
    assert torch.equal(got[1].cpu(), ref[1].cpu())


def test_torch_matcher_is_brute_force_topk() -> None:
    views, masks, targets, clutter = _match_data()
    s = nvsm_similarity(views, masks, targets, clutter)
    vals, idx = TorchMatcher(query_batch=4).search(views, masks, targets, 5, clutter=clutter)
    ref_v, ref_i = s.topk(5, dim=1)
    assert torch.allclose(vals, ref_v) and torch.equal(idx, ref_i)
    assert isinstance(TorchMatcher(), Matcher)
    # k beyond the number of usable views pads with -inf / -1; the empty view is never matched.
    vals, idx = TorchMatcher().search(views, masks, targets[:2], 45)
    assert bool((idx[:, 39:] == -1).all()) and bool((vals[:, 39:] == -math.inf).all())
    assert not bool((idx == 3).any())


@needs_faiss
def test_faiss_matches_brute_force() -> None:
    views, masks, targets, clutter = _match_data()
    torch_m = TorchMatcher()
    flat = FaissMatcher("flat", query_batch=4)
    assert isinstance(flat, Matcher)
    # Linear score: exact.
    _assert_same_topk(
        flat.search(views, masks, targets, 5), torch_m.search(views, masks, targets, 5)
    )
    # Clutter-aware: shortlist then exact re-scoring; exact when the shortlist covers all views.
    ref = torch_m.search(views, masks, targets, 5, clutter=clutter)
    full = FaissMatcher("flat", shortlist=40)
    _assert_same_topk(full.search(views, masks, targets, 5, clutter=clutter), ref)
    exact_all = nvsm_similarity(views, masks, targets, clutter)
    results = []
    for ratio in (1, 32):  # pair-by-pair and full-block re-scoring
        short = FaissMatcher("flat", shortlist=8, full_rescore_ratio=ratio)
        short_v, short_i = short.search(views, masks, targets, 5, clutter=clutter)
        exact = exact_all.gather(1, short_i)
        assert torch.allclose(short_v, exact, atol=1e-5)  # returned scores are the exact ones
        results.append((short_v, short_i))
    _assert_same_topk(results[0], results[1])
    # IVF visiting every list equals flat.
    ivf = FaissMatcher("ivf", nlist=6, nprobe=6)
    _assert_same_topk(ivf.search(views, masks, targets, 5), flat.search(views, masks, targets, 5))
    # PCA spanning all views is exact for the linear score (re-scored exactly).
    pca = FaissMatcher("flat", pca_dim=64)
    _assert_same_topk(
        pca.search(views, masks, targets, 5), torch_m.search(views, masks, targets, 5)
    )
    lossy_v, lossy_i = FaissMatcher("flat", pca_dim=4, shortlist=10).search(
        views, masks, targets, 3
    )
    assert lossy_v.shape == (15, 3)
    # A chunk of views without a usable pixel (all holes) scores -inf / -1, as the torch
    # matcher does (encoding no view raised a reshape error).
    holes = torch.zeros_like(masks)
    want = torch_m.search(views, holes, targets, 3, clutter=clutter)
    assert bool((want[1] == -1).all())
    for m in (flat, ivf, pca, full):
        for c in (None, clutter):
            got = m.search(views, holes, targets, 3, clutter=c)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    exact_lin = nvsm_similarity(views, masks, targets).gather(1, lossy_i)
    assert torch.allclose(lossy_v, exact_lin, atol=1e-5)
    # Build once, stream targets in chunks.
    built = flat.build(views, masks)
    streamed = [flat.query(built, targets[i : i + 6], 5) for i in range(0, 15, 6)]
    _assert_same_topk(
        (torch.cat([s[0] for s in streamed]), torch.cat([s[1] for s in streamed])),
        torch_m.search(views, masks, targets, 5),
    )


def test_equal_scores_go_to_the_lower_view_index() -> None:
    """An all-zero target scores exactly 0 against every view under the clutter-aware score
    (ReLU(0 − 0)): the matchers then list the views by index (torch.topk leaves the order of
    ties open), and the FAISS re-scored shortlist (every view) agrees with the brute force."""
    views, masks, targets, clutter = _match_data()
    targets[2] = 0.0
    assert (nvsm_similarity(views, masks, targets, clutter)[2, torch.arange(40) != 3] == 0).all()
    vals, idx = TorchMatcher().search(views, masks, targets, 6, clutter=clutter)
    assert idx[2].tolist() == [0, 1, 2, 4, 5, 6]  # view 3 has no usable pixel
    if faiss_available():
        got = FaissMatcher(shortlist=40).search(views, masks, targets, 6, clutter=clutter)
        _assert_same_topk(got, (vals, idx))


def test_hubness_correction_is_csls() -> None:
    """r_m = the mean of view m's k best scores over the targets (excluded pairs and views
    without usable pixels left out), merged over target chunks; with offsets −r_m / 2 both
    matchers rank by s − r_m / 2 over all views, computed here directly, for every k."""
    views, masks, targets, clutter = _match_data()
    t, m, k = targets.shape[0], views.shape[0], 3
    excl = torch.zeros(t, m, dtype=torch.bool)
    excl[:, 7] = True  # a view every target is excluded from...
    excl[:t - 2, 8] = True  # ...and one only two targets may match
    s = nvsm_similarity(views, masks, targets, clutter, exclude=excl)
    top = None
    for start in range(0, t, 4):
        top = top_scores(s[start : start + 4], k, top)
    assert top is not None
    assert torch.equal(top, s.topk(k, dim=0).values)
    r = view_hubness(top)
    for j in (0, 11, 39):
        assert r[j] == pytest.approx(float(s[:, j].sort(descending=True).values[:k].mean()))
    assert r[3] == 0.0 and r[7] == 0.0  # nothing to match: no correction
    assert r[8] == pytest.approx(float(s[t - 2 :, 8].mean()))  # only its finite scores
    expected = torch.where(torch.isfinite(s), s - r[None] / 2, s)
    matchers: list[TorchMatcher | FaissMatcher] = [TorchMatcher(), TorchMatcher(query_batch=5)]
    if faiss_available():
        # The shortlist re-scored as one score block, and pair by pair (full_rescore_ratio 0).
        matchers += [FaissMatcher(shortlist=m), FaissMatcher(query_batch=4, shortlist=m),
                     FaissMatcher(shortlist=m, full_rescore_ratio=0)]
    for matcher in matchers:
        for kk in (1, 3, m):
            got_s, got_i = matcher.search(
                views, masks, targets, kk, clutter=clutter, exclude=excl, offsets=-r / 2
            )
            want_s, want_i = expected.topk(kk, dim=1)
            finite = torch.isfinite(want_s)
            assert torch.equal(torch.isfinite(got_s), finite)
            assert torch.allclose(got_s[finite], want_s[finite], atol=1e-5)
            assert torch.equal(got_i[:, 0], want_i[:, 0])
            assert (got_i[~finite] == -1).all()
    # The linear score: FAISS answers it from the index alone (no re-scoring), where the offset
    # is the views' extra coordinate.
    lin = nvsm_similarity(views, masks, targets, exclude=excl)
    r_lin = view_hubness(lin.topk(k, dim=0).values)
    expected_lin = torch.where(torch.isfinite(lin), lin - r_lin[None] / 2, lin)
    linear: list[TorchMatcher | FaissMatcher] = [TorchMatcher()]
    if faiss_available():
        linear += [FaissMatcher(), FaissMatcher(pca_dim=m)]
    for matcher in linear:
        for kk in (1, 3):
            got_s, got_i = matcher.search(views, masks, targets, kk, exclude=excl,
                                          offsets=-r_lin / 2)
            want_s, want_i = expected_lin.topk(kk, dim=1)
            assert torch.allclose(got_s, want_s, atol=1e-5) and torch.equal(got_i, want_i)
    # The correction changes some target's best view on this data (so the checks above can
    # tell a matcher that ignores the offsets).
    raw = TorchMatcher().search(views, masks, targets, 1, clutter=clutter, exclude=excl)[1]
    assert not torch.equal(raw[:, 0], expected.argmax(dim=1))


def _self_match_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views cut out of the targets themselves: view m is target source[m] seen through a mask,
    so every target matches its own views perfectly (score 1)."""
    _, _, targets, _ = _match_data(1)
    g = torch.Generator().manual_seed(2)
    source = torch.arange(15).repeat_interleave(3)  # 45 views
    views = targets[source] * 2.0
    masks = torch.rand(45, 6, 7, generator=g) < 0.6
    return views, masks, targets, source


@pytest.mark.parametrize("kind", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_self_matches_are_excluded(kind: str) -> None:
    views, masks, targets, source = _self_match_data()
    matcher: Matcher = TorchMatcher() if kind == "torch" else FaissMatcher("flat", query_batch=4)
    target_ids = torch.arange(15)
    _, idx = matcher.search(views, masks, targets, 3)
    assert bool((source[idx[:, 0]] == target_ids).all())  # without exclusion: itself
    clutter = F.normalize(torch.ones(8), dim=0)
    for exclude in ((target_ids, source), exclusion_mask(target_ids, source)):
        for c in (None, clutter):
            vals, idx = matcher.search(views, masks, targets, 5, clutter=c, exclude=exclude)
            assert bool((idx >= 0).all())
            assert not bool((source[idx] == target_ids[:, None]).any())
            assert bool((vals < 0.999).all())
    # uid strings work as ids too.
    uids = [f"img{i}" for i in range(15)]
    s = nvsm_similarity(views, masks, targets, exclude=(uids, [uids[i] for i in source]))
    assert bool((s[target_ids[:, None] == source[None]] == -math.inf).all())


# ------------------------------------------------------------------------------------------
# Pseudo-labels
# ------------------------------------------------------------------------------------------


def _ring_poses() -> torch.Tensor:
    """36 views at azimuth 0°, 10°, ..., 350°, elevation 0, θ 0, distance 5."""
    az = torch.arange(36, dtype=torch.float64) * math.radians(10)
    return torch.stack([az, torch.zeros(36), torch.zeros(36), torch.full((36,), 5.0)], 1)


def _hand_scores() -> torch.Tensor:
    s = torch.full((3, 36), 0.1, dtype=torch.float64)
    s[0, 3] = 0.9  # best: 30°
    s[0, 4] = 0.85  # 10° away: not a competitor
    s[0, 0] = 0.8  # exactly 30° away: the distant competitor
    s[0, 21] = 0.7  # 210° = the flipped pose
    s[0, 19] = 0.75  # 190°: 20° from the flip (inside the radius)
    s[1] = -math.inf
    s[1, 7] = 0.4  # a single scored view
    s[2] = -math.inf  # nothing scored
    return s


def test_best_pose_and_margin() -> None:
    poses = _ring_poses()
    scores = _hand_scores()
    best = best_pose_and_margin(scores, poses, min_separation_deg=30)
    assert best.view.tolist() == [3, 7, -1]
    assert best.score[0] == 0.9 and best.score[1] == 0.4 and best.score[2] == -math.inf
    assert math.isclose(float(best.margin[0]), 0.1, abs_tol=1e-12)
    assert best.margin[1] == math.inf and math.isnan(float(best.margin[2]))
    # A wider separation drops the 30° competitor: the flip-side views compete instead.
    wide = best_pose_and_margin(scores, poses, min_separation_deg=40)
    assert math.isclose(float(wide.margin[0]), 0.9 - 0.75, abs_tol=1e-12)
    # Top-K form (candidate indices) gives the same answer when the candidates hold the peaks.
    vals, idx = scores.topk(6, dim=1)
    idx = idx.masked_fill(vals == -math.inf, -1)
    sparse = best_pose_and_margin(vals, poses, 30, index=idx)
    assert sparse.view.tolist() == best.view.tolist()
    assert torch.allclose(sparse.margin[:2], best.margin[:2])


def _label(uid: str, cat: str, score: float, margin: float, flip: float) -> PseudoLabel:
    return PseudoLabel(
        uid=uid,
        category=cat,
        azimuth=0.5,
        elevation=0.1,
        theta=0.0,
        distance=5.0,
        score=score,
        margin=margin,
        flip_score=flip,
        source_uid="anchor0",
        shift=(0.1, 0.0, 0.0),
    )


def test_acceptance_rule_and_schedule() -> None:
    labels = [
        _label("a", "car", 0.9, 0.20, 0.30),
        _label("b", "car", 0.8, 0.01, 0.30),  # margin too small
        _label("c", "car", 0.7, 0.20, -0.05),  # the flip scores as well
        _label("d", "car", 0.6, 0.20, math.nan),  # no view near the flip
        _label("e", "car", 0.2, math.inf, 0.30),  # score too low
        _label("f", "car", -math.inf, math.nan, math.nan),  # no match
        _label("g", "bus", 0.3, 0.20, 0.30),
    ]
    rule = AcceptanceRule(min_score=0.25, min_margin=0.05, min_flip_margin=0.0)
    assert rule.accept(labels).tolist() == [True, False, False, True, False, False, True]
    strict = AcceptanceRule(min_flip_margin=0.0, require_flip_evidence=True)
    assert strict.accept(labels).tolist() == [True, True, False, False, True, False, True]
    # Top fraction is ranked per category: car keeps ceil(0.4·5) = 2, bus ceil(0.4·1) = 1.
    top = AcceptanceRule(top_fraction=0.4)
    assert top.accept(labels).tolist() == [True, True, False, False, False, False, True]
    pooled = AcceptanceRule(top_fraction=0.4, per_category=False)
    assert pooled.accept(labels).tolist() == [True, True, True, False, False, False, False]
    with pytest.raises(ValueError):
        AcceptanceRule(top_fraction=0.0)
    # Ranked by score and flip margin together: car ranks (score, flip) a (5, 4), b (4, 4),
    # c (3, 2), d (2, 1: NaN last), e (1, 4: tied) → sums a 9, b 8, c 5, e 5, d 3 (ties kept).
    both = AcceptanceRule(top_fraction=0.4, rank_with_flip=True)
    assert both.accept(labels).tolist() == [True, True, False, False, False, False, True]
    both_more = AcceptanceRule(top_fraction=0.6, rank_with_flip=True)
    assert both_more.accept(labels).tolist() == [True, True, True, False, True, False, True]
    # Flip score weighted 10×: a 5 + 40, b 4 + 40, e 1 + 40, c 3 + 20, d 2 + 10 → e before c.
    flip_heavy = AcceptanceRule(top_fraction=0.6, rank_with_flip=True, flip_rank_weight=10.0)
    assert flip_heavy.accept(labels).tolist() == [True, True, False, False, True, False, True]
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="flip_rank_weight"):
            AcceptanceRule(rank_with_flip=True, flip_rank_weight=bad)

    # Score weight 0: the flip margin alone ranks (a, b, e tied at 4, then c) → c before d.
    flip_only = AcceptanceRule(top_fraction=0.8, rank_with_flip=True, score_rank_weight=0.0)
    assert flip_only.accept(labels).tolist() == [True, True, True, False, True, False, True]
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="score_rank_weight"):
            AcceptanceRule(rank_with_flip=True, score_rank_weight=bad)

    # Equal rank sums tie exactly: score ranks 1…10 and flip ranks 1 2 3 9 8 7 10 6 5 4 give
    # sums 13 for the 4th to 6th label, all three at the threshold of the top half. As percentile
    # ranks (rank / 10) one sum came out 1.2999999999999998 and that label was dropped.
    ranks = np.array([1, 2, 3, 9, 8, 7, 10, 6, 5, 4], np.float64)
    half = AcceptanceRule(top_fraction=0.5, rank_with_flip=True)
    kept = half.accept_arrays(np.arange(1.0, 11.0) / 10, np.full(10, np.inf), ranks / 100)
    assert kept.tolist() == [False, False, False, True, True, True, True, True, True, True]

    sched = AcceptanceSchedule((AcceptanceRule(top_fraction=0.3), AcceptanceRule(top_fraction=0.7)))
    assert sched.rule(0).top_fraction == 0.3 and sched.rule(7) == sched.rules[-1]
    with pytest.raises(ValueError, match="round_index"):
        sched.rule(-1)

    out = apply_acceptance(labels, rule, weights=np.linspace(0.5, 1.0, len(labels)))
    assert [lb.accepted for lb in out] == rule.accept(labels).tolist()
    assert out[0].weight == 0.5 and out[1].weight == 0.0


def test_pseudo_label_round_trip_and_construction() -> None:
    lb = _label("img1", "car", 0.9, 0.2, 0.3)
    assert PseudoLabel.from_dict(json.loads(json.dumps(lb.to_dict()))) == lb
    odd = _label("img2", "car", -math.inf, math.inf, math.nan)
    text = json.dumps(odd.to_dict(), allow_nan=False)  # strict JSON
    back = PseudoLabel.from_dict(json.loads(text))
    assert back.score == -math.inf and back.margin == math.inf and math.isnan(back.flip_score)
    assert back.to_dict() == odd.to_dict()
    with pytest.raises(ValueError):
        PseudoLabel.from_dict({**lb.to_dict(), "bogus": 1})

    poses = _ring_poses()
    scores = _hand_scores()
    best = best_pose_and_margin(scores, poses)
    flip = torch.tensor([0.2, math.nan, math.nan], dtype=torch.float64)
    shifts = torch.zeros(36, 3, dtype=torch.float64)
    labels = make_pseudo_labels(
        ["t0", "t1", "t2"], "car", best, flip, poses, shifts, [f"a{i // 6}" for i in range(36)], 2
    )
    assert [x.source_uid for x in labels] == ["a0", "a1", ""]
    assert math.isclose(labels[0].azimuth, math.radians(30)) and labels[0].round == 2
    assert math.isnan(labels[2].azimuth) and not any(x.accepted for x in labels)
    assert isinstance(best, BestMatch)


def test_view_areas_follow_fewshot_score_area() -> None:
    from types import SimpleNamespace

    from nvsm.fewshot.estep import view_areas

    sil = torch.zeros(2, 4, 5, dtype=torch.bool)
    sil[0, :2] = True
    sil[1, 0, 0] = True
    views = SimpleNamespace(silhouette=sil)
    assert torch.equal(view_areas(views, "silhouette"), torch.tensor([10, 1]))  # type: ignore[arg-type]
    assert view_areas(views, "usable") is None  # type: ignore[arg-type]
    message = re.escape("fewshot.score_area: expected one of silhouette | usable, got 'mask'")
    with pytest.raises(ValueError, match=message):
        view_areas(views, "mask")  # type: ignore[arg-type]


def test_run_fewshot_refuses_bad_fewshot_options_before_any_work(tmp_path: Path) -> None:
    from nvsm.config import ConfigError, RunConfig, override_config
    from nvsm.fewshot.loop import run_fewshot

    config = override_config(RunConfig(), ["labels.annotations=7"])
    # "x" is not one of score_area's choices, on purpose: run_fewshot must refuse it.
    bad_fewshot = dataclasses.replace(config.fewshot, score_area="x")  # type: ignore[arg-type]
    bad = dataclasses.replace(config, fewshot=bad_fewshot)
    message = "config.fewshot.score_area: expected one of silhouette | usable, got 'x'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_fewshot(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    for option, message in (
        ("fewshot.mstep_image_shifts_deg=[30,0]", "must be non-zero and within ±90°, got [0.0]"),
        ("fewshot.mstep_image_shifts_deg=[120]", "must be non-zero and within ±90°, got [120.0]"),
    ):
        config = override_config(RunConfig(), [option, "labels.annotations=7"])
        with pytest.raises(ValueError, match=re.escape(message)):
            run_fewshot(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    # Out-of-range numbers fail on loading, naming the key ...
    for option, message in (
        ("fewshot.accept_flip_rank_weight=0", "accept_flip_rank_weight: expected a value > 0"),
        ("fewshot.accept_score_rank_weight=-1", "accept_score_rank_weight: expected a value >= 0"),
        ("fewshot.accept_azimuth_bins=0", "fewshot.accept_azimuth_bins: expected a value >= 1"),
        ("fewshot.hubness_k=-1", "fewshot.hubness_k: expected a value >= 0, got -1"),
        ("fewshot.hubness_sample=0", "fewshot.hubness_sample: expected a value >= 1, got 0"),
        ("fewshot.mstep_image_shifts_deg=[.nan]", "mstep_image_shifts_deg[0]: expected a finite"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            override_config(RunConfig(), [option])
    # ... and a config built in code is checked by the loop itself before any work.
    config = override_config(RunConfig(), ["labels.annotations=7"])
    bad = dataclasses.replace(config, fewshot=dataclasses.replace(config.fewshot, hubness_k=-1))
    with pytest.raises(ConfigError, match=re.escape("config.fewshot.hubness_k: expected a value")):
        run_fewshot(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_acceptance_per_azimuth_bin() -> None:
    """``azimuth_bins``: the top fraction is taken within each bin of the pseudo-pose azimuth,
    so a bin whose views all score low (end-on views) still gets its share."""
    front = [math.radians(a) for a in (-10.0, 5.0, 350.0 - 360.0, 15.0)]  # bin 0 of 4
    side = [math.radians(a) for a in (80.0, 95.0, 100.0, 110.0)]  # bin 1 of 4 (90°)
    labels = [
        dataclasses.replace(_label(f"f{i}", "car", 0.1 + 0.01 * i, 0.2, 0.1), azimuth=a)
        for i, a in enumerate(front)
    ] + [
        dataclasses.replace(_label(f"s{i}", "car", 0.5 + 0.01 * i, 0.2, 0.1), azimuth=a)
        for i, a in enumerate(side)
    ]
    pooled = AcceptanceRule(top_fraction=0.5)
    assert pooled.accept(labels).tolist() == [False] * 4 + [True] * 4
    binned = AcceptanceRule(top_fraction=0.5, azimuth_bins=4)
    assert binned.accept(labels).tolist() == [False, False, True, True] * 2
    # An azimuth of 2π + 5° is the front bin too.
    wrapped = [dataclasses.replace(labels[0], azimuth=2 * math.pi + math.radians(5.0))]
    wrapped += labels[1:]
    assert binned.accept(wrapped).tolist() == binned.accept(labels).tolist()
    with pytest.raises(ValueError, match="azimuths"):
        binned.accept_arrays(np.ones(8), np.ones(8), np.ones(8), ["car"] * 8)
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="azimuth_bins"):
            AcceptanceRule(azimuth_bins=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Reading pseudo-labels back: strict field types, accepted poses finite, UTF-8
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("accepted", "false", "expected true or false, got 'false'"),
        ("accepted", 0.5, "expected true or false, got 0.5"),
        ("accepted", 1, "expected true or false, got 1"),
        ("round", 7.9, "expected an integer, got 7.9"),
        ("round", True, "expected an integer, got True"),
        ("round", -1, "expected an integer >= 0, got -1"),
        ("uid", 5, "expected a string, got 5"),
        ("source_uid", None, "expected a string, got None"),
        ("azimuth", True, 'expected a number, null (NaN) or "inf" / "-inf", got True'),
        ("score", "0.5", 'expected a number, null (NaN) or "inf" / "-inf", got \'0.5\''),
        ("score", "nan", 'expected a number, null (NaN) or "inf" / "-inf", got \'nan\''),
        ("weight", [1.0], 'expected a number, null (NaN) or "inf" / "-inf", got [1.0]'),
        ("shift", "abc", "expected a list of 3 numbers, got 'abc'"),
        ("shift", [0.0, False, 0.0], 'expected a number, null (NaN) or "inf" / "-inf", got False'),
    ],
)
def test_pseudo_label_from_dict_rejects_wrong_types(
    field: str, value: object, expected: str
) -> None:
    # Before: bool()/int()/str()/float() coerced these ("false" → accepted, 7.9 → round 7, ...).
    data = {**dataclasses.replace(_label("a", "car", 0.9, 0.2, 0.3), accepted=True).to_dict()}
    data[field] = value
    with pytest.raises(ValueError, match=re.escape(f"field {field!r}: {expected}")):
        PseudoLabel.from_dict(data)


def test_pseudo_label_from_dict_accepted_pose_must_be_finite() -> None:
    # The loop accepts only matched labels, whose poses are finite; a rejected label without a
    # match legitimately has a NaN pose and must still round-trip exactly.
    base = _label("a", "car", 0.9, 0.2, 0.3)
    for name in ("azimuth", "elevation", "theta", "distance"):
        for bad in (None, "inf", "-inf"):
            data = {**base.to_dict(), "accepted": True, name: bad}
            with pytest.raises(ValueError, match=f"accepted pseudo-label with non-finite {name}"):
                PseudoLabel.from_dict(data)
    nan = math.nan
    rejected = dataclasses.replace(
        base, azimuth=nan, elevation=nan, theta=nan, distance=nan, shift=(nan, nan, nan),
        score=-math.inf,
    )
    back = PseudoLabel.from_dict(json.loads(json.dumps(rejected.to_dict(), allow_nan=False)))
    assert back.to_dict() == rejected.to_dict() and math.isnan(back.azimuth)
    partial = {k: v for k, v in base.to_dict().items() if k not in ("uid", "shift")}
    with pytest.raises(ValueError, match=re.escape("missing fields ['uid', 'shift']")):
        PseudoLabel.from_dict(partial)
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        PseudoLabel.from_dict([base.to_dict()])


def test_read_pseudo_labels_names_file_line_and_field(tmp_path: Path) -> None:
    from nvsm.fewshot.pseudo_labels import pseudo_labels_jsonl, read_pseudo_labels

    good = dataclasses.replace(_label("a", "car", 0.9, 0.2, 0.3), accepted=True, weight=1.0)
    path = tmp_path / "pseudo_labels.jsonl"
    text = pseudo_labels_jsonl([good, dataclasses.replace(good, uid="b", accepted=False,
                                                          weight=0.0)])
    path.write_text(text)
    assert read_pseudo_labels(path)[1].uid == "b"

    def fails(content: bytes, message: str) -> None:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{path} line 2: {message}")):
            read_pseudo_labels(path)

    first = text.splitlines()[0].encode()
    fails(first + b"\n" + first.replace(b'"accepted": true', b'"accepted": "false"'),
          "field 'accepted': expected true or false, got 'false'")
    fails(first + b"\n" + first.replace(b'"round": 0', b'"round": 7.9'),
          "field 'round': expected an integer, got 7.9")
    fails(first + b"\n" + re.sub(rb'"azimuth": [^,]+', b'"azimuth": null', first),
          "accepted pseudo-label with non-finite azimuth (nan)")
    # The M-step trains with the weights: a resumed round took 5 (or a rejected label's 1).
    fails(first + b"\n" + first.replace(b'"weight": 1.0', b'"weight": 5.0'),
          "field 'weight': expected a number in [0, 1], got 5.0")
    fails(first + b"\n" + first.replace(b'"accepted": true', b'"accepted": false'),
          "field 'weight': expected 0 (rejected), got 1.0")
    # Before: the file was decoded outside the try, so the error named neither file nor line.
    fails(first + b"\n" + first + b"\xff", "not UTF-8 text (invalid byte 0xff at offset")


def test_matchers_agree_when_there_are_no_views() -> None:
    # TorchMatcher raised on M = 0 (reshape(0, -1)); FaissMatcher padded: they are swappable.
    views, masks = torch.randn(0, 4, 3, 3), torch.zeros(0, 3, 3, dtype=torch.bool)
    targets = torch.randn(2, 4, 3, 3)
    for matcher in (TorchMatcher(), FaissMatcher()):
        scores, index = matcher.search(views, masks, targets, 2)
        assert torch.equal(index, torch.full((2, 2), -1))
        assert torch.isinf(scores).all() and (scores < 0).all()
