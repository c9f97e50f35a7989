"""User-facing errors.

Everything that is the user's fault (an unknown name, a bad value, a missing file, a diverged run)
raises :class:`MMBalanceError`. The CLI prints its message as one line and exits non-zero, so users
never read a traceback for a mistake they can fix themselves.
"""

from __future__ import annotations


class MMBalanceError(Exception):
    """An error caused by input or configuration, with a message that says how to fix it."""


class ConfigError(MMBalanceError):
    """An unknown key or an invalid value in a configuration."""


class DataError(MMBalanceError):
    """Missing, empty, corrupt or mismatched data."""


class TrainingDiverged(MMBalanceError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class NoSpaceLeft(MMBalanceError):
    """The device filled up while a file was written; the previous file is kept."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote what the user gave:
    an error is one line, whatever the value (a YAML bomb, a nested list, a long string)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply, or an int too long to print
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
