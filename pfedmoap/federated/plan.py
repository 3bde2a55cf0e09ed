"""The one place that checks a run's config together with its plug-ins, and resolves them.

:func:`resolve_config` is the whole check of a config: the shared knobs (:meth:`Config.validate`), the plug-ins it
names (method, gate, expert-selection rule, dataset), every plug-in setting against its declaration (unknown keys
refused, missing ones given their defaults) and each chosen plug-in's own rules. :func:`plugins` hands a resolved
config's plug-in classes to the server, the world and the engines, so nothing below looks a plug-in up by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..base.errors import ConfigError
from ..config import DEFAULT_PRESET, Config, load_preset
from ..config.settings import Setting
from ..data.registry import list_datasets
from . import registry


@dataclass(frozen=True)
class Plugins:
    """A run's plug-in classes: the method (as resolved for the config), the gate, the expert-selection rule."""

    method: type
    gate: type
    selection: type


def plugin_settings() -> dict[str, Setting]:
    """Every registered plug-in's settings by config key (a plug-in may not take a shared field's name)."""
    found = registry.settings()
    clash = sorted(set(found) & {*Config.shared_fields(), "settings"})
    if clash:
        raise TypeError(f"{found[clash[0]][1][0]} declares setting {clash[0]!r}, a shared config field's name")
    return {name: setting for name, (setting, _) in found.items()}


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """A config (not yet checked) from a flat object: ``config.json``, a preset with overrides, a checkpoint's. A
    key that is neither a shared field nor a registered plug-in's setting is refused, naming ``source``."""
    return Config.from_dict(data, source, plugin_settings=plugin_settings())


def saved_config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """:func:`config_from_dict` for a saved run's ``config.json`` (its ``_meta`` removed). A run directory's config
    holds every plug-in setting of its time, so a setting it lacks was declared after the run was saved: it is
    given the value the run ran with (:attr:`Setting.saved_default`), so that resuming the run changes nothing."""
    filled = dict(data)
    for name, setting in plugin_settings().items():
        filled.setdefault(name, setting.saved_default)
    return config_from_dict(filled, source)


def resolve_config(cfg: Config) -> Config:
    """``cfg`` checked whole (ConfigError, one line naming the first bad value) with every plug-in setting present
    (defaults filled in). Idempotent: a resolved config resolves to an equal one."""
    method = registry.method_class(cfg.method)
    if cfg.dataset not in (datasets := list_datasets()):
        raise ConfigError(f"dataset={cfg.dataset!r} is not one of: {', '.join(datasets)}")
    cfg.validate()
    selection = registry.selection_class(cfg.expert_selection)
    gate = registry.gate_class(cfg.gate)
    declared = plugin_settings()
    unknown = sorted(set(cfg.settings) - set(declared))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}")
    values = {name: cfg.settings.get(name, setting.default) for name, setting in declared.items()}
    for name, setting in declared.items():
        setting.check(values[name])
    if list(values.items()) != list(cfg.settings.items()):  # same values in declaration order: nothing to fill
        cfg = dataclasses.replace(cfg, settings=values)
    if cfg.subsample == "new" and method.trains:
        raise ConfigError(
            f"subsample=new is for evaluation only (clients never train on the novel classes), and "
            f"method={cfg.method} trains: use subsample=base, or method=zeroshot"
        )
    # what only some plug-ins need is checked by them (their classes carry their own rules)
    selection.check_config(cfg)
    gate.check_config(cfg)
    method.resolve(cfg).check_config(cfg)
    return cfg


def plugins(cfg: Config) -> Plugins:
    """The plug-in classes of a resolved config."""
    return Plugins(
        registry.method_class(cfg.method).resolve(cfg),
        registry.gate_class(cfg.gate),
        registry.selection_class(cfg.expert_selection),
    )


def make_config(preset: str | None = DEFAULT_PRESET, **overrides: Any) -> Config:
    """Build a checked config from a preset (None = bare defaults) and keyword overrides (shared fields and
    plug-in settings alike, by their flat names)."""
    data: dict[str, Any] = {}
    if preset is not None:
        data.update(load_preset(preset))
        data["preset"] = preset
    data.update(overrides)
    return resolve_config(config_from_dict(data, source=f"preset {preset}" if preset else "config"))
