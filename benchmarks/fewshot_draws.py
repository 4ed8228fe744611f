"""Few-shot accuracy over several anchor draws: mean and spread of every row of `nvsm fewshot`.

Runs (or, with the run folders already complete, only reads) ``nvsm fewshot`` once per anchor
draw (``--seed`` = the draw; the seed also seeds training) for the given anchor strategy, then
prints and writes per row (nemo, nemo_same_steps, self_training, nvsm, oracle) and occlusion
level the mean, the standard deviation and the min–max of Acc@π/6, Acc@π/18 and the median
error, the accuracy of the last round's accepted pseudo-labels and its flip share, and the gain
of nvsm over nemo and over self_training (per draw, then averaged).

Usage:
    python benchmarks/fewshot_draws.py --seeds 0 1 2 --anchors stratified --out runs/draws
    python benchmarks/fewshot_draws.py --seeds 0 1 2 --anchors random --out runs/draws \\
        -- -s fewshot.rounds=3        # everything after -- goes to nvsm fewshot
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _cli import non_negative_int, positive_int, run_command, run_main

from nvsm.fewshot.loop import ROWS
from nvsm.io import atomic_write_json

KEYS = ("acc_pi_6", "acc_pi_18", "median_error_deg")


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean/std/min/max over draws of every row, level and key, plus the per-draw gains."""
    first = next(iter(runs.values()))
    out: dict[str, Any] = {"seeds": sorted(runs), "rows": {}, "gains": {}, "pseudo_labels": {}}
    for row in ROWS:
        if not all(row in m for m in runs.values()):
            continue
        out["rows"][row] = {
            lv: {k: _stats([m[row][lv][k] for m in runs.values()]) for k in KEYS}
            for lv in first[row]
        }
    for base in ("nemo", "nemo_same_steps", "self_training"):
        if base not in out["rows"]:
            continue
        out["gains"][f"nvsm-{base}"] = {
            lv: {
                k: _stats([m["nvsm"][lv][k] - m[base][lv][k] for m in runs.values()])
                for k in ("acc_pi_6", "acc_pi_18")
            }
            for lv in first["nvsm"]
        }
    for name, key in (("nvsm", "rounds"), ("self_training", "self_training_rounds")):
        last = [m[key][-1]["pseudo_labels"] for m in runs.values() if m.get(key)]
        if last:
            out["pseudo_labels"][name] = {
                "accepted": _stats([float(p["accepted"]) for p in last]),
                **{
                    k: _stats([p["refined"][k] for p in last])
                    for k in ("acc_pi_6", "acc_pi_18", "flip_share")
                },
            }
    return out


def fewshot_args(args: argparse.Namespace, seed: int, folder: Path, extra: list[str]) -> list[str]:
    """The ``nvsm`` arguments of one draw: ``extra`` is what followed ``--``; ``--resume`` when
    ``folder`` holds a started run (an interrupted draw goes on)."""
    started = folder.is_dir() and any(folder.iterdir())
    return [
        "fewshot", "--annotations", str(args.annotations), "--anchors", args.anchors,
        "--seed", str(seed), "--out", str(folder), *(["--resume"] if started else []), *extra,
    ]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--anchors", choices=("stratified", "random"), default="stratified")
    parser.add_argument("--annotations", type=positive_int, default=7)
    parser.add_argument("--out", type=Path, default=Path("runs/draws"))
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the ``nvsm fewshot`` arguments after ``--``)."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def main() -> None:
    own, extra = split_argv(sys.argv[1:])
    args = build_parser().parse_args(own)

    runs = {}
    for seed in args.seeds:
        folder = args.out / f"{args.anchors}-{args.annotations}-seed{seed}"
        if not (folder / "metrics.json").is_file():
            cmd = [sys.executable, "-m", "nvsm.cli", *fewshot_args(args, seed, folder, extra)]
            print(" ".join(cmd), flush=True)
            run_command(cmd)
        runs[seed] = json.loads((folder / "metrics.json").read_text())
    summary = {"anchors": args.anchors, "annotations": args.annotations, **summarize(runs)}
    atomic_write_json(args.out / f"summary-{args.anchors}-{args.annotations}.json", summary)
    print(f"{args.anchors} anchors, {args.annotations} labels, seeds {args.seeds}")
    for row, levels in summary["rows"].items():
        for lv, m in levels.items():
            cells = "  ".join(
                f"{k} {m[k]['mean'] * (1 if k == 'median_error_deg' else 100):.1f}"
                f"±{m[k]['std'] * (1 if k == 'median_error_deg' else 100):.1f}"
                for k in KEYS
            )
            print(f"{row:16s} {lv}  {cells}")
    for name, levels in summary["gains"].items():
        for lv, m in levels.items():
            print(
                f"gain {name:22s} {lv}  Acc@π/6 {100 * m['acc_pi_6']['mean']:+.1f}"
                f"±{100 * m['acc_pi_6']['std']:.1f}  Acc@π/18 {100 * m['acc_pi_18']['mean']:+.1f}"
                f"±{100 * m['acc_pi_18']['std']:.1f}"
            )
    for name, p in summary["pseudo_labels"].items():
        print(
            f"{name} last-round accepted PLs: {p['accepted']['mean']:.0f}, "
            f"Acc@π/6 {100 * p['acc_pi_6']['mean']:.1f}, "
            f"Acc@π/18 {100 * p['acc_pi_18']['mean']:.1f}, "
            f"flips {100 * p['flip_share']['mean']:.1f}%"
        )


if __name__ == "__main__":
    run_main(main)
