"""Orchestration shared by the CLI commands: resolve the dataset, build meshes and crop sets,
train, evaluate. Each function is a thin composition of the library's pure parts."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nvsm.config import (
    RunConfig,
    check_config,
    check_resumed_config,
    config_differences,
    config_to_dict,
    override_config,
)
from nvsm.data.cad import load_cad_models
from nvsm.data.datasets import load_dataset
from nvsm.data.errors import id_sample
from nvsm.data.kitti import KITTI_N_FOLDS, KITTI_TEST_FOLD
from nvsm.data.occluded import OCCLUDED_SUBFOLDER
from nvsm.data.record import ObjectRecord
from nvsm.data.splits import FEW_SHOT_LADDER, LABELS_SETTING, Strategy, few_shot_splits
from nvsm.mesh import Mesh, single_cuboid
from nvsm.render import Rasterizer, get_rasterizer
from nvsm.train import distributed as ddp
from nvsm.train.cropset import CropSet, build_cropset
from nvsm.train.model import NeMoModel

#: Where the built-in synthetic dataset is generated when no root is given.
DATA_HOME_ENV = "NVSM_DATA"


def data_home() -> Path:
    """``$NVSM_DATA`` or ``~/.cache/nvsm``."""
    return Path(os.environ.get(DATA_HOME_ENV, "~/.cache/nvsm")).expanduser()


#: Settings a checkpoint's network and meshes were built with: evaluating or inferring with
#: another value would record it beside results that did not use it.
CHECKPOINT_FIXED_KEYS = frozenset(
    {"model.backbone", "model.backbone_weights", "model.feature_dim", "model.n_vertices"}
)


def checkpoint_config(model: NeMoModel, overrides: Sequence[str], checkpoint: Path) -> RunConfig:
    """The config of ``model`` (loaded from ``checkpoint``) with ``-s`` overrides, for
    evaluating or inferring with it. Refuses (``ValueError``, naming the key) a change of what
    the checkpoint fixes and a category it has no mesh for (a KeyError from deep inside)."""
    # The checkpoint's own config was checked when it was loaded: what fails is an override.
    config = override_config(model.config, overrides, "overrides")
    saved = config_to_dict(model.config)
    changed = sorted(set(config_differences(saved, config_to_dict(config))) & CHECKPOINT_FIXED_KEYS)
    if changed:
        section, key = changed[0].split(".")
        raise ValueError(
            f"{changed[0]}: {checkpoint} was trained with {saved[section][key]!r}; it cannot be "
            "changed for evaluation or inference (train a model with it instead)"
        )
    missing = [c for c in config.data.categories if c not in model.meshes]
    if missing:
        raise ValueError(
            f"data.categories: {checkpoint} has no mesh for {', '.join(missing)} (it has "
            f"{', '.join(model.categories)})"
        )
    return config


#: Config keys ``nvsm train --resume`` may change: more steps, another device or name.
TRAIN_RESUMABLE_KEYS = frozenset(
    {"train.steps", "train.checkpoint_every", "device", "name", "description"}
)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` when this
    machine has it. Raises ``ValueError`` naming ``device`` otherwise (before any work, rather
    than torch's error from inside the first copy to the device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: expected {expected}, got {name!r}") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) < count:
            return device
        raise ValueError(f"device: {name!r} is not available here ({count} CUDA device(s) "
                         "visible); use device=auto or device=cpu")
    if device.type == "mps":
        if torch.backends.mps.is_available():
            return device
        raise ValueError(f"device: {name!r} is not available here; use device=auto or device=cpu")
    raise ValueError(f"device: expected {expected}, got {name!r}")


def check_run_config(config: RunConfig) -> torch.device:
    """Fail, before any work, on a config that cannot run here, naming the key: a value outside
    its type, choices or bounds (``check_config``; a config built in code has not been through
    ``load_config``), a backbone that nobody registered, a device this machine lacks or a
    rasteriser it cannot import. Returns the resolved device."""
    from nvsm.models import available_backbones

    check_config(config, "config")
    backbones = available_backbones()
    if config.model.backbone not in backbones:
        raise ValueError(f"model.backbone: expected one of {' | '.join(backbones)}, got "
                         f"{config.model.backbone!r}")
    device = resolve_device(config.device)
    try:
        get_rasterizer(config.model.rasterizer, device)
    except ImportError as exc:
        raise ValueError(f"model.rasterizer: {exc}") from exc
    return device


def check_backbone_weights(config: RunConfig) -> None:
    """Fail, before any work, when ``model.backbone_weights`` names no file: a fresh model
    reads it (``build_model``), which found it missing only after the built-in dataset had been
    generated and cropped. Not part of ``check_run_config``: evaluating or resuming from a
    checkpoint does not read it (the backbone is in the checkpoint), and a checkpoint's config
    keeps the training machine's path."""
    path = config.model.backbone_weights
    if path is not None and not Path(path).is_file():
        raise ValueError(f"model.backbone_weights: no file {path} (expected a local ImageNet "
                         "state dict for the backbone, torchvision format)")


