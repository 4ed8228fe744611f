"""``nvsm pseudo-labels export | inspect`` and ``nvsm.fewshot.report``."""

import base64
import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fewshot_loop import _label as fewshot_label
from test_fewshot_loop import _tiny_overrides
from typer.testing import CliRunner

from nvsm.cli import app
from nvsm.config import config_to_dict, load_config
from nvsm.fewshot.loop import prepare_fewshot_data, run_fewshot
from nvsm.fewshot.pseudo_labels import (
    CSV_FIELDS,
    PseudoLabel,
    pseudo_labels_jsonl,
    read_pseudo_labels,
)
from nvsm.fewshot.report import (
    REPORT_NAME,
    accuracy_series,
    label_errors_deg,
    round_folders,
    sheet_selection,
)

runner = CliRunner()


def _label(uid: str, score: float, accepted: bool, k: int = 1, azimuth: float = 0.3) -> PseudoLabel:
    return dataclasses.replace(
        fewshot_label(uid, score, accepted),
        azimuth=azimuth,
        weight=0.5 if accepted else 0.0,
        round=k,
        source_uid="anchor",
    )


def _fake_run(root: Path, rounds: dict[int, list[PseudoLabel]], config: dict | None = None) -> Path:
    """A run folder: round_0 (config only) and rounds with pseudo_labels.jsonl/metrics.json."""
    run = root / "run"
    for k in [0, *rounds]:
        folder = run / f"round_{k}"
        folder.mkdir(parents=True)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        m = {"round": k, "test": {"pooled": {"L0": {"acc_pi_6": 0.1 * (k + 1)}}}}
        if k in rounds:
            labels = [dataclasses.replace(lb, round=k) for lb in rounds[k]]
            (folder / "pseudo_labels.jsonl").write_text(pseudo_labels_jsonl(labels))
            m["pseudo_labels"] = {"refined": {"acc_pi_6": 0.5, "acc_pi_18": 0.25}}
        (folder / "metrics.json").write_text(json.dumps(m))
    return run


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def test_sheet_selection_spans_scores_and_keeps_rejected():
    labels = [_label(f"a{i}", 1.0 - 0.1 * i, accepted=i < 6) for i in range(10)]
    pick = sheet_selection(labels, 4)
    assert pick == sorted(pick, key=lambda i: -labels[i].score)
    assert sum(not labels[i].accepted for i in pick) == 1  # ⌈0.25·4⌉ rejected
    assert 0 in pick and 5 in pick  # best and borderline accepted
    assert sorted(sheet_selection(labels, 50)) == list(range(10))
    only_acc = [_label(f"b{i}", float(i), accepted=True) for i in range(5)]
    assert sheet_selection(only_acc, 3) == [4, 2, 0]
    only_rej = [_label(f"c{i}", float(i), accepted=False) for i in range(5)]
    assert len(sheet_selection(only_rej, 3)) == 3


