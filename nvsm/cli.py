"""The ``nvsm`` command line: every command is a thin shell over the library."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nvsm.cli_pseudo_labels import app as pseudo_labels_app
from nvsm.config import RunConfig
from nvsm.data.cli import app as data_app
from nvsm.runtime import (
    check_option,
    exit_interrupted,
    exit_with_error,
    flow_help,
    interruption,
    keep_freed_memory,
    path_option,
    path_parser,
    raise_on_sigterm,
)

app = typer.Typer(
    help="""nvsm: few-shot category-level 3D pose (Neural View Synthesis and Matching on NeMo).

    Examples:
        nvsm fewshot --annotations 7
        nvsm fewshot --tiny --with-oracle --out /tmp/smoke
        nvsm train --recipe synthetic-car-supervised --out runs/sup
        nvsm evaluate --model runs/sup/model.pt
        nvsm recipes list
        nvsm COMMAND --help
    """,
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data_app, name="data")
recipes_app = typer.Typer(
    help="""List and show the named recipes in recipes/.

    Examples:
        nvsm recipes list
        nvsm recipes show synthetic-car-7shot -s fewshot.rounds=3
    """,
    no_args_is_help=True,
)
app.add_typer(recipes_app, name="recipes")
app.add_typer(pseudo_labels_app, name="pseudo-labels")
console = Console()
_path = partial(path_option, console)


@app.callback()
def _startup(ctx: typer.Context) -> None:
    # Before any command allocates: see keep_freed_memory for the page-fault cost it removes.
    keep_freed_memory()
    raise_on_sigterm()  # a `kill` cleans up as Ctrl-C does
    # Only `train` and `fewshot` share their work among torchrun's processes; any other
    # command would run in full once per process, every copy writing the same files.
    world = os.environ.get("WORLD_SIZE", "1")
    if ctx.invoked_subcommand not in (None, "train", "fewshot") and world != "1":
        _fail(
            f"nvsm {ctx.invoked_subcommand} runs in one process, but torchrun started "
            f"{world} (WORLD_SIZE={world}): launch it without torchrun (only nvsm train and "
            "nvsm fewshot run on several processes)"
        )


RecipeOpt = Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe name or YAML path.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. -s train.steps=200."),
]


def _fail(message: str) -> NoReturn:
    exit_with_error(console, message, 2)


def _interrupted(exc: KeyboardInterrupt, folder: Path, kept: str) -> NoReturn:
    """Ctrl-C or SIGTERM (``exc``) in a long command: say what is kept and how to go on; exit
    with ``interruption``'s code (it exited 130 without a word)."""
    word, code = interruption(exc)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        raise typer.Exit(code)
    if (folder / "run_info.json").is_file():
        message = (f"{word}: {folder} keeps {kept}; run the same command again with "
                   "--resume to go on from there")
    else:
        message = f"{word} before the run folder was written"
    exit_with_error(console, message, code)


def _config(
    recipe: str | None,
    overrides: list[str] | None,
    options: dict[str, tuple[str, object]] | None = None,
) -> RunConfig:
    """The recipe with ``overrides``, then the settings of command-line ``options``
    (``_option_overrides``); a bad value's error names the option."""
    from nvsm.config import ConfigError, load_config

    extra, given = _option_overrides(options or {})
    try:
        return load_config(recipe, [*(overrides or []), *extra])
    except ConfigError as exc:
        _fail(_name_option(str(exc), given))


def _yaml_value(value: object) -> str:
    """``value`` written so that the override's YAML reads it back exactly as typed: a number
    or true/false as itself, anything else as a string (a path "2024" was read as a number, and
    a "#" in one began a comment). Strings go through YAML's own double-quoted style, escapes
    and all: JSON's \\u escapes split a character beyond U+FFFF (an emoji) into two halves,
    which YAML read as two lone surrogates, and YAML takes U+0085 and U+2028 as line breaks."""
    if isinstance(value, int | float):
        return json.dumps(value)
    return yaml.safe_dump(str(value), default_style='"', allow_unicode=False,
                          width=sys.maxsize).rstrip("\n")


def _option_overrides(
    options: dict[str, tuple[str, object]],
) -> tuple[list[str], dict[str, str]]:
    """The ``key=value`` overrides that command-line options stand for (``options``: config
    key → (option, its value or None when not given)), and config key → option of those given.
    A value is taken as typed (``_yaml_value``)."""
    given = {key: option for key, (option, value) in options.items() if value is not None}
    extra = [f"{key}={_yaml_value(value)}"
             for key, (_, value) in options.items() if value is not None]
    return extra, given


