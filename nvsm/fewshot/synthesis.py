"""Neural view synthesis (NVSM E-step, part 1): anchor features → feature maps of novel views.

For each labelled (or accepted pseudo-labelled) *anchor* image with pose (a, e, θ, d):

1. ``sample_anchor_vertex_features``: project the cuboid vertices with the anchor's pose and
   feature camera, keep the vertices whose face normal looks at the camera
   (``nvsm.mesh.facing_visibility``) and whose nearest feature cell lies inside the map, and
   sample the feature map there bilinearly (``nvsm.train.loss.sample_vertex_features``). No CAD
   silhouette is used (the reference's silhouette filter needs the ground-truth CAD model).
2. ``synthesize_views``: give the mesh these vertex features (zero for vertices the anchor did not
   see) and render it at shifted poses (a + Δa, e + Δe, θ + Δθ, d). Pixels owned by a face with
   any unseen vertex are holes; they are reported explicitly by ``SynthesizedViews.mask`` (True
   only where the owning face's three vertices were all seen by the anchor), so matching can
   ignore them instead of scoring partially-zero features.

Shift grids (``shift_grid``, ``expanding_shift_grid``) are in radians, (S, 3) = (Δa, Δe, Δθ).
Synthesised view b = n·S + s comes from anchor n and shift s (anchor-major order).

``synthesize_images`` is the same idea one level down, for the M-step: it re-renders a crop's
*pixels* at a shifted pose by texturing the cuboid with the crop itself (each pixel of the new
view looks up the cuboid point it shows in the source crop), so a labelled or pseudo-labelled
image also trains the model at poses next to its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from nvsm.data.crops import gaussian_blur
from nvsm.mesh import Mesh, facing_visibility
from nvsm.pose.convention import (
    camera_centre,
    opencv_extrinsics,
    project_opencv,
    wrap_angle,
    wrap_azimuth,
)
from nvsm.render import Rasterizer, default_rasterizer, render_pose
from nvsm.train.cropset import reads_outside
from nvsm.train.loss import SampleMode, sample_vertex_features
from nvsm.train.trainer import project_mesh_vertices

__all__ = [
    "SynthesizedViews",
    "canonical_pose",
    "expanding_shift_grid",
    "iter_synthesized_views",
    "sample_anchor_vertex_features",
    "shift_grid",
    "shifted_poses",
    "synthesize_images",
    "synthesize_views",
]


def _k_batch(k_feat: torch.Tensor | np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """Intrinsics as an (n, 3, 3) float64 tensor from (3, 3) or (n, 3, 3)."""
    k = torch.as_tensor(np.asarray(k_feat) if not isinstance(k_feat, torch.Tensor) else k_feat)
    k = k.to(device=device, dtype=torch.float64)
    if k.shape == (3, 3):
        return k.expand(n, 3, 3)
    if k.shape != (n, 3, 3):
        raise ValueError(f"k_feat must be (3, 3) or ({n}, 3, 3), got {tuple(k.shape)}")
    return k


def sample_anchor_vertex_features(
    feature_maps: torch.Tensor,
    poses: torch.Tensor,
    k_feat: torch.Tensor | np.ndarray,
    mesh: Mesh,
    mode: SampleMode = "bilinear",
    renormalize: bool = True,
    occluded: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the anchors' feature maps at their visible projected cuboid vertices.

    A vertex is visible in an anchor when its face normal looks at the camera (exact for a
    convex cuboid), its nearest feature cell lies inside the map and (optionally) that cell is
    not ``occluded``; the same rule as the trainer's positive vertices.

    Args:
        feature_maps: (N, D, h, w) anchor feature maps (unit-norm per cell for a NeMo head).
        poses: (N, 4) anchor poses (azimuth, elevation, θ, distance), radians.
        k_feat: (N, 3, 3) or (3, 3) feature-map intrinsics (``feature_intrinsics`` of the crop
            camera).
        mesh: the category's cuboid, V vertices.
        mode, renormalize: passed to ``nvsm.train.loss.sample_vertex_features`` (bilinear and
            L2-renormalised by default).
        occluded: optional (N, h, w) bool; vertices falling on occluded cells are not visible.
    Returns:
        feats (N, V, D) in the maps' dtype, zero rows for invisible vertices, and
        visible (N, V) bool.
    """
    if feature_maps.ndim != 4:
        raise ValueError(f"feature_maps must be (N, D, h, w), got {tuple(feature_maps.shape)}")
    n, _d, h, w = feature_maps.shape
    if poses.shape != (n, 4):
        raise ValueError(f"poses must be ({n}, 4), got {tuple(poses.shape)}")
    device = feature_maps.device
    p = poses.to(device=device, dtype=torch.float64)
    k = _k_batch(k_feat, n, device)
    mesh_d = mesh.to(device)
    vpx = project_mesh_vertices(mesh_d.vertices, p, k).to(device)  # (N, V, 2)
    centres = camera_centre(p[:, 0], p[:, 1], p[:, 3])
    visible = facing_visibility(mesh_d, centres)
    ix = torch.floor(vpx[..., 0] + 0.5).long()
    iy = torch.floor(vpx[..., 1] + 0.5).long()
    visible = visible & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    if occluded is not None:
        if occluded.shape != (n, h, w):
            raise ValueError(f"occluded must be ({n}, {h}, {w}), got {tuple(occluded.shape)}")
        rows = torch.arange(n, device=device)[:, None]
        under = occluded.to(device)[rows, iy.clamp(0, h - 1), ix.clamp(0, w - 1)]
        visible = visible & ~under
    feats = sample_vertex_features(feature_maps, vpx, visible, mode=mode, renormalize=renormalize)
    return feats, visible


