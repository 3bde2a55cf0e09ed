"""Errors that mean "the user asked for something invalid" (as opposed to a bug).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; library callers can catch it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config value, a path, a run directory. The message is one line naming the value."""


class ConfigError(UserError):
    """A config value is out of range or names something that does not exist."""


class RunFailed(RuntimeError):
    """A run that was started but did not finish (a Flower run the SuperLink reports failed, a runtime that would not
    start). The message is one line saying why and where the log is; the CLI prints it and exits with code 1."""
