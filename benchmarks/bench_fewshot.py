"""Few-shot NVSM loop cost: per-stage timings of one EM round, and view-matching at pool scale.

Two parts (both when neither flag is given):

``--stages``  Time every stage of one EM round on the built-in synthetic car data (recipe
    ``synthetic-car-7shot``, ``-s KEY=VALUE`` overrides, device ``--device``, default cpu) with
    an untrained ``build_model`` model (timings do not depend on the weights; early stopping of
    inference may) or ``--checkpoint``. Stages, each the median of ``--repeats`` timed runs
    after one warm-up run, reported in ms per unit:

    * crop          ``prepare_fewshot_data`` (split + cropping), per crop. ONE run only.
    * extract       ``extract_features`` of unlabelled crops, per image.
    * synthesis     ``sample_anchor_vertex_features`` + ``iter_synthesized_views`` of the anchors
                    on the round's shift grid (``round_shifts``), per view.
    * match torch / match faiss
                    ``TorchMatcher`` / ``FaissMatcher()`` (flat) ``search`` of the pool's feature
                    maps against all views, clutter-aware as the loop runs it (bank clutter model,
                    self-matches excluded by uid), per target at the measured view count M; the
                    maps of ``--images`` crops are tiled to the full pool size, so view
                    preparation is amortised as in the real call.
    * pseudo-labels ``best_pose_and_margin`` + ``accept_and_weight``, per target.
    * flip check    ``flip_margins`` (NeMo loss at the matched pose and at its half turn), per
                    image.
    * refine        ``refine_accepted`` (render-and-compare, ``fewshot.refine_steps``) of
                    matched poses, per image.
    * templates     ``render_templates`` of the inference schedule, once per evaluation.
    * inference     ``predict`` with the configured schedule (``fast``), templates cached,
                    per image.
    * train         ``NeMoTrainer.train_step`` (batch ``train.batch_size``) on labels + pool crops
                    standing in for pseudo-labels, per step (``--train-steps`` steps after
                    ``--train-warmup``).

    The projection multiplies each ms/unit by the units of the DEFAULT run of the config (full
    pool, rounds, steps, test set): anchors of round k = labels + min(max_pseudo_anchors,
    accepted of round k−1), views = anchors × |round_shifts(k)|, accepted = ceil(top_fraction ×
    pool), matching scaled linearly with the view count. It shows where the minutes go; it is an
    estimate (acceptance thresholds other than ``top_fraction`` are ignored).

``--index``  Matching throughput on a SIMULATED pool of ``--pool`` unlabelled images (default
    100 000), flat vs IVF (and PCA-compressed) ``FaissMatcher`` indexes, plus the exact
    ``TorchMatcher``, with the dimensions of the recipe: D = ``model.feature_dim`` (128) channels
    on an h × w map = crop_size / stride (128 × 240 / 8 → 16 × 30), M = ``--anchors`` (the
    recipe's 7 labels) × |round_shifts(fs, ``--round``)| views (7 × 21 = 147 in round 1).

    * Index = the VIEWS, queries = the TARGETS. The views are few (10²–10³ per round) and
      rebuilt every round, the pool is huge (10⁵ images) and only ever read once per round, so
      only the views need an index, built once (``FaissMatcher.build``); the targets are
      streamed: each chunk of ``--chunk`` target maps is generated from its own seeded
      generator, queried against every index (``FaissMatcher.query`` / ``TorchMatcher.search``),
      and dropped. The pool is never indexed, never held: 10⁵ maps of 128 × 16 × 30 float32 would
      be ~25 GB; the process' peak RSS (``resource.getrusage``) is recorded to show it stays
      bounded (it is process-wide: run ``--index`` alone for a clean number).
    * Simulation: each anchor has a smooth random unit feature field and a box-shaped mask; its
      views are that field rolled by one cell per 10° of azimuth / elevation shift (+ small
      noise), the mask's width varying with the azimuth shift, so views of one anchor are
      correlated as rendered ones are. Each target copies one random view (features and mask)
      moved by up to ``--jitter`` cells (a pose between grid poses, so neighbouring views
      compete), adds Gaussian noise (on-mask cosine ≈ 1/√(1 + ``--target-noise``²)) and is pure
      noise (clutter) off the mask; ``anchor@1`` is how often the top-1 view comes from the
      anchor the target was made from (how hard the simulated pool is).
    * The score is the LINEAR one (clutter=None): FAISS answers it exactly with flat, so
      throughput and recall compare index structures, not re-scoring. (The loop's clutter-aware
      score re-scores a shortlist exactly; see the ``--stages`` match rows for that cost.) PCA
      variants always re-score their shortlist exactly (``FaissMatcher`` semantics).
    * Throughput: targets/s, median over chunks of the query time only (generation excluded);
      build: median of up to 3 builds. recall@1 (R@1) = P(top-1 = flat's top-1); recall@10
      (R@10) = mean |top-10 ∩ flat's top-10| / 10; both over every streamed target (flat is
      queried on every chunk anyway, so the 'subsample' is the whole pool).

``--quick`` shrinks everything for a smoke check (pool 2000, repeats 2, 16 images, 3 training
steps after 1 warm-up).

Usage:
    python benchmarks/bench_fewshot.py [--stages] [--index] [--quick] [--json out.json]
        [-s fewshot.rounds=2 ...] [--checkpoint runs/x/round_1/model.pt] [--pool 100000]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _cli import non_negative_float, non_negative_int, positive_int, run_main, torch_device
from rich.console import Console
from rich.table import Table

from nvsm.config import RunConfig, load_config, override_config
from nvsm.fewshot.estep import (
    accept_and_weight,
    extract_features,
    flip_margins,
    refine_accepted,
    round_shifts,
)
from nvsm.fewshot.loop import acceptance_schedule, prepare_fewshot_data
from nvsm.fewshot.matching import FaissMatcher, Matcher, TorchMatcher, faiss_available
from nvsm.fewshot.pseudo_labels import best_pose_and_margin, make_pseudo_labels
from nvsm.fewshot.synthesis import (
    SynthesizedViews,
    iter_synthesized_views,
    sample_anchor_vertex_features,
)
from nvsm.infer.evaluate import predict, resolve_schedule
from nvsm.infer.solve import canonical_feature_camera, clutter_model, render_templates
from nvsm.io import atomic_write_json, git_commit, package_versions
from nvsm.models.common import STRIDE
from nvsm.pipeline import labelled_subset, load_splits
from nvsm.pose.camera import feature_intrinsics
from nvsm.pose.convention import NORMALIZED_DISTANCE
from nvsm.render import get_rasterizer
from nvsm.runtime import keep_freed_memory
from nvsm.train.cropset import CropSet
from nvsm.train.model import NeMoModel, build_model
from nvsm.train.trainer import NeMoTrainer

RECIPE = "synthetic-car-7shot"
#: What ``--quick`` sets (argument name → value).
QUICK = {"pool": 2000, "repeats": 2, "images": 16, "train_steps": 3, "train_warmup": 1}

#: Tables need ~120 columns; a pipe or file would get rich's default of 80.
console = Console(width=None if sys.stdout.isatty() else 120)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> list[float]:
    """Seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux,
    bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if platform.system() == "Darwin" else peak / 1024


