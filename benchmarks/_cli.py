"""Shared argument checks of the benchmark scripts (not a benchmark itself).

The scripts run as ``python benchmarks/X.py``, which puts this folder on ``sys.path``, so they
``import _cli``. Bad arguments fail in ``parse_args`` (exit 2, one line naming the argument)
before any heavy work. :func:`run_main` turns the package's own errors (a missing or bad
checkpoint, config, data set or mesh; a missing file) into one ``error: ...`` line and exit 2,
as ``nvsm`` does for input it cannot use, instead of a traceback; :func:`run_command` prints one
line for a child command that fails and exits with the child's code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse ``type``: an integer >= ``minimum``; anything else fails with
    ``argument --x: expected an integer >= N, got '...'`` (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


#: argparse ``type``: an integer >= 1 (a count that must not be empty).
positive_int = int_at_least(1)
#: argparse ``type``: an integer >= 0 (warm-up runs, seeds, 0 = "use the default").
non_negative_int = int_at_least(0)


def non_negative_float(text: str) -> float:
    """argparse ``type``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def torch_device(text: str) -> str:
    """argparse ``type``: a device string torch understands (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        msg = f"expected a torch device (cpu, cuda, ...), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return text


def _package_error(exc: BaseException) -> bool:
    """A missing file, or a ``ValueError`` of the package: one of its own classes
    (``ConfigError``, ``CheckpointError``, ``DataFormatError``, ...) or one raised by its code
    (its usual way to refuse an input). Anything else keeps its traceback: it is a bug."""
    if isinstance(exc, FileNotFoundError):
        return True
    if not isinstance(exc, ValueError):
        return False
    if type(exc).__module__.split(".")[0] == "nvsm":
        return True
    import nvsm

    package = Path(nvsm.__file__).resolve().parent
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and package in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def run_command(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, check=True, ...)``; a failure prints one line naming the command
    and its exit code (plus the last line of its stderr when that was captured) and exits with
    that code."""
    try:
        return subprocess.run(list(cmd), check=True, text=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or "").strip().splitlines()
        detail = f": {tail[-1]}" if tail else ""
        print(f"error: command failed with exit code {exc.returncode}: {' '.join(cmd)}{detail}",
              file=sys.stderr)
        sys.exit(exc.returncode if exc.returncode > 0 else 1)  # a signal's negative code: 1


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main``; the package's errors become one ``error: ...`` line, exit 2."""
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        if not _package_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def add_alternation_args(ap: argparse.ArgumentParser, modes: Sequence[str], repeats: int) -> None:
    """``--repeats``, ``--json`` and the hidden ``--child MODE`` of a script that measures
    ``modes`` in alternating child processes (``alternate_children``)."""
    ap.add_argument("--repeats", type=positive_int, default=repeats)
    ap.add_argument("--json", default=None, help="write the raw measurements here")
    ap.add_argument("--child", choices=list(modes), default=None, help=argparse.SUPPRESS)


def alternate_children(
    script: str,
    args: argparse.Namespace,
    modes: Sequence[str],
    child: Callable[[str, argparse.Namespace], dict[str, Any]],
    child_args: Sequence[str],
    describe: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]] | None:
    """In a child (``args.child`` set by ``add_alternation_args``): print ``child(mode, args)``
    as JSON and return None. Otherwise run ``python script --child MODE *child_args`` for every
    mode in turn, ``args.repeats`` times, so that drifting machine load hits every mode alike,
    print a line per measurement (``describe``) and return the measurements per mode."""
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return None
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            cmd = [sys.executable, script, "--child", mode, *child_args]
            out = run_command(cmd, capture_output=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"repeat {rep + 1}/{args.repeats} {mode:7s} {describe(runs[mode][-1])}",
                  flush=True)
    return runs
