"""Pseudo-label reports of a few-shot run folder (``nvsm pseudo-labels export | inspect``).

A run folder RUN (``nvsm.fewshot.loop.run_fewshot``) holds ``RUN/round_<k>/``; rounds k ≥ 1
have ``pseudo_labels.jsonl`` (the source read here) and ``pseudo_labels.csv``, ``config.json``
and, once complete, ``metrics.json``.

* Export: one round's labels as CSV (``pseudo_labels_csv``, ``CSV_FIELDS``) or JSON lines (the
  round's file format), optionally only the accepted ones.
* Inspect: one self-contained static HTML page (every image an inline base64 data URI, no
  external script, style sheet or link): per round a contact sheet of unlabelled crops with the
  cuboid drawn at the pseudo-labelled pose (``nvsm.infer.overlay.draw_overlay``), score
  histograms of accepted vs rejected labels and azimuth/elevation coverage; once, the accuracy
  per round from the rounds' ``metrics.json``. The crops and their ground-truth poses come from
  ``prepare_fewshot_data`` on the run's ``config.json``: the ground truth is the one the loop
  hides from its decisions, used here for diagnostics only.

Angles are radians in the labels (``PseudoLabel``) and degrees in the report.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from nvsm.config import ConfigError, config_from_dict
from nvsm.data.splits import azimuth_coverage
from nvsm.fewshot.loop import ROUND_FOLDER, FewShotData, prepare_fewshot_data
from nvsm.fewshot.pseudo_labels import (
    PseudoLabel,
    pseudo_labels_csv,
    pseudo_labels_jsonl,
    read_pseudo_labels,
)
from nvsm.infer.overlay import draw_overlay
from nvsm.io import atomic_write_text, read_json_object
from nvsm.mesh import Mesh
from nvsm.pose.metrics import pose_errors

__all__ = [
    "EXPORT_FORMATS",
    "LABELS_FILE",
    "REPORT_NAME",
    "ReportSummary",
    "RunFolderError",
    "accuracy_series",
    "export_labels",
    "format_labels",
    "label_errors_deg",
    "label_files",
    "labels_path",
    "load_labels",
    "load_pool",
    "render_report",
    "round_folders",
    "round_metrics",
    "sheet_selection",
    "thumbnail",
    "write_report",
]

#: The pseudo-label file of a round (the CSV is derived from the same labels).
LABELS_FILE = "pseudo_labels.jsonl"
#: Default file name of the HTML report inside the run folder.
REPORT_NAME = "pseudo_labels_report.html"
#: Export formats of ``format_labels``.
EXPORT_FORMATS = ("csv", "jsonl")
#: Contact-sheet thumbnails: height in pixels, cuboid line width in thumbnail pixels, JPEG
#: quality; share of each sheet reserved for rejected labels (when there are that many).
THUMB_HEIGHT = 96
THUMB_LINE_PX = 1.5
THUMB_QUALITY = 80
REJECTED_SHARE = 0.25
#: Azimuth bins of the coverage histogram (centred on k·360°/bins, as ``azimuth_coverage``).
AZIMUTH_BINS = 24
#: Dots per inch of the matplotlib figures.
FIG_DPI = 72
ACCEPTED_COLOR = "#2ca02c"
REJECTED_COLOR = "#d62728"

class RunFolderError(ValueError):
    """A run folder, round or pseudo-label file that is missing or malformed; the message
    names the path and what was expected."""


# --------------------------------------------------------------------------------------------
# Run folder
# --------------------------------------------------------------------------------------------


def round_folders(run_dir: Path) -> dict[int, Path]:
    """Round index → ``RUN/round_<k>``, in increasing order.

    Raises:
        RunFolderError: ``run_dir`` is missing, not a folder, or has no round folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a folder; expected a few-shot run folder")
    found = {
        int(m.group(1)): p
        for p in run_dir.iterdir()
        if p.is_dir() and (m := ROUND_FOLDER.fullmatch(p.name))
    }
    if not found:
        raise RunFolderError(_not_a_fewshot_run(run_dir))
    return dict(sorted(found.items()))