# --------------------------------------------------------------------------------------------
# Part 1: stages of one EM round
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Timings of one stage.

    Attributes:
        name: stage name; unit: what one unit is; units: units per timed run.
        runs_s: seconds of each timed run.
        per_round: units of the default run in each round (index = round; filled later).
        counted: whether the stage counts towards the projected total (one matcher only).
        note: free text shown in the JSON.
    """

    name: str
    unit: str
    units: int
    runs_s: list[float]
    per_round: list[float] = field(default_factory=list)
    counted: bool = True
    note: str = ""

    @property
    def ms_per_unit(self) -> float:
        return 1000 * statistics.median(self.runs_s) / max(1, self.units)

    def projected_s(self) -> list[float]:
        """Projected seconds of the default run per round."""
        return [u * self.ms_per_unit / 1000 for u in self.per_round]

    def to_dict(self) -> dict[str, Any]:
        proj = self.projected_s()
        return {
            "name": self.name,
            "unit": self.unit,
            "units_per_run": self.units,
            "runs_s": self.runs_s,
            "ms_per_unit": self.ms_per_unit,
            "default_run_units_per_round": self.per_round,
            "projected_s_per_round": proj,
            "projected_s": sum(proj),
            "counted": self.counted,
            "note": self.note,
        }


@dataclass(frozen=True)
class RunSizes:
    """Unit counts of the default run of a config (index = round, 0 = NeMo on the labels)."""

    labelled: int
    pool: int
    test: int
    train_steps: list[int]
    anchors: list[int]
    views: list[int]
    accepted: list[int]

    @property
    def rounds(self) -> int:
        return len(self.train_steps) - 1


def run_sizes(config: RunConfig, labelled: int, pool: int, test: int) -> RunSizes:
    """Anchors, views, accepted pseudo-labels and training steps of every round."""
    fs = config.fewshot
    schedule = acceptance_schedule(fs)
    train = [config.train.steps] + [fs.mstep_steps] * fs.rounds
    anchors, views, accepted = [0], [0], [0]
    for k in range(1, fs.rounds + 1):
        n_anchors = labelled + min(fs.max_pseudo_anchors, accepted[k - 1])
        anchors.append(n_anchors * (2 if fs.mirror_anchors else 1))
        views.append(anchors[-1] * int(round_shifts(fs, k).shape[0]))
        frac = schedule.rule(k - 1).top_fraction
        accepted.append(pool if frac is None else min(pool, math.ceil(frac * pool - 1e-9)))
    return RunSizes(labelled, pool, test, train, anchors, views, accepted)


def stand_in_pseudo_anchors(sizes: RunSizes, k: int, mirror_anchors: bool) -> int:
    """Pool images that stand in for round ``k``'s pseudo-labelled anchors, beside the labels:
    ``sizes.anchors`` counts the mirrored copies, which the stage benchmark adds itself (taken
    as they were, round 1 got as many stand-ins as labels, and twice its views)."""
    return sizes.anchors[k] // (2 if mirror_anchors else 1) - sizes.labelled


def _category_set(data: CropSet, category: str) -> CropSet:
    return data.subset([i for i, c in enumerate(data.categories) if c == category])


def bench_stages(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 (module docstring): per-stage timings and the default run's projection."""
    device = torch.device(args.device)
    overrides = [*args.set, f"device={args.device}"]
    loaded: NeMoModel | None = None
    if args.checkpoint is None:
        config = load_config(args.recipe, overrides)
    else:  # the checkpoint's own config (crop size, feature dim, ...) + the overrides
        loaded, _ = NeMoModel.load(args.checkpoint)
        config = override_config(loaded.config, overrides, str(args.checkpoint))
    fs = config.fewshot
    if config.labels.annotations is None:
        raise SystemExit("the few-shot stages need labels.annotations (the recipe sets 7)")
    category = config.data.categories[0]
    measured_round = args.round
    if measured_round > fs.rounds:
        raise SystemExit(f"--round {measured_round} > fewshot.rounds = {fs.rounds}")

    # Sizes of the default run (cheap: annotations only, no cropping).
    splits = load_splits(config, tuple(fs.occlusion_levels))
    n_labelled = len(
        labelled_subset(splits.train, config.labels.annotations, config.labels.anchors, config.seed)
    )
    n_pool = len(splits.train) - n_labelled
    if fs.unlabelled_limit is not None:
        n_pool = min(n_pool, fs.unlabelled_limit)
    n_test = sum(len(v) for v in splits.test.values())
    sizes = run_sizes(config, n_labelled, n_pool, n_test)
    pseudo_anchors = stand_in_pseudo_anchors(sizes, measured_round, fs.mirror_anchors)

    # Crop only what is timed: --images pool crops (and the stand-in pseudo-anchors).
    limit = min(n_pool, max(args.images, pseudo_anchors))
    small = dataclasses.replace(config, fewshot=dataclasses.replace(fs, unlabelled_limit=limit))
    start = time.perf_counter()
    data = prepare_fewshot_data(small)
    prep_s = time.perf_counter() - start
    n_cropped = len(data.labelled) + len(data.unlabelled) + len(data.test)

    if loaded is None:
        torch.manual_seed(config.seed)
        loaded = build_model(config, data.meshes)  # untrained: timings do not need weights
    model = loaded.to(device)
    rasterizer = get_rasterizer(config.model.rasterizer, device)
    labelled = _category_set(data.labelled, category)
    pool_all = _category_set(data.unlabelled, category)
    n_img = min(args.images, len(pool_all))
    pool = pool_all.subset(torch.arange(n_img))
    test = _category_set(data.test, category)
    test = test.subset(torch.arange(min(args.images, len(test))))
    # Round k's anchors: the labels + accepted pseudo-labels; pool crops at their ground-truth
    # poses stand in for the latter (the cost does not depend on the poses' accuracy).
    anchors = labelled
    if pseudo_anchors > 0:
        anchors = CropSet.concat([labelled, pool_all.subset(torch.arange(pseudo_anchors))])
    if fs.mirror_anchors:
        anchors = CropSet.concat([anchors, anchors.mirrored()])
    stages: list[Stage] = []
    reps = args.repeats

    console.print(
        f"stages: {category}, measured round {measured_round}: {len(anchors)} anchors, "
        f"{n_img} timed images; default run: pool {n_pool}, test {n_test}, views per round "
        f"{sizes.views[1:]}, accepted {sizes.accepted[1:]}, rasterizer {rasterizer.name}"
    )
    note = "prepare_fewshot_data (splits, CAD meshes, cropping), one run"
    stages.append(Stage("crop", "crop", n_cropped, [prep_s], note=note))

    # Feature extraction.
    batch = config.infer.batch_size
    runs = _timed_runs(lambda: extract_features(model, pool, device, batch), device, reps)
    stages.append(Stage("extract", "image", n_img, runs))
    pool_feats = extract_features(model, pool, device, batch)
    anchor_feats = extract_features(model, anchors, device, batch).to(device)

    # View synthesis (as ``nvsm.fewshot.estep._match_category``).
    shifts = round_shifts(fs, measured_round)
    size = (int(pool_feats.shape[-2]), int(pool_feats.shape[-1]))
    view_k = canonical_feature_camera(size, STRIDE, pool.normalized_focal)
    mesh = model.meshes[category].to(device)

    def synthesize() -> list[SynthesizedViews]:
        with torch.no_grad():
            k_anchor = torch.as_tensor(feature_intrinsics(anchors.k.numpy(), STRIDE))
            feats, visible = sample_anchor_vertex_features(
                anchor_feats, anchors.poses.to(device), k_anchor, mesh
            )
            vposes = anchors.poses.clone().to(device)
            vposes[:, 3] = NORMALIZED_DISTANCE
            return list(
                iter_synthesized_views(
                    feats, visible, vposes, shifts, mesh, view_k, size, rasterizer, fs.view_chunk
                )
            )

    n_views = len(anchors) * int(shifts.shape[0])
    stages.append(Stage("synthesis", "view", n_views, _timed_runs(synthesize, device, reps)))
    views = SynthesizedViews.concat(synthesize())

    # Matching: the whole pool (tiled feature maps) against all views, as the loop calls it.
    reps_needed = math.ceil(n_pool / n_img)
    targets = pool_feats.repeat(reps_needed, 1, 1, 1)[:n_pool].to(device)
    uids = np.asarray([f"{pool.uids[i % n_img]}#{i}" for i in range(n_pool)])
    src_uids = [anchors.uids[i] for i in views.source.tolist()]
    queue = model.banks[category].clutter_queue().detach().float().to(device)
    clutter = clutter_model(queue) if fs.clutter_aware else None
    k_cand = min(fs.candidates, len(views))
    matchers: dict[str, Matcher] = {"torch": TorchMatcher()}
    if faiss_available():
        matchers["faiss"] = FaissMatcher()
    result: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, matcher in matchers.items():

        def match(matcher: Matcher = matcher) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return matcher.search(
                    views.features.float(),
                    views.mask,
                    targets,
                    k_cand,
                    clutter=clutter,
                    exclude=(uids, np.asarray(src_uids)),
                )

        runs = _timed_runs(match, device, reps)
        stage = Stage(
            f"match {name}",
            f"target @{len(views)} views",
            n_pool,
            runs,
            counted=name == fs.matcher,
            note=f"clutter-aware={fs.clutter_aware}, k={k_cand}, ms/unit scales with the views",
        )
        stages.append(stage)
        if result is None:
            result = match()
    assert result is not None
    scores, index = result

    # Pseudo-labels from the top-k (best pose, margin, acceptance, weights); the flip margins
    # they are ranked with are rendered, so they are timed per image below.
    vposes = views.poses.double().cpu()
    vshift = views.shift.cpu()
    rule = acceptance_schedule(fs).rule(measured_round - 1)
    no_flip = torch.full((len(uids),), math.nan, dtype=torch.float64)

    def pseudo_labels() -> list[Any]:
        best = best_pose_and_margin(scores, vposes, fs.min_separation_deg, index=index)
        made = make_pseudo_labels(
            list(uids), category, best, no_flip, vposes, vshift, src_uids, measured_round
        )
        return accept_and_weight(made, rule, fs)

    stages.append(
        Stage("pseudo-labels", "target", n_pool, _timed_runs(pseudo_labels, device, reps))
    )
    best = best_pose_and_margin(scores[:n_img], vposes, fs.min_separation_deg, index=index[:n_img])
    matched = vposes[best.view.clamp(min=0)]
    runs = _timed_runs(
        lambda: flip_margins(model, pool, pool_feats, range(n_img), matched, device, rasterizer),
        device,
        reps,
    )
    stages.append(Stage("flip check", "image", n_img, runs))

    # Refinement of the (all accepted) matched poses of the timed images.
    labels = [dataclasses.replace(lb, accepted=True, weight=1.0) for lb in pseudo_labels()[:n_img]]
    runs = _timed_runs(
        lambda: refine_accepted(model, pool, pool_feats, labels, fs, device, rasterizer),
        device,
        reps,
    )
    stages.append(Stage("refine", "image", n_img, runs, note=f"refine_steps={fs.refine_steps}"))

    # Inference templates (once per evaluation) and inference per image.
    schedule = resolve_schedule(config.infer.schedule)
    bank = model.banks[category]

    def templates() -> object:
        return render_templates(
            mesh,
            bank.memory.float(),
            schedule,
            size,
            STRIDE,
            rasterizer,
            k_feat=canonical_feature_camera(size, STRIDE, test.normalized_focal),
        )

    stages.append(Stage("templates", "evaluation", 1, _timed_runs(templates, device, reps)))

    def infer() -> object:
        return predict(model, test, schedule, batch, device, rasterizer, show_progress=False)

    stages.append(
        Stage(
            "inference",
            "image",
            len(test),
            _timed_runs(infer, device, reps),
            note=f"schedule {config.infer.schedule} (early stopping on: weight dependent)",
        )
    )

    # Training (last: it changes the model).
    train_set = CropSet.concat([labelled, pool])
    cfg = dataclasses.replace(config.train, steps=fs.mstep_steps)
    trainer = NeMoTrainer(model, cfg, device, rasterizer, seed=config.seed)

    def steps(n: int) -> None:
        for _ in range(n):
            trainer.train_step(train_set, trainer.sample_batch(len(train_set)))

    steps(args.train_warmup)
    runs = _timed_runs(lambda: steps(args.train_steps), device, reps, warmup=0)
    stages.append(
        Stage(
            "train",
            "step",
            args.train_steps,
            runs,
            note=f"batch {cfg.batch_size}, {args.train_warmup} warm-up steps",
        )
    )

    _project(stages, sizes, len(views))
    return {
        "recipe": args.recipe,
        "overrides": args.set,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "category": category,
        "measured_round": measured_round,
        "measured": {
            "anchors": len(anchors),
            "views": len(views),
            "timed_images": n_img,
            "pool_targets": n_pool,
            "test_images": len(test),
            "feature_map": [int(x) for x in pool_feats.shape[1:]],
        },
        "default_run": dataclasses.asdict(sizes),
        "stages": [s.to_dict() for s in stages],
        "projected_total_s": sum(sum(s.projected_s()) for s in stages if s.counted),
        "rasterizer": rasterizer.name,
    }


