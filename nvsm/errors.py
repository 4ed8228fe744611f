"""The error of a setting that does not fit, and the one check of a string setting against its
choices.

A leaf module (it imports nothing of nvsm), so that the modules ``nvsm.config`` itself imports
(splits, crop cameras, dataset readers) check their string arguments with the same function and
message as loading a recipe does.
"""

from __future__ import annotations

import typing
from collections.abc import Collection
from typing import Any, Literal

__all__ = ["ConfigError", "check_choice"]


class ConfigError(ValueError):
    """A recipe, override, option or argument that does not fit the configuration schema."""


def check_choice(value: Any, choices: Any, where: str) -> Any:
    """``value`` if it is one of ``choices``; ``ConfigError`` (a ``ValueError``) naming
    ``where`` otherwise: ``"<where>: expected one of a | b, got 'c'"``.

    Args:
        value: the setting as given (a non-string is refused, whatever it equals).
        choices: a ``Literal`` type, or a collection of the allowed strings.
        where: what set it, e.g. ``"fewshot.matcher"`` or ``"--anchors"``.
    """
    allowed = (typing.get_args(choices) if typing.get_origin(choices) is Literal
               else tuple(typing.cast(Collection[str], choices)))
    if isinstance(value, str) and value in allowed:
        return value
    raise ConfigError(f"{where}: expected one of {' | '.join(allowed)}, got {value!r}")