def _name_option(message: str, options: dict[str, str]) -> str:
    """``message`` naming the command-line option (``options``: config key → option) whose
    setting it is about: it said "overrides.fewshot.rounds: ..." for --rounds 0."""
    for key, option in options.items():
        if message.startswith(f"overrides.{key}:"):
            named = option if option == f"--{key}" else f"{option} ({key})"
            return f"{named}{message.removeprefix(f'overrides.{key}')}"
    return message


#: Help of ``--schedule`` (evaluate, infer): it stands for ``-s infer.schedule=NAME``, so that
#: the config recorded with the results names the schedule that gave them.
_SCHEDULE_HELP = "Inference schedule: fast | reference (default: the checkpoint's infer.schedule)."


def _run_dir(out: Path | None, prefix: str) -> Path:
    if out is not None:
        return out
    return Path("runs") / f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


@app.command()
def info() -> None:
    """Show versions, the git commit and the rendering backends available here.

    Example:
        nvsm info
    """
    from nvsm.io import git_commit, package_versions
    from nvsm.render import default_rasterizer, pytorch3d_available

    table = Table(title="nvsm environment")
    table.add_column("item")
    table.add_column("value")
    for name, version in package_versions().items():
        table.add_row(name, str(version))
    table.add_row("git commit", str(git_commit()))
    table.add_row("pytorch3d rasteriser", "available" if pytorch3d_available() else "missing")
    table.add_row("default rasteriser (cpu)", default_rasterizer("cpu").name)
    console.print(table)


@recipes_app.command("list")
def recipes_list() -> None:
    """List the named recipes.

    Example:
        nvsm recipes list
    """
    from nvsm.config import ConfigError, list_recipes

    try:
        recipes = list_recipes()
    except ConfigError as exc:
        _fail(str(exc))
        return
    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("description")
    for name, text in recipes.items():
        table.add_row(name, text)
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    overrides: SetOpt = None,
) -> None:
    """Print a recipe fully resolved (defaults ← recipe ← overrides) as YAML.

    Example:
        nvsm recipes show synthetic-car-7labels -s train.steps=100
    """
    from nvsm.config import config_to_dict

    typer.echo(yaml.safe_dump(config_to_dict(_config(name, overrides)), sort_keys=False))


@app.command()
def train(
    recipe: RecipeOpt = "synthetic-car-supervised",
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default runs/train-<time>).", **_path("--out")),
    ] = None,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN/model.pt.")] = False,
    evaluate: Annotated[bool, typer.Option(help="Evaluate on the test split after.")] = True,
    backbone_weights: Annotated[  # a string: a Path made "" the working directory
        str | None,
        typer.Option(metavar="PATH",
                     help="Local ImageNet state dict for the backbone (torchvision format)."),
    ] = None,
) -> None:
    """Train a NeMo model (backbone + neural mesh features); checkpoint at RUN/model.pt.

    With no dataset root the built-in synthetic dataset is used (generated on first use).

    Examples:
        nvsm train --recipe synthetic-car-supervised --out runs/sup
        nvsm train -r synthetic-car-7labels -s train.steps=200 -s labels.anchors=random
        nvsm train -r synthetic-car-supervised -s data.dataset=pascal3d -s data.root=/data/P3D
        nvsm train -s model.backbone=resnet50-unet --backbone-weights resnet50-imagenet.pth
    """
    from nvsm.pipeline import train_and_evaluate
    from nvsm.train.distributed import PeerFailed

    cfg = _config(recipe, overrides,
                  {"model.backbone_weights": ("--backbone-weights", backbone_weights)})
    folder = _run_dir(out, "train")
    try:
        metrics = train_and_evaluate(cfg, folder, resume=resume, evaluate=evaluate)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except PeerFailed as exc:  # the failed process printed the cause: one line here too
        exit_with_error(console, str(exc), 1)
    except KeyboardInterrupt as exc:
        _interrupted(exc, folder, "its last checkpoint, model.pt, if one was saved "
                             "(every train.checkpoint_every steps)")
    if metrics is not None:
        print_metrics_table(metrics, f"{cfg.name}: test")


