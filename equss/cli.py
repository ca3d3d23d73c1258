"""What every command-line script shares: ``key=value`` overrides anywhere on the line, ``--debug``, and
user errors printed as one line.

A user error (a bad configuration key or value, a missing dataset, weights or checkpoint file, a corrupt
checkpoint, an input of the wrong shape) ends the script with ``error: <one line naming the key or path
and the fix>`` and exit code 2; ``--debug`` shows the full traceback instead. Progress notices of the
package (``logging`` under the ``equss`` logger) go to stderr, one line each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from equss.checkpoint import CheckpointError
from equss.config import ConfigError

__all__ = ["USER_ERRORS", "add_common_arguments", "parse_args", "run_main"]

# What reaches a user as "error: ...": the package raises these with messages naming what was wrong.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, OSError, ValueError, TypeError)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``overrides`` (``key=value``, anywhere on the line) and ``--debug``."""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides (keys in docs/configuration.md), e.g. optim.lr=1e-4")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Like ``parser.parse_args`` but overrides may come before, between or after the options."""
    args = parser.parse_intermixed_args(argv)
    for o in args.overrides:
        if "=" not in o:
            parser.error(f"override {o!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    return args


def _setup_logging() -> None:
    logger = logging.getLogger("equss")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_main(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Parse, run ``main(args)``; a user error becomes one line on stderr and exit code 2."""
    args = parse_args(parser, argv)
    _setup_logging()
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}  (run with --debug for the traceback)", file=sys.stderr)
        return 2
