import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nvsm.pose as P
from nvsm.pose.convention import POLE_EPS


def _vectors(shared_dir):
    path = shared_dir / "testdata" / "pascal3d_convention_vectors.json"
    # The file ships with ../shared; a missing file is a failure, not a skip.
    assert path.is_file(), f"missing convention test vectors: {path}"
    return json.loads(path.read_text())


def test_projection_vectors(shared_dir):
    cases = _vectors(shared_dir)["projection_cases"]
    assert len(cases) > 0
    for c in cases:
        a, e, t = (math.radians(c[k]) for k in ("azimuth_deg", "elevation_deg", "theta_deg"))
        pix = P.project_pascal3d(
            np.array(c["points_3d"]),
            a,
            e,
            t,
            c["distance"],
            c["px"],
            c["py"],
            c["focal"],
            c["viewport"],
        )
        np.testing.assert_allclose(pix, c["pixels_xy"], atol=1e-6)
        np.testing.assert_allclose(P.rotation_matrix(a, e, t), c["eval_rotation"], atol=1e-6)
        np.testing.assert_allclose(
            P.camera_centre(a, e, c["distance"]), c["camera_centre"], atol=1e-6
        )


def test_rotation_error_vectors(shared_dir):
    pairs = _vectors(shared_dir)["rotation_error_pairs"]
    assert len(pairs) > 0
    keys = ("azimuth_deg", "elevation_deg", "theta_deg")
    ra = P.rotation_matrix(*np.radians([[p["a"][k] for k in keys] for p in pairs]).T)
    rb = P.rotation_matrix(*np.radians([[p["b"][k] for k in keys] for p in pairs]).T)
    err = np.degrees(P.rotation_error(ra, rb))
    np.testing.assert_allclose(err, [p["geodesic_error_deg"] for p in pairs], atol=1e-6)


def test_torch_and_numpy_agree_and_batch():
    rng = np.random.default_rng(0)
    a, e, t = rng.uniform(-3, 3, (3, 5, 4))
    r_np = P.rotation_matrix(a, e, t)
    r_t = P.rotation_matrix(torch.tensor(a), torch.tensor(e), torch.tensor(t))
    assert r_np.shape == (5, 4, 3, 3) and isinstance(r_t, torch.Tensor)
    np.testing.assert_allclose(r_np, r_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(
        r_np @ np.swapaxes(r_np, -1, -2), np.broadcast_to(np.eye(3), r_np.shape), atol=1e-12
    )


angles = st.floats(-math.pi, math.pi, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(0, 2 * math.pi - 1e-9), e=st.floats(-1.5, 1.5), t=angles, d=st.floats(0.5, 50))
def test_round_trip_away_from_poles(a, e, t, d):
    r_cv, t_cv = P.opencv_extrinsics(a, e, t, d)
    a2, e2, t2, d2 = P.pose_from_opencv(r_cv, t_cv)
    assert abs(P.wrap_angle(a2 - a)) < 1e-7
    assert abs(e2 - e) < 1e-9
    assert abs(P.wrap_angle(t2 - t)) < 1e-9
    assert abs(d2 - d) < 1e-9 * d


@pytest.mark.parametrize("e", [math.pi / 2, -math.pi / 2])
def test_round_trip_at_poles_preserves_rotation(e):
    for a, t in [(0.3, 0.2), (2.0, -1.0), (5.0, 3.0)]:
        r = P.rotation_matrix(a, e, t)
        a2, e2, t2 = P.pose_from_rotation(r)
        assert np.isfinite([a2, e2, t2]).all()
        assert a2 == 0.0 and abs(abs(e2) - math.pi / 2) < 1e-7
        np.testing.assert_allclose(P.rotation_matrix(a2, e2, t2), r, atol=1e-9)
    # Just off the pole the general branch must still give the same rotation.
    r = P.rotation_matrix(1.0, e - math.copysign(10 * POLE_EPS, e), 0.5)
    np.testing.assert_allclose(P.rotation_matrix(*P.pose_from_rotation(r)), r, atol=1e-6)


def test_opencv_camera_matches_pascal_projection():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(10, 3))
    a, e, t, d, px, py = 0.7, 0.3, -0.2, 8.0, 120.0, 90.0
    r_cv, t_cv = P.opencv_extrinsics(a, e, t, d)
    pix, depth = P.project_opencv(pts, r_cv, t_cv, P.intrinsics(3000.0, px, py))
    np.testing.assert_allclose(pix, P.project_pascal3d(pts, a, e, t, d, px, py), atol=1e-9)
    # The object origin sits on the optical axis at depth d.
    o, od = P.project_opencv(np.zeros((1, 3)), r_cv, t_cv, P.intrinsics(3000.0, px, py))
    np.testing.assert_allclose(o[0], [px, py])
    np.testing.assert_allclose(od, [d])
    assert (depth > 0).all()


