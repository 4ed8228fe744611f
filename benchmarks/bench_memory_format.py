"""NCHW vs NHWC (``model.channels_last``) backbone layout: training-step and feature-extraction
time on the built-in synthetic car data, measured interleaved in one process.

Two models with identical weights (recipe ``synthetic-car-7shot``, ``-s KEY=VALUE`` overrides)
differ only in ``FeatureBackbone.set_memory_format``. Each repetition times, for each layout in
turn, one ``NeMoTrainer.train_step`` (batch ``train.batch_size``, labels + ``--images`` pool
crops) and one no-grad ``backbone`` forward of ``--extract-batch`` pool crops (what
``extract_features`` and inference run). Interleaving puts both layouts under the same machine
load; the ratio NCHW / NHWC is computed per repetition and its median reported, next to the
median seconds of each (after ``--warmup`` untimed repetitions). The two trainers draw the same
batches and augmentations, so the losses are compared too (they agree to float rounding).

Usage:
    python benchmarks/bench_memory_format.py [--repeats 20] [--json out.json] [-s key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _cli import non_negative_int, positive_int, run_main
from rich.console import Console
from rich.table import Table

from nvsm.config import load_config
from nvsm.fewshot.loop import prepare_fewshot_data
from nvsm.io import atomic_write_json, git_commit, package_versions
from nvsm.models import normalize_images
from nvsm.render import get_rasterizer
from nvsm.train.cropset import CropSet
from nvsm.train.model import build_model
from nvsm.train.trainer import NeMoTrainer

LAYOUTS = {"nchw": False, "nhwc": True}


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="synthetic-car-7shot")
    ap.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--images", type=positive_int, default=64, help="pool crops beside the labels")
    ap.add_argument(
        "--extract-batch", type=positive_int, default=32, help="pool crops per backbone forward"
    )
    ap.add_argument("--repeats", type=positive_int, default=20)
    ap.add_argument("--warmup", type=non_negative_int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main() -> None:
    args = build_parser().parse_args()

    config = load_config(args.recipe, [*args.set, "device=cpu"])
    fs = config.fewshot
    data = prepare_fewshot_data(
        dataclasses.replace(config, fewshot=dataclasses.replace(fs, unlabelled_limit=args.images))
    )
    train_set = CropSet.concat([data.labelled, data.unlabelled])
    pool = normalize_images(data.unlabelled.images[: args.extract_batch].float() / 255.0)
    rasterizer = get_rasterizer(config.model.rasterizer, "cpu")
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "extract": []} for n in LAYOUTS}
    losses: dict[str, list[float]] = {n: [] for n in LAYOUTS}
    trainers = {}
    for name, channels_last in LAYOUTS.items():
        cfg = dataclasses.replace(
            config, model=dataclasses.replace(config.model, channels_last=channels_last)
        )
        torch.manual_seed(config.seed)
        model = build_model(cfg, data.meshes)
        trainers[name] = NeMoTrainer(model, cfg.train, "cpu", rasterizer, seed=config.seed)
    for rep in range(args.warmup + args.repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            batch = trainer.sample_batch(len(train_set))
            losses[name].append(trainer.train_step(train_set, batch).loss)
            step_s = time.perf_counter() - start
            backbone = trainer.model.backbone.eval()
            start = time.perf_counter()
            with torch.no_grad():
                backbone(pool)
            extract_s = time.perf_counter() - start
            if rep >= args.warmup:
                times[name]["train"].append(step_s)
                times[name]["extract"].append(extract_s)
    result: dict[str, Any] = {
        "recipe": args.recipe,
        "overrides": args.set,
        "repeats": args.repeats,
        "batch_size": config.train.batch_size,
        "extract_batch": int(pool.shape[0]),  # at most --images (the pool crops there are)
        "crop_size": list(train_set.images.shape[-2:]),
        "threads": torch.get_num_threads(),
        "max_loss_difference": max(
            abs(a - b) for a, b in zip(losses["nchw"], losses["nhwc"], strict=True)
        ),
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    table = Table(title="backbone layout (median s; ratio = median of per-repetition NCHW / NHWC)")
    for col in ("stage", "NCHW s", "NHWC s", "NCHW / NHWC"):
        table.add_column(col)
    for stage in ("train", "extract"):
        a, b = times["nchw"][stage], times["nhwc"][stage]
        row = {
            "nchw_s": statistics.median(a),
            "nhwc_s": statistics.median(b),
            "ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
        }
        result[stage] = row
        table.add_row(stage, f"{row['nchw_s']:.3f}", f"{row['nhwc_s']:.3f}", f"{row['ratio']:.2f}")
    Console().print(table)
    n_steps = len(losses["nchw"])
    print(f"max |loss NCHW - loss NHWC| over {n_steps} steps: {result['max_loss_difference']:.2e}")
    if args.json is not None:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    run_main(main)
