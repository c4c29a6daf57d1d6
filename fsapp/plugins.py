"""The plugin manager: built-ins plus entry points (group ``fsapp``), failures isolated.

Built-ins register through the same hooks as third-party plugins (one hook per kind, listed in
:mod:`fsapp.hookspecs`). Plugins fail alone:

- a plugin whose import or hook raises (any exception but KeyboardInterrupt, SystemExit
  included) costs one warning line (a :class:`PluginFailure`) and nothing else;
- a component registered with a bad name, params or factory is skipped with one warning line;
- a name provided twice is one warning line, and both components stay reachable under their
  qualified names ``plugin/name`` (e.g. ``fsapp/pgd``, ``my-plugin/pgd``). A built-in keeps its
  plain name; two plugins sharing a name leave the plain name ambiguous (asking for it is one
  line naming the qualified choices);
- an error raised while a plugin's component is built or called (its factory, or the attack,
  perturbation or solver it returned) is one :class:`~fsapp.errors.PluginError` line naming the
  plugin and the component (a ValueError or RuntimeError stays one, see
  :func:`~fsapp.errors.plugin_failure`). Built-ins are not wrapped: their errors are bugs.

``FSAPP_LOAD_PLUGINS`` (comma-separated entry-point names, empty for none) chooses which
entry-point plugins load; ``FSAPP_STRICT_PLUGINS=1`` (or ``--strict-plugins``) turns load
failures and duplicate names into errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from fsapp import hookspecs
from fsapp._version import __version__
from fsapp.errors import FsappError, PluginError, UsageError, plugin_failure
from fsapp.registry import HOOKS, KINDS, Component, ModelParams, NoParams, Spec, parse_spec

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
GUARDED_CALLS = ("solver", "perturbation", "attack")  # kinds whose factory returns a plain callable
COMPONENT_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
QUALIFIER = "/"  # ``plugin/name``: one plugin's component when two provide the same name

__all__ = ["HOOKS", "KINDS", "PluginFailure", "Registry", "get_registry", "load_registry", "reset_registry"]


@dataclass(frozen=True)
class PluginFailure:
    """A plugin (or one of its components) that could not load or register, with a one-line reason."""

    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' skipped: {self.reason}"


@dataclass
class Registry:
    """Every registered component by kind, plus the plugins that failed.

    ``components[kind]`` maps each reachable name to its component: plain names, plus
    ``plugin/name`` for a component whose plain name is taken. Any component can also be asked
    for by its qualified name (see :meth:`get`).
    """

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    failures: list[PluginFailure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # duplicate names (visible, not failures)
    qualified: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    ambiguous: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # plain -> qualified
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> version

    def names(self, kind: str) -> list[str]:
        """Sorted names of the components of ``kind`` (qualified where a plain name is shared)."""
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> Component:
        """The component called ``name`` (or ``plugin/name``); a clear error names the valid ones."""
        table = self._kind(kind)
        if name in table:
            return table[name]
        if name in self.qualified[kind]:
            return self.qualified[kind][name]
        if (kind, name) in self.ambiguous:
            choices = " or ".join(self.ambiguous[(kind, name)])
            raise UsageError(f"{kind} {name!r} is provided by more than one plugin; name one: {choices}")
        raise UsageError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")

    def create(self, kind: str, spec: str | Spec, **params: Any) -> Any:
        """Build a component from a spec string (``"name:key=value"``) plus keyword params."""
        parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
        component = self.get(kind, parsed.name)
        merged: dict[str, Any] = dict(parsed.params)
        merged.update(params)
        return component.build(merged)

    def _kind(self, kind: str) -> dict[str, Component]:
        if kind not in self.components:
            raise UsageError(f"unknown component kind '{kind}'; valid: {', '.join(KINDS)}")
        return self.components[kind]


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())


class GuardedCall:
    """A plugin's callable component (attack, perturbation, solver): an error raised while it runs
    becomes one :class:`PluginError` line naming the plugin and the component.

    Attribute reads and writes pass through, and ``isinstance`` sees the component's own class,
    so code that inspects a component (its ``norm``, ``eps``...) sees the component.
    """

    __slots__ = ("_inner", "_label")

    def __init__(self, inner: Callable[..., Any], label: str) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_label", label)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._inner(*args, **kwargs)
        except (FsappError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - plugin code fails alone
            raise plugin_failure(f"{self._label} failed: {_one_line(exc)}", exc) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance() checks see the wrapped component
        return type(self._inner)

    def __repr__(self) -> str:
        return f"GuardedCall({self._inner!r})"


def _guarded_factory(plugin: str, kind: str, name: str, factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``factory`` whose errors, and those of the callable it returns, name the plugin and component."""
    label = f"{kind} '{name}' from plugin '{plugin}'"

    def build(params: Any) -> Any:
        try:
            made = factory(params)
        except (FsappError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - plugin code fails alone
            raise plugin_failure(f"{label} failed to build: {_one_line(exc)}", exc) from exc
        if kind in GUARDED_CALLS and callable(made):
            return GuardedCall(made, label)
        return made

    build.__doc__ = getattr(factory, "__doc__", None)
    build.__wrapped__ = factory  # type: ignore[attr-defined]
    return build


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

    def warn(message: str) -> None:
        if strict:
            raise PluginError(message)
        registry.warnings.append(message)
        log.warning("fsapp: %s", message)


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
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin must not end fsapp
            fail(plugin, f"import failed: {_one_line(exc)}")
            continue
        owners[id(obj)] = plugin
        dist = getattr(ep, "dist", None)
        registry.plugins[plugin] = dist.version if dist is not None else "?"

    for kind, hook_name in HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order
            plugin = owners.get(id(impl.plugin), impl.plugin_name)
            register = _make_register(registry, kind, plugin, fail, warn)
            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin must not end fsapp
                if plugin == BUILTIN_PLUGIN or (strict and isinstance(exc, PluginError)):
                    raise
                fail(plugin, f"hook {hook_name} raised {_one_line(exc)}")
    return registry


def _check_params(kind: str, params: Any) -> str | None:
    """Why ``params`` cannot be a component's parameter dataclass, or None."""
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        return f"params must be a dataclass, got {params!r}"
    if kind == "model" and not issubclass(params, ModelParams):
        return "a model's params must subclass fsapp.registry.ModelParams"
    try:  # listings and forms read every field's type and default
        Component(kind, "-", lambda p: p, params, "-").param_table()
    except Exception as exc:  # noqa: BLE001 - unresolvable annotations, failing default factories
        return f"params cannot be read: {_one_line(exc)}"
    return None


def _make_register(
    registry: Registry, kind: str, plugin: str,
    fail: Callable[[str, str], None], warn: Callable[[str], None],
) -> Callable[..., None]:
    def register(
        name: str,
        factory: Callable[[Any], Any],
        params: type | None = None,
        description: str = "",
    ) -> None:
        params = params or NoParams
        if not isinstance(name, str) or not COMPONENT_NAME.fullmatch(name):
            fail(plugin, f"registered a {kind} with an invalid name {name!r}; names are 1-100 letters, "
                         "digits, '-', '_', '.'")
            return
        if not callable(factory):
            fail(plugin, f"{kind} '{name}': the factory is not callable ({factory!r})")
            return
        if (why := _check_params(kind, params)) is not None:
            fail(plugin, f"{kind} '{name}': {why}")
            return
        if not isinstance(description, str):
            fail(plugin, f"{kind} '{name}': the description must be a string, got {type(description).__name__}")
            return
        qualified = f"{plugin}{QUALIFIER}{name}"
        if qualified in registry.qualified[kind]:
            fail(plugin, f"registered {kind} '{name}' twice")
            return
        if plugin != BUILTIN_PLUGIN:
            factory = _guarded_factory(plugin, kind, name, factory)
        component = Component(kind, name, factory, params, plugin, " ".join(description.split()))
        registry.qualified[kind][qualified] = component
        table = registry.components[kind]
        if (kind, name) in registry.ambiguous:  # a third plugin joins the clash
            registry.ambiguous[(kind, name)].append(qualified)
            table[qualified] = dataclasses.replace(component, name=qualified)
            warn(f"{kind} '{name}' is provided by more than one plugin; name one: "
                 + " or ".join(registry.ambiguous[(kind, name)]))
            return
        if name not in table:
            table[name] = component
            return
        first = table[name]
        if plugin == BUILTIN_PLUGIN:
            raise PluginError(f"built-in {kind} '{name}' is registered twice")
        table[qualified] = dataclasses.replace(component, name=qualified)
        if first.plugin == BUILTIN_PLUGIN:
            warn(f"plugin '{plugin}' provides {kind} '{name}', a built-in name: '{name}' is the built-in, "
                 f"'{qualified}' is the plugin's")
            return
        first_qualified = f"{first.plugin}{QUALIFIER}{name}"
        del table[name]
        table[first_qualified] = dataclasses.replace(first, name=first_qualified)
        registry.ambiguous[(kind, name)] = [first_qualified, qualified]
        warn(f"{kind} '{name}' is provided by plugins '{first.plugin}' and '{plugin}'; "
             f"name one: {first_qualified} or {qualified}")

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