def test_mirror_pose_matches_flipped_image():
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(20, 3))
    mirrored = pts * np.array([-1.0, 1.0, 1.0])  # the object's left/right mirror image
    a, e, t, d, px, py = 0.9, 0.25, 0.15, 6.0, 100.0, 80.0
    pix = P.project_pascal3d(pts, a, e, t, d, px, py)
    am, em, tm = P.mirror_pose(np.float64(a), np.float64(e), np.float64(t))
    pix_m = P.project_pascal3d(mirrored, am, em, tm, d, px, py)
    # Flipping the image about the column x = px.
    np.testing.assert_allclose(pix_m[:, 0], 2 * px - pix[:, 0], atol=1e-9)
    np.testing.assert_allclose(pix_m[:, 1], pix[:, 1], atol=1e-9)


def test_mirror_pose_keeps_the_documented_ranges():
    _, _, tm = P.mirror_pose(np.float64(0.3), np.float64(0.2), np.float64(math.pi))
    assert tm == math.pi
    a, _, tm = P.mirror_pose(torch.tensor([0.0, 1.0]), torch.tensor([0.1, 0.1]),
                             torch.tensor([math.pi, 0.5]))
    assert a.tolist() == [0.0, pytest.approx(2 * math.pi - 1.0)]
    assert tm.tolist() == [pytest.approx(math.pi), -0.5]


def test_angles_come_back_in_their_documented_ranges():
    # The remainder rounded a tiny negative angle up to 2π itself (atan2 gives −2e−16 for an
    # azimuth of 360°), and atan2 gives θ = −π for a half turn in plane.
    for az in (2 * math.pi, -1e-17, 4 * math.pi):
        a, _, _ = P.pose_from_rotation(P.rotation_matrix(az, 0.3, 0.1))
        assert 0 <= a < 2 * math.pi and abs(P.wrap_angle(a - az)) < 1e-9
    a32, _, _ = P.pose_from_rotation(P.rotation_matrix(torch.tensor(-1e-8), 0.3, 0.1).float())
    assert 0 <= float(a32) < 2 * math.pi
    _, _, t = P.pose_from_rotation(P.rotation_matrix(0.5, 0.3, -math.pi))
    assert t == math.pi
    for x in (-math.pi, 3 * math.pi, -1e-17):
        assert -math.pi < P.wrap_angle(x) <= math.pi and 0 <= P.wrap_azimuth(x) < 2 * math.pi
    assert float(P.wrap_azimuth(torch.tensor(-1e-8, dtype=torch.float32))) == 0.0
    assert float(P.wrap_angle(torch.tensor(-math.pi, dtype=torch.float32))) > 0


def test_an_integer_tensor_does_not_truncate_the_other_values():
    # The other values took the first tensor's dtype: an int azimuth made elevation 0.5 → 0.
    want = P.rotation_matrix(0.0, 0.5, 0.25)
    np.testing.assert_allclose(P.rotation_matrix(torch.tensor(0), 0.5, 0.25), want, atol=1e-6)
    np.testing.assert_allclose(
        P.camera_centre(torch.tensor(0), 0.5, 7.9), P.camera_centre(0.0, 0.5, 7.9), atol=1e-5
    )


def test_rotation_error_is_clamped_and_handles_nan():
    r = P.rotation_matrix(0.3, 0.2, 0.1)
    assert P.rotation_error(r, r) == 0.0
    # Tiny numerical excess of the trace must not produce NaN.
    assert np.isfinite(P.rotation_error(r * (1 + 1e-12), r))
    assert P.rotation_error(np.full((3, 3), np.nan), r) == math.pi
    flipped = P.rotation_matrix(0.3 + math.pi, 0.2, 0.1)
    assert abs(P.rotation_error(flipped, r) - P.rotation_error(r, flipped)) < 1e-12


def test_metrics_count_failures_as_180():
    gt = np.array([[0.0, 0.1, 0.0]] * 4)
    preds = [(0.0, 0.1, 0.0), (math.radians(20), 0.1, 0.0), None, (float("nan"), 0.0, 0.0)]
    err = P.pose_errors(preds, gt)
    np.testing.assert_allclose(np.degrees(err), [0, 20, 180, 180], atol=1e-9)
    m = P.summarize_errors(err)
    assert m.acc_pi_6 == 0.5 and m.acc_pi_18 == 0.25 and m.n == 4
    assert m.median_error_deg == pytest.approx(100.0)
    m2 = P.summarize_errors(np.array([0.1, np.nan]))
    assert m2.failures == 1 and m2.acc_pi_6 == 0.5


