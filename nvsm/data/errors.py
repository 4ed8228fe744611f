"""Errors of the dataset readers: each names the file, the field and what was expected."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataFormatError", "check_items", "id_sample", "is_real"]


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataFormatError(ValueError):
    """A dataset file does not follow its published format.

    Args:
        path: the offending file (annotation, image, list, calibration, ...).
        field: the field (or part of the file) that is wrong, e.g.
            ``"objects[2].viewpoint.azimuth"``.
        expected: plain-language description of what the format requires.
        got: what was found (any object; shown with ``repr``, shortened).

    The message reads ``"<path>: field '<field>': expected <expected>, got <got>"``.
    """

    def __init__(self, path: str | os.PathLike[str], field: str, expected: str, got: Any) -> None:
        self.path = Path(path)
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(str(self))

    def detail(self) -> str:
        """The message without the path: ``"field '<field>': expected <expected>, got <got>"``."""
        got = self.got if isinstance(self.got, str) else _short(self.got)
        return f"field '{self.field}': expected {self.expected}, got {got}"

    def __str__(self) -> str:
        return f"{self.path}: {self.detail()}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.field, self.expected, self.got))


def check_items(
    path: str | os.PathLike[str], field: str, values: np.ndarray, bad: np.ndarray, expected: str
) -> None:
    """Raise ``DataFormatError`` naming ``field[i, j, ...]``, the first item of the array
    ``values`` where the mask ``bad`` is set, and its value; nothing when none is."""
    where = np.argwhere(bad)
    if where.size:
        index = tuple(int(i) for i in where[0])
        raise DataFormatError(path, f"{field}[{', '.join(map(str, index))}]", expected,
                              values[index].item())


def id_sample(ids: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` ids, comma-separated, then `` ...`` when there are more: enough of a
    long list for an error message to be checked against the files."""
    return ", ".join(ids[:limit]) + (" ..." if len(ids) > limit else "")


def is_real(values: np.ndarray) -> bool:
    """Whether an array holds real numbers (bool, integer or float): ``np.number`` admits
    complex values too, whose imaginary part ``float()`` refuses and ``astype`` drops."""
    return values.dtype.kind in "biuf"