def ensure_synthetic(size: str, seed: int = 0) -> Path:
    """Root of the built-in synthetic dataset of this size, generated on first use.

    ``generate_synthetic_dataset`` moves the dataset into place only when complete, so an
    interrupted generation leaves none behind (a later call starts again; a stale
    ``.<name>.partial-*`` folder of a killed process may be deleted).
    """
    from nvsm.data.synth import MANIFEST_NAME, generate_synthetic_dataset

    root = data_home() / f"synthetic-{size}-seed{seed}"
    if (root / MANIFEST_NAME).is_file():
        return root
    if root.exists():
        raise FileExistsError(
            f"{root} exists but holds no {MANIFEST_NAME} (not a complete nvsm synthetic "
            "dataset); remove it or set $NVSM_DATA to another folder"
        )
    try:
        generate_synthetic_dataset(root, size=size, seed=seed, workers=2)
    except FileExistsError:
        if not (root / MANIFEST_NAME).is_file():  # not a concurrent run that finished first
            raise
    return root


def dataset_root(config: RunConfig) -> Path:
    """The configured dataset root; for ``synthetic`` without a root, the built-in set."""
    if config.data.root is not None:
        return Path(config.data.root)
    if config.data.dataset != "synthetic":
        raise ValueError(f"dataset {config.data.dataset!r} needs data.root (-s data.root=PATH; "
                         "nvsm fewshot: --root PATH)")
    try:
        return ensure_synthetic(config.data.synth_size, seed=0)
    except FileExistsError as exc:  # a bad folder, reported as bad input by every command
        raise ValueError(str(exc)) from exc


def cad_root(config: RunConfig, root: Path) -> Path:
    """Where the CAD models for the cuboids are: ``data.cad_root`` or else the dataset ``root``
    (KITTI has no CAD models: point ``data.cad_root`` at a PASCAL3D+ release)."""
    if config.data.cad_root:
        return Path(config.data.cad_root)
    if config.data.dataset == "kitti":
        raise ValueError(
            "KITTI has no CAD models for the cuboids: set -s data.cad_root=PATH to a PASCAL3D+ "
            "release (the folder holding CAD/)"
        )
    return root


def occluded_root(config: RunConfig, root: Path) -> Path:
    """Where the Occluded PASCAL3D+ levels of a PASCAL3D+-layout set are: ``data.occluded_root``
    or else ``<root>/OccludedPASCAL3D`` (the built-in synthetic set keeps them there; the
    published release is a separate download, usually elsewhere)."""
    if config.data.occluded_root:
        return Path(config.data.occluded_root)
    return root / OCCLUDED_SUBFOLDER


def category_meshes(root: Path, categories: list[str], n_vertices: int) -> dict[str, Mesh]:
    """One cuboid per category from its CAD models (99 % coverage of the pooled vertices)."""
    return {
        cat: single_cuboid([m.vertices for m in load_cad_models(root, cat)], 0.99, n_vertices)
        for cat in categories
    }


@dataclass
class DatasetSplits:
    """Train records, and test records per occlusion level (0 = unoccluded)."""

    root: Path
    train: list[ObjectRecord]
    test: dict[int, list[ObjectRecord]]


