"""Shared command-line plumbing: every command's user mistakes are one line on stderr and exit code 2.

``OneLineParser`` does it for argparse's own errors; :func:`run_command` for what the command itself finds
(:class:`~pfedmoap.base.errors.UserError`, and Ctrl-C as exit code 130).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from .errors import RunFailed, UserError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``) and exit code 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def fail(name: str, message: str) -> int:
    """Print ``name: error: message`` on stderr and return the bad-input exit code."""
    print(f"{name}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_command(name: str, job: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a command's body: a :class:`UserError` becomes one line and exit code 2, a :class:`RunFailed` one line and
    exit code 1, Ctrl-C the ``interrupted`` note and 130; anything else is a bug and propagates with its traceback."""
    try:
        return job()
    except UserError as exc:
        return fail(name, str(exc))
    except RunFailed as exc:  # not the user's mistake, but its cause is in the log above: one line, not a traceback
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{name}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
