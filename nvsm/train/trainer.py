"""NeMo training loop: contrastive backbone + feature-bank training on posed crops.

One step, per category present in the batch (shared backbone, one mesh and bank each):
project the cuboid at the (augmented) pose into the feature map, sample features at the
visible vertices (face-normal visibility, exact for a cuboid; vertices off the map or under a
synthetic occluder count as invisible), draw clutter from cells outside the rendered cuboid
silhouette, and minimise the CoKe contrastive loss + background regulariser. The banks are
updated after the optimiser step from the detached features.

Distributed data parallel (``torch.distributed`` initialised, see ``nvsm.train.distributed``):

* the backbone is wrapped in ``DistributedDataParallel``: its parameters and buffers are
  broadcast from rank 0 when the trainer is built and the gradients are averaged over the
  ranks, i.e. the step follows the mean of the per-rank losses (each rank's contrastive loss
  is itself a mean over its own visible vertices);
* the banks are broadcast from rank 0 when the trainer is built, and every rank updates them
  with the all-gathered (rank-ordered) features of all ranks, so they stay identical;
* ``config.batch_size`` is per rank. The batch indices come from one index stream shared by
  all ranks (same seed), rank r taking the r-th slice of each draw, so the ranks see disjoint
  crops whenever the set holds ``world_size × batch_size`` crops (``sample_batch``; smaller
  few-shot sets are covered by back-to-back shuffles). Augmentation and clutter draws use
  rank-offset seeds (``rank_seed``), so they differ between ranks too;
* only rank 0 writes the model checkpoint; every rank writes its own training state.

Checkpoints are resumable exactly: beside ``model.pt`` each rank keeps its training state
(``training_state_path``: AdamW's moments, the clutter, batch and augmentation random streams,
torch's global one (dropout, colour jitter) and the CUDA one, the loss scaler), so a run
stopped after a checkpoint and resumed with the same config ends with the tensors an
uninterrupted run ends with (``restore_training_state``).

A single-process run (no process group) draws exactly the same random numbers as before.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nvsm.config import TrainConfig, check_config
from nvsm.mesh import facing_visibility
from nvsm.models import normalize_images
from nvsm.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from nvsm.models.common import STRIDE
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import camera_centre, opencv_extrinsics, project_opencv
from nvsm.render import Rasterizer, default_rasterizer, project_vertices
from nvsm.train.cropset import BatchAugmenter, CropSet, hidden_cells
from nvsm.train.distributed import get_rank, get_world_size, is_initialized
from nvsm.train.loss import (
    background_regulariser,
    contrastive_loss,
    near_vertex_mask_2d,
    near_vertex_mask_3d,
    sample_clutter_features,
    sample_vertex_features,
)
from nvsm.train.model import NeMoModel


class TrainingDiverged(ValueError):
    """The training loss stopped being a finite number."""


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
    seen through feature intrinsics k_feat (B, 3, 3); computed in float64 on the vertices'
    device (the crop set's poses and cameras are on the CPU)."""
    p = poses.to(vertices.device, torch.float64)
    r_cv, t_cv = opencv_extrinsics(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
    k = k_feat.to(vertices.device, torch.float64)
    px, _ = project_opencv(vertices.double()[None], r_cv, t_cv, k)
    return px.float()


def _cuda_grad_scaler() -> Any:
    """A CUDA loss scaler (``torch.amp.GradScaler`` from torch 2.3 on, ``torch.cuda.amp``'s
    before)."""
    scaler = getattr(torch.amp, "GradScaler", None)
    return scaler("cuda") if scaler is not None else torch.cuda.amp.GradScaler()


#: Seed offset between ranks for augmentation and clutter draws (rank 0 keeps the base seed).
RANK_SEED_STRIDE = 1_000_003


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation / clutter streams (``seed`` itself on rank 0)."""
    return seed + RANK_SEED_STRIDE * rank


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (in rank order) the rows of ``x`` from every rank; ``x`` itself without a
    process group.

    The ranks may hold different numbers of rows (dim 0, possibly 0) but must agree on the
    trailing shape and the dtype. Bool tensors travel as uint8 (gloo has no bool all-gather).
    """
    if not is_initialized():
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    is_bool = x.dtype == torch.bool
    payload = x.to(torch.uint8) if is_bool else x
    padded = payload.new_zeros((max(sizes), *payload.shape[1:]))
    padded[: x.shape[0]] = payload
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
    return out.bool() if is_bool else out


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
        check_config(config, "train")  # a config built in code: a bad value fails here, named
        self.model = model.to(device)
        self.config = config
        self.device = torch.device(device)
        self.rasterizer = rasterizer or default_rasterizer(self.device)
        self.rank = get_rank()
        self.world_size = get_world_size()
        own_seed = rank_seed(seed, self.rank)
        #: Clutter draws (rank-offset seed).
        self.generator = torch.Generator().manual_seed(own_seed)
        #: Batch indices: one stream shared by all ranks (the single-process run keeps drawing
        #: them from ``generator``, as it always did).
        self.batch_generator = (
            torch.Generator().manual_seed(seed) if self.world_size > 1 else self.generator
        )
        self.augment = BatchAugmenter(config.augment, seed=own_seed + 1)
        net: torch.nn.Module = self.model.backbone
        if is_initialized():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's parameters and buffers here.
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
            self._broadcast_banks()
        self.net = net
        self.optimizer = torch.optim.AdamW(
            self.model.backbone.param_groups(config.lr_backbone, config.lr_head),
            weight_decay=config.weight_decay,
        )
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        #: Mixed precision (float16 autocast) on CUDA only; its gradients need loss scaling, or
        #: the small ones flush to zero.
        self.use_amp = config.amp and self.device.type == "cuda"
        self.scaler: Any = _cuda_grad_scaler() if self.use_amp else None
        # 3D neighbours are fixed per mesh; 2D ones depend on the pose (computed per batch).
        self.near = {
            cat: near_vertex_mask_3d(mesh.vertices, config.near_radius).to(self.device)
            for cat, mesh in model.meshes.items()
        }
        self.step = 0

    def _broadcast_banks(self) -> None:
        """Copy rank 0's banks (prototypes, clutter queue, pointers) to every rank."""
        for cat in sorted(self.model.banks):
            for buf in self.model.banks[cat].buffers():
                dist.broadcast(buf, src=0)

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
        padding: torch.Tensor,
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
        # The cell indices are on the model's device; a CPU mask indexed by them fails on a GPU.
        rows = torch.arange(len(ix), device=self.device)[:, None]
        under = occluded.to(self.device)[rows, iy.clamp(0, h - 1), ix.clamp(0, w - 1)]
        visible = visible & inside & ~under
        feats = sample_vertex_features(fmap, vpx, visible, mode=cfg.sample_mode)
        # Clutter comes from outside the rendered cuboid silhouette (dilated by one cell) and
        # off the padding: zeros beyond the image are no scene's background.
        with torch.no_grad():
            r_cv, t_cv = opencv_extrinsics(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
            screen = project_vertices(mesh.vertices.double(), r_cv, t_cv, k_feat.double())
            sil = self.rasterizer.rasterize(screen.float(), mesh.faces, (h, w)) >= 0
            sil = F.max_pool2d(sil[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
        not_clutter = sil.to(self.device) | padding.to(self.device)
        clutter, valid = sample_clutter_features(
            fmap, not_clutter, cfg.clutter_per_image, self.generator
        )
        loss = contrastive_loss(
            feats,
            visible,
            bank.memory,
            bank.clutter_queue(),
            self.near[category]
            if cfg.near_mode == "3d"
            else near_vertex_mask_2d(vpx, cfg.near_radius_px),
            cfg.temperature,
            cfg.clutter_weight,
            weights,
        ) + background_regulariser(clutter, bank.memory, cfg.regulariser_weight, valid)
        return loss, {
            "feats": feats.detach(),
            "visible": visible,
            "clutter": clutter.detach(),
            "valid": valid,
            "weights": weights,
        }

    def batch_loss(
        self, data: CropSet, index: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        """This rank's loss on the crops ``index`` of ``data`` (augmented) and, per category in
        the batch, the detached bank-update tensors (``feats``, ``visible``, ``clutter``,
        ``valid``, ``weights``). The loss is the crop-count-weighted mean of the per-category
        losses."""
        images = data.images[index].float() / 255.0
        batch = self.augment(
            images, data.k[index].clone(), data.poses[index].clone(), data.image_box[index]
        )
        k_feat = torch.as_tensor(feature_intrinsics(batch.k.numpy(), STRIDE))
        occ_cells = hidden_cells(batch.hidden, STRIDE)
        pad_cells = hidden_cells(batch.padding, STRIDE)
        images = normalize_images(batch.images.to(self.device))
        with torch.autocast(self.device.type, enabled=self.use_amp):
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
                batch.poses[sel],
                k_feat[sel],
                occ_cells[sel],
                pad_cells[sel],
                weights[sel.to(self.device)],
            )
            total = total + loss * (int(sel.sum()) / len(cats))
            updates[cat] = upd
        return total, updates

    def update_banks(self, updates: dict[str, dict[str, torch.Tensor]]) -> float:
        """Update the banks from ``batch_loss``'s tensors, all-gathered over the ranks (every
        rank passes through every category in the same order, with zero rows for categories
        absent from its batch). Returns the mean number of visible vertices per crop, averaged
        over the categories present in some rank's batch."""
        cats = sorted(self.model.banks) if is_initialized() else sorted(updates)
        n_clutter = self.config.clutter_per_image
        vis_sum, present = 0.0, 0
        for cat in cats:
            bank = self.model.banks[cat]
            upd = updates.get(cat)
            if upd is None:  # distributed only: contribute no rows to the gather
                k, d = bank.num_vertices, bank.feature_dim
                upd = {
                    "feats": torch.zeros(0, k, d, device=self.device),
                    "visible": torch.zeros(0, k, dtype=torch.bool, device=self.device),
                    "clutter": torch.zeros(0, n_clutter, d, device=self.device),
                    "valid": torch.zeros(0, n_clutter, dtype=torch.bool, device=self.device),
                    "weights": torch.zeros(0, device=self.device),
                }
            g = {name: all_gather_rows(t) for name, t in upd.items()}
            if g["feats"].shape[0] == 0:
                continue
            bank.update(g["feats"], g["visible"], g["clutter"], g["valid"], g["weights"])
            vis_sum += float(g["visible"].float().sum(1).mean())
            present += 1
        return vis_sum / max(1, present)

    def train_step(self, data: CropSet, index: torch.Tensor) -> StepResult:
        """One optimisation step on the crops ``index`` of ``data`` (this rank's batch).

        Returns the loss averaged over the ranks and the mean visible-vertex count.
        """
        self.model.train()
        self._set_lr()
        total, updates = self.batch_loss(data, index)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        vis_mean = self.update_banks(updates)
        loss = total.detach().clone()
        if is_initialized():
            dist.all_reduce(loss)
            loss = loss / self.world_size
        self.step += 1
        return StepResult(loss=float(loss), visible_vertices=vis_mean)

    def sample_batch(self, n: int) -> torch.Tensor:
        """This rank's batch indices: a shuffled pass over the data, with replacement when the
        set is smaller than the batch (few-shot).

        With several ranks, one sequence of ``world_size × batch_size`` indices is drawn from
        a stream shared by all ranks (same seed) and rank r takes the r-th slice. The sequence
        is one shuffle of the set when ``n >= world_size × batch_size`` (disjoint batches that
        together are the batch one process with ``world_size × batch_size`` would draw), and
        back-to-back shuffles otherwise (every crop used before any is repeated).
        """
        bs = self.config.batch_size
        if self.world_size == 1:
            if n >= bs:
                return torch.randperm(n, generator=self.batch_generator)[:bs]
            return torch.randint(0, n, (bs,), generator=self.batch_generator)
        total = bs * self.world_size
        rounds = -(-total // n)
        draw = torch.cat([torch.randperm(n, generator=self.batch_generator) for _ in range(rounds)])
        return draw[self.rank * bs : (self.rank + 1) * bs]

    def fit(
        self,
        data: CropSet,
        steps: int | None = None,
        checkpoint_path: Path | None = None,
        description: str = "training",
        show_progress: bool = True,
    ) -> dict[str, float | None]:
        """Train for ``steps`` (default ``config.steps``) steps; returns ``steps`` (those of
        this call), ``world_size`` (the processes that shared them), ``seconds`` and
        ``final_loss`` (the mean loss of its last tenth of steps, steadier than the last
        step's, which the progress bar shows).

        When ``checkpoint_path`` is given the model is saved there at every multiple of
        ``config.checkpoint_every`` steps (counted from the first step of the run, a resumed
        one included) and at the end (with the step count), so an interrupted run can resume
        from it.

        Raises:
            TrainingDiverged: the loss is not finite; the checkpoint keeps the last finite
                step saved (a diverged model was written and the run reported success).
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
        show_progress = show_progress and self.rank == 0
        with Progress(*columns, disable=not show_progress) as progress:
            task = progress.add_task(description, total=steps, loss=float("nan"))
            saved_at = None
            for _ in range(steps):
                result = self.train_step(data, self.sample_batch(len(data)))
                # The loss is averaged over the ranks: every rank stops at the same step.
                if not math.isfinite(result.loss):
                    raise TrainingDiverged(
                        f"training diverged at step {self.step}: the loss is {result.loss} "
                        "(lower train.lr_backbone / train.lr_head, or raise train.temperature)"
                        + (f"; {checkpoint_path} keeps the last step saved before it"
                           if checkpoint_path is not None else "")
                    )
                losses.append(result.loss)
                progress.update(task, advance=1, loss=result.loss)
                # The run's own step count: after a resume, saves stay at the multiples.
                if checkpoint_path is not None and self.step % self.config.checkpoint_every == 0:
                    self.save(checkpoint_path)
                    saved_at = self.step
        if checkpoint_path is not None and saved_at != self.step:
            self.save(checkpoint_path)
        tail = losses[-max(1, len(losses) // 10) :]
        return {
            "steps": steps,
            "world_size": self.world_size,  # processes sharing each step (DDP)
            "seconds": time.perf_counter() - start,
            # None when no step ran: a resumed run whose checkpoint holds every step already.
            "final_loss": sum(tail) / len(tail) if tail else None,
        }

    def save(self, path: Path) -> None:
        """Checkpoint: every rank writes its training state (``training_state_path``), then
        rank 0 the model with the step count. Each file is written atomically; one stop between
        the writes leaves files of two steps, which ``restore_training_state`` tells apart."""
        path = Path(path)
        save_checkpoint(
            training_state_path(path, self.rank),
            self._training_state(),
            {"step": self.step, "world_size": self.world_size, "device": self.device.type,
             "scaler": None if self.scaler is None else self.scaler.state_dict()},
        )
        if self.rank == 0:
            self.model.save(path, {"step": self.step})

    def _random_streams(self) -> dict[str, torch.Generator]:
        # The batch stream is the clutter stream in a single process: restored twice, the same.
        return {"clutter": self.generator, "batches": self.batch_generator,
                "augment": self.augment.generator}

    def _random_states(self) -> dict[str, torch.Tensor]:
        random = {name: g.get_state() for name, g in self._random_streams().items()}
        random["torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            random["cuda"] = torch.cuda.get_rng_state(self.device)
        return random

    def _training_state(self) -> dict[str, Any]:
        moments = self.optimizer.state_dict()["state"]
        return {"optimizer": {str(i): dict(v) for i, v in moments.items()},
                "random": self._random_states()}

    def restore_training_state(self, checkpoint: Path) -> str | None:
        """Restore what ``save`` kept beside ``checkpoint`` besides the model, on every rank or
        on none (ranks with different optimiser states would drift apart). Call it after
        setting ``step`` to the checkpoint's.

        Returns:
            None when restored; otherwise why not (a missing, unreadable or mismatched file on
            this rank, or on another), and the optimiser and random streams start afresh.
        """
        path = training_state_path(Path(checkpoint), self.rank)
        state, why = self._load_training_state(path)
        usable = torch.tensor([0 if why else 1], device=self.device)
        if is_initialized():
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if state is None or not int(usable):
            return why or "another process's training state is unusable"
        opt = self.optimizer.state_dict()
        opt["state"] = {int(i): v for i, v in state.tensors["optimizer"].items()}
        self.optimizer.load_state_dict(opt)
        random = state.tensors["random"]
        for name, g in self._random_streams().items():
            g.set_state(random[name])
        torch.set_rng_state(random["torch"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(random["cuda"], self.device)
        if self.scaler is not None:
            self.scaler.load_state_dict(state.metadata["scaler"])
        return None

    def _load_training_state(self, path: Path) -> tuple[Checkpoint | None, str | None]:
        """The training state in ``path`` if this trainer can take it over exactly, else None
        and why not."""
        if not path.is_file():
            return None, f"{path} is missing (checkpoints of nvsm before 2026-12-07 have none)"
        try:
            state = load_checkpoint(path, required=("optimizer", "random"))
        except CheckpointError as exc:
            return None, str(exc)
        meta = state.metadata
        saved = {k: meta.get(k) for k in ("step", "world_size", "device")}
        if saved["step"] != self.step:
            return None, f"{path} is from step {saved['step']}, the model from step {self.step}"
        if saved["world_size"] != self.world_size:
            return None, (f"{path} was saved by {saved['world_size']} process(es), this run has "
                          f"{self.world_size}")
        if saved["device"] != self.device.type:
            return None, f"{path} was saved on {saved['device']}, this run is on {self.device.type}"
        random, moments_by_key = state.tensors["random"], state.tensors["optimizer"]
        if not isinstance(random, dict) or not isinstance(moments_by_key, dict):
            return None, f"{path}: entries 'random' and 'optimizer' must each hold named tensors"
        ours = self._random_states()
        unfit = sorted(name for name, t in ours.items() if not (
            isinstance(random.get(name), torch.Tensor) and random[name].dtype == t.dtype
            and random[name].shape == t.shape))
        if unfit:
            return None, f"{path}: entry 'random' lacks a generator state for {unfit}"
        params = [q for group in self.optimizer.param_groups for q in group["params"]]
        for key, moments in moments_by_key.items():
            index = int(key) if key.isdigit() else len(params)
            if index >= len(params) or not isinstance(moments, dict) or any(
                name != "step" and m.shape != params[index].shape for name, m in moments.items()
            ):
                return None, f"{path}: entry 'optimizer.{key}' fits no parameter of this model"
        return state, None


def training_state_path(checkpoint: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its training state for ``checkpoint``: beside it, e.g.
    ``model.train_state.rank0.pt``."""
    return checkpoint.with_name(f"{checkpoint.stem}.train_state.rank{rank}.pt")
