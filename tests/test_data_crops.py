"""Crops: the crop camera projects the pose where the image content lands after the warp."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from nvsm.data import ObjectRecord
from nvsm.data.crops import (
    DEFAULT_CROP_SIZES,
    crop_camera,
    crop_mask,
    crop_object,
    default_crop_size,
    warp_to_crop,
)
from nvsm.pose import feature_intrinsics, project_opencv, project_pascal3d
from nvsm.pose.camera import CropCamera

H, W = 240, 320
CAD = np.array([[0, 0, 0], [0.5, -1.0, 0.3], [-0.5, 1.0, -0.3], [0.4, 0.9, 0.2],
                [-0.45, -0.8, 0.25], [0.0, 0.0, 0.5]])
SMALL = CAD * 0.08  # stays well inside small crops


def _rec(**kw: Any) -> ObjectRecord:
    base: dict[str, Any] = dict(
        image_path="a.png", category="car", bbox=(100.3, 80.7, 230.2, 170.9),
        azimuth=math.radians(37), elevation=math.radians(12), theta=math.radians(-8),
        distance=9.0, px=161.37, py=122.61, focal=1.0, viewport=3000.0, cad_index=0,
        truncated=False, occluded=False, difficult=False, occlusion_level=0,
        source="pascal3d", image_id="a", object_index=0)
    base.update(kw)
    return ObjectRecord(**base)


def _affine(points_xy: np.ndarray, m: np.ndarray) -> np.ndarray:
    return points_xy @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("protocol", ["gt-normalized", "bbox"])
@pytest.mark.parametrize("size", [(256, 672), (64, 96)])
def test_crop_camera_projects_like_the_affine_map(protocol: str, size: tuple[int, int]) -> None:
    rec = _rec()
    cam = crop_camera(rec, protocol, size)
    original = project_pascal3d(CAD, *rec.pose, rec.px, rec.py, rec.focal, rec.viewport)
    r_cv, t_cv = rec.extrinsics()
    in_crop, _ = project_opencv(CAD, r_cv, t_cv, cam.k)
    np.testing.assert_allclose(in_crop, _affine(original, cam.image_to_crop()), atol=1e-9)
    # the object origin projects to (px, py) in the image
    np.testing.assert_allclose(original[0], [rec.px, rec.py], atol=1e-9)
    if protocol == "gt-normalized":
        h, w = size
        np.testing.assert_allclose(in_crop[0], [(w - 1) / 2, (h - 1) / 2], atol=1e-9)
        assert cam.k[0, 0] == pytest.approx(3000 * rec.distance / 5)
        assert cam.reference_distance() == pytest.approx(rec.distance)
    else:  # the box centre sits at the crop centre, its longer side fills 80 %
        box = np.array([[rec.bbox[0], rec.bbox[1]], [rec.bbox[2], rec.bbox[3]]])
        b = _affine(box, cam.image_to_crop())
        np.testing.assert_allclose(b.mean(0), [(size[1] - 1) / 2, (size[0] - 1) / 2], atol=1e-9)
        assert max((b[1] - b[0]) / [size[1], size[0]]) == pytest.approx(0.8)


def _blob_image(x0: float, y0: float, sigma: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    return np.repeat((g * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def _centroid(img: torch.Tensor) -> np.ndarray:
    w = img[0].double().numpy()
    yy, xx = np.mgrid[0 : w.shape[0], 0 : w.shape[1]]
    return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


@pytest.mark.parametrize("protocol", ["gt-normalized", "bbox"])
def test_image_content_lands_where_the_camera_says(protocol: str) -> None:
    """A sub-pixel blob drawn where a CAD point projects in the image appears in the crop where
    that point projects with the crop camera (centroid to < 0.05 crop px)."""
    rec = _rec()
    original = project_pascal3d(SMALL, *rec.pose, rec.px, rec.py, rec.focal, rec.viewport)
    r_cv, t_cv = rec.extrinsics()
    for k in (1, 3, 4):
        x0, y0 = original[k]
        crop, cam = crop_object(_blob_image(x0, y0), rec, protocol, (128, 192))
        assert crop.shape == (3, 128, 192) and crop.dtype == torch.float32
        assert float(crop.min()) >= 0.0 and float(crop.max()) <= 1.0
        expected, _ = project_opencv(SMALL[k : k + 1], r_cv, t_cv, cam.k)
        assert 20 < expected[0, 0] < 172 and 20 < expected[0, 1] < 108
        np.testing.assert_allclose(_centroid(crop), expected[0], atol=0.05 * max(1, cam.scale))


def test_downscaled_crop_antialias_keeps_centre() -> None:
    rec = _rec(distance=1.0)  # gt-normalized scale = 3000·1/(5·3000) = 0.2
    original = project_pascal3d(SMALL * 0.5, *rec.pose, rec.px, rec.py, rec.focal, rec.viewport)
    x0, y0 = original[1]
    crop, cam = crop_object(_blob_image(x0, y0, sigma=6.0), rec, "gt-normalized", (64, 64))
    assert cam.scale == pytest.approx(0.2)
    expected = _affine(np.array([[x0, y0]]), cam.image_to_crop())[0]
    np.testing.assert_allclose(_centroid(crop), expected, atol=0.05)


def test_zero_padding_numpy_and_torch_inputs_agree() -> None:
    rec = _rec(px=5.0, py=5.0, bbox=(0, 0, 30, 20))
    img = np.full((H, W, 3), 200, np.uint8)
    a, _ = crop_object(img, rec, "gt-normalized", (64, 64))
    b, _ = crop_object(torch.from_numpy(img), rec, "gt-normalized", (64, 64))
    c, _ = crop_object(img.astype(np.float32) / 255, rec, "gt-normalized", (64, 64))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert float(a[:, 0, 0].abs().max()) == 0.0  # outside the image: zeros
    assert float(a[:, -1, -1].min()) == pytest.approx(200 / 255)


def test_masks_use_the_same_warp() -> None:
    rec = _rec()
    mask = np.zeros((H, W), bool)
    mask[100:140, 150:200] = True
    cam = crop_camera(rec, "gt-normalized", (128, 192))
    m = crop_mask(mask, cam)
    assert m.dtype == torch.bool and m.shape == (128, 192)
    corners = _affine(np.array([[150.0, 100.0], [199.0, 139.0]]), cam.image_to_crop())
    inside = np.round(corners.mean(0)).astype(int)
    assert bool(m[inside[1], inside[0]])
    area = (corners[1, 0] - corners[0, 0] + cam.scale) * (corners[1, 1] - corners[0, 1]
                                                           + cam.scale)
    assert int(m.sum()) == pytest.approx(area, rel=0.1)
    soft = crop_mask(mask, cam, "bilinear")
    assert soft.dtype == torch.float32 and float(soft.max()) == 1.0


def test_feature_map_camera_matches_stride8_cells() -> None:
    rec = _rec()
    _, cam = crop_object(np.zeros((H, W, 3), np.uint8), rec, "gt-normalized", (256, 672))
    r_cv, t_cv = rec.extrinsics()
    px_crop, _ = project_opencv(CAD, r_cv, t_cv, cam.k)
    px_feat, _ = project_opencv(CAD, r_cv, t_cv, feature_intrinsics(cam.k, 8))
    np.testing.assert_allclose(px_feat, (px_crop - 3.5) / 8, atol=1e-9)
    np.testing.assert_allclose(px_feat[0], [(672 / 8 - 1) / 2, (256 / 8 - 1) / 2], atol=1e-9)


def test_sizes_and_errors() -> None:
    assert default_crop_size("car") == (256, 672) == DEFAULT_CROP_SIZES["car"]
    assert default_crop_size("teapot") == (512, 512)
    assert default_crop_size("car", {"car": (64, 64)}) == (64, 64)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in DEFAULT_CROP_SIZES.values())
    img = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="multiple of the stride"):
        crop_object(img, _rec(), "gt-normalized", (100, 100))
    with pytest.raises(ValueError, match="protocol"):
        crop_object(img, _rec(), "tight", (64, 64))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        crop_object(np.zeros((H, W)), _rec(), "bbox", (64, 64))
    with pytest.raises(ValueError):
        warp_to_crop(torch.zeros(H, W), crop_camera(_rec(), "bbox", (64, 64)))


@pytest.mark.parametrize("image_hw", [(1, 40), (30, 1), (1, 1)])
def test_a_one_pixel_side_is_not_smeared_over_the_crop(image_hw: tuple[int, int]) -> None:
    """grid_sample read a 1-pixel-high image's row at every crop row (and a 1-pixel-wide one's
    column at every crop column): the crop showed a band where the image is one pixel."""
    from nvsm.pose.convention import intrinsics

    h, w = image_hw
    scale, offset = 4.0, np.array([10.0, 12.0])
    cam = CropCamera(k=np.asarray(intrinsics(3000.0, 32.0, 32.0)), scale=scale, offset=offset,
                     size=(64, 96), protocol="bbox")
    crop = warp_to_crop(torch.ones(3, h, w), cam, antialias=False)[0]
    # The image's pixel centres land at offset + scale·index; bilinear reading gives weight 0
    # one image pixel (``scale`` crop pixels) beyond them (float32 leaves ~6e-8 there).
    ys, xs = torch.nonzero(crop > 1e-6, as_tuple=True)
    assert float(ys.min()) > offset[1] - scale and float(ys.max()) < offset[1] + scale * h
    assert float(xs.min()) > offset[0] - scale and float(xs.max()) < offset[0] + scale * w
    assert float(crop[int(offset[1]), int(offset[0])]) == 1.0  # the first pixel centre itself