def shift_grid(
    azimuth_deg: Sequence[float],
    elevation_deg: Sequence[float] = (0.0,),
    theta_deg: Sequence[float] = (0.0,),
) -> torch.Tensor:
    """Cartesian grid of pose shifts.

    Args:
        azimuth_deg, elevation_deg, theta_deg: shift values in DEGREES.
    Returns:
        (S, 3) float64 (Δa, Δe, Δθ) in RADIANS, S = |az|·|el|·|θ|, azimuth-major order
        (azimuth varies slowest).
    """
    axes = [
        torch.tensor([float(x) for x in values], dtype=torch.float64).deg2rad()
        for values in (azimuth_deg, elevation_deg, theta_deg)
    ]
    if any(a.numel() == 0 for a in axes):
        raise ValueError("shift_grid needs at least one value per axis")
    return torch.cartesian_prod(*axes).reshape(-1, 3)


def expanding_shift_grid(
    round_index: int,
    step_deg: float = 10.0,
    base_range_deg: float = 30.0,
    growth_deg: float = 30.0,
    elevation_deg: Sequence[float] = (-10.0, 0.0, 10.0),
    theta_deg: Sequence[float] = (0.0,),
) -> torch.Tensor:
    """The shift grid of EM round ``round_index`` (0-based): widening azimuth range.

    Round r shifts the azimuth by multiples of ``step_deg`` within ±R, R = min(base_range_deg +
    r·growth_deg, 180); shifts that coincide modulo 360° (±180°) are kept once. The defaults
    are the proposed design of the reference notes (§7.6): ±30° in 10° steps, Δe ∈ {−10, 0, 10}°,
    Δθ = 0, widened by 30° per round.

    Returns:
        (S, 3) float64 radians, see ``shift_grid``.
    """
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if step_deg <= 0:
        raise ValueError(f"step_deg must be > 0, got {step_deg}")
    reach = min(base_range_deg + round_index * growth_deg, 180.0)
    if reach < 0:
        raise ValueError(f"the azimuth range is negative in round {round_index}: {reach}")
    m = math.floor(reach / step_deg + 1e-9)
    azimuths: list[float] = []
    seen: set[float] = set()
    for i in range(-m, m + 1):
        value = i * step_deg
        key = round(((value + 180.0) % 360.0) - 180.0, 9)
        if key not in seen:
            seen.add(key)
            azimuths.append(value)
    return shift_grid(azimuths, elevation_deg, theta_deg)