def load_splits(config: RunConfig, occlusion_levels: tuple[int, ...] = (0,)) -> DatasetSplits:
    """Train and test records of the configured dataset (``train_test_records``).

    PASCAL3D+-layout sets: level 0 is the val list, levels 1–3 come from the Occluded PASCAL3D+
    release at ``occluded_root``. KITTI: the test fold, its levels being KITTI's own occlusion
    flags 0–2."""
    from nvsm.data.datasets import split_list_file, train_test_records

    root = dataset_root(config)
    name, cats = config.data.dataset, config.data.categories
    train_read, test_read = train_test_records(name, root, cats)
    train = train_read.records
    # Empty sides fail here, naming where the records come from, before any training: an empty
    # test level failed after it, as "CropSet.concat needs at least one set".
    if name == "kitti":
        bad = [lv for lv in occlusion_levels if lv > 2]
        if bad:
            raise ValueError(f"occlusion levels {bad}: KITTI's are 0-2 (its occlusion flags)")
        fold = (f"test fold {KITTI_TEST_FOLD} (frames with number mod {KITTI_N_FOLDS} == "
                f"{KITTI_TEST_FOLD})")
        sources = {lv: f"KITTI {fold}, level {lv}" for lv in occlusion_levels}
        train_source = f"{root} (KITTI label_2, the frames outside {fold})"
    else:
        listed = [str(split_list_file(name, root, c, "val")) for c in cats]
        sources = {0: f"the test list(s) {', '.join(listed)}"}
        train_source = ", ".join(str(split_list_file(name, root, c, "train")) for c in cats)
    if not train:
        raise ValueError(f"no training records of {', '.join(cats)} in {train_source}")
    test: dict[int, list[ObjectRecord]] = {}
    if name == "kitti":
        for lv in occlusion_levels:
            test[lv] = [r for r in test_read.records if r.occlusion_level == lv]
        _require_test_records(test, sources)
        return DatasetSplits(root, train, test)
    if 0 in occlusion_levels:
        test[0] = test_read.records
    occluded = tuple(lv for lv in occlusion_levels if lv > 0)
    if occluded:
        occ_root = occluded_root(config, root)
        if not occ_root.is_dir():
            raise ValueError(
                f"occlusion levels {list(occluded)} need the Occluded PASCAL3D+ release (images/, "
                f"annotations/, lists/), but {occ_root} is not a folder: set "
                "-s data.occluded_root=PATH, or leave the occluded levels out (nvsm fewshot: "
                "-s fewshot.occlusion_levels=[0]; nvsm evaluate: no -l 1, 2 or 3)"
            )
        recs = load_dataset(
            "occluded_pascal3d", occ_root, categories=cats, pascal3d_root=root, levels=occluded
        ).records
        for lv in occluded:
            test[lv] = [r for r in recs if r.occlusion_level == lv]
            sources[lv] = f"{occ_root}/lists (level {lv})"
        trained = {(r.category, r.image_id) for r in train}
        shared = sorted({(r.category, r.image_id) for r in recs} & trained)
        if shared:  # the occluded levels would score images the model was trained on
            raise ValueError(f"{occ_root}/lists: {len(shared)} occluded test image(s) are also "
                             f"training images ({train_source}): "
                             f"{id_sample([i for _, i in shared])}")
    _require_test_records(test, sources)
    return DatasetSplits(root, train, test)


def _require_test_records(test: dict[int, list[ObjectRecord]], sources: dict[int, str]) -> None:
    empty = [lv for lv, recs in sorted(test.items()) if not recs]
    if empty:
        raise ValueError("no test records at occlusion level(s) "
                         f"{empty}: " + "; ".join(sources[lv] for lv in empty))


def labelled_subset(
    records: list[ObjectRecord], n: int, strategy: Strategy, seed: int
) -> list[ObjectRecord]:
    """The ``n`` labelled records per category of the deterministic split: the lists ``nvsm
    data split`` writes by default, nested through the sizes of ``FEW_SHOT_LADDER`` below
    ``n`` (so the 20 hold the 7 and the 50 the 20; each size drew on its own before)."""
    sizes = [m for m in FEW_SHOT_LADDER if m < n] + [n]
    splits = few_shot_splits(records, (), sizes, strategy, seed, setting=LABELS_SETTING)
    ids = {uid for (_, size), split in splits.items() if size == n for uid in split.labelled}
    return [r for r in records if r.uid in ids]


def cropsets(config: RunConfig, records: list[ObjectRecord], description: str) -> CropSet:
    """Crops of records of possibly several categories (one crop size per category), held on
    disk (``build_cropset(on_disk=True)``): a dataset's crops, the unlabelled pool's above all,
    need not fit in memory. Under torchrun every process crops, rank 0 with progress bars."""
    size = config.data.crop_hw()
    parts = []
    for cat in sorted({r.category for r in records}):
        recs = [r for r in records if r.category == cat]
        parts.append(
            build_cropset(
                recs,
                config.data.crop_protocol,
                config.data.crop_scale,
                size,
                f"{description} ({cat})",
                show_progress=ddp.is_main_process(),
                on_disk=True,
            )
        )
    return CropSet.concat(parts)


