"""Pose conventions (PASCAL3D+), crop cameras and pose metrics. See ``convention`` first."""

from nvsm.pose.camera import (
    CropCamera,
    bbox_crop,
    feature_intrinsics,
    gt_normalized_crop,
)
from nvsm.pose.convention import (
    NORMALIZED_DISTANCE,
    PASCAL3D_VIEWPORT,
    camera_centre,
    intrinsics,
    mirror_pose,
    opencv_extrinsics,
    pose_from_opencv,
    pose_from_rotation,
    project_opencv,
    project_pascal3d,
    rotation_matrix,
    wrap_angle,
    wrap_azimuth,
)
from nvsm.pose.metrics import (
    PoseMetrics,
    pose_errors,
    rotation_error,
    summarize_errors,
    weighted_mean,
)

__all__ = [
    "NORMALIZED_DISTANCE",
    "PASCAL3D_VIEWPORT",
    "CropCamera",
    "PoseMetrics",
    "bbox_crop",
    "camera_centre",
    "feature_intrinsics",
    "gt_normalized_crop",
    "intrinsics",
    "mirror_pose",
    "opencv_extrinsics",
    "pose_errors",
    "pose_from_opencv",
    "pose_from_rotation",
    "project_opencv",
    "project_pascal3d",
    "rotation_error",
    "rotation_matrix",
    "summarize_errors",
    "weighted_mean",
    "wrap_angle",
    "wrap_azimuth",
]
