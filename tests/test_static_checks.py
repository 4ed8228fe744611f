"""The code base stays lint-clean (ruff) and type-consistent (mypy over ``nvsm``, ``tests`` and
``benchmarks``, as configured in pyproject.toml): a change that breaks either fails the suite."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_finds_nothing() -> None:
    res = _run("ruff", "check", "--no-cache", "nvsm", "tests", "benchmarks")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_finds_nothing() -> None:
    res = _run("mypy", "nvsm", "tests", "benchmarks")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: no issues found" in res.stdout
