"""The error of a setting that does not fit, the one check of a string setting against its
choices, and the bounded repr with which their messages quote a value.

A leaf module (it imports nothing of nvsm), so that the modules ``nvsm.config`` itself imports
(splits, crop cameras, dataset readers) check their string arguments with the same function and
message as loading a recipe does.
"""

from __future__ import annotations

import reprlib
import typing
from collections.abc import Collection
from typing import Any, Literal

__all__ = ["ConfigError", "check_choice", "short_repr"]

# Messages quote the value they refuse: whole, a few lines of nested YAML (aliases, deep
# nesting) made a message of hundreds of kilobytes. The string limit keeps a long path whole.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 240
_SHORT.maxlong = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 10
_SHORT.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr(value)`` for an error message, bounded: long strings and numbers are cut in the
    middle and long or deep lists and mappings end in ``...``."""
    return _SHORT.repr(value)


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
    raise ConfigError(f"{where}: expected one of {' | '.join(allowed)}, got {short_repr(value)}")