def training_records(config: RunConfig, splits: DatasetSplits) -> list[ObjectRecord]:
    """The labelled training records: all, or ``labels.annotations`` per category."""
    n = config.labels.annotations
    if n is None:
        return splits.train
    return labelled_subset(splits.train, n, config.labels.anchors, config.seed)


def evaluate_crops(
    model: NeMoModel,
    config: RunConfig,
    data: CropSet,
    device: torch.device,
    rasterizer: Rasterizer | None = None,
    show_progress: bool = True,
    description: str = "inference",
) -> dict[str, object]:
    """Predict and score ``data`` with the config's inference schedule (``infer.schedule``);
    the result names the crop protocol, the schedule and the dataset."""
    from nvsm.infer.evaluate import predict, resolve_schedule, score

    preds = predict(
        model,
        data,
        resolve_schedule(config.infer.schedule),
        config.infer.batch_size,
        device,
        rasterizer or get_rasterizer(config.model.rasterizer, device),
        show_progress=show_progress,
        description=description,
    )
    return {
        "protocol": config.data.crop_protocol,
        "schedule": config.infer.schedule,
        "dataset": config.data.dataset,
        **score(data, preds),
    }


def evaluate_model(
    model: NeMoModel,
    config: RunConfig,
    test: dict[int, list[ObjectRecord]],
    device: torch.device,
) -> dict[str, object]:
    """Crop every test level, then ``evaluate_crops``."""
    data = CropSet.concat(
        [cropsets(config, recs, f"cropping L{lv}") for lv, recs in sorted(test.items())]
    )
    return evaluate_crops(model, config, data, device)


def train_and_evaluate(
    config: RunConfig, run_dir: Path, resume: bool = False, evaluate: bool = True
) -> dict[str, object] | None:
    """``nvsm train``: build meshes and crops, train, checkpoint to RUN/model.pt, evaluate.

    Under ``torchrun`` (see ``nvsm.train.distributed`` for the command) every process trains
    on its own batches with DDP; only rank 0 writes files (run_info, checkpoints, summary,
    metrics) and evaluates, and the other ranks return None.
    """
    from nvsm.io import check_run_folder

    check_run_config(config)
    if not (resume and (Path(run_dir) / "model.pt").is_file()):  # a fresh model, built below
        check_backbone_weights(config)
    check_resumed_config(run_dir, check_run_folder(run_dir, resume, "train"),
                         config_to_dict(config), TRAIN_RESUMABLE_KEYS)
    with ddp.process_group(config.device) as info:
        return _train_and_evaluate(config, run_dir, resume, evaluate, info)