@app.command()
def evaluate(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint (model.pt).", **_path("--model"))
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for metrics.json (not one holding a metrics.json already).",
                     **_path("--out")),
    ] = None,
    schedule: Annotated[str | None, typer.Option(help=_SCHEDULE_HELP)] = None,
    occlusion_level: Annotated[
        list[int] | None, typer.Option("--occlusion-level", "-l", help="Levels 0..3 (repeat).")
    ] = None,
    overrides: SetOpt = None,
    unseen_azimuth: Annotated[
        bool,
        typer.Option(
            "--unseen-azimuth",
            help="Score only the test images in the unseen azimuth bins (45° bins TFFTTFFT, "
            "T = seen); metrics.json says subset: unseen-azimuth.",
        ),
    ] = False,
) -> None:
    """Evaluate a checkpoint on its dataset's test split: Acc@π/6, Acc@π/18, MedErr, failures.

    The dataset, crop protocol and categories come from the checkpoint's config; override them
    with -s (e.g. -s data.root=/data/PASCAL3D+). Failures count as 180° errors.

    Examples:
        nvsm evaluate --model runs/sup/model.pt
        nvsm evaluate -m runs/sup/model.pt -l 0 -l 1 -l 2 -l 3 --schedule reference --out ev
        nvsm evaluate -m runs/sup/model.pt --unseen-azimuth --out ev-unseen
    """
    from nvsm.pipeline import evaluate_checkpoint

    levels = tuple(occlusion_level or [0])
    if any(lv not in (0, 1, 2, 3) for lv in levels):
        _fail(f"--occlusion-level must be 0..3, got {list(levels)}")
    extra, given = _option_overrides({"infer.schedule": ("--schedule", schedule)})
    try:
        metrics = evaluate_checkpoint(
            model, levels, [*(overrides or []), *extra], out, unseen_azimuth=unseen_azimuth
        )
    except ValueError as exc:
        _fail(_name_option(str(exc), given))
        return
    except KeyboardInterrupt as exc:  # metrics.json is written at the end
        exit_interrupted(console, exc, out)
    subset = " unseen azimuths" if unseen_azimuth else ""
    print_metrics_table(metrics, f"{model}: test{subset} ({metrics['schedule']})")


@app.command()
def infer(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint (model.pt).", **_path("--model"))
    ],
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Image files or folders (their images, not recursive).",
                       parser=path_parser(console, "PATHS")),
    ] = None,
    dataset_split: Annotated[
        str | None,
        typer.Option(help="Without PATHS: the checkpoint dataset's split, test (= val, the "
                     "default) | train."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder, without an earlier inference's outputs (default "
                     "runs/infer-<time>).", **_path("--out")),
    ] = None,
    overlays: Annotated[
        bool, typer.Option("--overlays", help="Also write OUT/overlays/*.png per image.")
    ] = False,
    schedule: Annotated[str | None, typer.Option(help=_SCHEDULE_HELP)] = None,
    category: Annotated[
        str | None,
        typer.Option(help="The images' category (no inference); with a split, keep only it."),
    ] = None,
    infer_category: Annotated[
        bool,
        typer.Option(
            "--infer-category",
            help="With a dataset split: infer the category (lowest-loss mesh) instead of using "
            "the annotation.",
        ),
    ] = False,
    overrides: SetOpt = None,
) -> None:
    """Predict poses and write OUT/predictions.csv and OUT/predictions.jsonl.

    One row per image: image, uid, category (given or inferred: the mesh with the lowest loss),
    azimuth_deg, elevation_deg, theta_deg (DEGREES), distance, score (1 − loss), seconds and
    error (empty, or the failure message with NaN pose). Without PATHS the checkpoint's
    dataset split is used with its crop protocol. Raw images have no annotation: each is
    assumed to hold ONE roughly centred object, cropped with the bbox protocol using the whole
    image as the box (focal length assumed 3000 px, so the distance is relative). --overlays
    draws the cuboid at the predicted pose beside the occlusion heat map (NeMo's outlier map).

    Examples:
        nvsm infer --model runs/sup/model.pt --out preds
        nvsm infer -m runs/sup/model.pt photos/ extra.jpg --overlays --out preds
        nvsm infer -m runs/sup/model.pt --dataset-split val --infer-category --schedule reference
    """
    from nvsm.config import ConfigError
    from nvsm.infer.predict_io import run_inference

    folder = _run_dir(out, "infer")
    extra, given = _option_overrides({"infer.schedule": ("--schedule", schedule)})
    try:
        summary = run_inference(
            model,
            [str(p) for p in paths or []],
            folder,
            dataset_split=dataset_split,
            category=category,
            infer_category=infer_category,
            overlays=overlays,
            overrides=[*(overrides or []), *extra],
        )
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        _fail(_name_option(str(exc), given))
        return
    except KeyboardInterrupt as exc:  # the outputs are written aside, moved into place at the end
        exit_interrupted(console, exc, folder)
    console.print(
        f"{summary['images']} image(s), {summary['failures']} failure(s), category "
        f"{summary['category']}, protocol {summary['protocol']} → {folder}/predictions.csv, "
        f"{folder}/predictions.jsonl"
        + (f", {summary['overlays']} overlay(s) in {folder}/overlays" if overlays else ""),
        markup=False,
        soft_wrap=True,
    )
    for row in summary["failed"]:
        console.print(f"failed: {row['image']} ({row['uid']}): {row['error']}", markup=False,
                      soft_wrap=True)
    if summary["failed"] and len(summary["failed"]) == summary["images"]:
        exit_with_error(console, "no image gave a pose (unreadable, or inference failed); "
                        "their rows say why", 1)


