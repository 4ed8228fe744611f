"""Few-shot NVSM: neural view synthesis, matching and pseudo-labels (the E-step's pure core).

* ``synthesis``: anchor vertex features → feature maps of shifted views (with explicit holes).
* ``matching``: the size-normalised (optionally clutter-aware) NVSM score; brute-force torch and
  FAISS matchers behind the ``Matcher`` protocol; self-match exclusion; CSLS hubness correction.
* ``pseudo_labels``: best pose, distant-pose margin, front/back flip score, acceptance rules.
* ``estep``: an EM round's E-step (features, matching per category, flip margins, acceptance,
  refinement) and self-training's.
* ``loop``: the EM loop (round 0 NeMo, E-steps, M-steps, round folders, resume).
"""

from nvsm.fewshot.estep import e_step, flip_margins
from nvsm.fewshot.loop import (
    FewShotData,
    FewShotResult,
    acceptance_schedule,
    prepare_fewshot_data,
    run_fewshot,
)
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
    top_scores,
    view_hubness,
)
from nvsm.fewshot.pseudo_labels import (
    AcceptanceRule,
    AcceptanceSchedule,
    BestMatch,
    PseudoLabel,
    apply_acceptance,
    best_pose_and_margin,
    make_pseudo_labels,
    pseudo_label_diagnostics,
)
from nvsm.fewshot.synthesis import (
    SynthesizedViews,
    canonical_pose,
    expanding_shift_grid,
    iter_synthesized_views,
    sample_anchor_vertex_features,
    shift_grid,
    shifted_poses,
    synthesize_images,
    synthesize_views,
)

__all__ = [
    "AcceptanceRule",
    "AcceptanceSchedule",
    "BestMatch",
    "Exclude",
    "FaissMatcher",
    "FaissViewIndex",
    "FewShotData",
    "FewShotResult",
    "Matcher",
    "PreparedViews",
    "PseudoLabel",
    "SynthesizedViews",
    "TorchMatcher",
    "acceptance_schedule",
    "apply_acceptance",
    "best_pose_and_margin",
    "canonical_pose",
    "e_step",
    "encode_targets",
    "encode_views",
    "exclusion_mask",
    "expanding_shift_grid",
    "faiss_available",
    "flip_margins",
    "iter_synthesized_views",
    "make_pseudo_labels",
    "nvsm_similarity",
    "nvsm_similarity_pairs",
    "prepare_fewshot_data",
    "prepare_views",
    "pseudo_label_diagnostics",
    "run_fewshot",
    "sample_anchor_vertex_features",
    "shift_grid",
    "shifted_poses",
    "synthesize_images",
    "synthesize_views",
    "top_scores",
    "view_hubness",
]