def _not_a_fewshot_run(run_dir: Path) -> str:
    """Why ``run_dir`` (a folder without round folders) is not a few-shot run folder: a round
    folder itself, an ``nvsm train`` run, or neither."""
    expected = "expected a run folder written by 'nvsm fewshot --out RUN'"
    if m := ROUND_FOLDER.fullmatch(run_dir.name):
        return (f"{run_dir} is one round of a run; give its run folder {run_dir.parent} instead "
                f"('nvsm pseudo-labels export' takes --round {m.group(1)} to export only this "
                "round)")
    if (run_dir / "run_info.json").is_file() and any(
        (run_dir / name).is_file() for name in ("model.pt", "train_summary.json")
    ):
        return f"{run_dir} is an 'nvsm train' run, which has no pseudo-labels; {expected}"
    return f"{run_dir} has no round_<k> folders; {expected}"


def label_files(run_dir: Path) -> dict[int, Path]:
    """Round → ``pseudo_labels.jsonl`` of every round that has one, in increasing order.

    Raises:
        RunFolderError: bad run folder (``round_folders``), no round has pseudo-labels, or an
            EM round that is complete (it has its ``metrics.json``) lacks them: its record is
            damaged, and the loop's ``--resume`` refuses it too (the round was left out without
            a word).
    """
    folders = round_folders(run_dir)
    files = {k: f / LABELS_FILE for k, f in folders.items() if (f / LABELS_FILE).is_file()}
    for k, folder in folders.items():
        if k >= 1 and k not in files and (folder / "metrics.json").is_file():
            raise RunFolderError(
                f"{folder / LABELS_FILE} does not exist, though round {k} is complete (it has "
                "its metrics.json); the round's record is damaged"
            )
    if not files:
        raise RunFolderError(
            f"{run_dir} has no round with {LABELS_FILE} yet (rounds: "
            f"{', '.join(map(str, folders))}; round 0 trains on the labels only)"
        )
    return files


def labels_path(run_dir: Path, round_index: int | None = None) -> tuple[int, Path]:
    """The round and ``pseudo_labels.jsonl`` of ``round_index`` (default: the last round that
    has pseudo-labels).

    Raises:
        RunFolderError: no such round, or it has no pseudo-labels (the message lists the
            rounds that have them).
    """
    files = label_files(run_dir)
    if round_index is None:
        round_index = max(files)
    if round_index in files:
        return round_index, files[round_index]
    folder = Path(run_dir) / f"round_{round_index}"
    missing = (
        f"{folder / LABELS_FILE} does not exist (round 0 has no pseudo-labels; a running round "
        "writes them after its M-step)"
        if folder.is_dir()
        else f"{folder} does not exist"
    )
    raise RunFolderError(f"{missing}; rounds with pseudo-labels: {', '.join(map(str, files))}")


def load_labels(path: Path, round_index: int) -> list[PseudoLabel]:
    """``read_pseudo_labels(path, round_index)`` with errors that name the file and the bad
    line.

    Raises:
        RunFolderError: unreadable file, a line that is not a ``PseudoLabel.to_dict`` object,
            no label at all, or an image labelled twice (the loop writes one label per
            unlabelled image).
    """
    try:
        labels = read_pseudo_labels(path, round_index)
    except OSError as exc:
        raise RunFolderError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise RunFolderError(str(exc)) from exc
    if not labels:
        raise RunFolderError(f"{path}: expected one pseudo-label per unlabelled image, got none")
    seen: set[str] = set()
    for number, lb in enumerate(labels, 1):
        if lb.uid in seen:
            raise RunFolderError(f"{path}: label {number}: image {lb.uid!r} is labelled twice "
                                 "(expected one pseudo-label per unlabelled image)")
        seen.add(lb.uid)
    return labels


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, RunFolderError)


