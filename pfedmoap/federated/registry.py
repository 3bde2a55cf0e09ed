"""The plug-in registries: federated methods, mixture gates and expert-selection rules, each looked up by name.

A method or a gate is one class in one file, registered with a decorator::

    from pfedmoap.federated.registry import register_method
    from pfedmoap.methods.base import Method

    @register_method
    class MyMethod(Method):
        name = "mine"
        help = "what it does, in one line"

A plug-in's own settings are :class:`~pfedmoap.config.settings.Setting` declarations in its class's ``settings`` tuple
(:func:`settings` gathers them for the command line and the config checks).

Plug-ins from outside the library register the same way: list their modules in ``$PFEDMOAP_PLUGINS``
(comma-separated) or as ``pfedmoap.plugins`` entry points of an installed package, and every lookup (the command
line's flags included) sees them.

The built-in ones register when :mod:`pfedmoap.methods` and :mod:`pfedmoap.gates` are imported (``import
pfedmoap`` does both); a lookup imports them first, so the registries are complete whatever was imported.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Any, TypeVar

from ..base.errors import ConfigError
from ..config.settings import Setting

T = TypeVar("T", bound=type)

_METHODS: dict[str, type] = {}
_GATES: dict[str, type] = {}
_SELECTIONS: dict[str, type] = {}


PLUGINS_ENV = "PFEDMOAP_PLUGINS"  # comma-separated modules that register plug-ins, imported with the built-ins
ENTRY_POINTS = "pfedmoap.plugins"  # an installed package's modules that register plug-ins
_outside_loaded = False


def _builtins() -> None:
    importlib.import_module("pfedmoap.methods")
    importlib.import_module("pfedmoap.gates")
    importlib.import_module("pfedmoap.federated.selection")
    _outside()


def _outside() -> None:
    """Import the plug-ins from outside the library, once: the modules ``$PFEDMOAP_PLUGINS`` names and the
    ``pfedmoap.plugins`` entry points of installed packages. They register on import, like the built-ins, so
    their methods, gates, rules and settings (flags included) are there before the command line is read."""
    global _outside_loaded
    if _outside_loaded:
        return
    _outside_loaded = True  # before importing: a plug-in module may itself ask the registry
    names = [(f"{PLUGINS_ENV}", n.strip()) for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        names.append((f"entry point {entry.name}", entry.value))
    for source, module in names:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a plug-in that fails to import is the user's code: one line, what and why
            _outside_loaded = False
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(
                f"{source} names module {module!r}, which cannot be imported ({type(exc).__name__}: {reason})"
            ) from None


def register_method(cls: T) -> T:
    """Class decorator: make a :class:`~pfedmoap.methods.base.Method` subclass available by its ``name``."""
    _METHODS[_name_of(cls)] = cls
    return cls


def register_gate(cls: T) -> T:
    """Class decorator: make a :class:`~pfedmoap.gates.base.Gate` subclass available by its ``name``."""
    _GATES[_name_of(cls)] = cls
    return cls


def register_selection(cls: T) -> T:
    """Class decorator: make an :class:`~pfedmoap.federated.selection.ExpertSelection` rule available by its
    ``name``."""
    _SELECTIONS[_name_of(cls)] = cls
    return cls


def _name_of(cls: type) -> str:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    return name


def method_class(name: str) -> Any:
    """The registered method class called ``name``; ConfigError (one line, the valid names) otherwise."""
    _builtins()
    if name not in _METHODS:
        raise ConfigError(f"method={name!r} is not one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def gate_class(name: str) -> Any:
    """The registered gate class called ``name``; ConfigError (one line, the valid names) otherwise."""
    _builtins()
    if name not in _GATES:
        raise ConfigError(f"gate={name!r} is not one of: {', '.join(sorted(_GATES))}")
    return _GATES[name]


def selection_class(name: str) -> Any:
    """The registered expert-selection rule called ``name``; ConfigError (one line, the valid names) otherwise."""
    _builtins()
    if name not in _SELECTIONS:
        raise ConfigError(f"expert_selection={name!r} is not one of: {', '.join(sorted(_SELECTIONS))}")
    return _SELECTIONS[name]


def selections() -> dict[str, Any]:
    """Every registered expert-selection rule, by name."""
    _builtins()
    return dict(sorted(_SELECTIONS.items()))


def methods() -> dict[str, Any]:
    """Every registered method, by name."""
    _builtins()
    return dict(sorted(_METHODS.items()))


def gates() -> dict[str, Any]:
    """Every registered gate, by name."""
    _builtins()
    return dict(sorted(_GATES.items()))


def settings() -> dict[str, tuple[Setting, list[str]]]:
    """Every registered plug-in's own settings, by config key: the declaration and who declares it (e.g.
    ``"gate attention, gate linear"``). Two plug-ins may share a setting only by declaring the same one."""
    _builtins()
    found: dict[str, tuple[Setting, list[str]]] = {}
    for kind, table in (("method", _METHODS), ("gate", _GATES), ("expert_selection", _SELECTIONS)):
        for name, cls in sorted(table.items()):
            for setting in getattr(cls, "settings", ()):
                if setting.name in found:
                    known, owners = found[setting.name]
                    if known is not setting and not known.same_as(setting):
                        raise TypeError(
                            f"{kind} {name} declares setting {setting.name!r} unlike {owners[0]} does: two plug-ins "
                            "share a setting only by declaring the same one"
                        )
                    owners.append(f"{kind} {name}")
                else:
                    found[setting.name] = (setting, [f"{kind} {name}"])
    return found
