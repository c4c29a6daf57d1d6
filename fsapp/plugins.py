"""The plugin manager: built-ins plus entry points (group ``fsapp``), failures isolated.

Built-ins register through the same hooks as third-party plugins. A plugin that fails to
import, or whose hook raises, costs one warning line and nothing else. ``FSAPP_LOAD_PLUGINS``
(comma-separated entry-point names, empty for none) chooses which entry-point plugins load;
``FSAPP_STRICT_PLUGINS=1`` (or ``--strict-plugins``) turns load failures into errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from fsapp import hookspecs
from fsapp.errors import PluginError, UsageError
from fsapp.registry import KINDS, Component, Spec, parse_spec

log = logging.getLogger("fsapp")

ENTRY_POINT_GROUP = "fsapp"
BUILTIN_PLUGIN = "fsapp"
BUILTIN_MODULES = (
    "fsapp.builtins.models",
    "fsapp.builtins.datasets",
    "fsapp.builtins.solvers",
    "fsapp.builtins.perturbations",
    "fsapp.builtins.attacks",
    "fsapp.builtins.autoattack",
    "fsapp.builtins.trackers",
    "fsapp.builtins.imagefolder",
)
HOOKS = {
    "model": "register_models",
    "dataset": "register_datasets",
    "solver": "register_solvers",
    "perturbation": "register_perturbations",
    "attack": "register_attacks",
    "tracker": "register_trackers",
}


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not load or register, with a one-line reason."""

    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' skipped: {self.reason}"


@dataclass
class Registry:
    """Every registered component by kind, plus the plugins that failed."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    failures: list[PluginFailure] = field(default_factory=list)
    duplicates: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> version

    def names(self, kind: str) -> list[str]:
        """Sorted names of the components of ``kind``."""
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> Component:
        """The component called ``name``; a clear error names the valid ones."""
        table = self._kind(kind)
        if (kind, name) in self.duplicates:
            who = " and ".join(f"'{p}'" for p in self.duplicates[(kind, name)])
            raise PluginError(f"{kind} '{name}' is registered twice, by {who}; uninstall one")
        if name not in table:
            raise UsageError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
        return table[name]

    def create(self, kind: str, spec: str | Spec, **params: Any) -> Any:
        """Build a component from a spec string (``"name:key=value"``) plus keyword params."""
        parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
        component = self.get(kind, parsed.name)
        merged: dict[str, Any] = dict(parsed.params)
        merged.update(params)
        try:
            return component.build(merged)
        except (UsageError, PluginError):
            raise
        except Exception as exc:  # a factory that raises must not take fsapp down
            if component.plugin == BUILTIN_PLUGIN:
                raise
            raise PluginError(
                f"{kind} '{parsed.name}' from plugin '{component.plugin}' failed to build: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _kind(self, kind: str) -> dict[str, Component]:
        if kind not in self.components:
            raise UsageError(f"unknown component kind '{kind}'; valid: {', '.join(KINDS)}")
        return self.components[kind]


def _selected_entry_points() -> list[metadata.EntryPoint]:
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    wanted = os.environ.get("FSAPP_LOAD_PLUGINS")
    if wanted is None:
        return eps
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in names]


def _plugin_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.name


def load_registry(strict: bool | None = None) -> Registry:
    """Load built-ins and entry-point plugins into a fresh :class:`Registry`."""
    if strict is None:
        strict = os.environ.get("FSAPP_STRICT_PLUGINS", "") not in ("", "0", "false")
    pm = pluggy.PluginManager("fsapp")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    owners: dict[int, str] = {}

    def fail(plugin: str, reason: str) -> None:
        failure = PluginFailure(plugin, reason)
        if strict:
            raise PluginError(str(failure))
        registry.failures.append(failure)
        log.warning("fsapp: %s", failure)

    from fsapp._version import __version__

    for modname in BUILTIN_MODULES:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        owners[id(module)] = BUILTIN_PLUGIN
    registry.plugins[BUILTIN_PLUGIN] = __version__

    for ep in _selected_entry_points():
        plugin = _plugin_name(ep)
        try:
            obj = ep.load()
            pm.register(obj, name=f"{plugin}:{ep.name}")
        except Exception as exc:
            fail(plugin, f"import failed: {type(exc).__name__}: {exc}")
            continue
        owners[id(obj)] = plugin
        dist = getattr(ep, "dist", None)
        registry.plugins[plugin] = dist.version if dist is not None else "?"

    for kind, hook_name in HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order
            plugin = owners.get(id(impl.plugin), impl.plugin_name)
            register = _make_register(registry, kind, plugin, fail)
            try:
                impl.function(register=register)
            except Exception as exc:
                if plugin == BUILTIN_PLUGIN:
                    raise
                fail(plugin, f"hook {hook_name} raised {type(exc).__name__}: {exc}")
    return registry


def _make_register(
    registry: Registry, kind: str, plugin: str, fail: Callable[[str, str], None]
) -> Callable[..., None]:
    def register(
        name: str,
        factory: Callable[[Any], Any],
        params: type | None = None,
        description: str = "",
    ) -> None:
        from fsapp.registry import NoParams

        params = params or NoParams
        if not isinstance(name, str) or not name or ":" in name or "," in name:
            fail(plugin, f"registered a {kind} with an invalid name {name!r}")
            return
        if not dataclasses.is_dataclass(params) or not callable(factory):
            fail(plugin, f"{kind} '{name}' needs a callable factory and a dataclass of params")
            return
        table = registry.components[kind]
        if name in table:
            first = table[name].plugin
            registry.duplicates[(kind, name)] = [first, plugin]
            log.warning("fsapp: %s '%s' is registered by both '%s' and '%s'", kind, name, first, plugin)
            return
        table[name] = Component(kind, name, factory, params, plugin, description)

    return register


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def reset_registry(strict: bool | None = None) -> Registry:
    """Reload all plugins (after installing one, or changing ``FSAPP_LOAD_PLUGINS``)."""
    global _REGISTRY
    _REGISTRY = load_registry(strict=strict)
    return _REGISTRY
