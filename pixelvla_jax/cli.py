"""The one wrapper every entry point runs its `main` through: the project's own errors are
printed as their message alone, everything else keeps its traceback.

    if __name__ == "__main__":
        cli.run(main)                     # absl entry points (flags parsed by absl.app.run)
        cli.run(main, absl_flags=False)   # argparse entry points: main(argv_list) -> int

The rule (nothing is guessed from where an exception comes from): an exception whose class
derives from `pixelvla_jax.errors.PixelVLAError` is one of the project's own checks (a config
key, a flag value, a missing dataset or checkpoint, a bad observation, a diverged run). Its
message says what is wrong and what to do, so it is printed alone on stderr and the process
exits with the error's `exit_code` (2). Any other exception, a ValueError from numpy or a
KeyError in our own code included, is a bug: it propagates with its full traceback.

`--verbose` (anywhere on the command line; removed before the entry point parses its flags)
or the environment variable `PIXELVLA_VERBOSE=1` prints the traceback of a project error too.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pixelvla_jax.errors import PixelVLAError

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "PIXELVLA_VERBOSE"


def verbose_requested(argv: Sequence[str] = ()) -> bool:
    """True if `--verbose` is in argv or PIXELVLA_VERBOSE is set to anything but ''/0/false."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return VERBOSE_FLAG in argv or env not in ("", "0", "false", "no")


def format_error(err: BaseException) -> str:
    """The message of a project error as printed: `<program>: error: <message>`."""
    # KeyError subclasses would print their message quoted: take the argument itself.
    message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return f"{_prog()}: error: {message}"


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "pixelvla_jax"


def call(main: Callable[[Any], Any], argv: Any, *, verbose: bool = False) -> int:
    """Runs `main(argv)`; a project error becomes its message on stderr and its exit code.

    Returns main's own result as an exit status (None: 0). Exceptions that are not
    `PixelVLAError`s propagate unchanged.
    """
    try:
        result = main(argv)
    except PixelVLAError as err:
        if verbose:
            traceback.print_exc()
        print(format_error(err), file=sys.stderr)
        if not verbose:
            print(f"(the traceback: rerun with {VERBOSE_FLAG} or {VERBOSE_ENV}=1)", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
    return 0 if result is None else int(result)


def _parse_absl_flags(argv: list[str], verbose: bool) -> list[str]:
    """absl's own parse, except that a `--config.KEY=...` override naming a key the config
    lacks (ml_collections raises AttributeError/KeyError while parsing) is a usage error:
    its message alone, exit status 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        if not overrides or verbose:
            raise
        text = str(err.args[0]) if err.args else str(err)
        with contextlib.suppress(ValueError, SyntaxError):  # KeyError's quoted message
            text = str(ast.literal_eval(text))
        print(
            f"{_prog()}: error: a --config override names a key the config does not have "
            f"({' '.join(overrides)}): {' '.join(text.split())} Run with --helpfull or read "
            "pixelvla_jax/training/config.py:base_config for every key.",
            file=sys.stderr,
        )
        sys.exit(2)


def run(main: Callable[[Any], Any], *, absl_flags: bool = True) -> None:
    """The entry point: `main` behind `call`, then exit with its status (never returns).

    Args:
      main: the entry point's main. absl_flags=True: `main(argv)` after `absl.app.run` has
        parsed the flags (usage errors are absl's own). False: `main(sys.argv[1:])` (an
        argparse main that parses its own arguments and returns an exit status).
      absl_flags: whether the program's flags are absl flags.
    """
    verbose = verbose_requested(sys.argv[1:])
    sys.argv = [a for a in sys.argv if a != VERBOSE_FLAG]
    if absl_flags:
        from absl import app

        app.run(
            lambda argv: call(main, argv, verbose=verbose),
            flags_parser=lambda argv: _parse_absl_flags(argv, verbose),
        )
    else:
        sys.exit(call(main, sys.argv[1:], verbose=verbose))
