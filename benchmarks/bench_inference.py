"""Inference speed and accuracy: nvsm's ``fast`` schedule against ``--schedule reference``.

Both schedules run in the same process on the same checkpoint and the same test crops, so the
ratio is measured under identical conditions. Templates are rendered once per model and
schedule (timed separately, as ``templates_once_s``); per-image time is the median over repeated
runs of the whole test set (backbone features + template scoring + refinement) divided by the
number of images.

Usage:
    python benchmarks/bench_inference.py --model runs/sup/model.pt [--images 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _cli import positive_int, run_main

from nvsm.infer.evaluate import predict, resolve_schedule, score
from nvsm.pipeline import cropsets, load_splits, resolve_device
from nvsm.render import get_rasterizer
from nvsm.train.model import NeMoModel


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=positive_int, default=150, help="test crops used")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"argument --model: no checkpoint file {str(args.model)!r}")

    model, _ = NeMoModel.load(args.model)
    config = model.config
    device = resolve_device(config.device)
    model = model.to(device)
    splits = load_splits(config, (0,))
    data = cropsets(config, splits.test[0], "cropping")
    n = min(args.images, len(data))
    data = data.subset(torch.arange(n))
    rasterizer = get_rasterizer(config.model.rasterizer, device)
    results: dict[str, Any] = {}
    for name in ("fast", "reference"):
        schedule = resolve_schedule(name)
        start = time.perf_counter()  # first call renders and caches this schedule's templates
        predict(model, data.subset(torch.arange(1)), schedule, 1, device, rasterizer,
                show_progress=False)
        templates_once = time.perf_counter() - start
        times, metrics = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            preds = predict(model, data, schedule, args.batch_size, device, rasterizer,
                            show_progress=False)
            times.append((time.perf_counter() - start) / n)
            metrics = score(data, preds)
        assert metrics is not None
        l0 = metrics["pooled"]["L0"]
        results[name] = {
            "ms_per_image_median": 1000 * statistics.median(times),
            "templates_once_s": templates_once,
            "ms_per_image_runs": [1000 * t for t in times],
            "acc_pi_6": l0["acc_pi_6"],
            "acc_pi_18": l0["acc_pi_18"],
            "median_error_deg": l0["median_error_deg"],
            "n": l0["n"],
        }
    fast, ref = results["fast"], results["reference"]
    results["speedup"] = ref["ms_per_image_median"] / fast["ms_per_image_median"]
    results["acc_pi_6_gap_points"] = 100 * (ref["acc_pi_6"] - fast["acc_pi_6"])
    results["device"] = str(device)
    results["threads"] = torch.get_num_threads()
    print(f"{'schedule':<10} {'ms/img':>9} {'Acc@pi/6':>9} {'Acc@pi/18':>10} {'MedErr':>7}"
          f" {'templates':>10}  n")
    for name in ("fast", "reference"):
        r = results[name]
        print(f"{name:<10} {r['ms_per_image_median']:9.1f} {100 * r['acc_pi_6']:9.1f} "
              f"{100 * r['acc_pi_18']:10.1f} {r['median_error_deg']:7.2f}"
              f" {r['templates_once_s']:9.2f}s  {r['n']}")
    print(f"speed-up {results['speedup']:.1f}x, Acc@pi/6 gap {results['acc_pi_6_gap_points']:.1f}"
          " points (reference - fast)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_main(main)
