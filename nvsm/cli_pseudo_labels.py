"""``nvsm pseudo-labels``: export and inspect the pseudo-labels of a few-shot run folder
(mounted by ``nvsm/cli.py``; the work is done by ``nvsm.fewshot.report``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from nvsm.runtime import exit_with_error, path_option, path_parser

app = typer.Typer(
    help="""Export a few-shot run's pseudo-labels (CSV, JSON lines) or inspect them (HTML).

    The report is one self-contained file that opens offline.

    Examples:
        nvsm pseudo-labels export runs/nvsm7 --format csv --out labels.csv
        nvsm pseudo-labels inspect runs/nvsm7
    """,
    no_args_is_help=True,
    add_completion=False,
)
#: Messages go to stderr so that ``export`` without --out writes only the labels to stdout.
console = Console(stderr=True)

RunArg = Annotated[
    Path,
    typer.Argument(help="Run folder written by 'nvsm fewshot --out RUN'.", show_default=False,
                   parser=path_parser(console, "RUN")),
]


class ExportFormat(StrEnum):
    """Formats of ``nvsm pseudo-labels export``."""

    csv = "csv"
    jsonl = "jsonl"


def _fail(message: str) -> NoReturn:
    exit_with_error(console, message, 2)  # what it was given cannot be used, as elsewhere


@app.command()
def export(
    run: RunArg,
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="csv (the columns of pseudo_labels.csv) or jsonl."),
    ],
    round_index: Annotated[
        int | None,
        typer.Option(
            "--round", "-k", min=0, help="EM round (default: the last one with pseudo-labels)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file (default: stdout).",
                     **path_option(console, "--out")),
    ] = None,
    accepted_only: Annotated[
        bool, typer.Option("--accepted-only", help="Only the labels the round accepted.")
    ] = False,
) -> None:
    """Write one round's pseudo-labels as CSV or JSON lines (angles in radians).

    The labels are read from RUN/round_<k>/pseudo_labels.jsonl; the CSV has the columns of
    RUN/round_<k>/pseudo_labels.csv. --out is written atomically.

    Examples:
        nvsm pseudo-labels export runs/nvsm7 --format csv --out labels.csv
        nvsm pseudo-labels export runs/nvsm7 --round 1 --format jsonl --accepted-only
    """
    from nvsm.fewshot.report import export_labels
    from nvsm.io import atomic_write_text, check_output_folder

    if out is not None and out.resolve().is_relative_to(run.resolve()):
        # An export onto round_<k>/pseudo_labels.jsonl replaced the round's own record.
        _fail(f"--out {out} lies inside the run folder {run}; write the export elsewhere")
    try:
        if out is not None:
            check_output_folder(out.parent)  # under a file, it failed as "File exists"
        k, n, text = export_labels(run, round_index, fmt.value, accepted_only)
    except ValueError as exc:  # RunFolderError is one
        _fail(str(exc))
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    which = "accepted pseudo-labels" if accepted_only else "pseudo-labels"
    console.print(f"round {k}: {n} {which} → {escape(str(out))}", soft_wrap=True)


@app.command()
def inspect(
    run: RunArg,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="HTML file (default RUN/pseudo_labels_report.html).",
                     **path_option(console, "--out")),
    ] = None,
    per_round: Annotated[
        int, typer.Option("--per-round", "-n", min=1, help="Thumbnails per round's contact sheet.")
    ] = 48,
) -> None:
    """Write a single offline HTML report of a run's pseudo-labels (images inlined).

    Per round: a contact sheet of unlabelled crops (up to --per-round, by score, rejected ones
    in red) with the cuboid drawn at the pseudo-labelled pose, captioned with the score and the
    pose error; score histograms of accepted vs rejected labels; azimuth/elevation coverage.
    Once: accepted pseudo-label and test accuracy per round (from the rounds' metrics.json).
    The crops and their ground truth are rebuilt from the run's config.json (diagnostics only);
    if the data set cannot be loaded the report has no contact sheets and says why.

    Examples:
        nvsm pseudo-labels inspect runs/nvsm7
        nvsm pseudo-labels inspect runs/nvsm7 --per-round 24 --out nvsm7-labels.html
    """
    from nvsm.fewshot.report import REPORT_NAME, RunFolderError, round_folders, write_report
    from nvsm.io import check_output_folder

    target = out or run / REPORT_NAME
    try:  # the run, then the output, before the crops are rebuilt, not in the final write
        round_folders(run)
        resolved, run_dir = target.resolve(), run.resolve()
        if resolved.is_relative_to(run_dir) and not (
            resolved.parent == run_dir and resolved.suffix.lower() in (".html", ".htm")
        ):
            # --out round_2/pseudo_labels.jsonl replaced the round's record with the report.
            raise ValueError(f"--out {out} would overwrite the run's own records; inside the "
                             f"run folder only an .html file directly in {run} is written")
        check_output_folder(target.parent)
        if target.is_dir():
            raise ValueError(f"cannot write {target}: it is a folder; name an HTML file")
    except ValueError as exc:  # RunFolderError is one
        _fail(str(exc))
    try:
        summary = write_report(run, out, per_round)
    except RunFolderError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror or exc}")
    if summary.note:
        console.print(f"[yellow]warning:[/yellow] {escape(summary.note)}", soft_wrap=True)
    console.print(
        f"rounds {', '.join(map(str, summary.rounds))}: {summary.size / 1e6:.2f} MB → "
        f"{escape(str(summary.path))}",
        soft_wrap=True,
    )
