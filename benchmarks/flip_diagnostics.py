"""Does the flip margin keep ~180° flips out of the accepted pseudo-labels? (diagnostics only)

For every EM round of the given few-shot runs (NVSM and self-training), compares the accepted
pseudo-labels (ranked by score and flip margin together, ``fewshot.accept_rank_with_flip``) with
the counterfactual acceptance the same rule would make ranking by the match score alone (same
top fraction), against the hidden ground truth of the unlabelled images: how many of each set are
flipped (rotation error > 150°) and their Acc@π/6. Labels outside the accepted set carry their
raw matched pose (accepted ones are refined), which does not change whether a pose is a ~180°
flip. Also prints the ROC AUC of the score and of the flip margin for telling flips apart, and
per 45° bin of the hidden ground-truth azimuth (centred on 0° = the front, 180° = the back): how
many pool images the bin holds, how many of them are matched within 30° and how many flipped, and
how many are accepted and accepted flipped (where the flips come from, and which views the
acceptance leaves out).

Usage:
    python benchmarks/flip_diagnostics.py runs/draws/stratified-7-seed0 [RUN ...] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from _cli import run_main
from sklearn.metrics import roc_auc_score

from nvsm.config import config_from_dict
from nvsm.data.splits import azimuth_bins
from nvsm.fewshot.loop import acceptance_schedule
from nvsm.fewshot.pseudo_labels import FLIP_ERROR_DEG, read_pseudo_labels
from nvsm.io import atomic_write_json
from nvsm.pipeline import load_splits
from nvsm.pose.metrics import PI_6, pose_errors

#: Bins of the hidden ground-truth azimuth in the per-bin breakdown (45° wide, centred on 0°).
AZIMUTH_BINS = 8


def round_stats(folder: Path, gt: dict[str, tuple[float, float, float]], rule: Any) -> dict:
    labels = read_pseudo_labels(folder / "pseudo_labels.jsonl")
    poses = np.array([[lb.azimuth, lb.elevation, lb.theta] for lb in labels])
    truth = np.array([gt[lb.uid] for lb in labels])
    err = np.degrees(pose_errors([tuple(p) for p in poses], truth))
    flip = err > FLIP_ERROR_DEG
    correct = err < np.degrees(PI_6)  # Acc@π/6's test, on errors in degrees
    used = np.array([lb.accepted for lb in labels])
    score_only = dataclasses.replace(rule, rank_with_flip=False).accept(labels)
    score = np.array([lb.score for lb in labels])
    margin = np.nan_to_num(np.array([lb.flip_score for lb in labels]), nan=-np.inf)
    ok = np.isfinite(score)

    def share(mask: np.ndarray) -> dict[str, float]:
        return {
            "n": int(mask.sum()),
            "flips": int((mask & flip).sum()),
            "flip_share": float(flip[mask].mean()) if mask.any() else float("nan"),
            "acc_pi_6": float(correct[mask].mean()) if mask.any() else float("nan"),
        }

    both = flip[ok].any() and (~flip[ok]).any()
    bins = azimuth_bins(truth[:, 0], AZIMUTH_BINS)

    def bin_counts(b: int) -> dict[str, float]:
        m = bins == b
        return {
            "azimuth_deg": 360.0 * b / AZIMUTH_BINS,
            "n": int(m.sum()),
            "matched_ok": int((m & correct).sum()),
            "matched_flipped": int((m & flip).sum()),
            "accepted": int((m & used).sum()),
            "accepted_flipped": int((m & used & flip).sum()),
        }

    return {
        "accepted": share(used),
        "score_only": share(score_only),
        "pool_flip_share": float(flip.mean()),
        "auc_score": float(roc_auc_score(~flip[ok], score[ok])) if both else float("nan"),
        "auc_flip_margin": float(roc_auc_score(~flip[ok], margin[ok])) if both else float("nan"),
        "by_true_azimuth": [bin_counts(b) for b in range(AZIMUTH_BINS)],
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    for run_dir in args.runs:
        if not (run_dir / "round_0" / "config.json").is_file():
            parser.error(
                f"argument runs: {str(run_dir)!r} is not a few-shot run folder "
                "(expected RUN/round_0/config.json, as `nvsm fewshot --out RUN` writes)"
            )
    out: dict[str, Any] = {}
    gt: dict[str, tuple[float, float, float]] | None = None
    for run in args.runs:
        config = config_from_dict(json.loads((run / "round_0" / "config.json").read_text()))
        if gt is None:  # every run here reads the same dataset
            records = load_splits(config, (0,)).train
            gt = {r.uid: (r.azimuth, r.elevation, r.theta) for r in records}
        schedule = acceptance_schedule(config.fewshot)
        for method, root in (("nvsm", run), ("self_training", run / "self_training")):
            for k in range(1, config.fewshot.rounds + 1):
                folder = root / f"round_{k}"
                if not (folder / "pseudo_labels.jsonl").is_file():
                    continue
                stats = round_stats(folder, gt, schedule.rule(k - 1))
                out[f"{run.name}/{method}/round_{k}"] = stats
                a, s = stats["accepted"], stats["score_only"]
                print(
                    f"{run.name:24s} {method:13s} r{k}: accepted {a['n']:3d}, flips "
                    f"{a['flips']:2d} ({100 * a['flip_share']:.1f} %) | score-only ranking: flips "
                    f"{s['flips']:2d} ({100 * s['flip_share']:.1f} %) | pool flips "
                    f"{100 * stats['pool_flip_share']:.1f} % | AUC score "
                    f"{stats['auc_score']:.2f}, flip margin {stats['auc_flip_margin']:.2f}"
                )
                print(
                    "    per true azimuth (n: ok / flipped matched, accepted / flipped): "
                    + ", ".join(
                        f"{b['azimuth_deg']:.0f}° {b['n']}: {b['matched_ok']}/"
                        f"{b['matched_flipped']}, {b['accepted']}/{b['accepted_flipped']}"
                        for b in stats["by_true_azimuth"]
                    )
                )
    if args.json:
        atomic_write_json(args.json, out)


if __name__ == "__main__":
    run_main(main)
