"""SIGTERM (``kill``) unwinds a command as Ctrl-C does: its default action ended the process
at once, with no cleanup, and left ``nvsm data synth``'s hidden staging folder behind (a real
``kill`` of ``data synth``: ``tests/test_data_synth.py``)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nvsm.cli import app
from nvsm.runtime import Terminated, interruption, raise_on_sigterm


@pytest.fixture
def sigterm_handler_restored() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_raises_terminated_once(sigterm_handler_restored: None) -> None:
    raise_on_sigterm()
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs between bytecodes; this is never reached in full
    # A second SIGTERM is not caught again: whoever sends it asks for no more cleanup.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert interruption(Terminated()) == ("terminated", 143)
    assert interruption(KeyboardInterrupt()) == ("interrupted", 130)


def test_a_terminated_command_says_so_with_code_143(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sigterm_handler_restored: None
) -> None:
    def terminated(*args: object, **kwargs: object) -> None:
        raise Terminated

    monkeypatch.setattr("nvsm.fewshot.loop.run_fewshot", terminated)
    res = CliRunner().invoke(app, ["fewshot", "--tiny", "--out", str(tmp_path / "run")])
    assert res.exit_code == 143
    assert res.output == "error: terminated before the run folder was written\n"
    # The command line installed the handler (the stub above stands in for the run).
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
