"""NeMo-style inference: templates, batched scoring, top-k and joint gradient refinement."""

from nvsm.infer.solve import (
    FAST_SCHEDULE,
    REFERENCE_SCHEDULE,
    SCHEDULES,
    InferenceSchedule,
    PosePrediction,
    TemplateBank,
    canonical_feature_camera,
    clutter_model,
    estimate_poses,
    flip_margin,
    pose_loss,
    refine_poses,
    render_templates,
    score_templates,
)

__all__ = [
    "FAST_SCHEDULE",
    "REFERENCE_SCHEDULE",
    "SCHEDULES",
    "InferenceSchedule",
    "PosePrediction",
    "TemplateBank",
    "canonical_feature_camera",
    "clutter_model",
    "estimate_poses",
    "flip_margin",
    "pose_loss",
    "refine_poses",
    "render_templates",
    "score_templates",
]