def canonical_pose(
    azimuth: torch.Tensor, elevation: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same rotation with elevation in [−π/2, π/2], azimuth in [0, 2π), θ in (−π, π].

    An elevation pushed past a pole by a shift is folded back: (a, e, θ) and
    (a + π, ±π − e, θ + π) are the same rotation R_eval and the same camera centre.
    """
    e = wrap_angle(elevation)
    over = e.abs() > math.pi / 2
    e = torch.where(over, torch.sign(e) * math.pi - e, e)
    a = torch.where(over, azimuth + math.pi, azimuth)
    t = torch.where(over, theta + math.pi, theta)
    return wrap_azimuth(a), e, wrap_angle(t)


def shifted_poses(
    anchor_poses: torch.Tensor, shifts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All anchor × shift poses, anchor-major.

    Args:
        anchor_poses: (N, 4) (a, e, θ, d), radians; shifts: (S, 3) (Δa, Δe, Δθ), radians.
    Returns:
        poses (N·S, 4) float64 = anchor pose + shift, canonicalised by ``canonical_pose``
        (azimuth wrapped to [0, 2π)); source (N·S,) int64 anchor index; shift (N·S, 3) float64.
    """
    if anchor_poses.ndim != 2 or anchor_poses.shape[1] != 4:
        raise ValueError(f"anchor_poses must be (N, 4), got {tuple(anchor_poses.shape)}")
    if shifts.ndim != 2 or shifts.shape[1] != 3:
        raise ValueError(f"shifts must be (S, 3), got {tuple(shifts.shape)}")
    n, s = anchor_poses.shape[0], shifts.shape[0]
    device = anchor_poses.device
    p = anchor_poses.to(torch.float64)
    sh = shifts.to(device=device, dtype=torch.float64)
    source = torch.arange(n, device=device).repeat_interleave(s)
    shift = sh.repeat(n, 1)
    raw = p[source, :3] + shift
    a, e, t = canonical_pose(raw[:, 0], raw[:, 1], raw[:, 2])
    poses = torch.stack([a, e, t, p[source, 3]], dim=1)
    return poses, source, shift


@dataclass(frozen=True)
class SynthesizedViews:
    """Feature maps of novel views synthesised from anchors.

    Attributes:
        features: (B, D, h, w) rendered vertex features (barycentric mixes, NOT renormalised;
            zero on the background; partially zero next to holes).
        mask: (B, h, w) bool, pixels owned by a face whose three vertices were all seen by the
            anchor (the pixels matching may use).
        silhouette: (B, h, w) bool, pixels owned by any face (the cuboid's silhouette).
        poses: (B, 4) (a, e, θ, d) radians, exactly the poses rendered: float32, or float64
            for float64 features.
        source: (B,) int64 anchor index of each view.
        shift: (B, 3) float64 (Δa, Δe, Δθ) radians applied to the anchor pose.
    """

    features: torch.Tensor
    mask: torch.Tensor
    silhouette: torch.Tensor
    poses: torch.Tensor
    source: torch.Tensor
    shift: torch.Tensor

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @staticmethod
    def concat(parts: Sequence[SynthesizedViews]) -> SynthesizedViews:
        """Concatenate along the view axis (at least one part)."""
        if not parts:
            raise ValueError("SynthesizedViews.concat needs at least one part")
        return SynthesizedViews(
            features=torch.cat([p.features for p in parts]),
            mask=torch.cat([p.mask for p in parts]),
            silhouette=torch.cat([p.silhouette for p in parts]),
            poses=torch.cat([p.poses for p in parts]),
            source=torch.cat([p.source for p in parts]),
            shift=torch.cat([p.shift for p in parts]),
        )


def iter_synthesized_views(
    anchor_feats: torch.Tensor,
    anchor_visible: torch.Tensor,
    anchor_poses: torch.Tensor,
    shifts: torch.Tensor,
    mesh: Mesh,
    k_feat: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    rasterizer: Rasterizer | None = None,
    chunk: int = 256,
    out_dtype: torch.dtype | None = None,
) -> Iterator[SynthesizedViews]:
    """``synthesize_views`` in consecutive chunks of at most ``chunk`` views (memory bounded:
    a consumer such as a matcher index can take each chunk and drop it). Same arguments."""
    if anchor_feats.ndim != 3:
        raise ValueError(f"anchor_feats must be (N, V, D), got {tuple(anchor_feats.shape)}")
    n, v, _d = anchor_feats.shape
    if anchor_visible.shape != (n, v):
        raise ValueError(f"anchor_visible must be ({n}, {v}), got {tuple(anchor_visible.shape)}")
    if v != mesh.num_vertices:
        raise ValueError(f"anchor_feats has V = {v} but the mesh has {mesh.num_vertices}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = anchor_feats.device
    mesh_d = mesh.to(device)
    faces = mesh_d.faces
    # Cameras and poses in float32 at least: float16 features had their poses rounded by up to
    # 0.05° (bfloat16: 0.4°), and the rounded poses became the pseudo-labels.
    geometry = torch.promote_types(anchor_feats.dtype, torch.float32)
    k_all = _k_batch(k_feat, n, device).to(geometry)
    if rasterizer is None:
        rasterizer = default_rasterizer(device)
    poses, source, shift = shifted_poses(anchor_poses.to(device), shifts)
    poses = poses.to(geometry)
    seen_all = anchor_visible.to(device=device, dtype=torch.bool)
    masked = anchor_feats * seen_all[..., None].to(anchor_feats.dtype)
    for start in range(0, poses.shape[0], chunk):
        stop = min(start + chunk, poses.shape[0])
        src = source[start:stop]
        p = poses[start:stop]
        out = render_pose(
            mesh_d,
            masked[src],
            p[:, 0],
            p[:, 1],
            p[:, 2],
            p[:, 3],
            k_all[src],
            image_size,
            rasterizer,
        )
        face_ok = seen_all[src][:, faces].all(dim=-1)  # (stop - start, F)
        ptf = out.pix_to_face.flatten(1)
        ok = face_ok.gather(1, ptf.clamp(min=0)) & (ptf >= 0)
        feats = out.features if out_dtype is None else out.features.to(out_dtype)
        yield SynthesizedViews(
            features=feats,
            mask=ok.reshape(out.mask.shape),
            silhouette=out.mask,
            poses=p,
            source=src,
            shift=shift[start:stop],
        )


def synthesize_views(
    anchor_feats: torch.Tensor,
    anchor_visible: torch.Tensor,
    anchor_poses: torch.Tensor,
    shifts: torch.Tensor,
    mesh: Mesh,
    k_feat: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    rasterizer: Rasterizer | None = None,
    chunk: int = 256,
    out_dtype: torch.dtype | None = None,
) -> SynthesizedViews:
    """Render every anchor's vertex features at every shifted pose (batched, chunked).

    Vertices the anchor did not see get zero features; the returned ``mask`` marks the pixels
    whose owning face has all three vertices seen, so holes are explicit. Gradients are kept if
    the inputs require them (wrap the call in ``torch.no_grad()`` for the E-step).

    Args:
        anchor_feats: (N, V, D) vertex features of each anchor (``sample_anchor_vertex_features``).
        anchor_visible: (N, V) bool, which vertices each anchor saw.
        anchor_poses: (N, 4) (a, e, θ, d) radians.
        shifts: (S, 3) (Δa, Δe, Δθ) radians (``shift_grid``, ``expanding_shift_grid``).
        mesh: the cuboid (V vertices).
        k_feat: (3, 3) intrinsics of the rendered maps, or (N, 3, 3) one per anchor.
        image_size: (h, w) of the rendered maps.
        rasterizer: backend (``default_rasterizer`` of the features' device when None).
        chunk: views rendered per batch (bounds the rasteriser's memory).
        out_dtype: optional storage dtype of the features (e.g. float16 for large banks).
    Returns:
        ``SynthesizedViews`` with B = N·S views, view b = n·S + s.
    """
    return SynthesizedViews.concat(
        list(
            iter_synthesized_views(
                anchor_feats,
                anchor_visible,
                anchor_poses,
                shifts,
                mesh,
                k_feat,
                image_size,
                rasterizer,
                chunk,
                out_dtype,
            )
        )
    )


def synthesize_images(
    images: torch.Tensor,
    k: torch.Tensor,
    poses: torch.Tensor,
    image_box: torch.Tensor,
    shifts: torch.Tensor,
    mesh: Mesh,
    rasterizer: Rasterizer | None = None,
    fill_sigma: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each crop re-rendered at its pose + a shift, with the cuboid textured by the crop.

    A pixel of the new view shows a cuboid point X (rasterised at the shifted pose); it takes the
    crop's colour at X's projection under the crop's own pose (bilinear), provided the crop saw
    X: the cuboid is convex, so it did iff X's face looks at the crop's camera
    (``facing_visibility``), and X projects onto the image, not onto the crop's zero padding
    (``image_box``). Every other pixel — background, faces the crop did not see, points on the
    padding — takes the crop blurred with a Gaussian of ``fill_sigma`` px: clutter-coloured,
    without the source object's edges, so that it reads as background to the contrastive loss.
    The object is only as right as the cuboid: parts off its faces (a car's cabin above the
    bonnet) slide more the larger the shift.

    Args:
        images: (N, 3, H, W) uint8 crops.
        k: (N, 3, 3) their intrinsics (OpenCV, crop pixels).
        poses: (N, 4) (a, e, θ, d) radians, the pose each crop shows (label or pseudo-label).
        image_box: (N, 4) where each crop's original image lies (``CropSet.image_box``).
        shifts: (N, 3) (Δa, Δe, Δθ) radians, one per crop.
        mesh: the category's cuboid.
        rasterizer: backend (``default_rasterizer`` when None).
        fill_sigma: blur of the fill, in pixels.
    Returns:
        images (N, 3, H, W) uint8 at the shifted poses; poses (N, 4) float64, the shifted poses
        (``canonical_pose``, the same distance); seen (N, H, W) bool, the pixels textured from
        the crop.
    """
    n, _, h, w = images.shape
    if (
        k.shape != (n, 3, 3)
        or poses.shape != (n, 4)
        or image_box.shape != (n, 4)
        or shifts.shape != (n, 3)
    ):
        raise ValueError(
            "synthesize_images: expected k (N, 3, 3), poses (N, 4), image_box (N, 4), shifts "
            f"(N, 3) for N = {n}, got {tuple(k.shape)}, {tuple(poses.shape)}, "
            f"{tuple(image_box.shape)}, {tuple(shifts.shape)}"
        )
    src = poses.to(torch.float64)
    kk = k.to(torch.float64)
    raw = src[:, :3] + shifts.to(torch.float64)
    a, e, t = canonical_pose(raw[:, 0], raw[:, 1], raw[:, 2])
    dst = torch.stack([a, e, t, src[:, 3]], dim=1)
    cuboid = Mesh(mesh.vertices.to(torch.float64), mesh.faces)
    textured = facing_visibility(cuboid, camera_centre(src[:, 0], src[:, 1], src[:, 3]))
    vertex_data = torch.cat(
        [cuboid.vertices.expand(n, -1, -1), textured[..., None].double()], dim=-1
    )
    out = render_pose(
        cuboid, vertex_data, dst[:, 0], dst[:, 1], dst[:, 2], dst[:, 3], kk, (h, w), rasterizer
    )
    points = out.features[:, :3].permute(0, 2, 3, 1).reshape(n, h * w, 3)
    # A face's vertices all lie on one box face (unwelded cuboid), so the interpolated flag is
    # exactly 1 on faces the crop saw and 0 elsewhere; > 0.5 only guards round-off.
    seen = out.mask & (out.features[:, 3] > 0.5)
    r_cv, t_cv = opencv_extrinsics(src[:, 0], src[:, 1], src[:, 2], src[:, 3])
    pix, depth = project_opencv(points, r_cv, t_cv, kk)
    on_image = ~reads_outside(pix.reshape(n, h, w, 2).cpu(), image_box.cpu(), (h, w))
    seen = seen & on_image.to(seen.device) & (depth > 0).reshape(n, h, w)
    # Pixel centres sit at integer coordinates: −1 and +1 are the first and last centres.
    grid = kornia.geometry.conversions.normalize_pixel_coordinates(pix, h, w)
    source = images.float()
    looked_up = F.grid_sample(
        source, grid.reshape(n, h, w, 2).float(), mode="bilinear", padding_mode="border",
        align_corners=True,
    )  # fmt: skip
    fill = gaussian_blur(source, fill_sigma)
    synthesized = torch.where(seen[:, None], looked_up, fill).round().clamp(0, 255)
    return synthesized.to(torch.uint8), dst, seen
