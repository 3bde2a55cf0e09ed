"""A plug-in's own settings, declared where the plug-in lives.

A method, a gate or an expert-selection rule lists its settings as :class:`Setting` objects in its class's
``settings`` tuple. From those declarations come the command-line flags (``--fedprox-mu``), ``--print-config``,
the checks with one-line errors, and the entries of ``config.json`` and checkpoints: a config keeps every plug-in
setting in :attr:`~pfedmoap.config.Config.settings` under its flat name, the name it has always had on the command
line, in presets and in saved runs. The plug-in reads its value with :meth:`Setting.of`::

    MU = Setting("fedprox_mu", 0.01, "FedProx: weight of the proximal term", low=0.0)

    @register_method
    class FedProx(PromptFL):
        settings = (MU,)
        ...
        mu = MU.of(self.cfg)

This module imports neither torch nor any plug-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..base.errors import ConfigError

if TYPE_CHECKING:
    from . import Config

T = TypeVar("T")


class Setting(Generic[T]):
    """One typed setting of one plug-in: its name, default, valid values and help line.

    ``kind`` is ``float``, ``int`` or ``str``. Numbers: ``low`` is the smallest valid value (``strict``: the value
    must be above it), ``high`` the largest; with neither, a float need only be finite. Strings: ``choices``.
    ``parse`` turns a flag's text into a value (``argparse``'s ``type``; it raises ``ArgumentTypeError``) and
    ``check`` replaces the built-in check (raise :class:`ConfigError`). ``label`` names the value in errors and
    ``flag`` on the command line (defaults: the name, and ``--`` + the name with dashes). ``saved_default`` is for a
    setting added after runs were saved whose behaviour it changes: the value a saved run's ``config.json`` without
    this key ran with (default: ``default``), so that resuming it changes nothing.
    """

    def __init__(
        self,
        name: str,
        default: T,
        help: str,
        *,
        kind: type = float,
        low: float | None = None,
        strict: bool = False,
        high: float | None = None,
        choices: tuple[str, ...] | None = None,
        flag: str | None = None,
        label: str | None = None,
        parse: Callable[[str], Any] | None = None,
        check: Callable[[Any], None] | None = None,
        saved_default: T | None = None,
    ):
        if not name.isidentifier():
            raise ValueError(f"setting name {name!r} must be an identifier (it is a config key)")
        self.name, self.default, self.help, self.kind = name, default, help, kind
        self.low, self.strict, self.high, self.choices = low, strict, high, choices
        self.flag = flag or "--" + name.replace("_", "-")
        self.label = label or name
        self.parse, self.custom_check = parse, check
        self.saved_default = default if saved_default is None else saved_default
        self.check(default)  # a declaration whose default it would refuse is a bug in the plug-in
        self.check(self.saved_default)

    def __repr__(self) -> str:
        return f"Setting({self.name!r}, {self.default!r})"

    def same_as(self, other: Setting) -> bool:
        """Whether two declarations (e.g. two gates') describe the same setting."""
        keys = ("name", "default", "kind", "low", "strict", "high", "choices", "flag", "label")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def of(self, cfg: Config) -> T:
        """This setting's value in ``cfg`` (its default when the config does not hold it)."""
        return cfg.settings.get(self.name, self.default)

    def check(self, value: Any) -> None:
        """Refuse a value outside this setting's range: ConfigError, one line naming the value and what is valid."""
        if self.custom_check is not None:
            self.custom_check(value)
            return
        label = self.label
        if self.kind is str:
            if self.choices is not None and value not in self.choices:
                raise ConfigError(f"{label}={value!r} is not one of: {', '.join(self.choices)}")
            if not isinstance(value, str):
                raise ConfigError(f"{label}={value!r} must be a string")
            return
        if self.kind is int:
            bad = not isinstance(value, int) or isinstance(value, bool)
            if bad or (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                low = int(self.low) if self.low is not None else None
                valid = f">= {low}" if self.high is None else f"in {low}..{int(self.high)}"
                raise ConfigError(f"{label}={value!r} must be an integer {valid}")
            return
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ConfigError(f"{label}={value} must be a {self._what()}")
        low_bad = self.low is not None and (value <= self.low if self.strict else value < self.low)
        if low_bad or (self.high is not None and value > self.high):
            raise ConfigError(f"{label}={value} must be a {self._what()}")

    def _what(self) -> str:
        if self.low == 0 and self.high is None:
            return "positive number" if self.strict else "non-negative number"
        if self.low is None and self.high is None:
            return "finite number"
        low = "" if self.low is None else f"{'>' if self.strict else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        return f"number {' and '.join(p for p in (low, high) if p)}"

    def cli_type(self) -> Callable[[str], Any]:
        """What argparse turns the flag's text into (its own error names the flag and the bad text)."""
        return self.parse if self.parse is not None else self.kind

    def cli_help(self, owners: str) -> str:
        """The flag's help line: the declaration's, who owns it, the default."""
        choices = f" ({' | '.join(self.choices)})" if self.choices else ""
        return f"{owners}: {self.help}{choices} (default {self.default})"