def test_accuracy_series_and_label_errors():
    metrics = {
        0: {"test": {"pooled": {"L0": {"acc_pi_6": 0.2}}}},
        1: {
            "pseudo_labels": {"refined": {"acc_pi_6": 0.5, "acc_pi_18": math.nan}},
            "test": {"pooled": {"L0": {"acc_pi_6": 0.4}}},
        },
    }
    series = accuracy_series(metrics)
    assert series["test Acc@π/6 L0"] == ([0, 1], [0.2, 0.4])
    assert series["accepted pseudo-labels Acc@π/6"] == ([1], [0.5])
    assert "accepted pseudo-labels Acc@π/18" not in series  # no finite value
    assert accuracy_series({}) == {}
    labels = [_label("a", 1.0, True, azimuth=0.3), _label("b", 1.0, True, azimuth=0.3)]
    gt = torch.tensor([[0.3 + math.pi / 2, 0.2, 0.0, 5.0], [math.nan] * 4], dtype=torch.float64)
    err = label_errors_deg(labels, gt)
    assert err[0] == pytest.approx(90.0) and np.isnan(err[1])


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def test_export_filters_and_writes(tmp_path):
    labels = [_label("a", 0.9, True), _label("b", 0.1, False), _label("c", 0.5, True)]
    run = _fake_run(tmp_path, {1: labels[:2], 2: labels})
    res = runner.invoke(app, ["pseudo-labels", "export", str(run), "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    assert res.stdout == (run / "round_2" / "pseudo_labels.jsonl").read_text()  # last round
    out = tmp_path / "out" / "acc.csv"
    args = ["pseudo-labels", "export", str(run), "-f", "csv", "--accepted-only", "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and "round 2: 2 accepted pseudo-labels" in res.output
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert tuple(rows[0]) == CSV_FIELDS and [r["uid"] for r in rows] == ["a", "c"]
    assert _no_temp_files(tmp_path)
    res = runner.invoke(app, ["pseudo-labels", "export", str(run), "-f", "jsonl", "-k", "1"])
    assert [json.loads(x)["uid"] for x in res.stdout.splitlines()] == ["a", "b"]
    # An export into the run folder is refused: onto its own source it replaced the round's
    # record (exit 0), breaking the run.
    source = run / "round_2" / "pseudo_labels.jsonl"
    before = source.read_bytes()
    res = runner.invoke(app, ["pseudo-labels", "export", str(run), "-f", "csv", "-o", str(source)])
    assert res.exit_code == 2 and "lies inside the run folder" in res.output
    assert source.read_bytes() == before


def test_only_the_loops_own_round_names_are_rounds(tmp_path, monkeypatch):
    # A stray round_01 (a copy, say) was a second round 1: which one the export and the report
    # read depended on the order the folder listed them in. Listed here in name order, where
    # round_١ (an Arabic-Indic one) follows round_1.
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self))))
    run = _fake_run(tmp_path, {1: [_label("a", 0.9, True)]})
    stray_labels = pseudo_labels_jsonl([_label("x", 0.9, True)])
    for stray in ("round_01", "round_001", "round_0001", "round_١"):
        (run / stray).mkdir()
        (run / stray / "pseudo_labels.jsonl").write_text(stray_labels)
    assert round_folders(run) == {0: run / "round_0", 1: run / "round_1"}
    res = runner.invoke(app, ["pseudo-labels", "export", str(run), "-f", "jsonl", "-k", "1"])
    assert res.exit_code == 0 and [json.loads(x)["uid"] for x in res.stdout.splitlines()] == ["a"]


def test_export_errors_name_the_path(tmp_path):
    def fails(args: list[str], *expected: str) -> None:
        res = runner.invoke(app, ["pseudo-labels", "export", *args, "-f", "csv"])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output
        text = " ".join(res.output.split())
        for part in expected:
            assert part in text, (part, text)

    missing = tmp_path / "missing"
    fails([str(missing)], f"run folder {missing} does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails([str(empty)], str(empty), "no round_<k> folders",
          "expected a run folder written by 'nvsm fewshot --out RUN'")
    # An 'nvsm train' run and a round folder were told only to run nvsm fewshot there.
    train = tmp_path / "t3"
    train.mkdir()
    (train / "run_info.json").write_text("{}")
    (train / "model.pt").write_bytes(b"")
    fails([str(train)], f"{train} is an 'nvsm train' run, which has no pseudo-labels")
    (empty / "round_0").mkdir()
    fails([str(empty)], str(empty), "no round with pseudo_labels.jsonl", "rounds: 0")
    run = _fake_run(tmp_path, {1: [_label("a", 0.9, True)]})
    fails([str(run / "round_1")], f"{run / 'round_1'} is one round of a run; give its run "
          f"folder {run} instead ('nvsm pseudo-labels export' takes --round 1 to export only "
          "this round)")
    fails([str(run), "--round", "5"], str(run / "round_5"), "rounds with pseudo-labels: 1")
    fails([str(run), "--round", "0"], str(run / "round_0" / "pseudo_labels.jsonl"), ": 1")
    path = run / "round_1" / "pseudo_labels.jsonl"
    path.write_text(path.read_text() + "\n{not json\n")
    fails([str(run)], f"{path} line 3", "expected one pseudo-label JSON object per line")
    # A label of another round (a file copied between rounds) was read as this round's.
    path.write_text(pseudo_labels_jsonl([_label("a", 0.9, True, k=2)]))
    fails([str(run)], f"{path} line 1: field 'round': expected 1", "got 2")
    path.write_text('{"uid": "a"}\n')
    fails([str(run)], f"{path} line 1")


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _check_html(path: Path, n_rounds: int) -> str:
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count('class="sheet"') == n_rounds
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/") for s in sources)
    for src in sources:
        base64.b64decode(src.split(",", 1)[1], validate=True)
    assert _no_temp_files(path.parent)
    return text


