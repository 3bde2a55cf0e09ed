"""The plug-in registries: federated methods, mixture gates and expert-selection rules, each looked up by name.

A method or a gate is one class in one file, registered with a decorator::

    from pfedmoap.registry import register_method
    from pfedmoap.methods.base import Method

    @register_method
    class MyMethod(Method):
        name = "mine"
        help = "what it does, in one line"

The built-in ones register when :mod:`pfedmoap.methods` and :mod:`pfedmoap.gates` are imported (``import
pfedmoap`` does both); a lookup imports them first, so the registries are complete whatever was imported.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=type)

_METHODS: dict[str, type] = {}
_GATES: dict[str, type] = {}
_SELECTIONS: dict[str, type] = {}


def _builtins() -> None:
    importlib.import_module("pfedmoap.methods")
    importlib.import_module("pfedmoap.gates")
    importlib.import_module("pfedmoap.selection")


def register_method(cls: T) -> T:
    """Class decorator: make a :class:`~pfedmoap.methods.base.Method` subclass available by its ``name``."""
    _METHODS[_name_of(cls)] = cls
    return cls


def register_gate(cls: T) -> T:
    """Class decorator: make a :class:`~pfedmoap.gates.base.Gate` subclass available by its ``name``."""
    _GATES[_name_of(cls)] = cls
    return cls


def register_selection(cls: T) -> T:
    """Class decorator: make an :class:`~pfedmoap.selection.ExpertSelection` rule available by its ``name``."""
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
