"""NeMo training loop: contrastive backbone + feature-bank training on posed crops.

One step, per category present in the batch (shared backbone, one mesh and bank each):
project the cuboid at the (augmented) pose into the feature map, sample features at the
visible vertices (face-normal visibility, exact for a cuboid; vertices off the map or under a
synthetic occluder count as invisible), draw clutter from cells outside the rendered cuboid
silhouette, and minimise the CoKe contrastive loss + background regulariser. The banks are
updated after the optimiser step from the detached features; with ``torch.distributed``
initialised the backbone is wrapped in DDP and the bank updates are all-gathered, so every
rank keeps identical banks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nvsm.config import TrainConfig
from nvsm.mesh import facing_visibility
from nvsm.models import normalize_images
from nvsm.models.common import STRIDE
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import camera_centre, opencv_extrinsics, project_opencv
from nvsm.render import Rasterizer, default_rasterizer, project_vertices
from nvsm.train.cropset import BatchAugmenter, CropSet
from nvsm.train.loss import (
    background_regulariser,
    contrastive_loss,
    near_vertex_mask_3d,
    sample_clutter_features,
    sample_vertex_features,
)
from nvsm.train.model import NeMoModel


@dataclass(frozen=True)
class StepResult:
    loss: float
    visible_vertices: float


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 5 % of the base rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def project_mesh_vertices(
    vertices: torch.Tensor, poses: torch.Tensor, k_feat: torch.Tensor
) -> torch.Tensor:
    """Feature-map pixels (B, V, 2) of mesh vertices (V, 3) at poses (B, 4) = (a, e, θ, d)
    seen through feature intrinsics k_feat (B, 3, 3); computed in float64."""
    p = poses.to(torch.float64)
    r_cv, t_cv = opencv_extrinsics(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
    px, _ = project_opencv(vertices.double()[None], r_cv, t_cv, k_feat.double())
    return px.float()


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class NeMoTrainer:
    """Trains a ``NeMoModel`` on a ``CropSet`` (labels, or labels + weighted pseudo-labels).

    Args:
        model: the model (its banks are updated in place).
        config: training hyper-parameters.
        device: where to train.
        rasterizer: backend for the clutter-exclusion silhouettes (injected).
        seed: seeds batch sampling, augmentation and clutter draws.
    """

    def __init__(
        self,
        model: NeMoModel,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        rasterizer: Rasterizer | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model.to(device)
        self.config = config
        self.device = torch.device(device)
        self.rasterizer = rasterizer or default_rasterizer(self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = BatchAugmenter(config.augment, seed=seed + 1)
        net: torch.nn.Module = self.model.backbone
        if dist.is_available() and dist.is_initialized():
            net = torch.nn.parallel.DistributedDataParallel(net)
        self.net = net
        self.optimizer = torch.optim.AdamW(
            self.model.backbone.param_groups(config.lr_backbone, config.lr_head),
            weight_decay=config.weight_decay,
        )
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.near = {
            cat: near_vertex_mask_3d(mesh.vertices, config.near_radius).to(self.device)
            for cat, mesh in model.meshes.items()
        }
        self.step = 0

    def _set_lr(self) -> None:
        f = _lr_factor(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * f

    def _category_loss(
        self,
        category: str,
        fmap: torch.Tensor,
        poses: torch.Tensor,
        k_feat: torch.Tensor,
        occluded: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        mesh = self.model.meshes[category].to(self.device)
        bank = self.model.banks[category]
        _, _, h, w = fmap.shape
        p = poses.to(torch.float64)
        vpx = project_mesh_vertices(mesh.vertices, p, k_feat).to(self.device)
        centres = torch.as_tensor(camera_centre(p[:, 0], p[:, 1], p[:, 3])).float()
        visible = facing_visibility(mesh, centres.to(self.device))
        ix = torch.floor(vpx[..., 0] + 0.5).long()
        iy = torch.floor(vpx[..., 1] + 0.5).long()
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        under = occluded[torch.arange(len(ix))[:, None], iy.clamp(0, h - 1), ix.clamp(0, w - 1)]
        visible = visible & inside & ~under.to(self.device)
        feats = sample_vertex_features(fmap, vpx, visible, mode=cfg.sample_mode)  # type: ignore[arg-type]
        # Clutter comes from outside the rendered cuboid silhouette (dilated by one cell).
        with torch.no_grad():
            r_cv, t_cv = opencv_extrinsics(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
            screen = project_vertices(mesh.vertices.double(), r_cv, t_cv, k_feat.double())
            sil = self.rasterizer.rasterize(screen.float(), mesh.faces, (h, w)) >= 0
            sil = F.max_pool2d(sil[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
        clutter, valid = sample_clutter_features(
            fmap, sil.to(self.device), cfg.clutter_per_image, self.generator
        )
        loss = contrastive_loss(
            feats,
            visible,
            bank.memory,
            bank.clutter_queue(),
            self.near[category],
            cfg.temperature,
            cfg.clutter_weight,
            weights,
        ) + background_regulariser(clutter, bank.memory, cfg.regulariser_weight)
        return loss, {
            "feats": feats.detach(),
            "visible": visible,
            "clutter": clutter.detach(),
            "valid": valid,
            "weights": weights,
        }

    def train_step(self, data: CropSet, index: torch.Tensor) -> StepResult:
        """One optimisation step on the crops ``index`` of ``data``."""
        self.model.train()
        self._set_lr()
        images = data.images[index].float() / 255.0
        images, k, poses, occluded = self.augment(
            images, data.k[index].clone(), data.poses[index].clone()
        )
        k_feat = torch.as_tensor(feature_intrinsics(k.numpy(), STRIDE))
        occ_cells = F.max_pool2d(occluded[:, None].float(), STRIDE)[:, 0] > 0.5
        images = normalize_images(images.to(self.device))
        use_amp = self.config.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=use_amp):
            fmap = self.net(images)
        fmap = fmap.float()
        weights = data.weights[index].to(self.device)
        cats = [data.categories[i] for i in index.tolist()]
        total = fmap.new_zeros(())
        updates = {}
        for cat in sorted(set(cats)):
            sel = torch.tensor([c == cat for c in cats])
            loss, upd = self._category_loss(
                cat,
                fmap[sel.to(self.device)],
                poses[sel],
                k_feat[sel],
                occ_cells[sel],
                weights[sel.to(self.device)],
            )
            total = total + loss * (int(sel.sum()) / len(cats))
            updates[cat] = upd
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        vis_mean = 0.0
        for cat, upd in updates.items():
            bank = self.model.banks[cat]
            feats = _all_gather_cat(upd["feats"])
            visible = _all_gather_cat(upd["visible"])
            w = _all_gather_cat(upd["weights"])
            bank.update(
                feats, visible, _all_gather_cat(upd["clutter"]), _all_gather_cat(upd["valid"]), w
            )
            vis_mean += float(visible.float().sum(1).mean()) / len(updates)
        self.step += 1
        return StepResult(loss=float(total.detach()), visible_vertices=vis_mean)

    def sample_batch(self, n: int) -> torch.Tensor:
        """Indices of one batch: a shuffled pass over the data, with replacement when the set
        is smaller than the batch (few-shot)."""
        bs = self.config.batch_size
        if n >= bs:
            return torch.randperm(n, generator=self.generator)[:bs]
        return torch.randint(0, n, (bs,), generator=self.generator)

    def fit(
        self,
        data: CropSet,
        steps: int | None = None,
        checkpoint_path: Path | None = None,
        description: str = "training",
        show_progress: bool = True,
    ) -> dict[str, float]:
        """Train for ``steps`` (default ``config.steps``) steps; returns summary statistics.

        When ``checkpoint_path`` is given the model is saved there every
        ``config.checkpoint_every`` steps and at the end (with the step count), so an
        interrupted run can resume from it.
        """
        steps = self.config.steps if steps is None else steps
        start = time.perf_counter()
        losses: list[float] = []
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not show_progress) as progress:
            task = progress.add_task(description, total=steps, loss=float("nan"))
            for i in range(steps):
                result = self.train_step(data, self.sample_batch(len(data)))
                losses.append(result.loss)
                progress.update(task, advance=1, loss=result.loss)
                if checkpoint_path is not None and (i + 1) % self.config.checkpoint_every == 0:
                    self.save(checkpoint_path)
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        tail = losses[-max(1, len(losses) // 10) :]
        return {
            "steps": steps,
            "seconds": time.perf_counter() - start,
            "final_loss": sum(tail) / len(tail),
        }

    def save(self, path: Path) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        self.model.save(path, {"step": self.step})
