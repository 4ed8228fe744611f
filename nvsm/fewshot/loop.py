"""The NVSM EM loop: NeMo on the labelled anchors, then rounds of synthesis → matching →
refined pseudo-labels → retraining.

* Round 0 trains NeMo on the N labelled anchors only (``NeMoTrainer``); it is the ``nemo``
  baseline.
* EM round k ≥ 1, E-step (``nvsm.fewshot.estep``): the anchors (labels + the previous round's
  most confident accepted pseudo-labels) give vertex features at their (pseudo-)poses
  (``sample_anchor_vertex_features``); their views are synthesised on
  ``expanding_shift_grid(k − 1)`` and matched to every unlabelled image (the injected
  ``Matcher``, clutter-aware with the bank's clutter model, self-matches excluded by uid); the
  best pose, its distant-pose margin and its front/back flip score make a ``PseudoLabel``; the
  round's ``AcceptanceRule`` accepts some; each accepted match is refined against the current
  model (``nvsm.infer.solve.refine_poses``) so it does not inherit the anchor's θ and the
  grid's coarseness; the confidence (score / best accepted score, floored) is its weight.
* M-step: train on labels (weight 1) + accepted pseudo-labels (weight = confidence), either
  continuing from the current model or restarting from the labelled-only model.

The unlabelled images' ground-truth poses are removed from their ``CropSet`` before the loop
starts (replaced by NaN): they are read only by ``pseudo_label_diagnostics``.

Each round writes ``RUN/round_<k>/``: ``model.pt``, ``config.json``, (k ≥ 1)
``pseudo_labels.csv`` / ``pseudo_labels.jsonl``, and last ``metrics.json`` (the completion
marker). With ``resume=True`` complete rounds are loaded instead of recomputed. Every round
starts from its predecessor's checkpoint on disk and seeds its own generators, so a resumed
run equals an uninterrupted one.

Under ``torchrun`` (``nvsm.train.distributed``) every process runs the loop: each training stage
is one DDP training (the processes share the steps' batches), and what must happen once runs
on rank 0 alone, the others waiting for its result (``on_main``): the E-steps (their
pseudo-labels are sent to every rank), the evaluations and every file written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nvsm.config import (
    FewShotConfig,
    MatcherName,
    RunConfig,
    TrainConfig,
    check_choice,
    check_resumed_config,
    config_differences,
    config_to_dict,
)
from nvsm.data.splits import azimuth_coverage
from nvsm.fewshot.estep import (
    StageTimer,
    accept_and_weight,
    e_step,
    extract_features,
    self_training_labels,
)
from nvsm.fewshot.matching import FaissMatcher, Matcher, TorchMatcher
from nvsm.fewshot.pseudo_labels import (
    AcceptanceRule,
    AcceptanceSchedule,
    PseudoLabel,
    pseudo_label_diagnostics,
    pseudo_labels_csv,
    pseudo_labels_jsonl,
    read_pseudo_labels,
)
from nvsm.fewshot.synthesis import synthesize_images
from nvsm.io import (
    atomic_write_json,
    atomic_write_text,
    check_run_folder,
    read_json_object,
    write_run_info,
)
from nvsm.mesh import Mesh
from nvsm.models import load_checkpoint
from nvsm.render import Rasterizer, get_rasterizer
from nvsm.train import distributed as ddp
from nvsm.train.cropset import CropImages, CropSet
from nvsm.train.model import NeMoModel, build_model
from nvsm.train.trainer import NeMoTrainer

__all__ = [
    "ROWS",
    "FewShotData",
    "FewShotResult",
    "acceptance_schedule",
    "hide_poses",
    "make_matcher",
    "prepare_fewshot_data",
    "round_seed",
    "run_fewshot",
    "summary_levels",
    "train_steps",
]


#: Pose-summary keys reported per occlusion level in the top-level metrics.
SUMMARY_KEYS = ("acc_pi_6", "acc_pi_18", "median_error_deg", "n", "failures")

#: Seed offset between EM rounds (trainer, augmentation and clutter streams).
ROUND_SEED_STRIDE = 1000

#: The name of round k's folder, ``round_<k>`` with k written as ``f"round_{k}"`` writes it: a
#: stray ``round_01`` or ``round_١`` is not a second name for round 1 (which of the two was
#: read depended on the order the folder listed them in).
ROUND_FOLDER = re.compile(r"round_(0|[1-9][0-9]*)")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class FewShotData:
    """What the loop works on.

    Attributes:
        meshes: category → cuboid.
        labelled: the N labelled anchors per category (poses = labels, weights 1).
        unlabelled: the unlabelled pool. Its ``poses`` may hold the ground truth: the loop
            hides them (``hide_poses``) and uses them only for diagnostics.
        test: test crops of every configured occlusion level (ground truth for scoring).
    """

    meshes: dict[str, Mesh]
    labelled: CropSet
    unlabelled: CropSet
    test: CropSet


def prepare_fewshot_data(config: RunConfig) -> FewShotData:
    """Split the configured dataset: ``labels.annotations`` anchors per category (the
    deterministic ``labels.anchors`` split with ``config.seed``), the rest of the training
    records as the unlabelled pool (optionally the first ``fewshot.unlabelled_limit``), and the
    test split at ``fewshot.occlusion_levels``."""
    from nvsm.pipeline import (
        cad_root,
        category_meshes,
        cropsets,
        labelled_subset,
        load_splits,
    )

    n = config.labels.annotations
    if n is None:
        raise ValueError("the few-shot loop needs labels.annotations (e.g. 7)")
    fs = config.fewshot
    splits = load_splits(config, tuple(fs.occlusion_levels))
    labelled = labelled_subset(splits.train, n, config.labels.anchors, config.seed)
    ids = {r.uid for r in labelled}
    pool = [r for r in splits.train if r.uid not in ids]
    if fs.unlabelled_limit is not None:
        pool = pool[: fs.unlabelled_limit]
    if not pool:
        raise ValueError("no unlabelled training records left for the few-shot loop")
    # The cuboids first: a missing CAD folder fails before minutes of cropping.
    meshes = category_meshes(
        cad_root(config, splits.root), config.data.categories, config.model.n_vertices
    )
    test = CropSet.concat(
        [cropsets(config, recs, f"cropping test L{lv}") for lv, recs in sorted(splits.test.items())]
    )
    return FewShotData(
        meshes=meshes,
        labelled=cropsets(config, labelled, "cropping labelled"),
        unlabelled=cropsets(config, pool, "cropping unlabelled"),
        test=test,
    )


def hide_poses(data: CropSet) -> tuple[CropSet, torch.Tensor]:
    """The crops with NaN poses and zero weights, and the hidden (N, 4) poses."""
    hidden = data.poses.clone()
    return data.with_poses(torch.full_like(hidden, math.nan), torch.zeros(len(data))), hidden


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def make_matcher(fs: FewShotConfig) -> Matcher:
    """``fewshot.matcher``: ``torch`` (exact brute force) or ``faiss`` (the views in a
    ``fewshot.faiss_index`` index, flat or IVF with ``faiss_nlist``/``faiss_nprobe``, optionally
    PCA-compressed to ``faiss_pca_dim`` and on the GPU with ``faiss_gpu``; shortlists re-scored
    exactly)."""
    if check_choice(fs.matcher, MatcherName, "fewshot.matcher") == "torch":
        return TorchMatcher()
    return FaissMatcher(
        index_type=fs.faiss_index,
        nlist=fs.faiss_nlist,
        nprobe=fs.faiss_nprobe,
        pca_dim=fs.faiss_pca_dim,
        use_gpu=fs.faiss_gpu,
    )


def acceptance_schedule(fs: FewShotConfig) -> AcceptanceSchedule:
    """Rule of EM round k (index k − 1): the top fraction min(max, first + (k − 1)·step) of the
    pool by score, plus the optional fixed margin and flip thresholds. It does not depend on
    ``fs.rounds``, so extending a run with ``resume`` gives the rounds a longer run would."""
    first = AcceptanceRule(
        min_margin=fs.accept_min_margin,
        min_flip_margin=fs.accept_min_flip_margin,
        top_fraction=min(fs.accept_top_fraction_first, fs.accept_top_fraction_max),
        rank_with_flip=fs.accept_rank_with_flip,
        flip_rank_weight=fs.accept_flip_rank_weight,
        score_rank_weight=fs.accept_score_rank_weight,
        azimuth_bins=fs.accept_azimuth_bins,
    )
    rules = [first]
    while rules[-1].top_fraction is not None and rules[-1].top_fraction < (
        fs.accept_top_fraction_max
    ):
        if fs.accept_top_fraction_step <= 0:
            break
        frac = min(
            fs.accept_top_fraction_max,
            fs.accept_top_fraction_first + len(rules) * fs.accept_top_fraction_step,
        )
        rules.append(dataclasses.replace(first, top_fraction=frac))
    return AcceptanceSchedule(tuple(rules))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_labels(folder: Path, labels: Sequence[PseudoLabel]) -> None:
    atomic_write_text(folder / "pseudo_labels.csv", pseudo_labels_csv(labels))
    atomic_write_text(folder / "pseudo_labels.jsonl", pseudo_labels_jsonl(labels))


def check_stage_metrics(saved: dict[str, Any], path: Path, round_index: int | None) -> None:
    """Raise ``ValueError`` naming ``path`` and the field unless a stage's saved metrics hold
    what a resumed run reads of them: the pooled test metrics per level (``SUMMARY_KEYS``), a
    ``train`` mapping with an integer ``seed`` when it has one, and, for EM round
    ``round_index``, that round number."""
    pooled = saved.get("test", {}).get("pooled") if isinstance(saved.get("test"), dict) else None
    if not (isinstance(pooled, dict) and pooled and all(
            isinstance(m, dict) and set(SUMMARY_KEYS) <= set(m) for m in pooled.values())):
        raise ValueError(f"{path}: field 'test.pooled': expected the test metrics per occlusion "
                         f"level ({', '.join(SUMMARY_KEYS)} each)")
    train = saved.get("train", {})
    if not isinstance(train, dict) or not isinstance(train.get("seed", 0), int):
        raise ValueError(f"{path}: field 'train': expected a mapping (with an integer seed)")
    if round_index is not None and saved.get("round") != round_index:
        raise ValueError(f"{path}: field 'round': expected {round_index}, got "
                         f"{saved.get('round')!r}")


def summary_levels(test_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per level L0.. the ``SUMMARY_KEYS`` of the pooled test metrics."""
    return {lv: {k: m[k] for k in SUMMARY_KEYS} for lv, m in sorted(test_metrics["pooled"].items())}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class FewShotResult:
    """The run's top-level metrics and the final NVSM model and pseudo-labels."""

    metrics: dict[str, Any]
    model: NeMoModel
    labels: list[PseudoLabel]


