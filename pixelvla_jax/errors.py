"""The project's own error types.

`PixelVLAError` marks an exception raised by one of the project's own input checks
(a config key, a flag, a dataset directory, a checkpoint, an observation): its message
alone says what is wrong and what to do, so the command-line wrapper
(`pixelvla_jax.cli.run`) prints the message without a traceback and exits with status 2.
Any other exception is treated as a bug and keeps its full traceback.

Subclass it together with the builtin type callers already catch, e.g.
``class ConfigError(PixelVLAError, ValueError)``, so existing ``except ValueError``
handlers keep working. Set ``exit_code`` on a subclass for a different exit status
(e.g. a diverged training run).
"""

from __future__ import annotations


class PixelVLAError(Exception):
    """An error from the project's own checks; its message says what to do.

    Printed without a traceback by `pixelvla_jax.cli.run` (set PIXELVLA_VERBOSE=1 or pass
    --verbose to see it), exit status `exit_code`.
    """

    exit_code: int = 2


class InvalidInputError(PixelVLAError, ValueError):
    """A bad argument, observation or flag value (a ValueError for existing callers)."""


class MissingInputError(PixelVLAError, FileNotFoundError):
    """A file or directory the user named (or that a command needs) does not exist."""


class OutputExistsError(PixelVLAError, FileExistsError):
    """An output path that must not exist (it would be overwritten) exists."""


class UnknownNameError(PixelVLAError, KeyError):
    """A name (a dataset, a suite, a key) that is not among the known ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(PixelVLAError, RuntimeError):
    """An optional package a command needs is not installed (the message names the extra)."""
