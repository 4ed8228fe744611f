"""Few-shot NVSM: neural view synthesis, matching and pseudo-labels (the E-step's pure core).

* ``synthesis``: anchor vertex features → feature maps of shifted views (with explicit holes).
* ``matching``: the size-normalised (optionally clutter-aware) NVSM score; brute-force torch and
  FAISS matchers behind the ``Matcher`` protocol; self-match exclusion.
* ``pseudo_labels``: best pose, distant-pose margin, front/back flip score, acceptance rules.
"""

from nvsm.fewshot.matching import (
    Exclude,
    FaissMatcher,
    FaissViewIndex,
    Matcher,
    PreparedViews,
    TorchMatcher,
    encode_targets,
    encode_views,
    exclusion_mask,
    faiss_available,
    nvsm_similarity,
    nvsm_similarity_pairs,
    prepare_views,
)
from nvsm.fewshot.pseudo_labels import (
    AcceptanceRule,
    AcceptanceSchedule,
    BestMatch,
    PseudoLabel,
    apply_acceptance,
    best_pose_and_margin,
    flip_score,
    make_pseudo_labels,
)
from nvsm.fewshot.synthesis import (
    SynthesizedViews,
    canonical_pose,
    expanding_shift_grid,
    iter_synthesized_views,
    sample_anchor_vertex_features,
    shift_grid,
    shifted_poses,
    synthesize_views,
)

__all__ = [
    "AcceptanceRule",
    "AcceptanceSchedule",
    "BestMatch",
    "Exclude",
    "FaissMatcher",
    "FaissViewIndex",
    "Matcher",
    "PreparedViews",
    "PseudoLabel",
    "SynthesizedViews",
    "TorchMatcher",
    "apply_acceptance",
    "best_pose_and_margin",
    "canonical_pose",
    "encode_targets",
    "encode_views",
    "exclusion_mask",
    "expanding_shift_grid",
    "faiss_available",
    "flip_score",
    "iter_synthesized_views",
    "make_pseudo_labels",
    "nvsm_similarity",
    "nvsm_similarity_pairs",
    "prepare_views",
    "sample_anchor_vertex_features",
    "shift_grid",
    "shifted_poses",
    "synthesize_views",
]