#: Config keys that may change between an interrupted run and its resumption: they do not
#: change any round's result (``fewshot.rounds`` only adds rounds, the baselines are separate
#: folders).
RESUMABLE_KEYS = frozenset(
    {"device", "fewshot.rounds", "fewshot.baselines", "fewshot.oracle", "name", "description"}
)


def round_seed(seed: int, round_index: int) -> int:
    """Seed of EM round ``round_index``'s M-step (trainer, augmentation, clutter streams)."""
    return seed + ROUND_SEED_STRIDE * round_index


def train_steps(
    model: NeMoModel,
    data: CropSet,
    config: TrainConfig,
    steps: int,
    seed: int,
    device: torch.device,
    rasterizer: Rasterizer,
    description: str,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place on ``data`` for ``steps`` steps of ``config`` (its schedule
    spanning those steps), seeding torch and the trainer with ``seed``; the trainer's
    summary. Every stage of the loop trains through this, so a stage can be repeated exactly."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(config, steps=steps)
    trainer = NeMoTrainer(model, cfg, device, rasterizer, seed=seed)
    return trainer.fit(data, steps=steps, description=description, show_progress=show_progress)


@dataclass
class _Run:
    """What every stage of a run shares (the shell around the pure E-step functions)."""

    config: RunConfig
    run_dir: Path
    resume: bool
    data: FewShotData
    pool: CropSet  # the unlabelled crops with their poses hidden
    hidden_gt: torch.Tensor
    matcher: Matcher
    schedule: AcceptanceSchedule
    device: torch.device
    rasterizer: Rasterizer
    show_progress: bool
    say: Callable[[str], None]
    config_json: dict[str, Any] = field(default_factory=dict)

    def complete(
        self,
        folder: Path,
        steps: int | None = None,
        seed: int | None = None,
        round_index: int | None = None,
    ) -> dict[str, Any] | None:
        """The saved metrics of a complete stage folder when resuming (None: compute it).

        With ``steps`` and ``seed`` (a single-stage folder), a saved stage trained for another
        number of steps or with another seed is stale and recomputed: the baselines' budget and
        seed follow the EM rounds, which ``--resume --rounds K`` may change. A stage saved
        before nvsm recorded its seed counts as stale when ``fewshot.rounds`` changed. With
        ``round_index`` (EM round k), the metrics must be round k's."""
        if not (self.resume and _saved_stage(folder)):
            return None
        try:
            saved_config = read_json_object(folder / "config.json")
            saved = read_json_object(folder / "metrics.json")
            check_stage_metrics(saved, folder / "metrics.json", round_index)
            # Read, not only found: a damaged checkpoint of a complete stage went unnoticed.
            load_checkpoint(folder / "model.pt")
        except ValueError as exc:
            raise self.damaged(folder, exc) from exc
        diff = config_differences(saved_config, self.config_json, RESUMABLE_KEYS)
        if diff:
            raise ValueError(
                f"cannot resume {self.run_dir}: {folder}/config.json differs from this run's "
                f"config in {diff}"
            )
        name = folder.relative_to(self.run_dir)
        if steps is not None:
            train = saved.get("train", {})
            rounds_changed = (
                saved_config.get("fewshot", {}).get("rounds") != self.config.fewshot.rounds
            )
            seed_ok = train["seed"] == seed if "seed" in train else not rounds_changed
            if train.get("steps") != steps or not seed_ok:
                self.say(
                    f"{name}: saved for {train.get('steps')} steps (seed "
                    f"{train.get('seed', 'not recorded')}), this run needs {steps} (seed {seed}): "
                    "training it again"
                )
                return None
        self.say(f"{name}: complete, loaded")
        return saved

    def damaged(self, folder: Path, why: Exception | str) -> ValueError:
        """The error for a saved stage that cannot be taken over as it is."""
        return ValueError(
            f"cannot resume {self.run_dir}: {why}; delete {folder} to compute that stage again"
        )

    def saved_labels(self, folder: Path, round_index: int) -> list[PseudoLabel]:
        """A complete round's pseudo-labels, one per pool image in the pool's order (a label's
        position is its pool index: a shortened or reordered file trained on other images).
        Its CSV, the same labels in the other format, is written again if lost or changed."""
        path = folder / "pseudo_labels.jsonl"
        if not path.is_file():
            raise self.damaged(folder, f"{path} is missing")
        try:
            labels = read_pseudo_labels(path, round_index)
        except ValueError as exc:
            raise self.damaged(folder, exc) from exc
        if [lb.uid for lb in labels] != list(self.pool.uids):
            raise self.damaged(
                folder, f"{path}: expected one label per unlabelled image, in the pool's order "
                f"({len(self.pool)} labels), got {len(labels)} labels of other images or order")
        csv_path, csv_text = folder / "pseudo_labels.csv", pseudo_labels_csv(labels)
        if not csv_path.is_file() or csv_path.read_text(encoding="utf-8") != csv_text:
            self.say(f"{csv_path.relative_to(self.run_dir)}: missing or not the JSONL's labels: "
                     "written again from pseudo_labels.jsonl")
            ddp.on_main(partial(atomic_write_text, csv_path, csv_text))
        return labels

    def load(self, folder: Path) -> NeMoModel:
        model, _ = NeMoModel.load(folder / "model.pt")
        return model.to(self.device)

    def train(
        self, model: NeMoModel, data: CropSet, steps: int, seed: int, description: str
    ) -> dict[str, Any]:
        return train_steps(
            model, data, self.config.train, steps, seed, self.device, self.rasterizer,
            description, self.show_progress,
        )  # fmt: skip

    def evaluate(self, model: NeMoModel) -> dict[str, Any]:
        from nvsm.pipeline import evaluate_crops

        return evaluate_crops(model, self.config, self.data.test, self.device, self.rasterizer,
                              self.show_progress, "evaluating")

    def finish(
        self, folder: Path, model: NeMoModel, info: dict[str, Any], timer: StageTimer
    ) -> dict[str, Any]:
        """Evaluate, then write model, config and (last, the completion marker) metrics; on
        rank 0, whose result every rank returns."""

        def evaluate_and_write() -> dict[str, Any]:
            with timer("inference"):
                info["test"] = self.evaluate(model)
            info["stage_seconds"] = dict(timer.seconds)
            model.save(folder / "model.pt", {"stage": str(folder.relative_to(self.run_dir))})
            atomic_write_json(folder / "config.json", self.config_json)
            atomic_write_json(folder / "metrics.json", info)
            return json.loads(json.dumps(info, default=str))

        return ddp.on_main(evaluate_and_write)


def _pseudo_set(pool: CropSet, labels: Sequence[PseudoLabel], idx: list[int]) -> CropSet:
    poses = torch.tensor(
        [
            [labels[i].azimuth, labels[i].elevation, labels[i].theta, labels[i].distance]
            for i in idx
        ],
        dtype=torch.float64,
    )
    weights = torch.tensor([labels[i].weight for i in idx], dtype=torch.float32)
    return pool.subset(idx).with_poses(poses, weights)


def with_synthesized_images(
    crops: CropSet,
    meshes: dict[str, Mesh],
    azimuth_shifts_deg: Sequence[float],
    rasterizer: Rasterizer,
    chunk: int = 64,
) -> CropSet:
    """``crops``, then every crop re-rendered at its pose + Δa for each azimuth shift in turn
    (``synthesize_images``, the category's cuboid; same weights, uids and cameras): the M-step's
    image-level view synthesis. The image boxes are kept too: the fill there is the source
    crop blurred, so its padding stays where it was. ``chunk`` crops are rendered at a time
    (bounds memory)."""
    parts = [crops]
    for shift_deg in azimuth_shifts_deg:
        images = torch.empty(crops.images.shape, dtype=torch.uint8)
        poses = torch.empty_like(crops.poses, dtype=torch.float64)
        for cat in sorted(set(crops.categories)):
            idx = torch.tensor([i for i, c in enumerate(crops.categories) if c == cat])
            for part in idx.split(chunk):
                shifts = torch.zeros(len(part), 3, dtype=torch.float64)
                shifts[:, 0] = math.radians(shift_deg)
                images[part], poses[part], _ = synthesize_images(
                    crops.images[part], crops.k[part], crops.poses[part], crops.image_box[part],
                    shifts, meshes[cat], rasterizer,
                )  # fmt: skip
        parts.append(dataclasses.replace(crops, images=CropImages.of(images), poses=poses))
    return CropSet.concat(parts)


def _anchors(run: _Run, labels: Sequence[PseudoLabel]) -> CropSet:
    """Labelled crops + the ``max_pseudo_anchors`` most confident accepted pseudo-labelled
    crops (at their pseudo-poses; stable order on ties), and their mirrors when
    ``fewshot.mirror_anchors``."""
    fs = run.config.fewshot
    acc = [i for i, lb in enumerate(labels) if lb.accepted]
    acc = sorted(acc, key=lambda i: -labels[i].weight)[: max(0, fs.max_pseudo_anchors)]
    acc.sort()
    anchors = run.data.labelled
    if acc:
        anchors = CropSet.concat([anchors, _pseudo_set(run.pool, labels, acc)])
    return CropSet.concat([anchors, anchors.mirrored()]) if fs.mirror_anchors else anchors


#: (model, EM round k ≥ 1, previous round's labels, timer) → (labels, raw poses (N, 4)).
Labeller = Callable[
    [NeMoModel, int, list[PseudoLabel], StageTimer], tuple[list[PseudoLabel], torch.Tensor]
]


def _nvsm_labeller(run: _Run) -> Labeller:
    def label(
        model: NeMoModel, k: int, previous: list[PseudoLabel], timer: StageTimer
    ) -> tuple[list[PseudoLabel], torch.Tensor]:
        anchors = _anchors(run, previous)
        run.say(f"round {k}: E-step, {len(anchors)} anchors, {len(run.pool)} unlabelled")
        batch = run.config.infer.batch_size
        with timer("features"):
            anchor_feats = extract_features(model, anchors, run.device, batch)
            pool_feats = extract_features(model, run.pool, run.device, batch, run.run_dir)
        return e_step(
            model,
            k,
            anchors,
            anchor_feats,
            run.pool,
            pool_feats,
            run.config.fewshot,
            run.matcher,
            run.schedule.rule(k - 1),
            run.device,
            run.rasterizer,
            timer,
        )

    return label


def _self_training_labeller(run: _Run) -> Labeller:
    def label(
        model: NeMoModel, k: int, previous: list[PseudoLabel], timer: StageTimer
    ) -> tuple[list[PseudoLabel], torch.Tensor]:
        run.say(f"self-training round {k}: NeMo predictions on {len(run.pool)} unlabelled")
        labels = self_training_labels(
            model,
            run.pool,
            run.config,
            k,
            run.device,
            run.rasterizer,
            timer,
            show_progress=run.show_progress,
            features_folder=run.run_dir,
        )
        matched = torch.tensor(
            [[lb.azimuth, lb.elevation, lb.theta, lb.distance] for lb in labels],
            dtype=torch.float64,
        )
        return accept_and_weight(labels, run.schedule.rule(k - 1), run.config.fewshot), matched

    return label


def _em_rounds(
    run: _Run, root: Path, labeller: Labeller, name: str, rounds: int, stop_early: bool
) -> list[dict[str, Any]]:
    """EM rounds 1..``rounds`` from ``RUN/round_0``, writing ``root/round_<k>``; with
    ``stop_early`` the rounds end once pose coverage saturates (``_saturated``). Each M-step
    also trains on its images re-rendered at ``fewshot.mstep_image_shifts_deg``
    (``with_synthesized_images``; empty: none), in NVSM and self-training alike, so that the
    two loops differ only in where their pseudo-labels come from.

    Every round starts from its predecessor's checkpoint on disk and seeds its own generators,
    so a resumed run equals an uninterrupted one."""
    fs = run.config.fewshot
    out: list[dict[str, Any]] = []
    labels: list[PseudoLabel] = []
    previous = run.run_dir / "round_0"
    gaps: list[float] = []
    for k in range(1, rounds + 1):
        if stop_early and _saturated(run.schedule, k, gaps):
            run.say(f"{name}: pose coverage saturated after round {k - 1}; stopping")
            break
        folder = root / f"round_{k}"
        saved = run.complete(folder, round_index=k)
        if saved is not None:
            out.append(saved)
            labels = run.saved_labels(folder, k)
            gaps.append(_accepted_gap(labels))
            previous = folder
            continue
        timer = StageTimer()
        model = run.load(previous)
        seed = round_seed(run.config.seed, k)
        info: dict[str, Any] = {"round": k, "method": name}
        labels, matched = ddp.on_main(partial(labeller, model, k, labels, timer))
        info["pseudo_labels"] = diag = pseudo_label_diagnostics(labels, matched, run.hidden_gt)
        acc = [i for i, lb in enumerate(labels) if lb.accepted]
        accepted = f"{name} round {k}: accepted {len(acc)}/{len(labels)} pseudo-labels"
        if diag["accepted"] and math.isfinite(diag["refined"]["acc_pi_6"]):
            r = diag["refined"]
            run.say(
                f"{accepted}; vs the hidden ground truth (diagnostics only): Acc@π/6 "
                f"{100 * r['acc_pi_6']:.1f}, Acc@π/18 {100 * r['acc_pi_18']:.1f}, flips "
                f"{100 * r['flip_share']:.1f} %"
            )
        else:  # none accepted, or no ground truth to compare with: the count still tells
            run.say(accepted)
        data = run.data.labelled
        if acc:
            data = CropSet.concat([data, _pseudo_set(run.pool, labels, acc)])
        image_shifts_deg = fs.mstep_image_shifts_deg
        if image_shifts_deg:
            with timer("image synthesis"):
                data = with_synthesized_images(
                    data, run.data.meshes, image_shifts_deg, run.rasterizer
                )
        if fs.mstep_init == "restart":
            model = run.load(run.run_dir / "round_0")
        run.say(
            f"{name} round {k}: M-step on {len(run.data.labelled)} labels + {len(acc)} PLs"
            + (f", each also at Δa = {list(image_shifts_deg)}°" if image_shifts_deg else "")
        )
        with timer("training"):
            info["train"] = run.train(model, data, fs.mstep_steps, seed, f"{name} round {k}")
        info["train"].update(
            labelled_images=len(run.data.labelled), pseudo_labelled_images=len(acc)
        )
        ddp.on_main(partial(_write_labels, folder, labels))
        out.append(run.finish(folder, model, info, timer))
        gaps.append(_accepted_gap(labels))
        previous = folder
    return out


def _accepted_gap(labels: Sequence[PseudoLabel]) -> float:
    """Largest azimuth gap (degrees) between the accepted pseudo-labels."""
    return azimuth_coverage([lb.azimuth for lb in labels if lb.accepted]).max_gap_deg


def _saturated(schedule: AcceptanceSchedule, k: int, gaps: list[float]) -> bool:
    """Whether EM round k (≥ 3) would add nothing: the acceptance rule stopped loosening and
    the previous round did not close any azimuth gap of the accepted pseudo-labels."""
    return k >= 3 and schedule.rule(k - 1) == schedule.rule(k - 2) and gaps[-1] >= gaps[-2]


def _saved_stage(folder: Path) -> bool:
    """Whether ``folder`` holds a stage's results (its metrics and checkpoint), which a resumed
    run reuses unless stale or damaged (``_Run.complete``)."""
    return (folder / "metrics.json").is_file() and (folder / "model.pt").is_file()


def _single_stage(
    run: _Run,
    folder: Path,
    name: str,
    start: Path | None,
    data: CropSet,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Train (from ``start``'s checkpoint, or a fresh model) on ``data`` for ``steps`` steps,
    evaluate and write ``folder``; or load it when resuming."""
    saved = run.complete(folder, steps, seed)
    if saved is not None:
        return saved
    timer = StageTimer()
    if start is None:
        torch.manual_seed(run.config.seed)
        model = build_model(run.config, run.data.meshes).to(run.device)
    else:
        model = run.load(start)
    run.say(f"{name}: {steps} steps on {len(data)} images")
    with timer("training"):
        info: dict[str, Any] = {"method": name, "train": run.train(model, data, steps, seed, name)}
    info["train"]["labelled_images"] = len(data)
    info["train"]["seed"] = seed
    return run.finish(folder, model, info, timer)


def validate_fewshot_config(config: RunConfig) -> None:
    """Raise ``ValueError`` naming the first value the loop cannot run with
    (``nvsm.pipeline.check_run_config``, then the ``fewshot.*`` values that only make sense
    together), so that it fails before any data is cropped or round 0 trained."""
    from nvsm.pipeline import check_run_config

    check_run_config(config)
    fs = config.fewshot
    bad = [x for x in fs.mstep_image_shifts_deg if not 0 < abs(x) <= 90]
    if bad:
        raise ValueError(
            "fewshot.mstep_image_shifts_deg: every azimuth shift must be non-zero and within "
            f"±90°, got {bad}"
        )
    acceptance_schedule(fs)


def run_fewshot(
    config: RunConfig,
    run_dir: Path,
    resume: bool = False,
    data: FewShotData | None = None,
    matcher: Matcher | None = None,
    schedule: AcceptanceSchedule | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FewShotResult:
    """Run (or resume) the few-shot loop and its baselines; writes RUN/metrics.json.

    Folders: ``round_0`` (``nemo``: the labels alone, ``train.steps``), ``round_<k>`` (``nvsm``
    EM rounds), and with ``fewshot.baselines``: ``nemo_same_steps`` (round 0 continued on the
    labels alone up to the NVSM run's total steps), ``self_training/round_<k>`` (NeMo's own
    predictions as pseudo-labels, same acceptance rule, rounds and budget); with
    ``fewshot.oracle``: ``oracle`` (every training image with its ground truth, the NVSM run's
    total steps from scratch). The total (``total_steps`` in the metrics) counts the EM rounds
    NVSM actually ran (fewer than ``fewshot.rounds`` when coverage saturated).

    Args:
        config: resolved configuration (``config.fewshot`` for the loop).
        run_dir: the run folder.
        resume: reuse complete stages (``metrics.json`` present).
        data: the split (default ``prepare_fewshot_data(config)``).
        matcher: the matcher (default from ``fewshot.matcher``).
        schedule: acceptance rules per EM round (index k − 1; default ``acceptance_schedule``).
        log: optional progress messages (rank 0's only under torchrun).

    Under ``torchrun`` every process calls this (see the module docstring) and returns the
    same result; the process group is set up here and torn down after, unless one is
    running already.
    """
    from nvsm.pipeline import check_backbone_weights

    validate_fewshot_config(config)
    # Only the stages that start from a fresh model read the backbone weights; a resumed run
    # whose such stages are all saved does not (see check_backbone_weights).
    fresh = [Path(run_dir) / "round_0"]
    if config.fewshot.oracle:
        fresh.append(Path(run_dir) / "oracle")
    if not (resume and all(_saved_stage(folder) for folder in fresh)):
        check_backbone_weights(config)
    with ddp.process_group(config.device) as info:
        return _run_fewshot(config, Path(run_dir), resume, data, matcher, schedule,
                            show_progress, log, info)


def _run_fewshot(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    data: FewShotData | None,
    matcher: Matcher | None,
    schedule: AcceptanceSchedule | None,
    show_progress: bool,
    log: Callable[[str], None] | None,
    info: ddp.DistInfo,
) -> FewShotResult:
    """``run_fewshot``'s body on this process (``info``, whose device it runs on)."""
    fs = config.fewshot
    device = info.device
    schedule = schedule or acceptance_schedule(fs)
    run_dir = ddp.broadcast_object(run_dir)  # e.g. a timestamped default: rank 0's
    config_json = config_to_dict(config)
    check_resumed_config(run_dir, check_run_folder(run_dir, resume, "fewshot"), config_json,
                         RESUMABLE_KEYS)
    if resume:
        # Fewer rounds than the folder holds left the later rounds beside results of fewer
        # (the pseudo-label export and report read the last round there is).
        held = max(
            (
                int(m.group(1))
                for root in (run_dir, run_dir / "self_training")
                for p in root.glob("round_*")
                if (m := ROUND_FOLDER.fullmatch(p.name))
            ),
            default=0,
        )
        if held > fs.rounds:
            raise ValueError(
                f"cannot resume {run_dir} with {fs.rounds} round(s) (fewshot.rounds, --rounds): "
                f"it holds round {held} already; ask for at least {held}, or start a new run in "
                "another folder"
            )
    ddp.barrier()  # every rank has checked the folder before rank 0 writes into it
    data = data or ddp.main_first(lambda: prepare_fewshot_data(config))

    def start_run_folder() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, config_json, config.seed, "fewshot")

    ddp.on_main(start_run_folder)
    pool, hidden_gt = hide_poses(data.unlabelled)
    run = _Run(
        config=config,
        run_dir=run_dir,
        resume=resume,
        data=data,
        pool=pool,
        hidden_gt=hidden_gt,
        matcher=matcher or make_matcher(fs),
        schedule=schedule,
        device=device,
        rasterizer=get_rasterizer(config.model.rasterizer, device),
        show_progress=show_progress and info.is_main,
        say=log if log is not None and info.is_main else (lambda _msg: None),
        config_json=config_json,
    )
    nemo = _single_stage(
        run, run_dir / "round_0", "nemo", None, data.labelled, config.train.steps, config.seed
    )
    nemo["round"] = 0
    rounds = [nemo, *_em_rounds(run, run_dir, _nvsm_labeller(run), "nvsm", fs.rounds, True)]
    # The baselines get the budget of the EM rounds NVSM actually ran.
    em_rounds = len(rounds) - 1
    budget = config.train.steps + em_rounds * fs.mstep_steps
    rows: dict[str, Any] = {"nemo": nemo, "nvsm": rounds[-1]}
    extra: dict[str, Any] = {}
    if fs.baselines:
        rows["nemo_same_steps"] = _single_stage(
            run,
            run_dir / "nemo_same_steps",
            "nemo_same_steps",
            run_dir / "round_0",
            data.labelled,
            em_rounds * fs.mstep_steps,
            # Past every EM round that ran: not fs.rounds, so that asking a saturated run for
            # more rounds (which it skips) leaves this row as it was.
            round_seed(config.seed, em_rounds + 1),
        )
        st = _em_rounds(
            run,
            run_dir / "self_training",
            _self_training_labeller(run),
            "self_training",
            em_rounds,
            False,
        )
        rows["self_training"] = st[-1]
        extra["self_training_rounds"] = [_round_summary(r) for r in st]
    if fs.oracle:
        truth = data.unlabelled.with_poses(data.unlabelled.poses, torch.ones(len(data.unlabelled)))
        rows["oracle"] = _single_stage(
            run,
            run_dir / "oracle",
            "oracle",
            None,
            CropSet.concat([data.labelled, truth]),
            budget,
            round_seed(config.seed, em_rounds + 2),
        )
    last = run_dir / f"round_{rounds[-1]['round']}"  # earlier than fs.rounds if saturated
    final = run.load(last)
    labels = read_pseudo_labels(last / "pseudo_labels.jsonl", rounds[-1]["round"])
    extra["world_size"] = info.world_size
    metrics = _top_level(config, data, rows, rounds, {"total_steps": budget, **extra})
    ddp.on_main(partial(atomic_write_json, run_dir / "metrics.json", metrics))
    return FewShotResult(metrics=metrics, model=final, labels=labels)


#: Rows of the top-level metrics and the printed table, in order.
ROWS = ("nemo", "nemo_same_steps", "self_training", "nvsm", "oracle")


def _round_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": r["round"],
        "test": summary_levels(r["test"]),
        "train": r.get("train", {}),
        "stage_seconds": r.get("stage_seconds", {}),
        **({"pseudo_labels": r["pseudo_labels"]} if "pseudo_labels" in r else {}),
    }


def _top_level(
    config: RunConfig,
    data: FewShotData,
    rows: dict[str, dict[str, Any]],
    rounds: list[dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    coverage = {
        cat: dataclasses.asdict(
            azimuth_coverage(
                [
                    float(p[0])
                    for p, c in zip(data.labelled.poses, data.labelled.categories, strict=True)
                    if c == cat
                ]
            )
        )
        for cat in sorted(set(data.labelled.categories))
    }
    return {
        **{name: summary_levels(rows[name]["test"]) for name in ROWS if name in rows},
        "protocol": config.data.crop_protocol,  # test crops: gt-normalized | bbox
        "anchor_seed": config.seed,
        "anchor_strategy": config.labels.anchors,
        "annotations": config.labels.annotations,
        "anchor_uids": list(data.labelled.uids),
        "anchor_azimuth_coverage": coverage,
        "rounds": [_round_summary(r) for r in rounds],
        **extra,
    }