def _train_and_evaluate(
    config: RunConfig, run_dir: Path, resume: bool, evaluate: bool, info: ddp.DistInfo
) -> dict[str, object] | None:
    """``train_and_evaluate``'s body on this process (``info``), inside the process group."""
    from nvsm.io import atomic_write_json, write_run_info
    from nvsm.train.model import build_model
    from nvsm.train.trainer import NeMoTrainer

    torch.manual_seed(config.seed)
    device = info.device
    run_dir = ddp.broadcast_object(Path(run_dir))  # e.g. a timestamped default: rank 0's
    levels = (0,) if evaluate else ()
    # Rank 0 reads the splits first (it may generate the built-in synthetic dataset), then the
    # others. Its failure is sent to them, so that every rank stops with the same one-line
    # error; they waited in a barrier and died there with gloo's traceback when rank 0 exited.
    splits = ddp.main_first(lambda: load_splits(config, levels))
    labelled = training_records(config, splits)
    ckpt = run_dir / "model.pt"
    done_steps = 0
    if resume and ckpt.is_file():
        model, meta = NeMoModel.load(ckpt)
        diff = config_differences(
            config_to_dict(model.config), config_to_dict(config), TRAIN_RESUMABLE_KEYS
        )
        if diff:  # resuming went on with the checkpoint's model, recording this config
            raise ValueError(f"cannot resume {run_dir}: {ckpt} was trained with another config, "
                             f"which differs from this run's in {diff}")
        done_steps = int(meta.get("step", 0))
        if done_steps > config.train.steps:  # it went on with no step and recorded the fewer
            raise ValueError(f"cannot resume {run_dir}: {ckpt} holds step {done_steps}, beyond "
                             f"train.steps = {config.train.steps}; ask for at least "
                             f"{done_steps}")
        model.config = config  # what the checkpoint saved from here on records (steps, device)
    else:
        model = build_model(
            config,
            category_meshes(
                cad_root(config, splits.root), config.data.categories, config.model.n_vertices
            ),
        )
    data = cropsets(config, labelled, "cropping train")
    # The run folder once the dataset, the CAD models and the training images have been read: a
    # run that cannot start (an unreadable image included) leaves none behind.
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, config_to_dict(config), config.seed, "train")
    # The trainer broadcasts rank 0's backbone and banks; the step count follows rank 0.
    done_steps = ddp.broadcast_object(done_steps)
    trainer = NeMoTrainer(
        model,
        config.train,
        device,
        get_rasterizer(config.model.rasterizer, device),
        seed=config.seed,
    )
    trainer.step = done_steps
    why_inexact = trainer.restore_training_state(ckpt) if done_steps else None
    if why_inexact is not None and info.is_main:
        print(f"note: resuming at step {done_steps} with a fresh optimiser and fresh random "
              f"streams, so the result will differ from an uninterrupted run's: {why_inexact}",
              file=sys.stderr)
    summary = trainer.fit(data, steps=config.train.steps - done_steps, checkpoint_path=ckpt)
    ddp.barrier()  # the final checkpoint is written
    if not info.is_main:
        return None
    summary["labelled_images"] = len(data)
    # "steps" counts this command's steps: after --resume, the run's total is another number.
    summary["resumed_at_step"] = done_steps
    summary["resumed_exactly"] = bool(done_steps) and why_inexact is None
    summary["total_steps"] = trainer.step
    atomic_write_json(run_dir / "train_summary.json", summary)
    if not evaluate:
        return None
    metrics = evaluate_model(model, config, splits.test, device)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def evaluate_checkpoint(
    checkpoint: Path,
    levels: tuple[int, ...],
    overrides: list[str],
    out: Path | None,
    unseen_azimuth: bool = False,
) -> dict[str, object]:
    """``nvsm evaluate``: a checkpoint on its dataset's test split at the given levels, with
    the inference schedule of its config (``overrides`` may change it: ``infer.schedule=...``).

    With ``unseen_azimuth`` only the test records strictly inside the unseen azimuth bins
    (``nvsm.data.splits.unseen_azimuth_split``: 45° bins ``TFFTTFFT``, T = seen) are scored,
    and the metrics say ``"subset": "unseen-azimuth"`` (else ``"all"``). They are written to
    OUT/metrics.json, which must not exist yet, with ``out``; without it nothing is written.
    """
    from nvsm.io import atomic_write_json, check_output_folder, run_record
    from nvsm.train.model import NeMoModel

    if out is not None:
        check_output_folder(out)
        # A run's folder (train, a few-shot stage) keeps its own metrics.json: replacing it lost
        # the run's result, and the few-shot loop reads it as the stage's.
        if (Path(out) / "metrics.json").exists():
            raise ValueError(f"{Path(out) / 'metrics.json'} exists already: choose another "
                             "folder (--out) or delete it")
    model, _ = NeMoModel.load(checkpoint)
    config = checkpoint_config(model, overrides, checkpoint)
    device = check_run_config(config)
    model = model.to(device)
    splits = load_splits(config, levels)
    test, subset = splits.test, "all"
    if unseen_azimuth:
        from nvsm.data.splits import UNSEEN_AZIMUTH_PATTERN, unseen_azimuth_split

        test = {lv: list(unseen_azimuth_split(recs).unseen) for lv, recs in test.items()}
        empty = [lv for lv, recs in test.items() if not recs]
        if empty:
            raise ValueError(
                f"no test records in the unseen azimuth bins ({UNSEEN_AZIMUTH_PATTERN}) at "
                f"occlusion level(s) {empty}"
            )
        subset = "unseen-azimuth"
    metrics = {"subset": subset, **evaluate_model(model, config, test, device)}
    if out is not None:
        # The record goes inside metrics.json: --out may be a train run's folder (one evaluated
        # with --no-evaluate), whose run_info.json is the training's.
        record = {"checkpoint": str(checkpoint), **run_record(config_to_dict(config), config.seed)}
        atomic_write_json(Path(out) / "metrics.json", {**metrics, "run": record})
    return metrics