def _project(stages: Sequence[Stage], sizes: RunSizes, measured_views: int) -> None:
    """Fill every stage's units per round of the default run."""
    rounds = range(sizes.rounds + 1)
    for s in stages:
        if s.name == "crop":
            s.per_round = [
                sizes.labelled + sizes.pool + sizes.test if k == 0 else 0 for k in rounds
            ]
        elif s.name == "extract":
            s.per_round = [sizes.anchors[k] + sizes.pool if k else 0 for k in rounds]
        elif s.name == "synthesis":
            s.per_round = [float(sizes.views[k]) for k in rounds]
        elif s.name.startswith("match"):
            s.per_round = [sizes.pool * sizes.views[k] / measured_views for k in rounds]
        elif s.name in ("pseudo-labels", "flip check"):
            s.per_round = [sizes.pool if k else 0 for k in rounds]
        elif s.name == "refine":
            s.per_round = [float(sizes.accepted[k]) for k in rounds]
        elif s.name == "templates":
            s.per_round = [1.0 for _ in rounds]
        elif s.name == "inference":
            s.per_round = [float(sizes.test) for _ in rounds]
        elif s.name == "train":
            s.per_round = [float(x) for x in sizes.train_steps]


def print_stages(res: dict[str, Any]) -> None:
    """Rich table of the stage timings and the projection."""
    rounds = len(res["default_run"]["train_steps"])
    m = res["measured"]
    table = Table(
        title=(
            f"EM stages (measured: round {res['measured_round']}, {m['anchors']} anchors, "
            f"{m['views']} views, map {m['feature_map']}); projected seconds of the default run"
        )
    )
    table.add_column("stage", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    table.add_column("ms / unit", justify="right")
    for k in range(rounds):
        table.add_column(f"round {k} s", justify="right")
    table.add_column("total s", justify="right")
    for s in res["stages"]:
        name = s["name"] if s["counted"] else f"({s['name']})"
        table.add_row(
            name,
            s["unit"],
            f"{s['ms_per_unit']:.3g}",
            *(f"{x:.1f}" for x in s["projected_s_per_round"]),
            f"{s['projected_s']:.1f}",
        )
    total = [
        sum(s["projected_s_per_round"][k] for s in res["stages"] if s["counted"])
        for k in range(rounds)
    ]
    table.add_row("total", "", "", *(f"{x:.1f}" for x in total), f"{res['projected_total_s']:.1f}")
    console.print(table)
    console.print(
        "(parenthesised rows are not the configured matcher and are left out of the total; "
        f"matching is scaled linearly from {m['views']} views)"
    )


# --------------------------------------------------------------------------------------------
# Part 2: matching throughput on a simulated pool
# --------------------------------------------------------------------------------------------


def simulate_views(
    anchors: int,
    shifts: torch.Tensor,
    dim: int,
    size: tuple[int, int],
    seed: int,
    smooth: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-like synthetic views (module docstring): features (M, D, h, w) per-pixel unit
    vectors (zero off the mask) and masks (M, h, w) bool, M = anchors × S, anchor-major. The
    anchor fields are smooth (bilinear upsampling of a grid ``smooth`` times coarser), so a
    one-cell move keeps most of the correlation, as with real feature maps."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    s = int(shifts.shape[0])
    deg = torch.rad2deg(shifts.float())
    views = torch.zeros(anchors * s, dim, h, w)
    masks = torch.zeros(anchors * s, h, w, dtype=torch.bool)
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w)[None, :]
    for n in range(anchors):
        coarse = torch.randn(1, dim, max(1, h // smooth), max(1, w // smooth), generator=gen)
        base = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        base = F.normalize(base, dim=0)
        box_h = h * (0.4 + 0.3 * float(torch.rand((), generator=gen)))
        box_w = w * (0.45 + 0.4 * float(torch.rand((), generator=gen)))
        cy = h / 2 + h * 0.1 * (2 * float(torch.rand((), generator=gen)) - 1)
        cx = w / 2 + w * 0.1 * (2 * float(torch.rand((), generator=gen)) - 1)
        for j in range(s):
            da, de = float(deg[j, 0]), float(deg[j, 1])
            f = base.roll((round(de / 10), round(da / 10)), dims=(1, 2))
            f = F.normalize(f + 0.3 * torch.randn(dim, h, w, generator=gen) / dim**0.5, dim=0)
            half_w = box_w / 2 * (0.75 + 0.25 * math.cos(2 * math.radians(da)))
            half_h = box_h / 2
            ccy = cy - de / 10
            mask = ((rows - ccy).abs() <= half_h) & ((cols - cx).abs() <= half_w)
            views[n * s + j] = f * mask
            masks[n * s + j] = mask
    return views, masks


def simulate_targets(
    views: torch.Tensor,
    masks: torch.Tensor,
    start: int,
    count: int,
    noise: float,
    seed: int,
    jitter: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets start..start+count−1 of the simulated pool (each chunk from its own seeded
    generator, so a chunk never depends on the others): (count, D, h, w) maps and (count,) the
    index of the view each one copies. A target is its view (features and mask) moved by up to
    ``jitter`` cells in each direction (a pose between grid poses) plus Gaussian noise of
    per-pixel norm ≈ ``noise``, and pure noise off the mask."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
    m, d, h, w = views.shape
    truth = torch.randint(0, m, (count,), generator=gen)
    moves = torch.randint(-jitter, jitter + 1, (count, 2), generator=gen)
    x = torch.randn(count, d, h, w, generator=gen).mul_(noise / d**0.5)
    for dy, dx in torch.unique(moves, dim=0).tolist():
        rows = torch.nonzero((moves[:, 0] == dy) & (moves[:, 1] == dx)).squeeze(1)
        v = truth[rows]
        x[rows] += (views[v] * masks[v][:, None]).roll((dy, dx), dims=(2, 3))
    return x, truth


@dataclass
class IndexRun:
    """Per index type: builds, per-chunk query seconds and recall counters."""

    name: str
    matcher: FaissMatcher | TorchMatcher
    build_s: list[float] = field(default_factory=list)
    built: Any = None
    chunk_s: list[float] = field(default_factory=list)
    chunk_n: list[int] = field(default_factory=list)
    hit1: int = 0
    hit10: float = 0.0
    anchor1: int = 0

    def query(
        self, views: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor, k: int
    ) -> torch.Tensor:
        if isinstance(self.matcher, TorchMatcher):
            return self.matcher.search(views, masks, targets, k)[1]
        return self.matcher.query(self.built, targets, k)[1]

    def to_dict(self, pool: int) -> dict[str, Any]:
        rates = [n / s for n, s in zip(self.chunk_n, self.chunk_s, strict=True)]
        seen = sum(self.chunk_n)
        rate = statistics.median(rates) if rates else math.nan
        cfg = (
            {"matcher": "torch"}
            if isinstance(self.matcher, TorchMatcher)
            else {
                "index_type": self.matcher.index_type,
                "nlist": self.matcher.nlist if self.matcher.index_type == "ivf" else None,
                "nprobe": self.matcher.nprobe if self.matcher.index_type == "ivf" else None,
                "pca_dim": self.matcher.pca_dim,
                "shortlist": self.matcher.shortlist if self.matcher.pca_dim else None,
            }
        )
        return {
            "name": self.name,
            **cfg,
            "build_ms": 1000 * statistics.median(self.build_s) if self.build_s else 0.0,
            "targets_per_s": rate,
            "query_s_total": sum(self.chunk_s),
            "projected_pool_s": pool / rate if rates else math.nan,
            "recall_at_1": self.hit1 / seen if seen else math.nan,
            "recall_at_10": self.hit10 / seen if seen else math.nan,
            "anchor_at_1": self.anchor1 / seen if seen else math.nan,
            "targets": seen,
        }


def bench_index(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2 (module docstring): flat vs IVF (vs PCA) throughput and recall, streamed pool."""
    if not faiss_available():
        raise SystemExit("--index needs faiss (pip install faiss-cpu)")
    config = load_config(args.recipe, [*args.set, f"device={args.device}"])
    fs = config.fewshot
    dim = args.dim or config.model.feature_dim
    if config.data.crop_size is None:
        raise SystemExit("--index needs data.crop_size in the recipe (or -s data.crop_size=...)")
    size = (config.data.crop_size[0] // STRIDE, config.data.crop_size[1] // STRIDE)
    anchors = args.anchors or config.labels.annotations or 7
    shifts = round_shifts(fs, args.round)
    rss_start = peak_rss_mb()
    views, masks = simulate_views(anchors, shifts, dim, size, args.seed)
    m = views.shape[0]
    n_shifts = int(shifts.shape[0])
    nlist = args.nlist or max(1, round(math.sqrt(m)))
    k = args.k
    if m < k:
        raise SystemExit(f"{m} views < k = {k}")
    chunk = args.chunk
    runs = [IndexRun("flat", FaissMatcher("flat", query_batch=chunk))]
    runs += [
        IndexRun(f"ivf{nlist} p{p}", FaissMatcher("ivf", nlist, p, query_batch=chunk))
        for p in args.nprobe
    ]
    for q in args.pca_dims:
        runs.append(IndexRun(f"flat pca{q}", FaissMatcher("flat", pca_dim=q, query_batch=chunk)))
        p = max(args.nprobe)
        runs.append(
            IndexRun(
                f"ivf{nlist} p{p} pca{q}",
                FaissMatcher("ivf", nlist, p, pca_dim=q, query_batch=chunk),
            )
        )
    if not args.no_torch:
        runs.append(IndexRun("torch (exact)", TorchMatcher()))
    for r in runs:
        if isinstance(r.matcher, FaissMatcher):
            for _ in range(max(1, min(3, args.repeats))):
                start = time.perf_counter()
                r.built = r.matcher.build(views, masks)
                r.build_s.append(time.perf_counter() - start)
    full_gb = args.pool * dim * size[0] * size[1] * 4 / 1e9
    console.print(
        f"index: pool {args.pool} streamed in chunks of {chunk}, D {dim}, map {size}, "
        f"M = {anchors} x {shifts.shape[0]} = {m} views, nlist {nlist}, k {k}; "
        f"holding the pool would take {full_gb:.1f} GB"
    )
    start_all = time.perf_counter()
    gen_s = 0.0
    rss_first = math.nan
    for c0 in range(0, args.pool, chunk):
        n = min(chunk, args.pool - c0)
        t0 = time.perf_counter()
        targets, truth = simulate_targets(
            views, masks, c0, n, args.target_noise, args.seed, args.jitter
        )
        gen_s += time.perf_counter() - t0
        exact: torch.Tensor | None = None
        for r in runs:
            t0 = time.perf_counter()
            with torch.no_grad():
                idx = r.query(views, masks, targets, k)
            r.chunk_s.append(time.perf_counter() - t0)
            r.chunk_n.append(n)
            if exact is None:  # runs[0] is the exact flat index
                exact = idx
            r.hit1 += int((idx[:, 0] == exact[:, 0]).sum())
            r.hit10 += float((idx[:, :, None] == exact[:, None, :]).any(-1).float().mean(1).sum())
            r.anchor1 += int(((idx[:, 0] // n_shifts) == (truth // n_shifts)).sum())
        del targets, truth
        if c0 == 0:
            rss_first = peak_rss_mb()
        if (c0 // chunk) % 50 == 49:
            console.print(f"  {c0 + n}/{args.pool} targets, peak RSS {peak_rss_mb():.0f} MiB")
    return {
        "pool": args.pool,
        "chunk": chunk,
        "dim": dim,
        "feature_map": list(size),
        "encoded_dim": int(runs[0].built.views.features[0].numel()),
        "anchors": anchors,
        "round": args.round,
        "views": m,
        "nlist": nlist,
        "k": k,
        "target_noise": args.target_noise,
        "jitter_cells": args.jitter,
        "score": "linear (clutter=None)",
        "seed": args.seed,
        "results": [r.to_dict(args.pool) for r in runs],
        "generate_s_total": gen_s,
        "wall_s": time.perf_counter() - start_all,
        "peak_rss_mb_before": rss_start,
        "peak_rss_mb_after_first_chunk": rss_first,
        "peak_rss_mb": peak_rss_mb(),
        "pool_in_memory_gb": full_gb,
        "faiss_threads": _faiss_threads(),
    }


def _faiss_threads() -> int | None:
    try:
        import faiss
    except ImportError:
        return None
    return int(faiss.omp_get_max_threads())


def print_index(res: dict[str, Any]) -> None:
    """Rich table of the index comparison."""
    table = Table(
        title=(
            f"matching {res['pool']} simulated targets x {res['views']} views "
            f"(D {res['dim']}, map {res['feature_map']}, {res['score']})"
        )
    )
    for col in ("index", "build ms", "targets/s", "pool s", "R@1", "R@10", "anchor@1"):
        if col == "index":
            table.add_column(col, no_wrap=True)
        else:
            table.add_column(col, justify="right")
    for r in res["results"]:
        table.add_row(
            r["name"],
            f"{r['build_ms']:.1f}" if r.get("index_type") else "-",
            f"{r['targets_per_s']:.0f}",
            f"{r['projected_pool_s']:.1f}",
            f"{r['recall_at_1']:.3f}",
            f"{r['recall_at_10']:.3f}",
            f"{r['anchor_at_1']:.3f}",
        )
    console.print(table)
    console.print(
        f"peak RSS {res['peak_rss_mb']:.0f} MiB (before the index part "
        f"{res['peak_rss_mb_before']:.0f} MiB, after the first chunk "
        f"{res['peak_rss_mb_after_first_chunk']:.0f} MiB; the whole pool would be "
        f"{res['pool_in_memory_gb']:.1f} GB); target generation {res['generate_s_total']:.1f} s "
        f"(not in targets/s); wall {res['wall_s']:.1f} s"
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stages", action="store_true", help="part 1: EM stage timings")
    ap.add_argument("--index", action="store_true", help="part 2: matching at pool scale")
    ap.add_argument("--quick", action="store_true", help="smoke check: " + str(QUICK))
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", type=torch_device, default="cpu")
    ap.add_argument("--checkpoint", type=Path, default=None, help="NeMoModel checkpoint")
    pos, nonneg = positive_int, non_negative_int  # argparse types: >= 1, >= 0
    ap.add_argument("--repeats", type=pos, default=5)
    ap.add_argument("--round", type=pos, default=1, help="EM round whose sizes are measured")
    ap.add_argument("--images", type=pos, default=64, help="images timed per-image stages use")
    ap.add_argument("--train-steps", type=pos, default=10, help="training steps per timed run")
    ap.add_argument("--train-warmup", type=nonneg, default=2)
    ap.add_argument("--pool", type=pos, default=100_000, help="simulated targets (--index)")
    ap.add_argument("--chunk", type=pos, default=256, help="targets per streamed chunk")
    ap.add_argument(
        "--anchors", type=nonneg, default=0, help="index anchors (0: labels.annotations)"
    )
    ap.add_argument("--dim", type=nonneg, default=0, help="feature channels (0: model.feature_dim)")
    ap.add_argument("--nlist", type=nonneg, default=0, help="IVF lists (0: round(sqrt(M)))")
    ap.add_argument("--nprobe", type=pos, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pca-dims", type=pos, nargs="*", default=[64])
    ap.add_argument("--k", type=pos, default=10)
    ap.add_argument(
        "--target-noise", type=non_negative_float, default=3.0, help="per-pixel noise norm"
    )
    ap.add_argument(
        "--jitter", type=nonneg, default=1, help="max target offset from its view, cells"
    )
    ap.add_argument("--no-torch", action="store_true", help="skip TorchMatcher in --index")
    ap.add_argument("--seed", type=nonneg, default=0)
    ap.add_argument(
        "--threads", type=nonneg, default=0, help="torch/faiss CPU threads (0: default)"
    )
    ap.add_argument("--json", "--out", dest="json", type=Path, default=None, help="write here")
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        ap.error(f"argument --checkpoint: no checkpoint file {str(args.checkpoint)!r}")
    if not args.stages and not args.index:
        args.stages = args.index = True
    malloc_kept = keep_freed_memory()  # as the `nvsm` command does at start-up
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)

    console.print(
        f"device {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, faiss threads {_faiss_threads()}), "
        f"torch {torch.__version__}"
    )
    out: dict[str, Any] = {
        "meta": {
            "argv": sys.argv,
            "quick": args.quick,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "malloc_keep_freed_memory": malloc_kept,
            "faiss_threads": _faiss_threads(),
            "repeats": args.repeats,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "cpu": platform.processor() or platform.machine(),
        }
    }
    if args.stages:
        out["stages"] = bench_stages(args)
        print_stages(out["stages"])
    if args.index:
        out["index"] = bench_index(args)
        print_index(out["index"])
    if args.json is not None:
        atomic_write_json(args.json, out)
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
