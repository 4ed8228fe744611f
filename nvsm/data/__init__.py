"""Datasets: one record type for every source, readers of the published formats, crops with exact
cameras, manifests and verification, deterministic few-shot splits.

Readers: ``load_pascal3d``, ``load_occluded_pascal3d``, ``load_kitti``, ``load_objectnet3d`` (or
``load_dataset(name, root)``) return a ``ReadResult`` (records, skipped objects with reasons,
collected errors). Bad files raise ``DataFormatError`` naming the file and the field.
"""

from nvsm.data.cad import CadModel, load_cad_models
from nvsm.data.categories import (
    OBJECTNET3D_CATEGORIES,
    PASCAL3D_CATEGORIES,
    is_known_category,
    known_categories,
    register_categories,
)
from nvsm.data.crops import (
    DEFAULT_CROP_SIZES,
    crop_camera,
    crop_mask,
    crop_object,
    default_crop_size,
    warp_to_crop,
)
from nvsm.data.datasets import DATASET_NAMES, load_dataset, train_test_records
from nvsm.data.errors import DataFormatError
from nvsm.data.images import load_image, load_mask, load_masks
from nvsm.data.kitti import KittiConfig, kitti_pose, load_kitti
from nvsm.data.matlab import ReadResult, SkippedObject
from nvsm.data.objectnet3d import load_objectnet3d
from nvsm.data.occluded import load_occluded_pascal3d
from nvsm.data.pascal3d import load_pascal3d, read_pascal3d_annotation
from nvsm.data.record import ObjectRecord
from nvsm.data.splits import (
    AzimuthCoverage,
    FewShotSplit,
    UnseenAzimuthSplit,
    azimuth_coverage,
    few_shot_splits,
    read_split_list,
    select_labelled,
    unseen_azimuth_split,
    write_few_shot_split,
)
from nvsm.data.verify import Problem, load_manifest, verify_dataset

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_CROP_SIZES",
    "OBJECTNET3D_CATEGORIES",
    "PASCAL3D_CATEGORIES",
    "AzimuthCoverage",
    "CadModel",
    "DataFormatError",
    "FewShotSplit",
    "KittiConfig",
    "ObjectRecord",
    "Problem",
    "ReadResult",
    "SkippedObject",
    "UnseenAzimuthSplit",
    "azimuth_coverage",
    "crop_camera",
    "crop_mask",
    "crop_object",
    "default_crop_size",
    "few_shot_splits",
    "is_known_category",
    "kitti_pose",
    "known_categories",
    "load_cad_models",
    "load_dataset",
    "load_image",
    "load_kitti",
    "load_manifest",
    "load_mask",
    "load_masks",
    "load_objectnet3d",
    "load_occluded_pascal3d",
    "load_pascal3d",
    "read_pascal3d_annotation",
    "read_split_list",
    "register_categories",
    "select_labelled",
    "train_test_records",
    "unseen_azimuth_split",
    "verify_dataset",
    "warp_to_crop",
    "write_few_shot_split",
]
