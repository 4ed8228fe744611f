"""What the command lines share: process-wide settings applied once at start-up, and the exit on
a user error.

Nothing here runs on import: importing nvsm as a library must not change its host process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from nvsm.errors import ConfigError, check_choice

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest ``M_MMAP_THRESHOLD`` glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Free heap memory kept before it is returned to the kernel.
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them
    to the kernel; returns whether the setting was applied.

    Why: a CPU training step allocates and frees dozens of 1-25 MB tensors (activations, the
    (visible vertices × prototypes) logits of the contrastive loss). With glibc's defaults many of
    them are ``mmap``-ed fresh and unmapped again when freed, so every step faults in and zeroes
    new pages: a timed default ``nvsm fewshot`` run took 97 M minor page faults and 245 s of
    system time in 19 min. Keeping the blocks in the heap trades a higher, flat resident size for
    that work (``benchmarks/bench_malloc.py`` measures both). PyTorch's CPU tuning
    advice is an ``LD_PRELOAD``-ed jemalloc or tcmalloc; this is the no-dependency equivalent.

    Not applied (False) off glibc, or when the user tunes malloc themselves (``GLIBC_TUNABLES``
    or any ``MALLOC_*`` variable is set).
    """
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def exit_with_error(console: Console, message: str, code: int) -> NoReturn:
    """Print ``error: message`` and exit with ``code``. The message is neither wrapped nor read
    as markup, so that the paths it names stay whole, brackets and all, for copying."""
    console.print("[red]error:[/red]", escape(message), soft_wrap=True)
    raise typer.Exit(code)


def check_option(console: Console, option: str, value: str, choices: Any) -> None:
    """``nvsm.errors.check_choice`` of an option's ``value`` against ``choices`` (a ``Literal``
    type or the allowed strings), refused in one ``error:`` line with exit 2 (the usage code;
    ``typer.BadParameter`` boxed it)."""
    try:
        check_choice(value, choices, option)
    except ConfigError as exc:
        exit_with_error(console, str(exc), 2)


def path_parser(console: Console, name: str) -> Callable[[str], Path]:
    """A typer ``parser`` for the path option or argument ``name``: an empty value is refused in
    one ``error:`` line with exit 2. Typer read ``""`` (``--out "$RUN"`` with ``RUN`` unset) as
    the working folder, into which a run then wrote."""

    def parse(value: str) -> Path:
        if value == "":
            exit_with_error(console, f"{name}: expected a path, got ''", 2)
        return Path(value)

    return parse


def path_option(console: Console, name: str) -> dict[str, Any]:
    """``typer.Option`` settings of the path option ``name``: ``path_parser``, shown as PATH."""
    return {"parser": path_parser(console, name), "metavar": "PATH"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt`` (``raise_on_sigterm``), so
    that every ``except KeyboardInterrupt`` and ``finally`` that cleans up after Ctrl-C does
    so after a ``kill`` too."""


def raise_on_sigterm() -> None:
    """From now on, SIGTERM (``kill``, a container's or job scheduler's stop, torchrun
    stopping its other workers) raises ``Terminated`` in this process. Its default action ends
    the process at once, with no ``finally`` run, which left the hidden staging folder of
    ``nvsm data synth`` behind. A second SIGTERM ends the process at once, as before: whoever
    sends it asks for no more cleanup. Only from the main thread, the only one that may set
    handlers (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, _frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)


def interruption(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped a command, in a word, and its exit code: 128 + the signal's number, the
    shell's code for a process a signal ended (130 for Ctrl-C's SIGINT, 143 for SIGTERM).

    Every command that turns Ctrl-C into its exit code asks this, so it also clears CPython's
    mark of an unhandled Ctrl-C: a ``KeyboardInterrupt`` that leaves code run from a string
    (``exec``/``eval`` of source: a dataclass or namedtuple being made, say by a module that
    training imports on first use) is marked unhandled even though it is caught further up, and
    under ``python -m nvsm.cli`` (not the ``nvsm`` script) the interpreter then ended the
    process by SIGINT (status -2) instead of with this code. Running any string resets the
    mark (CPython's ``run_eval_code_obj``)."""
    exec("None")
    if isinstance(exc, Terminated):
        return "terminated", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


def exit_interrupted(console: Console, exc: KeyboardInterrupt,
                     out: os.PathLike[str] | None = None) -> NoReturn:
    """Ctrl-C or SIGTERM (``exc``) in a command that writes only at its end (or aside, moved
    into place whole): say that nothing was written (to ``out``, when it has one) and exit
    with ``interruption``'s code."""
    word, code = interruption(exc)
    where = f" to {out}" if out is not None else ""
    exit_with_error(console, f"{word}: nothing was written{where}", code)


def flowing_help(text: str) -> str:
    """``text`` (a docstring) with each prose paragraph joined into one line, for the terminal
    to wrap. Typer's rich help keeps a paragraph's line breaks, so a paragraph wrapped in the
    source printed as ragged lines in a terminal narrower than the source. Example paragraphs
    and indented lines (command lines) stay as written."""
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = paragraph.split("\n")
        if paragraph.startswith("Example"):
            paragraphs.append(paragraph)
            continue
        joined = [lines[0]]
        for line in lines[1:]:
            if line[:1].isspace() or joined[-1][:1].isspace():
                joined.append(line)
            else:
                joined[-1] += " " + line
        paragraphs.append("\n".join(joined))
    return "\n\n".join(paragraphs)


def flow_help(app: typer.Typer) -> None:
    """Apply ``flowing_help`` to the help of ``app``, of its commands and of its sub-apps, in
    place; call it once every command is registered."""
    if isinstance(app.info.help, str):
        app.info.help = flowing_help(app.info.help)
    for command in app.registered_commands:
        doc = command.help or inspect.getdoc(command.callback)
        if doc:
            command.help = flowing_help(doc)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            flow_help(group.typer_instance)
