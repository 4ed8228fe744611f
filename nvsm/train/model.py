"""The NeMo model: one shared backbone, and per category a cuboid mesh with its feature bank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvsm.config import RunConfig, config_from_dict, config_to_dict
from nvsm.mesh import Mesh
from nvsm.models import (
    CheckpointError,
    FeatureBackbone,
    build_backbone,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from nvsm.train.bank import BankSet

if TYPE_CHECKING:  # nvsm.infer imports this module
    from nvsm.infer.solve import TemplateBank


class NeMoModel(nn.Module):
    """Backbone (swappable: any ``FeatureBackbone``) + meshes + banks, saved as one checkpoint.

    Args:
        backbone: images (B, 3, H, W) → unit features (B, D, H/8, W/8).
        meshes: category → cuboid mesh.
        config: the resolved run configuration (stored in the checkpoint).
    """

    def __init__(
        self, backbone: FeatureBackbone, meshes: dict[str, Mesh], config: RunConfig
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.meshes = dict(meshes)
        self.config = config
        #: Inference templates rendered from the banks (``nvsm.infer.evaluate``); not saved.
        self.template_cache: dict[tuple[object, ...], tuple[torch.Tensor, int, TemplateBank]] = {}
        t = config.train
        self.banks = BankSet(
            {cat: mesh.num_vertices for cat, mesh in self.meshes.items()},
            config.model.feature_dim,
            clutter_size=t.clutter_size,
            momentum=t.bank_momentum,
            seed=config.seed,
        )

    @property
    def categories(self) -> list[str]:
        return sorted(self.meshes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit feature maps of ImageNet-normalised images."""
        return self.backbone(images)

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Atomic checkpoint with backbone, banks, meshes and the resolved config."""
        tensors: dict[str, Any] = {
            "backbone": self.backbone.state_dict(),
            "banks": {cat: bank.state_dict() for cat, bank in self.banks.items()},
            "meshes": {
                cat: {"vertices": m.vertices, "faces": m.faces} for cat, m in self.meshes.items()
            },
        }
        meta = {"config": config_to_dict(self.config), **(extra or {})}
        return save_checkpoint(path, tensors, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> tuple[NeMoModel, dict[str, Any]]:
        """Load a checkpoint written by ``save`` (``weights_only`` loading); returns the model
        and the checkpoint's metadata."""
        ckpt = load_checkpoint(
            path, required=("backbone", "banks", "meshes"), map_location=map_location
        )
        # The file is nvsm's own format but may hold anything: every part that does not fit
        # the model is reported naming the file and the entry, not as torch's error from inside.
        if not isinstance(ckpt.metadata, dict) or not isinstance(ckpt.metadata.get("config"), dict):
            raise CheckpointError(f"{path}: metadata lacks the run's config (a 'config' mapping)")
        config = config_from_dict(ckpt.metadata["config"], f"{path}: metadata.config")
        meshes = {}
        if not isinstance(ckpt.tensors["meshes"], dict):
            raise CheckpointError(f"{path}: entry 'meshes' must map categories to meshes, is a "
                                  "tensor")
        for cat, m in ckpt.tensors["meshes"].items():
            if not isinstance(m, dict) or set(m) != {"vertices", "faces"}:
                got = sorted(m) if isinstance(m, dict) else "a tensor"
                raise CheckpointError(f"{path}: entry 'meshes.{cat}' must hold 'vertices' and "
                                      f"'faces', has {got}")
            try:
                meshes[cat] = Mesh(m["vertices"], m["faces"])
            except ValueError as exc:
                raise CheckpointError(f"{path}: entry 'meshes.{cat}': {exc}") from exc
        banks = ckpt.tensors["banks"]
        if not meshes or not isinstance(banks, dict) or set(banks) != set(meshes):
            got = sorted(banks) if isinstance(banks, dict) else "a tensor"
            raise CheckpointError(f"{path}: entry 'banks' must hold a bank for each of the "
                                  f"meshes' categories {sorted(meshes)} (not none), has {got}")
        try:
            backbone = configured_backbone(config, pretrained=False)
        except ValueError as exc:
            raise CheckpointError(f"{path}: metadata.config.model: {exc}") from exc
        model = cls(backbone, meshes, config)
        load_module_state(model.backbone, ckpt, "backbone")
        for cat in banks:
            load_module_state(model.banks[cat], ckpt, f"banks.{cat}")
        return model, ckpt.metadata


def configured_backbone(config: RunConfig, pretrained: bool = True) -> FeatureBackbone:
    """The backbone ``config.model`` names, in the memory layout it asks for
    (``model.channels_last``), with ImageNet weights (``model.backbone_weights`` or the
    packaged ones) when ``pretrained``."""
    m = config.model
    weights = Path(m.backbone_weights) if pretrained and m.backbone_weights else None
    backbone = build_backbone(m.backbone, m.feature_dim, weights=weights, pretrained=pretrained)
    return backbone.set_memory_format(m.channels_last)


def build_model(config: RunConfig, meshes: dict[str, Mesh]) -> NeMoModel:
    """Fresh model for a config: its backbone (pretrained where available) and new banks."""
    return NeMoModel(configured_backbone(config), meshes, config)