def test_weighted_mean_is_image_weighted():
    a = P.PoseMetrics(1.0, 0.5, 4.0, 30, 0)
    b = P.PoseMetrics(0.0, 0.0, 40.0, 10, 2)
    m = P.weighted_mean([a, b])
    assert m.acc_pi_6 == pytest.approx(0.75) and m.median_error_deg == pytest.approx(13.0)
    assert m.n == 40 and m.failures == 2


def test_gt_normalized_crop_camera_is_exact():
    rng = np.random.default_rng(3)
    pts = rng.normal(scale=0.8, size=(30, 3))
    a, e, t, d, px, py = 1.2, 0.2, 0.1, 11.0, 350.0, 200.0
    cam = P.gt_normalized_crop(d, px, py, 3000.0, (256, 672))
    pix = P.project_pascal3d(pts, a, e, t, d, px, py)
    in_crop = pix * cam.scale + cam.offset
    r_cv, t_cv = P.opencv_extrinsics(a, e, t, d)
    pix_crop, _ = P.project_opencv(pts, r_cv, t_cv, cam.k)
    np.testing.assert_allclose(pix_crop, in_crop, atol=1e-9)
    # Object origin at the crop centre; the object looks as if 5 units away at 3000 px.
    np.testing.assert_allclose(cam.k[:2, 2], [(672 - 1) / 2, (256 - 1) / 2])
    assert cam.k[0, 0] / d == pytest.approx(3000 / 5)
    assert cam.reference_distance() == pytest.approx(d)


def test_feature_intrinsics_maps_cell_centres():
    k = P.intrinsics(3000.0, 335.5, 127.5)
    kf = P.feature_intrinsics(np.asarray(k), 8)
    assert kf[0, 0] == 375.0
    # Crop pixel 8j + 3.5 is the centre of feature cell j.
    x_crop = np.array([3.5, 11.5, 8 * 41 + 3.5])
    np.testing.assert_allclose((x_crop - 335.5) / 3000 * 375 + kf[0, 2], [0, 1, 41])
    np.testing.assert_allclose(kf[:2, 2], [(84 - 1) / 2, (32 - 1) / 2])


def test_bbox_crop_uses_box_only():
    cam = P.bbox_crop((100, 50, 300, 150), (320, 240), 1000.0, (256, 672), fill=0.8)
    centre = cam.image_to_crop() @ np.array([200.0, 100.0, 1.0])
    np.testing.assert_allclose(centre, [(672 - 1) / 2, (256 - 1) / 2])
    assert cam.scale == pytest.approx(0.8 * min(672 / 200, 256 / 100))
    with pytest.raises(ValueError, match="x1 > x0"):
        P.bbox_crop((10, 10, 5, 20), (0, 0), 1000.0, (64, 64))


def test_torch_inputs_of_two_float_dtypes_follow_the_first() -> None:
    # float32 beside float64 failed in the matrix products ("expected m1 and m2 to have the
    # same dtype"), though the docstring promised the first floating tensor's dtype.
    a32, e64 = torch.tensor(0.3), torch.tensor(0.2, dtype=torch.float64)
    r = P.rotation_matrix(a32, e64, 0.1)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, torch.as_tensor(P.rotation_matrix(0.3, 0.2, 0.1)).float())
    uv = P.project_pascal3d(torch.randn(4, 3, dtype=torch.float64), a32, 0.2, 0.1, 5.0, 10.0,
                            10.0)
    assert uv.dtype == torch.float64 and torch.isfinite(uv).all()


def test_project_opencv_at_zero_depth_keeps_values_and_gives_finite_gradients() -> None:
    # uv / w at w = 0 is inf/NaN (kept, the renderers cull it), but its backward formed
    # 0 · inf = NaN even with a zero upstream gradient, and the NaN reached the pose.
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.2, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    k = torch.as_tensor(P.intrinsics(100.0, 20.0, 10.0))
    d = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)  # camera at the origin
    r_cv, t_cv = P.opencv_extrinsics(torch.tensor(0.3, dtype=torch.float64), 0.0, 0.0, d)
    pix, depth = P.project_opencv(pts, r_cv, t_cv, k)
    x_cv = pts @ r_cv.detach().T + t_cv.detach()
    uvw = x_cv @ k.T
    plain = uvw[:, :2] / uvw[:, 2:]
    assert depth[0] == 0 and not torch.isfinite(plain[0]).any()
    assert torch.equal(pix.isnan(), plain.isnan())
    assert torch.equal(pix.nan_to_num(), plain.nan_to_num())  # bit-identical, inf included
    # Only the finite points feed the loss (as a renderer's culling does).
    (pix[1:] ** 2).sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad) and d.grad != 0