FEWSHOT_DATASETS = ("synthetic", "pascal3d", "kitti")


@app.command()
def fewshot(
    annotations: Annotated[
        int | None, typer.Option(help="Labelled images per category (default: the recipe's).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(help="EM rounds after round 0 (default: the recipe's).")
    ] = None,
    anchors: Annotated[
        str | None,
        typer.Option(help="Anchor choice: stratified (pose-stratified) | random."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the anchor draw and of training.")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="synthetic | pascal3d | kitti: picks the recipe <dataset>-car-7shot "
            "unless --recipe is given."
        ),
    ] = None,
    root: Annotated[  # a string: a Path made "" the working directory
        str | None, typer.Option(metavar="PATH", help="Dataset root on disk (real datasets).")
    ] = None,
    recipe: RecipeOpt = None,
    tiny: Annotated[
        bool,
        typer.Option(
            "--tiny", help="Smoke test: the tiny built-in set and recipe synthetic-car-tiny."
        ),
    ] = False,
    with_oracle: Annotated[
        bool,
        typer.Option("--with-oracle", help="Also train on every training label (oracle row)."),
    ] = False,
    baselines: Annotated[
        bool | None,
        typer.Option(
            "--baselines/--no-baselines",
            help="Run the nemo_same_steps and self_training rows (same budget; default: the "
            "recipe's fewshot.baselines).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default runs/fewshot-<time>).", **_path("--out")),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip the stages already complete in --out.")
    ] = False,
    overrides: SetOpt = None,
) -> None:
    """Few-shot NVSM: NeMo on N labels, then EM rounds of synthesis, matching and retraining.

    Round 0 trains NeMo on the N labels; each EM round synthesises views, matches them to the
    unlabelled images, accepts pseudo-labels and retrains. Prints one table of nemo,
    nemo_same_steps, self_training, nvsm (each round) and oracle per occlusion level.

    Writes RUN/round_<k>/ (model.pt, config.json, metrics.json, pseudo_labels.csv/.jsonl),
    RUN/nemo_same_steps/, RUN/self_training/round_<k>/, RUN/oracle/ and RUN/metrics.json.
    The unlabelled images' poses are used only for pseudo-label diagnostics.

    Examples:
        nvsm fewshot --annotations 7
        nvsm fewshot --annotations 7 --anchors random --seed 1 --out runs/nvsm7-r1
        nvsm fewshot --annotations 7 --rounds 3 --out runs/nvsm7 --resume
        nvsm fewshot --annotations 20 --with-oracle
        nvsm fewshot --tiny --with-oracle --out /tmp/smoke
        nvsm fewshot --dataset pascal3d --root /data/PASCAL3D+_release1.1 \\
            -s data.occluded_root=/data/OccludedPASCAL3D
        nvsm fewshot --dataset kitti --root /data/kitti/object \\
            -s data.cad_root=/data/PASCAL3D+_release1.1
        nvsm fewshot -r synthetic-car-7shot -s fewshot.matcher=faiss -s fewshot.rounds=3
        torchrun --standalone --nproc_per_node 4 -m nvsm.cli fewshot --annotations 7
    """
    from nvsm.data.splits import Strategy
    from nvsm.fewshot.loop import run_fewshot
    from nvsm.train.distributed import PeerFailed

    if dataset is not None:
        check_option(console, "--dataset", dataset, FEWSHOT_DATASETS)
    if anchors is not None:
        check_option(console, "--anchors", anchors, Strategy)
    if tiny and (recipe is not None or dataset not in (None, "synthetic")):
        _fail("--tiny picks its own recipe and dataset (synthetic-car-tiny)")
    name = "synthetic-car-tiny" if tiny else recipe or f"{dataset or 'synthetic'}-car-7shot"
    cfg = _config(name, overrides, {  # config key: (option, its value if given)
        "labels.annotations": ("--annotations", annotations),
        "fewshot.rounds": ("--rounds", rounds),
        "labels.anchors": ("--anchors", anchors),
        "seed": ("--seed", seed),
        "data.dataset": ("--dataset", dataset),  # with --recipe it named no recipe: it was lost
        "data.root": ("--root", root),
        "fewshot.oracle": ("--with-oracle", True if with_oracle else None),
        "fewshot.baselines": ("--baselines/--no-baselines", baselines),  # None: the recipe's
    })
    if cfg.labels.annotations is None:
        _fail("the few-shot loop needs --annotations N (N >= 1)")
    folder = _run_dir(out, "fewshot")
    try:  # a bad config, run folder or dataset fails before the run folder is written
        result = run_fewshot(cfg, folder, resume=resume, log=console.print)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except PeerFailed as exc:
        exit_with_error(console, str(exc), 1)
    except KeyboardInterrupt as exc:
        _interrupted(exc, folder, "every complete stage")
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports, on its run folder
        return
    title = (
        f"{cfg.name}: {cfg.labels.annotations} labels ({cfg.labels.anchors}, seed {cfg.seed}), "
        f"{cfg.data.crop_protocol} test crops"
    )
    print_fewshot_table(result.metrics, f"{title} → {folder}")
    console.print(
        f"pseudo-labels: nvsm pseudo-labels inspect {folder} (an HTML report), "
        f"nvsm pseudo-labels export {folder} --format csv",
        markup=False,
        soft_wrap=True,
    )


def print_fewshot_table(metrics: dict, title: str) -> None:
    """Rich table of every row of a few-shot run (``nvsm.fewshot.loop.ROWS``; nvsm and
    self_training per EM round) per occlusion level."""
    from nvsm.fewshot.loop import ROWS

    table = Table(title=escape(title))  # the title names the run folder: no markup in it
    for col in ("method", "level", "n", "Acc@π/6", "Acc@π/18", "MedErr°", "failures"):
        table.add_column(col)
    rounds = {
        "nvsm": metrics.get("rounds", [])[1:],
        "self_training": metrics.get("self_training_rounds", []),
    }
    for method in ROWS:
        if method not in metrics:
            continue
        per_round = rounds.get(method) or [{"round": None, "test": metrics[method]}]
        for r in per_round:
            label = method if r["round"] is None else f"{method} r{r['round']}"
            for lv, m in r["test"].items():
                table.add_row(
                    label,
                    lv,
                    str(m["n"]),
                    f"{100 * m['acc_pi_6']:.1f}",
                    f"{100 * m['acc_pi_18']:.1f}",
                    f"{m['median_error_deg']:.1f}",
                    str(m["failures"]),
                )
    console.print(table)


def print_metrics_table(metrics: dict, title: str) -> None:
    """Rich table of ``nvsm.infer.evaluate.score`` output."""
    table = Table(title=escape(title))
    for col in ("category", "level", "n", "Acc@π/6", "Acc@π/18", "MedErr°", "failures", "s/img"):
        table.add_column(col)
    rows = [(cat, lv, m) for cat, by in metrics["per_category"].items() for lv, m in by.items()]
    rows += [("mean (weighted)", lv, m) for lv, m in metrics["mean"].items()]
    for cat, lv, m in rows:
        table.add_row(
            cat,
            lv,
            str(m["n"]),
            f"{100 * m['acc_pi_6']:.1f}",
            f"{100 * m['acc_pi_18']:.1f}",
            f"{m['median_error_deg']:.1f}",
            str(m["failures"]),
            f"{m['seconds_per_image']:.3f}" if "seconds_per_image" in m else "",
        )
    console.print(table)
    console.print(
        f"protocol: {metrics.get('protocol', '?')}  ·  "
        f"{metrics['seconds_per_image']:.4f} s per image"
    )


flow_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