def _check_mapping(path: Path, field: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise RunFolderError(f"{path}: field '{field}': expected a mapping, got "
                             f"{type(value).__name__}")


def round_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Round → its ``metrics.json`` (complete rounds only; a running round has none yet).

    Raises:
        RunFolderError: a file that is not a JSON object, or whose ``pseudo_labels``,
            ``pseudo_labels.refined``, ``test`` or ``test.pooled`` (each optional) is not a
            mapping, or a level of ``test.pooled`` that is not one: the report reads them.
    """
    out = {}
    for k, folder in round_folders(run_dir).items():
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        m = out[k] = _read_json(path)
        for outer, inner in (("pseudo_labels", "refined"), ("test", "pooled")):
            section = m.get(outer, {})
            _check_mapping(path, outer, section)
            _check_mapping(path, f"{outer}.{inner}", section.get(inner, {}))
        for level, value in m.get("test", {}).get("pooled", {}).items():
            _check_mapping(path, f"test.pooled.{level}", value)
    return out


def load_pool(run_dir: Path) -> FewShotData:
    """The run's data split rebuilt from its latest round's ``config.json``
    (``prepare_fewshot_data``): ``.unlabelled`` holds the crops the pseudo-labels refer to,
    with their ground-truth poses, and ``.meshes`` the cuboids.

    Raises:
        RunFolderError: no round has a config.json, or it is not a valid config.
        ValueError, OSError: the dataset cannot be loaded.
    """
    configs = [f / "config.json" for f in round_folders(run_dir).values()]
    configs = [p for p in configs if p.is_file()]
    if not configs:
        raise RunFolderError(f"no round folder of {run_dir} has a config.json yet")
    try:
        config = config_from_dict(_read_json(configs[-1]), str(configs[-1]))
    except ConfigError as exc:
        raise RunFolderError(str(exc)) from exc
    return prepare_fewshot_data(config)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def format_labels(labels: Sequence[PseudoLabel], fmt: str, accepted_only: bool = False) -> str:
    """The labels (optionally only the accepted ones) as ``csv`` or ``jsonl`` text."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected {' | '.join(EXPORT_FORMATS)}")
    chosen = [lb for lb in labels if lb.accepted] if accepted_only else list(labels)
    return pseudo_labels_csv(chosen) if fmt == "csv" else pseudo_labels_jsonl(chosen)


def export_labels(
    run_dir: Path, round_index: int | None, fmt: str, accepted_only: bool = False
) -> tuple[int, int, str]:
    """Round, number of labels written and the text of one round's export."""
    k, path = labels_path(run_dir, round_index)
    labels = load_labels(path, k)
    n = sum(lb.accepted for lb in labels) if accepted_only else len(labels)
    return k, n, format_labels(labels, fmt, accepted_only)


# --------------------------------------------------------------------------------------------
# Pure parts of the report
# --------------------------------------------------------------------------------------------


def _score_key(lb: PseudoLabel) -> float:
    return -math.inf if math.isnan(lb.score) else lb.score


def _spread(ranked: Sequence[int], m: int) -> list[int]:
    """``m`` items of ``ranked`` at evenly spaced ranks (first and last included)."""
    if m <= 0:
        return []
    return [ranked[int(i)] for i in np.linspace(0, len(ranked) - 1, m).round()]


def sheet_selection(
    labels: Sequence[PseudoLabel], n: int, rejected_share: float = REJECTED_SHARE
) -> list[int]:
    """Indices of up to ``n`` labels for a contact sheet, by score descending.

    ⌈rejected_share·n⌉ slots go to rejected labels (fewer when there are fewer; unused slots of
    either group go to the other); each group is sampled at evenly spaced score ranks so the
    sheet spans its whole score range, borderline labels included.
    """
    order = sorted(range(len(labels)), key=lambda i: -_score_key(labels[i]))
    acc = [i for i in order if labels[i].accepted]
    rej = [i for i in order if not labels[i].accepted]
    n_rej = min(len(rej), math.ceil(rejected_share * n))
    n_acc = min(len(acc), n - n_rej)
    n_rej = min(len(rej), n - n_acc)
    rank = {i: r for r, i in enumerate(order)}
    return sorted(_spread(acc, n_acc) + _spread(rej, n_rej), key=rank.__getitem__)


def label_errors_deg(labels: Sequence[PseudoLabel], ground_truth: torch.Tensor) -> np.ndarray:
    """Rotation error (degrees) of each label against (N, ≥3) ground-truth poses (radians);
    NaN where the ground truth is not finite."""
    gt = ground_truth[:, :3].double().numpy().reshape(-1, 3)
    err = np.degrees(pose_errors([(lb.azimuth, lb.elevation, lb.theta) for lb in labels], gt))
    return np.where(np.isfinite(gt).all(1), err, np.nan)


