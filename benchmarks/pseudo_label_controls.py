"""What bounds NVSM's M-step: retrain one EM round on controlled labels (diagnostics only).

For EM round k of a few-shot run, the round's M-step is repeated from the model it started
from (``RUN/round_<k-1>``, or ``RUN/round_0`` with ``fewshot.mstep_init=restart``), with the
round's seed and ``fewshot.mstep_steps``, on the labels plus the images the round accepted,
each time with other poses on those images:

* ``pseudo``: their pseudo-labels (what the loop trained on; reproduces the round's model);
* ``flips_fixed``: the pseudo-labels with every ~180° flip (error > 150° against the hidden
  ground truth) replaced by the ground truth, all other pseudo-labels kept;
* ``true``: the ground truth of the same images;
* ``true_random``: the ground truth of as many pool images drawn at random (seeded), so the
  round's *selection* can be told apart from its labels' errors.

All variants keep the pseudo-labels' confidence weights (``true_random``: weight 1). Each model
is scored on the run's test split (``gt-normalized`` crops, fast schedule, failures = 180°).
This reads the unlabelled images' ground truth on purpose: it is a diagnostic of the loop,
never part of it.

Usage:
    python benchmarks/pseudo_label_controls.py runs/nvsm7 --round 2 [--variants pseudo true]
        [--levels 0] [--json controls.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _cli import positive_int, run_main

from nvsm.config import config_from_dict
from nvsm.fewshot.loop import prepare_fewshot_data, round_seed, train_steps
from nvsm.fewshot.pseudo_labels import FLIP_ERROR_DEG, read_pseudo_labels
from nvsm.infer.evaluate import predict, resolve_schedule, score
from nvsm.io import atomic_write_json
from nvsm.pipeline import resolve_device
from nvsm.pose.metrics import pose_errors, summarize_errors
from nvsm.render import get_rasterizer
from nvsm.runtime import keep_freed_memory
from nvsm.train.cropset import CropSet
from nvsm.train.model import NeMoModel

VARIANTS = ("pseudo", "flips_fixed", "true", "true_random")


def control_poses(
    variant: str, pseudo: torch.Tensor, truth: torch.Tensor, error_deg: np.ndarray
) -> torch.Tensor:
    """(n, 4) training poses of the accepted images for a variant (not ``true_random``)."""
    if variant == "pseudo":
        return pseudo
    if variant == "true":
        return truth
    if variant == "flips_fixed":
        flipped = torch.as_tensor(error_deg > FLIP_ERROR_DEG)
        return torch.where(flipped[:, None], truth, pseudo)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=positive_int, default=1, help="EM round k >= 1 to repeat")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--levels", type=int, nargs="+", choices=range(4), default=[0])
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    keep_freed_memory()
    folder = args.run / f"round_{args.round}"
    for name in ("pseudo_labels.jsonl", "config.json"):
        if args.round < 1 or not (folder / name).is_file():
            raise SystemExit(f"{folder}: no {name} (a complete EM round k >= 1 is needed)")
    config = config_from_dict(json.loads((folder / "config.json").read_text()), str(folder))
    start = args.run / (
        "round_0" if config.fewshot.mstep_init == "restart" else f"round_{args.round - 1}"
    )
    if not (start / "model.pt").is_file():
        raise SystemExit(
            f"{start / 'model.pt'}: missing (the checkpoint round {args.round} started from)"
        )
    config.fewshot.occlusion_levels = list(args.levels)
    device = resolve_device(config.device)
    rasterizer = get_rasterizer(config.model.rasterizer, device)
    data = prepare_fewshot_data(config)
    pool = data.unlabelled
    row = {uid: i for i, uid in enumerate(pool.uids)}
    accepted = [lb for lb in read_pseudo_labels(folder / "pseudo_labels.jsonl") if lb.accepted]
    missing = sorted(lb.uid for lb in accepted if lb.uid not in row)
    if missing:
        raise SystemExit(
            f"{folder / 'pseudo_labels.jsonl'}: uids not in the run's unlabelled pool "
            f"(a different data set?): {missing[:5]}"
        )
    index = [row[lb.uid] for lb in accepted]
    pseudo = torch.tensor(
        [[lb.azimuth, lb.elevation, lb.theta, lb.distance] for lb in accepted], dtype=torch.float64
    )
    weights = torch.tensor([lb.weight for lb in accepted], dtype=torch.float32)
    truth = pool.poses[index].to(torch.float64)
    error = np.degrees(pose_errors([tuple(p[:3]) for p in pseudo.numpy()], truth[:, :3].numpy()))
    seed = round_seed(config.seed, args.round)
    out: dict[str, Any] = {
        "run": str(args.run),
        "round": args.round,
        "accepted": len(accepted),
        "accepted_flips": int((error > FLIP_ERROR_DEG).sum()),
        "accepted_acc_pi_6": summarize_errors(np.radians(error)).acc_pi_6,
        "protocol": config.data.crop_protocol,
        "variants": {},
    }
    print(
        f"{folder}: {len(accepted)} accepted pseudo-labels, {out['accepted_flips']} flipped; "
        f"M-step from {start.name}, {config.fewshot.mstep_steps} steps, seed {seed}"
    )
    for variant in args.variants:
        if variant == "true_random":
            rng = np.random.default_rng(seed)
            pick = sorted(rng.choice(len(pool), size=len(index), replace=False).tolist())
            images = pool.subset(pick)
            images = images.with_poses(images.poses, torch.ones(len(pick)))
        else:
            poses = control_poses(variant, pseudo, truth, error)
            images = pool.subset(index).with_poses(poses, weights)
        model, _ = NeMoModel.load(start / "model.pt")
        model = model.to(device)
        began = time.perf_counter()
        train_steps(
            model, CropSet.concat([data.labelled, images]), config.train,
            config.fewshot.mstep_steps, seed, device, rasterizer, variant,
        )  # fmt: skip
        seconds = time.perf_counter() - began
        preds = predict(
            model, data.test, resolve_schedule(config.infer.schedule), config.infer.batch_size,
            device, rasterizer, show_progress=False,
        )  # fmt: skip
        pooled = score(data.test, preds)["pooled"]
        out["variants"][variant] = {"train_seconds": seconds, "test": pooled}
        cells = ", ".join(
            f"L{lv[1:]} {100 * m['acc_pi_6']:.1f} / {100 * m['acc_pi_18']:.1f} / "
            f"{m['median_error_deg']:.1f}°"
            for lv, m in sorted(pooled.items())
        )
        print(f"{variant:12s} {cells}", flush=True)
    if args.json is not None:
        atomic_write_json(args.json, out)


if __name__ == "__main__":
    run_main(main)