def test_inspect_contact_sheets(tiny_synthetic, tmp_path):
    cfg = load_config("synthetic-car-7shot", _tiny_overrides(tiny_synthetic, 2))
    uids = prepare_fewshot_data(cfg).unlabelled.uids
    assert len(uids) == 3
    rounds = {
        k: [_label(u, 0.1 * i, accepted=i > 0, k=k) for i, u in enumerate(uids)] for k in (1, 2)
    }
    run = _fake_run(tmp_path, rounds, config_to_dict(cfg))
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(run), "--per-round", "2"])
    assert res.exit_code == 0, res.output
    text = _check_html(run / REPORT_NAME, n_rounds=2)
    assert text.count('<figure class="accepted"') == 2  # 1 accepted + 1 rejected per round
    assert text.count('<figure class="rejected"') == 2 and "rejected</figcaption>" in text
    assert "err " in text and "accuracy per round" in text and "Contact sheets omitted" not in text


def test_inspect_without_dataset_and_errors(tmp_path):
    cfg = load_config("synthetic-car-7shot", [f"data.root={tmp_path / 'no-data'}"])
    run = _fake_run(tmp_path, {1: [_label("a", 0.9, True), _label("b", 0.1, False)]})
    for k in (0, 1):
        (run / f"round_{k}" / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    out = tmp_path / "report" / "r.html"
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = _check_html(out, n_rounds=0)
    assert "Contact sheets omitted" in text and "Round 1" in text
    assert "warning" in res.output
    missing = tmp_path / "missing"
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(missing)])
    assert res.exit_code == 2 and str(missing) in " ".join(res.output.split())
    # An --out that is a folder, or under a file, is refused before the report is built (it
    # failed in the final write, after the crops were rebuilt; under a file: "File exists").
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target, message in ((tmp_path / "report", "it is a folder; name an HTML file"),
                            (blocker / "r.html", f"{blocker} is a file, not a folder")):
        res = runner.invoke(app, ["pseudo-labels", "inspect", str(run), "--out", str(target)])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    (run / "round_1" / "metrics.json").write_text("{oops")
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(run), "--out", str(out)])
    assert res.exit_code == 2 and str(run / "round_1" / "metrics.json") in res.output
    # JSON of the wrong shape ended in an AttributeError traceback.
    for metrics, field in (({"pseudo_labels": None}, "pseudo_labels"),
                           ({"pseudo_labels": {"refined": [1]}}, "pseudo_labels.refined"),
                           ({"test": {"pooled": {"L0": [0.5]}}}, "test.pooled.L0")):
        (run / "round_1" / "metrics.json").write_text(json.dumps(metrics))
        res = runner.invoke(app, ["pseudo-labels", "inspect", str(run), "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert f"field '{field}': expected a mapping" in " ".join(res.output.split())


def test_damaged_runs_and_outputs_are_refused_before_any_work(tmp_path):
    def fails(command: str, args: list[str], *expected: str) -> None:
        extra = ["-f", "csv"] if command == "export" else []
        res = runner.invoke(app, ["pseudo-labels", command, *args, *extra])
        assert res.exit_code == 2, res.output
        text = " ".join(res.output.split())
        assert "Traceback" not in res.output and all(p in text for p in expected), (expected, text)

    labels = [_label("a", 0.9, True), _label("b", 0.1, False)]
    run = _fake_run(tmp_path, {1: labels, 2: labels})
    record = run / "round_2" / "pseudo_labels.jsonl"
    kept = record.read_text()
    # --out onto the run's own files replaced a round's record with the HTML page.
    fails("inspect", [str(run), "--out", str(record)], "would overwrite the run's own records")
    assert record.read_text() == kept
    # A complete round without its labels was left out without a word.
    record.unlink()
    for command in ("export", "inspect"):
        fails(command, [str(run)], f"{record} does not exist, though round 2 is complete")
    # No label, an image labelled twice, rounds of different pools.
    for text, message in (("", "expected one pseudo-label per unlabelled image, got none"),
                          (pseudo_labels_jsonl([labels[0], labels[0]]), "'a' is labelled twice")):
        record.write_text(text.replace('"round": 1', '"round": 2'))
        fails("export", [str(run)], str(record), message)
    second = [dataclasses.replace(lb, round=2) for lb in labels]
    record.write_text(pseudo_labels_jsonl(second[::-1]))
    fails("inspect", [str(run)], str(record), "expected the images of", "in the same order")
    # JSON nested too deep (RecursionError) and a uid that cannot be written as UTF-8.
    record.write_text("[" * 100_000 + "\n")
    fails("export", [str(run)], f"{record} line 1", "invalid JSON")
    bad = json.dumps({**dataclasses.replace(labels[0], round=2).to_dict(), "uid": "a\ud800"})
    record.write_text(bad + "\n")
    fails("export", [str(run)], f"{record} line 1: field 'uid': expected printable text")
    # A file as RUN, an export under a file, an output nothing can be written in.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails("inspect", [str(blocker)], f"{blocker} is not a folder; expected a few-shot run folder")
    record.write_text(pseudo_labels_jsonl(second))
    fails("export", [str(run), "--out", str(blocker / "x.csv")], f"{blocker} is a file")
    fails("inspect", [str(run), "--out", "/proc/nvsm/r.html"], "cannot write into /proc/nvsm")
    assert not (run / REPORT_NAME).exists()


def test_config_damage_is_an_error_and_odd_names_are_drawn(tmp_path):
    labels = [_label("a", 0.9, True), dataclasses.replace(_label("b", -math.inf, False),
                                                         azimuth=math.nan)]
    run = _fake_run(tmp_path, {1: labels})
    metrics = run / "round_1" / "metrics.json"
    metrics.write_text(json.dumps({"test": {"pooled": {"$\\frac{a$": {"acc_pi_6": 0.5}}}}))
    (run / "round_1" / "config.json").write_text("{garbled")
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(run)])
    # It was a warning, and a report without contact sheets.
    assert res.exit_code == 2 and "config.json: expected a JSON object" in res.output
    (run / "round_1" / "config.json").unlink()
    (run / "round_0" / "config.json").write_text(json.dumps({"data": {"root": "/no/data"}}))
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(run)])
    assert res.exit_code == 0, res.output  # a "$" in a level's name broke matplotlib's mathtext
    assert "Contact sheets omitted" in res.output


