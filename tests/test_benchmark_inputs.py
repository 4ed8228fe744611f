"""Bad run folders given to the pseudo-label controls benchmark fail with a message that names
the missing file, before any data set is read; the flip diagnostics count per true azimuth.

Bad arguments of every benchmark script fail in argparse (exit 2, one line naming the argument,
no traceback) before any heavy work; the package's own errors end in one ``error: ...`` line
(exit 2, as nvsm's), and a failed child command in one line and the child's exit code."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nvsm.config import RunConfig, config_to_dict
from nvsm.fewshot.pseudo_labels import AcceptanceRule, PseudoLabel, pseudo_labels_jsonl

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "pseudo_label_controls.py"


def _run(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_round_names_the_file(tmp_path: Path) -> None:
    res = _run(tmp_path, "--round", "2")
    assert res.returncode != 0
    assert f"{tmp_path / 'round_2'}: no pseudo_labels.jsonl" in res.stderr
    assert "Traceback" not in res.stderr


def test_round_zero_is_refused(tmp_path: Path) -> None:
    res = _run(tmp_path, "--round", "0")
    assert res.returncode == 2
    assert "argument --round: expected an integer >= 1, got '0'" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_start_checkpoint_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "round_1"
    folder.mkdir()
    (folder / "pseudo_labels.jsonl").write_text("")
    (folder / "config.json").write_text(json.dumps(config_to_dict(RunConfig())))
    res = _run(tmp_path, "--round", "1")
    assert res.returncode != 0
    assert f"{tmp_path / 'round_0' / 'model.pt'}: missing" in res.stderr
    assert "Traceback" not in res.stderr


def test_flip_diagnostics_counts_per_true_azimuth(tmp_path: Path, load_benchmark) -> None:
    """Four labels with known truth: a correct front view, a front view labelled as the back
    (accepted), a correct back view and a side view 40° off. Each lands in its truth's bin."""
    diag = load_benchmark("flip_diagnostics")
    truth = {"f1": (0.1, 0.2, 0.0), "f2": (-0.1, 0.2, 0.0), "b": (math.pi, 0.2, 0.0)}
    truth["s"] = (math.pi / 2, 0.2, 0.0)
    pose = {"f1": (0.1, 0.2, 0.0), "f2": (math.pi - 0.1, 0.2, 0.0), "b": (math.pi, 0.2, 0.0)}
    pose["s"] = (math.pi / 2 + math.radians(40), 0.2, 0.0)
    accepted = {"f1": False, "f2": True, "b": True, "s": False}
    labels = [
        PseudoLabel(
            uid,
            "car",
            *pose[uid],
            5.0,
            0.9,
            0.1,
            0.05,
            "a",
            (0.0, 0.0, 0.0),
            accepted=accepted[uid],
        )
        for uid in ("f1", "f2", "b", "s")
    ]
    (tmp_path / "pseudo_labels.jsonl").write_text(pseudo_labels_jsonl(labels))
    stats = diag.round_stats(tmp_path, truth, AcceptanceRule(top_fraction=0.5))
    bins = {b["azimuth_deg"]: b for b in stats["by_true_azimuth"]}
    assert len(bins) == diag.AZIMUTH_BINS
    assert bins[0.0] == {
        "azimuth_deg": 0.0,
        "n": 2,
        "matched_ok": 1,
        "matched_flipped": 1,
        "accepted": 1,
        "accepted_flipped": 1,
    }
    assert (bins[180.0]["n"], bins[180.0]["matched_ok"], bins[180.0]["accepted"]) == (1, 1, 1)
    assert (bins[90.0]["n"], bins[90.0]["matched_ok"], bins[90.0]["matched_flipped"]) == (1, 0, 0)
    assert sum(b["n"] for b in bins.values()) == 4
    assert stats["accepted"] == {"n": 2, "flips": 1, "flip_share": 0.5, "acc_pi_6": 0.5}


def _bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("script", "args", "name"),
    [
        ("bench_inference.py", ["--model", "nope/model.pt"], "--model"),
        ("bench_inference.py", ["--model", "m.pt", "--images", "-5"], "--images"),
        ("bench_fewshot.py", ["--stages", "--checkpoint", "nope/model.pt"], "--checkpoint"),
        ("bench_fewshot.py", ["--index", "--pool", "-5", "--no-torch"], "--pool"),
        ("bench_render.py", ["--vertices", "-10"], "--vertices"),
        ("bench_malloc.py", ["--repeats", "0"], "--repeats"),
        ("bench_memory_format.py", ["--images", "-1"], "--images"),
        ("flip_diagnostics.py", ["nope"], "runs"),
        ("fewshot_draws.py", ["--annotations", "-1", "--out", "draws"], "--annotations"),
    ],
)
def test_bad_argument_is_refused_by_argparse(
    tmp_path: Path, script: str, args: list[str], name: str
) -> None:
    res = _bench(script, *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"error: argument {name}: " in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""  # nothing ran
    assert list(tmp_path.iterdir()) == []  # nothing written (no run folder launched)


def test_package_error_is_one_line(tmp_path: Path) -> None:
    res = _bench("bench_fewshot.py", "--stages", "-s", "train.steps=bogus", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: overrides.train.steps: expected int, got 'bogus'"


def test_failed_child_command_is_one_line(tmp_path: Path) -> None:
    res = _bench("bench_malloc.py", "--recipe", "nope", "--repeats", "1", cwd=tmp_path)
    assert res.returncode == 2  # the child's code: it could not use the recipe
    assert "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: command failed with exit code 2: ")
    assert "--child default --recipe nope" in line
    assert ": error: unknown recipe 'nope'" in line  # the child's own one-line error


def test_argument_types() -> None:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import _cli

    assert _cli.positive_int("3") == 3
    assert _cli.non_negative_int("0") == 0
    assert _cli.int_at_least(8)("8") == 8
    assert _cli.non_negative_float("0.5") == 0.5
    for parse, text in [
        (_cli.positive_int, "0"),
        (_cli.positive_int, "x"),
        (_cli.non_negative_int, "-1"),
        (_cli.int_at_least(8), "7"),
        (_cli.non_negative_float, "nan"),
        (_cli.non_negative_float, "-0.1"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            parse(text)


def test_the_stage_benchmark_measures_the_round_it_reports(load_benchmark) -> None:
    # It took the mirrored anchor count for the unmirrored one: round 1 of the default run
    # (7 labels, 14 anchors with mirrors, 294 views) was measured at 28 anchors, 588 views.
    from nvsm.config import load_config

    bench = load_benchmark("bench_fewshot")
    config = load_config("synthetic-car-7shot")
    sizes = bench.run_sizes(config, 7, 393, 600)
    mirror = config.fewshot.mirror_anchors
    for k in range(1, sizes.rounds + 1):
        stand_ins = bench.stand_in_pseudo_anchors(sizes, k, mirror)
        assert (7 + stand_ins) * (2 if mirror else 1) == sizes.anchors[k]
    assert mirror and bench.stand_in_pseudo_anchors(sizes, 1, mirror) == 0
