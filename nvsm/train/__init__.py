"""Training pieces: feature banks with a clutter queue and the NeMo contrastive objective."""

from nvsm.train.bank import BankSet, FeatureBank, enqueue, momentum_update, random_unit
from nvsm.train.loss import (
    background_regulariser,
    contrastive_loss,
    near_vertex_mask_2d,
    near_vertex_mask_3d,
    sample_clutter_features,
    sample_vertex_features,
)

__all__ = [
    "BankSet",
    "FeatureBank",
    "background_regulariser",
    "contrastive_loss",
    "enqueue",
    "momentum_update",
    "near_vertex_mask_2d",
    "near_vertex_mask_3d",
    "random_unit",
    "sample_clutter_features",
    "sample_vertex_features",
]
