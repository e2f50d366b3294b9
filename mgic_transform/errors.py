"""Errors raised on bad user input.

Every error the compiler raises for something the *user* can fix is an
:class:`MGICError`. Its message says what is wrong and what to do about it; the
CLI prints it as one line. Bugs in the compiler itself surface as ordinary
exceptions so they are not mistaken for user errors.
"""

from __future__ import annotations

__all__ = ["MGICError", "TraceError", "ConfigError", "InputError", "first_line"]


class MGICError(Exception):
    """Base class of every user-facing error raised by :mod:`mgic_transform`."""


class ConfigError(MGICError, ValueError):
    """A transform option (``group_size``, ``coarsest_width``, ``skip`` ...) is invalid."""


class InputError(MGICError, ValueError):
    """``example_inputs`` (or the model handed to the CLI) is unusable."""


class TraceError(MGICError):
    """``torch.fx`` could not trace the model; the message names the line and the remedy."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line reasons."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
