"""The one exception family a user can cause.

Every problem that a user can fix (a bad file, a missing checkpoint, a wrong option) raises a
subclass of :class:`ZsdenseError` with a message that says what went wrong and what to do. The CLI
prints the message without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations

from collections.abc import Iterable


class ZsdenseError(Exception):
    """Base class of every user-facing error; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


class InputError(ZsdenseError):
    """An input file cannot be read or is not a usable image."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsError(ZsdenseError):
    """A checkpoint is missing, corrupt or has the wrong hash."""


class ConfigError(ZsdenseError):
    """An option, preset, class list or prompt file is invalid."""


def unknown(
    what: str, name: object, known: Iterable[str], error: type[ZsdenseError] | None = None
) -> ZsdenseError:
    """The error for a ``name`` that is none of ``known``: what was asked for and what exists
    (a ConfigError unless ``error`` says otherwise); raise it."""
    return (error or ConfigError)(f"unknown {what} {name!r}; known: {', '.join(sorted(known))}")


class DependencyError(ZsdenseError):
    """An optional dependency needed for this feature is not installed."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the optional package '{package}'; "
            f"install it with: pip install 'zsdense[{extra}]'"
        )


class ImageArrayError(InputError, ValueError):
    """An in-memory image (numpy array, PIL image) given to the Python API is unusable.

    Also a :class:`ValueError`, so ``except ValueError`` around an API call catches it.
    """

    def __init__(self, problem: str):
        super().__init__("<image array>", problem)