def accuracy_series(metrics: dict[int, dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Name → (rounds, values in [0, 1]) of the accuracy-per-round plot: the accepted (refined)
    pseudo-labels' Acc@π/6 and Acc@π/18 against the hidden ground truth, and the test Acc@π/6
    per occlusion level; non-finite values (no ground truth) and empty series are dropped."""
    series: dict[str, tuple[list[int], list[float]]] = {}

    def add(name: str, k: int, value: Any) -> None:
        if isinstance(value, int | float) and math.isfinite(value):
            xs, ys = series.setdefault(name, ([], []))
            xs.append(k)
            ys.append(float(value))

    for k, m in sorted(metrics.items()):
        refined = m.get("pseudo_labels", {}).get("refined", {})
        add("accepted pseudo-labels Acc@π/6", k, refined.get("acc_pi_6"))
        add("accepted pseudo-labels Acc@π/18", k, refined.get("acc_pi_18"))
        for level, test in sorted(m.get("test", {}).get("pooled", {}).items()):
            add(f"test Acc@π/6 {level}", k, test.get("acc_pi_6"))
    return dict(sorted(series.items()))


def thumbnail(
    crop: torch.Tensor, mesh: Mesh, pose: np.ndarray, k: torch.Tensor, height: int = THUMB_HEIGHT
) -> Image.Image:
    """The (3, H, W) uint8 crop with the cuboid drawn at ``pose`` (4,) (a, e, θ radians, d)
    seen by the (3, 3) crop intrinsics ``k``, scaled to ``height`` pixels (lines about
    ``THUMB_LINE_PX`` wide)."""
    h = int(crop.shape[-2])
    image = draw_overlay(crop, mesh, pose, k, width=max(1, round(THUMB_LINE_PX * h / height)))
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _jpeg_uri(image: Image.Image) -> str:
    """Base64 ``data:`` URI of a thumbnail (JPEG, ``THUMB_QUALITY``)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(figure: Figure) -> str:
    """Base64 ``data:`` URI of a figure rendered to PNG in memory (no metadata)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _round_figure(labels: Sequence[PseudoLabel]) -> str:
    """PNG data URI: score histograms (accepted vs rejected) | accepted azimuth histogram |
    azimuth vs elevation of every label."""
    acc = np.array([lb.accepted for lb in labels], dtype=bool)
    score = np.array([lb.score for lb in labels], dtype=np.float64)
    az = np.array([lb.azimuth for lb in labels], dtype=np.float64)
    el = np.degrees([lb.elevation for lb in labels])
    fig = Figure(figsize=(11, 2.8), layout="constrained")
    ax_s, ax_a, ax_e = fig.subplots(1, 3)
    ok = np.isfinite(score)
    edges = np.histogram_bin_edges(score[ok], bins=20) if ok.any() else 20
    for mask, name, color in (
        (acc, "accepted", ACCEPTED_COLOR),
        (~acc, "rejected", REJECTED_COLOR),
    ):
        ax_s.hist(
            score[ok & mask], bins=edges, color=color, alpha=0.6, label=f"{name} ({mask.sum()})"
        )
    ax_s.set(xlabel="score", ylabel="labels", title="score")
    ax_s.legend(fontsize=8)
    cov = azimuth_coverage(az[acc], AZIMUTH_BINS)
    step = 360.0 / AZIMUTH_BINS
    ax_a.bar(np.arange(AZIMUTH_BINS) * step, cov.counts, width=step * 0.9, color=ACCEPTED_COLOR)
    ax_a.set(
        xlabel="azimuth (°, bins centred)",
        ylabel="accepted",
        xticks=np.arange(0, 360, 45),
        xlim=(-step / 2, 360 - step / 2),
        title=f"accepted azimuth: {cov.covered_bins}/{AZIMUTH_BINS} bins, "
        f"max gap {cov.max_gap_deg:.0f}°",
    )
    az_deg = np.degrees(np.mod(az, 2 * math.pi))
    for mask, color in ((~acc, REJECTED_COLOR), (acc, ACCEPTED_COLOR)):
        ax_e.scatter(az_deg[mask], el[mask], s=8, color=color)
    ax_e.set(
        xlabel="azimuth (°)",
        ylabel="elevation (°)",
        xlim=(0, 360),
        xticks=np.arange(0, 361, 45),
        title="azimuth vs elevation",
    )
    return _png_uri(fig)


def _accuracy_figure(series: dict[str, tuple[list[int], list[float]]]) -> str:
    """PNG data URI of the accuracy-per-round lines (percent)."""
    fig = Figure(figsize=(8.0, 3.0), layout="constrained")
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        # A "$" in a name (a level key of metrics.json) would start matplotlib's mathtext.
        ax.plot(xs, [100 * y for y in ys], marker="o", label=name.replace("$", r"\$"))
    rounds = sorted({x for xs, _ in series.values() for x in xs})
    ax.set(xlabel="round", ylabel="%", ylim=(0, 100), xticks=rounds, title="accuracy per round")
    # Beside the axes: inside, it hid the lines it names (every corner holds some accuracy).
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png_uri(fig)


_CSS = f"""
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
.note {{ background: #fff3cd; padding: 0.5em; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 6px; }}
.sheet figure {{ margin: 0; font-size: 11px; text-align: center; }}
.sheet img {{ display: block; border: 3px solid {ACCEPTED_COLOR}; }}
.sheet .rejected img {{ border-color: {REJECTED_COLOR}; }}
.sheet .rejected figcaption {{ color: {REJECTED_COLOR}; }}
"""


def _fmt(value: Any, scale: float = 100.0, digits: int = 1) -> str:
    """``scale·value`` with ``digits`` decimals, or "–" when missing or not finite."""
    ok = isinstance(value, int | float) and math.isfinite(value)
    return f"{scale * value:.{digits}f}" if ok else "–"


def _summary_table(rounds: dict[int, list[PseudoLabel]], metrics: dict[int, dict[str, Any]]) -> str:
    """HTML table: per round the pool, accepted count, mean weight, the accepted labels'
    accuracy against the hidden ground truth and the test Acc@π/6 (L0)."""
    head = (
        "<tr><th>round</th><th>pool</th><th>accepted</th><th>mean weight</th>"
        "<th>accepted Acc@π/6 %</th><th>accepted Acc@π/18 %</th><th>accepted MedErr °</th>"
        "<th>test Acc@π/6 % (L0)</th></tr>"
    )
    rows = []
    for k in sorted(set(rounds) | set(metrics)):
        labels, m = rounds.get(k), metrics.get(k, {})
        refined = m.get("pseudo_labels", {}).get("refined", {})
        weights = [lb.weight for lb in labels or [] if lb.accepted]
        cells = [
            str(k),
            str(len(labels)) if labels is not None else "–",
            str(len(weights)) if labels is not None else "–",
            _fmt(np.mean(weights) if weights else None, 1.0, 2),
            _fmt(refined.get("acc_pi_6")),
            _fmt(refined.get("acc_pi_18")),
            _fmt(refined.get("median_error_deg"), 1.0),
            _fmt(m.get("test", {}).get("pooled", {}).get("L0", {}).get("acc_pi_6")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _contact_sheet(labels: Sequence[PseudoLabel], data: FewShotData, per_round: int) -> str:
    """HTML of one round's contact sheet: up to ``per_round`` thumbnails (``sheet_selection``)
    captioned with score, pose error (when the ground truth is finite) and "rejected"."""
    pool = data.unlabelled
    row = {uid: i for i, uid in enumerate(pool.uids)}
    drawable = [lb for lb in labels if lb.uid in row and lb.category in data.meshes]
    chosen = [drawable[i] for i in sheet_selection(drawable, per_round)]
    rows = [row[lb.uid] for lb in chosen]
    errors = label_errors_deg(chosen, pool.poses[rows])
    figures = []
    for lb, r, err in zip(chosen, rows, errors, strict=True):
        # Rejected labels were never refined: their distance is the synthesised views' canonical
        # one, so they are drawn at the crop's reference distance (the refinement's start).
        dist = lb.distance if lb.accepted else float(pool.reference_distance[r])
        pose = np.array([lb.azimuth, lb.elevation, lb.theta, dist])
        image = thumbnail(pool.images[r], data.meshes[lb.category], pose, pool.k[r])
        matched = math.isfinite(lb.score)  # no view could be matched: no pose to score
        caption = f"score {lb.score:.3g}" if matched else "no match"
        caption += f" · err {err:.0f}°" if matched and np.isfinite(err) else ""
        caption += "" if lb.accepted else " · rejected"
        tip = (
            f"{lb.uid}: azimuth {math.degrees(lb.azimuth):.0f}°, elevation "
            f"{math.degrees(lb.elevation):.0f}°, θ {math.degrees(lb.theta):.0f}°, "
            f"weight {lb.weight:.2f}"
        )
        figures.append(
            f'<figure class="{"accepted" if lb.accepted else "rejected"}" '
            f'title="{html.escape(tip)}"><img src="{_jpeg_uri(image)}" alt="{html.escape(lb.uid)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    missing = len(labels) - len(drawable)
    return (
        f"<h3>Contact sheet ({len(chosen)} of {len(labels)}, by score)</h3>"
        + (
            f'<p class="note">{missing} label(s) refer to crops or categories missing from the '
            "rebuilt data set.</p>"
            if missing
            else ""
        )
        + f'<div class="sheet">{"".join(figures)}</div>'
    )


def render_report(
    run_dir: Path,
    rounds: dict[int, list[PseudoLabel]],
    metrics: dict[int, dict[str, Any]],
    data: FewShotData | None,
    per_round: int,
    note: str = "",
) -> str:
    """The HTML page (see the module docstring).

    Args:
        run_dir: the run folder (named in the page).
        rounds: round → its pseudo-labels (rounds k ≥ 1 that have them).
        metrics: round → its metrics.json (all complete rounds, 0 included).
        data: the rebuilt split for the contact sheets (None: no sheets).
        per_round: thumbnails per contact sheet.
        note: shown at the top (e.g. why there are no contact sheets).
    """
    name = html.escape(str(run_dir))
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Pseudo-labels of {name}</title><style>{_CSS}</style></head><body>",
        f"<h1>Pseudo-labels of {name}</h1>",
        f"<p>Rounds with pseudo-labels: {', '.join(map(str, rounds))}. Accuracies and pose "
        "errors use the unlabelled images' ground truth, which the loop hides from its "
        "decisions (diagnostics only). Green: accepted, red: rejected; the cuboid is drawn at "
        "the pseudo-labelled pose.</p>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    series = accuracy_series(metrics)
    parts.append("<h2>Accuracy per round</h2>")
    parts.append(
        f'<img src="{_accuracy_figure(series)}" alt="accuracy per round">'
        if series
        else '<p class="note">No ground-truth accuracy in the rounds\' metrics.json yet.</p>'
    )
    parts.append(_summary_table(rounds, metrics))
    for k, labels in rounds.items():
        parts.append(
            f'<section id="round-{k}"><h2>Round {k}</h2>'
            f"<p>{sum(lb.accepted for lb in labels)} of {len(labels)} pseudo-labels accepted.</p>"
            f'<img src="{_round_figure(labels)}" alt="round {k} scores and coverage">'
            + (_contact_sheet(labels, data, per_round) if data is not None else "")
            + "</section>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# IO
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSummary:
    """What ``write_report`` wrote: the file, its size in bytes, the rounds reported, whether
    it has contact sheets, and why not (empty when it has)."""

    path: Path
    size: int
    rounds: list[int]
    contact_sheets: bool
    note: str


def write_report(
    run_dir: Path,
    out: Path | None = None,
    per_round: int = 48,
    data: FewShotData | None = None,
) -> ReportSummary:
    """Write the HTML report of a run atomically (default ``RUN/pseudo_labels_report.html``).

    Args:
        data: the run's split (default ``load_pool(run_dir)``; when the dataset cannot be
            loaded the report is written without contact sheets and says why).

    Raises:
        RunFolderError: missing run folder, no round with pseudo-labels, malformed files.
    """
    run_dir = Path(run_dir)
    files = label_files(run_dir)
    rounds = {k: load_labels(path, k) for k, path in files.items()}
    first = next(iter(rounds))
    pool = [lb.uid for lb in rounds[first]]
    for k, labels in rounds.items():
        if [lb.uid for lb in labels] != pool:
            raise RunFolderError(
                f"{files[k]}: expected the images of {files[first]} in the same order (every "
                "round labels the same unlabelled pool), got another list"
            )
    metrics = round_metrics(run_dir)
    note = ""
    if data is None:
        try:
            data = load_pool(run_dir)
        except RunFolderError:  # the run's own record is damaged: not a missing data set
            raise
        except (ValueError, OSError) as exc:
            note = f"Contact sheets omitted: the run's data set could not be loaded ({exc})."
    text = render_report(run_dir, rounds, metrics, data, per_round, note)
    path = Path(out) if out is not None else run_dir / REPORT_NAME
    atomic_write_text(path, text)
    return ReportSummary(path, len(text.encode()), list(rounds), data is not None, note)
