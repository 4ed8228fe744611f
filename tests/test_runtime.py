"""nvsm.runtime: the malloc setting the command line applies at start-up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from nvsm.runtime import keep_freed_memory


@pytest.mark.parametrize(
    "variable", ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"]
)
def test_user_malloc_settings_win(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert keep_freed_memory() is False


def test_applied_on_glibc_without_user_settings():
    # In a child so the setting does not leak into this test process.
    code = "from nvsm.runtime import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items()
           if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == str(platform.libc_ver()[0] == "glibc")
