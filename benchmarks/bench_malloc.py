"""Training-step cost with glibc's default malloc vs ``nvsm.runtime.keep_freed_memory``.

Each measurement is a fresh child process (the malloc setting is process-wide): it crops the
recipe's labelled images plus ``--images`` pool images, builds an untrained model, runs
``--warmup`` training steps and then times ``--steps`` ``NeMoTrainer.train_step`` calls. The
two settings alternate ``--repeats`` times (so drifting machine load hits both alike); the table
reports medians of seconds per step, minor page faults and system CPU seconds of the timed
steps (``resource.getrusage``), and the child's peak RSS, plus the per-repeat speed-up ratio.

Usage:
    python benchmarks/bench_malloc.py [--repeats 5] [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time
from typing import Any

from _cli import add_alternation_args, alternate_children, non_negative_int, positive_int, run_main
from rich.console import Console
from rich.table import Table

MODES = ("default", "keep")


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (``mode`` ``keep`` applies ``keep_freed_memory`` first)."""
    applied = False
    if mode == "keep":
        from nvsm.runtime import keep_freed_memory

        applied = keep_freed_memory()
    import torch

    from nvsm.config import load_config
    from nvsm.fewshot.loop import prepare_fewshot_data
    from nvsm.render import get_rasterizer
    from nvsm.train.cropset import CropSet
    from nvsm.train.model import build_model
    from nvsm.train.trainer import NeMoTrainer

    config = load_config(args.recipe, ["device=cpu"])
    config = dataclasses.replace(
        config, fewshot=dataclasses.replace(config.fewshot, unlabelled_limit=args.images)
    )
    data = prepare_fewshot_data(config)
    device = torch.device("cpu")
    torch.manual_seed(config.seed)
    model = build_model(config, data.meshes).to(device)
    train_set = CropSet.concat([data.labelled, data.unlabelled])
    trainer = NeMoTrainer(
        model, config.train, device, get_rasterizer("auto", device), seed=config.seed
    )
    for _ in range(args.warmup):
        trainer.train_step(train_set, trainer.sample_batch(len(train_set)))
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(train_set, trainer.sample_batch(len(train_set)))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "mode": mode,
        "applied": applied,
        "s_per_step": seconds / args.steps,
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / args.steps,
        "peak_rss_gb": after.ru_maxrss / 1024**2,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="synthetic-car-7shot")
    ap.add_argument(
        "--images", type=positive_int, default=64, help="pool crops added to the labels"
    )
    ap.add_argument("--steps", type=positive_int, default=30)
    ap.add_argument("--warmup", type=non_negative_int, default=3)
    add_alternation_args(ap, MODES, repeats=5)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    runs = alternate_children(
        __file__, args, MODES, child,
        ["--recipe", args.recipe, "--images", str(args.images), "--steps", str(args.steps),
         "--warmup", str(args.warmup)],
        lambda r: f"{r['s_per_step']:.3f} s/step",
    )
    if runs is None:
        return
    console = Console()
    if not runs["keep"][0]["applied"]:
        console.print("[yellow]keep_freed_memory() was not applied here (not glibc, or MALLOC_* "
                      "/ GLIBC_TUNABLES set): both columns measure the same setting[/yellow]")
    table = Table(title=f"{args.steps} training steps, batch of the recipe, median of "
                        f"{args.repeats} alternating child processes")
    for col in ("malloc", "s / step", "minor faults / step", "system s / step", "peak RSS GB"):
        table.add_column(col, justify="right")
    for mode in MODES:
        med = {k: statistics.median(r[k] for r in runs[mode])
               for k in ("s_per_step", "minor_faults_per_step", "system_s_per_step",
                         "peak_rss_gb")}
        table.add_row(mode, f"{med['s_per_step']:.3f}", f"{med['minor_faults_per_step']:.0f}",
                      f"{med['system_s_per_step']:.3f}", f"{med['peak_rss_gb']:.2f}")
    console.print(table)
    ratios = [d["s_per_step"] / k["s_per_step"] for d, k in zip(runs["default"], runs["keep"],
                                                                 strict=True)]
    console.print(f"speed-up default/keep per repeat: {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"median {statistics.median(ratios):.2f}")
    if args.json:
        from pathlib import Path

        from nvsm.io import atomic_write_json

        atomic_write_json(Path(args.json), {"args": vars(args), "runs": runs, "ratios": ratios})


if __name__ == "__main__":
    run_main(main)
