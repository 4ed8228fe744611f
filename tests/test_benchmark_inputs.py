"""Bad run folders given to the pseudo-label controls benchmark fail with a message that names
the missing file, before any data set is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nvsm.config import RunConfig, config_to_dict

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudo_label_controls.py"


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
    assert res.returncode != 0
    assert "a complete EM round k >= 1 is needed" in res.stderr


def test_missing_start_checkpoint_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "round_1"
    folder.mkdir()
    (folder / "pseudo_labels.jsonl").write_text("")
    (folder / "config.json").write_text(json.dumps(config_to_dict(RunConfig())))
    res = _run(tmp_path, "--round", "1")
    assert res.returncode != 0
    assert f"{tmp_path / 'round_0' / 'model.pt'}: missing" in res.stderr
    assert "Traceback" not in res.stderr