def test_unmatched_labels_are_captioned_as_such(tiny_synthetic, tmp_path):
    cfg = load_config("synthetic-car-7shot", _tiny_overrides(tiny_synthetic, 2))
    uids = prepare_fewshot_data(cfg).unlabelled.uids
    labels = [_label(uids[0], 0.9, True)] + [
        dataclasses.replace(_label(u, -math.inf, False), azimuth=math.nan) for u in uids[1:]
    ]
    run = _fake_run(tmp_path, {1: labels}, config_to_dict(cfg))
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(run)])
    assert res.exit_code == 0, res.output
    text = (run / REPORT_NAME).read_text()
    # It read "score -inf · err 180° · rejected", like a confident front/back flip.
    assert text.count("<figcaption>no match · rejected</figcaption>") == len(uids) - 1
    assert "-inf" not in text


def test_help_has_examples():
    for cmd in ("export", "inspect"):
        res = runner.invoke(app, ["pseudo-labels", cmd, "--help"])
        assert res.exit_code == 0 and f"nvsm pseudo-labels {cmd} runs/" in res.output


# --------------------------------------------------------------------------------------------
# A real tiny run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_synthetic, tmp_path_factory) -> Path:
    overrides = [*_tiny_overrides(tiny_synthetic, 2), "fewshot.baselines=false"]
    run = tmp_path_factory.mktemp("fewshot") / "run"
    run_fewshot(load_config("synthetic-car-7shot", overrides), run, show_progress=False)
    return run


@pytest.mark.slow
def test_export_round_trips_the_loop_files(tiny_run):
    for k in (1, 2):
        folder = tiny_run / f"round_{k}"
        for fmt in ("csv", "jsonl"):
            args = ["pseudo-labels", "export", str(tiny_run), "-k", str(k), "-f", fmt]
            res = runner.invoke(app, args)
            assert res.exit_code == 0, res.output
            assert res.stdout == (folder / f"pseudo_labels.{fmt}").read_text(), (k, fmt)
        args = ["pseudo-labels", "export", str(tiny_run), "-k", str(k), "-f", "jsonl"]
        res = runner.invoke(app, [*args, "--accepted-only"])
        kept = [lb.uid for lb in read_pseudo_labels(folder / "pseudo_labels.jsonl") if lb.accepted]
        assert [json.loads(x)["uid"] for x in res.stdout.splitlines()] == kept


@pytest.mark.slow
def test_inspect_real_run(tiny_run):
    res = runner.invoke(app, ["pseudo-labels", "inspect", str(tiny_run)])
    assert res.exit_code == 0, res.output
    path = tiny_run / REPORT_NAME
    text = _check_html(path, n_rounds=2)
    assert text.count("<figure ") == 6  # the 3 pool images, both rounds
    print(f"tiny-run report: {path.stat().st_size / 1e3:.1f} kB")
