"""User-facing errors: the entry points print these as one line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class CompressError(Exception):
    """An error in the user's input (config, files), with a message that says how to fix it."""


class ConfigError(CompressError):
    """A config value is out of range or unknown."""


class CheckpointError(CompressError):
    """A checkpoint is missing, corrupt, or does not fit the requested model."""


class DataError(CompressError):
    """A data set is missing or malformed."""


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Unless `condition` holds, raise ConfigError naming `key`, the bad `value` and what is
    `allowed`."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


class DivergenceError(FloatingPointError):
    """Training diverged: a loss or a weight became NaN or inf. A FloatingPointError, not a
    CompressError: the input was valid, the run was not (the entry points exit with 3, not 2)."""
