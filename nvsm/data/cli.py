"""``nvsm data``: dataset checks and few-shot split lists (mounted by ``nvsm/cli.py``)."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nvsm.data.datasets import DATASET_NAMES, DatasetName, train_test_records
from nvsm.data.errors import DataFormatError
from nvsm.data.kitti import KITTI_N_FOLDS, KITTI_TEST_FOLD
from nvsm.data.matlab import ReadResult
from nvsm.data.splits import (
    FEW_SHOT_LADDER,
    SPLIT_STRATEGIES,
    Strategy,
    few_shot_splits,
    write_few_shot_splits,
)
from nvsm.data.synth import synth_command
from nvsm.data.verify import check_dataset_root, verify_dataset
from nvsm.io import check_output_folder
from nvsm.runtime import check_option, exit_with_error, path_option

app = typer.Typer(
    help="""Datasets: verify a local copy, write few-shot split lists, render the synthetic set.

    `verify` checks a copy against its manifest in data_manifests/.

    Examples:
        nvsm data verify --dataset pascal3d --root /data/PASCAL3D+_release1.1
        nvsm data split -d pascal3d -r /data/PASCAL3D+_release1.1 -n 7 --out splits/p3d
        nvsm data synth --out data/synthetic --tiny
    """,
    no_args_is_help=True,
    add_completion=False,
)
app.command("synth")(synth_command)
_path = partial(path_option, Console())


def _unique(categories: list[str] | None) -> list[str] | None:
    """The categories asked for, each once (a repeated one would be read, and split, twice)."""
    return list(dict.fromkeys(categories)) if categories else None


_NAMES = ", ".join(DATASET_NAMES)


@app.command()
def verify(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=f"One of: {_NAMES}.")],
    root: Annotated[Path, typer.Option("--root", "-r", help="Root folder of the local copy.",
                                       **_path("--root"))],
    category: Annotated[list[str] | None, typer.Option(
        "--category", "-c", help="Only these categories (repeatable).")] = None,
    decode: Annotated[bool, typer.Option(
        "--decode/--no-decode", help="Fully decode every image (slow), not headers only.")] = False,
    pascal3d_root: Annotated[Path | None, typer.Option(
        "--pascal3d-root", help="occluded_pascal3d: also check the source annotations.",
        **_path("--pascal3d-root"))] = None,
    limit: Annotated[int, typer.Option(
        "--limit", min=0, help="Rows shown in the table (all are counted).")] = 200,
) -> None:
    """Check a local dataset copy against data_manifests/<dataset>.yaml; list EVERY problem.

    Exit code 1 if the copy has problems; 2 if --root does not exist or is a file.

    Example:

        nvsm data verify --dataset pascal3d --root /data/PASCAL3D+_release1.1
    """
    console = Console()
    check_option(console, "--dataset", dataset, DatasetName)
    try:
        problems = verify_dataset(dataset, root, categories=_unique(category),
                                  decode_images=decode, pascal3d_root=pascal3d_root)
    except NotADirectoryError as exc:
        exit_with_error(console, f"cannot verify {dataset}: {exc}", 2)
    if not problems:
        console.print(f"[green]{dataset}: {escape(str(root))} matches the manifest[/green]")
        return
    # Paths are escaped: rich would read a "[...]" in them as markup and drop it.
    table = Table(title=f"{dataset}: {len(problems)} problem(s) in {escape(str(root))}")
    for col in ("kind", "path", "field", "message"):
        table.add_column(col, overflow="fold")
    for p in problems[:limit]:
        table.add_row(p.kind, escape(str(p.path)), escape(p.field or ""), escape(p.message))
    console.print(table)
    if len(problems) > limit:
        console.print(f"... and {len(problems) - limit} more (raise --limit to see them)")
    raise typer.Exit(code=1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def split(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=f"One of: {_NAMES}.")],
    root: Annotated[Path, typer.Option("--root", "-r", help="Root folder of the dataset.",
                                       **_path("--root"))],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.", **_path("--out"))],
    annotations: Annotated[list[str] | None, typer.Option(
        "--annotations", "-n", help="Labelled-set sizes: '--annotations 7 20 50' or '7,20,50' "
        f"(repeatable; default {','.join(map(str, FEW_SHOT_LADDER))}).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the PCG64 stream.")] = 0,
    strategy: Annotated[str, typer.Option(
        "--strategy", help=f"One of: {', '.join(SPLIT_STRATEGIES)}.")] = "stratified",
    category: Annotated[list[str] | None, typer.Option(
        "--category", "-c", help="Only these categories (repeatable).")] = None,
    test_fold: Annotated[int, typer.Option(
        "--test-fold",
        help=f"KITTI: frames with number mod {KITTI_N_FOLDS} == this are the test set.",
    )] = KITTI_TEST_FOLD,
    independent: Annotated[bool, typer.Option(
        "--independent", help="Draw each N independently instead of nested (7 in 20 in 50).")
    ] = False,
) -> None:
    r"""Write deterministic few-shot labelled/unlabelled/test lists (ids '<image_id>:<object>').

    Writes <out>/<category>/n<N>_<strategy>_seed<S>/{labelled,unlabelled,test}.txt and
    split.json (counts and azimuth coverage of the labelled set), atomically.

    Example:

        nvsm data split --dataset pascal3d --root /data/PASCAL3D+_release1.1 \
            --annotations 7 20 50 --seed 0 --strategy stratified --out splits/pascal3d
    """
    console = Console()
    check_option(console, "--dataset", dataset, DatasetName)
    check_option(console, "--strategy", strategy, Strategy)
    given = annotations or [",".join(map(str, FEW_SHOT_LADDER))]
    tokens = [t for part in [*given, *ctx.args] for t in re.split(r"[,\s]+", part) if t]
    try:
        sizes = sorted({int(t) for t in tokens})
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        exit_with_error(console, f"--annotations: expected positive integers, got "
                        f"{' '.join(tokens) or 'none'}", 2)
    try:
        check_output_folder(out)  # before reading the dataset, not at the first write
    except ValueError as exc:
        exit_with_error(console, str(exc), 2)
    # Checked here: the readers would only report the first file they miss under it.
    try:
        check_dataset_root(root)
    except NotADirectoryError as exc:
        exit_with_error(console, f"cannot split {dataset}: {exc}", 2)
    try:
        train, test = train_test_records(dataset, root, _unique(category), test_fold=test_fold)
    except DataFormatError as exc:
        exit_with_error(console, f"{exc}\nRun 'nvsm data verify --dataset {dataset} --root "
                        f"{root}' to list every problem.", 2)
    except ValueError as exc:  # a request the dataset cannot serve (test fold, test-only set)
        exit_with_error(console, f"cannot split {dataset}: {exc}", 2)
    # Writing nothing (or nothing for a requested category) must not look like success.
    found = {r.category for r in train.records}
    missing = sorted(set(category or ()) - found)
    if not found or missing:
        what = ", ".join(missing) if missing else "any category"
        exit_with_error(console, f"cannot split {dataset}: no training records of {what} in "
                        f"{root}", 2)
    try:
        splits = few_shot_splits(train.records, test.records, sizes,
                                 strategy, seed, nested=not independent,  # type: ignore[arg-type]
                                 setting="--annotations")
        ordered = [sp for _, sp in sorted(splits.items())]
        folders = write_few_shot_splits(ordered, out, dataset)
    except ValueError as exc:
        exit_with_error(console, f"cannot split {dataset}: {exc}", 2)
    table = Table(title=f"{dataset} few-shot splits (seed {seed}, {strategy})")
    for col in ("category", "N", "labelled", "unlabelled", "test", "azimuth bins covered (of 8)",
                "max gap °"):
        table.add_column(col)
    # Folded, relative to --out (printed whole below): a narrow terminal cut the full paths
    # in the table to "splits/…".
    table.add_column("folder", overflow="fold")
    for sp, folder in zip(ordered, folders, strict=True):
        table.add_row(sp.category, str(sp.n_labelled), str(len(sp.labelled)),
                      str(len(sp.unlabelled)), str(len(sp.test)), str(sp.coverage.covered_bins),
                      f"{sp.coverage.max_gap_deg:.0f}", escape(str(folder.relative_to(out))))
    console.print(table)
    console.print(f"lists written under {out} (the folder column is relative to it)",
                  markup=False, soft_wrap=True)
    for side, result in (("training", train), ("test", test)):
        _report_skipped(console, side, result)


def _report_skipped(console: Console, side: str, result: ReadResult) -> None:
    """One line each for the skipped objects and the skipped whole images, with reasons."""
    for what, whole_image in (("objects", False), ("images", True)):
        kept = ReadResult(skipped=[s for s in result.skipped
                                   if (s.object_index is None) == whole_image])
        if kept.skipped:
            console.print(f"{len(kept.skipped)} {side} {what} skipped: "
                          + ", ".join(f"{n} x {r}" for r, n in sorted(kept.skip_reasons().items())))
