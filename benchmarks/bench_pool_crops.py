"""Memory and time of a large unlabelled pool's crops held in memory vs on disk
(``nvsm.train.cropset.crop_storage``, ``build_cropset(on_disk=...)``; nvsm keeps every data
set's crops on disk), and as nvsm held them before 2026-12-07 (``copied``: in memory, and
every subset, concatenation and mirror a new tensor, as ``CropSet`` made them then).

Each mode runs in a fresh child process and goes through what the few-shot loop does with the
pool's crops, on ``--images`` crops of the recipe's crop size (random pixels: no cropping, so
the disk is measured and not the JPEG decoder):

* ``fill``: write every crop once, 256 at a time (``build_cropset`` cropping);
* ``extract``: read them in order, ``--batch`` at a time, as float (the E-step's features);
* ``m-step``: the training set of an EM round, the 7 labels (in memory) and a random half of
  the pool, its mirror appended (the next E-step's anchors), then ``--steps`` random batches
  read as float (training).

Reported per mode: seconds of each phase, and the process's private (anonymous) resident
memory, the largest of its values at the start and at the end of each phase (``RssAnon`` of
``/proc/self/status``), which crops on disk leave out: their pages are the file's, which the
kernel may drop again. The modes alternate ``--repeats`` times; medians. Linux only (``/proc``).

Usage:
    python benchmarks/bench_pool_crops.py [--images 20000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from _cli import add_alternation_args, alternate_children, positive_int, run_main
from rich.console import Console
from rich.table import Table

MODES = ("copied", "memory", "disk")
PHASES = ("fill", "extract", "m-step")


def _rss_anon_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("/proc/self/status has no RssAnon line")


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement of ``mode`` in this process."""
    import torch

    from nvsm.config import load_config
    from nvsm.train.cropset import CropImages, crop_size_for, crop_storage

    data = load_config(args.recipe).data
    size = data.crop_hw() or crop_size_for(data.categories[0], data.crop_scale)
    g = torch.Generator().manual_seed(0)
    seconds: dict[str, float] = {}
    anon = [_rss_anon_gb()]

    start = time.perf_counter()
    storage = crop_storage(args.images, size, on_disk=mode == "disk")
    for first in range(0, args.images, 256):
        rows = min(256, args.images - first)
        storage[first : first + rows] = torch.randint(0, 256, (rows, 3, *size),
                                                      dtype=torch.uint8, generator=g)
    pool = CropImages.of(storage)
    seconds["fill"] = time.perf_counter() - start
    anon.append(_rss_anon_gb())

    start = time.perf_counter()
    total = 0.0
    for first in range(0, len(pool), args.batch):
        total += float(pool[first : first + args.batch].float().mean())
    seconds["extract"] = time.perf_counter() - start
    anon.append(_rss_anon_gb())

    start = time.perf_counter()
    labels = torch.zeros(7, 3, *size, dtype=torch.uint8)
    accepted = torch.randperm(len(pool), generator=g)[: len(pool) // 2]
    train: CropImages | torch.Tensor
    if mode == "copied":
        train = torch.cat([labels, storage[accepted]])
        train = torch.cat([train, train.flip(-1)])
    else:
        train = CropImages.concat([CropImages.of(labels), pool.subset(accepted)])
        train = CropImages.concat([train, train.mirrored()])
    for _ in range(args.steps):
        batch = torch.randint(0, len(train), (args.batch,), generator=g)
        total += float(train[batch].float().mean())
    seconds["m-step"] = time.perf_counter() - start
    anon.append(_rss_anon_gb())
    return {"mode": mode, "seconds": seconds, "peak_rss_anon_gb": max(anon),
            "crops_gb": args.images * 3 * size[0] * size[1] / 1024**3, "check": total}


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="synthetic-car-7shot", help="gives the crop size")
    ap.add_argument("--images", type=positive_int, default=20000, help="crops in the pool")
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--steps", type=positive_int, default=500, help="M-step batches read")
    add_alternation_args(ap, MODES, repeats=3)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    runs = alternate_children(
        __file__, args, MODES, child,
        ["--recipe", args.recipe, "--images", str(args.images), "--batch", str(args.batch),
         "--steps", str(args.steps)],
        lambda r: f"anon {r['peak_rss_anon_gb']:.2f} GB, "
        + ", ".join(f"{p} {r['seconds'][p]:.2f} s" for p in PHASES),
    )
    if runs is None:
        return
    console = Console()
    crops_gb = runs["memory"][0]["crops_gb"]
    table = Table(title=f"{args.images} pool crops ({crops_gb:.2f} GB), median of "
                        f"{args.repeats} alternating child processes")
    for col in ("crops", *(f"{p} s" for p in PHASES), "peak private memory GB"):
        table.add_column(col, justify="right")
    for mode in MODES:
        row = [statistics.median(r["seconds"][p] for r in runs[mode]) for p in PHASES]
        anon = statistics.median(r["peak_rss_anon_gb"] for r in runs[mode])
        table.add_row(mode, *(f"{x:.2f}" for x in row), f"{anon:.2f}")
    console.print(table)
    for phase in PHASES:
        for mode in ("copied", "disk"):
            ratios = [r["seconds"][phase] / m["seconds"][phase]
                      for r, m in zip(runs[mode], runs["memory"], strict=True)]
            console.print(f"{phase}: {mode} / memory time per repeat "
                          f"{', '.join(f'{x:.2f}' for x in ratios)}; median "
                          f"{statistics.median(ratios):.2f}")
    if args.json:
        from nvsm.io import atomic_write_json

        atomic_write_json(Path(args.json), {"args": vars(args), "runs": runs})


if __name__ == "__main__":
    run_main(main)
