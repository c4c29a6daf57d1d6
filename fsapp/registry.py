"""Component specs: name lookup, parameter dataclasses and ``"name:key=value,..."`` strings."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, Union, get_args, get_origin

from fsapp import hookspecs
from fsapp.errors import UsageError

_NAME = re.compile(r"(?:[A-Za-z0-9_.\-]+/)?[A-Za-z0-9_.\-]+")  # ``name`` or ``plugin/name``


def _hooks_from_specs() -> dict[str, str]:
    """Component kind -> hook name, one per ``register_<kind>s`` hookspec in :mod:`fsapp.hookspecs`
    (in definition order): a new kind of component needs one new hookspec and nothing else here."""
    hooks = {}
    for name, fn in vars(hookspecs).items():
        if callable(fn) and getattr(fn, "fsapp_spec", None) is not None and name.startswith("register_"):
            hooks[name.removeprefix("register_").removesuffix("s")] = name
    return hooks


HOOKS: dict[str, str] = _hooks_from_specs()
KINDS: tuple[str, ...] = tuple(HOOKS)


@dataclass
class NoParams:
    """Parameters of a component that takes none."""


@dataclass
class ModelParams:
    """Fields every model receives; the dataset fills them in unless given."""

    num_classes: int = 10
    channels: int = 3
    size: int = 32
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class Component:
    """One registered component: a name, its factory, its parameters and who provides it."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    params: type
    plugin: str
    description: str = ""

    def param_table(self) -> list[dict[str, Any]]:
        """The parameters as ``{"name", "type", "default"}`` rows (for listings and forms)."""
        hints = typing.get_type_hints(self.params)
        rows = []
        for f in dataclasses.fields(self.params):
            row = {"name": f.name, "type": type_name(hints[f.name]), "default": _default(f)}
            if (bounds := value_range(f)) is not None:
                row["range"] = range_text(*bounds, *open_ends(f))
            rows.append(row)
        return rows

    def build(self, params: dict[str, Any] | None = None) -> Any:
        """Validate ``params`` against the dataclass and call the factory."""
        instance = make_params(self, params or {})
        return self.factory(instance)


def ranged(default: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A parameter field with a valid range, checked wherever the parameter is set (config
    files, ``--set``, spec strings, model-file metadata): ``width: int = ranged(16, 1, 4096)``.

    Bounds are inclusive unless ``low_open``/``high_open`` (``lr: float = ranged(0.1, 0, 10,
    low_open=True)`` means 0 < lr <= 10). Tuples and lists are checked element by element.
    The range shows in ``fsapp plugins list``.
    """
    metadata: dict[str, Any] = {"range": (low, high)}
    if low_open or high_open:
        metadata["open"] = (low_open, high_open)
    return field(default=default, metadata=metadata)


def value_range(f: dataclasses.Field) -> tuple[float | None, float | None] | None:
    """A field's declared ``(low, high)`` range, or None."""
    return f.metadata.get("range") if f.metadata else None


def open_ends(f: dataclasses.Field) -> tuple[bool, bool]:
    """Whether a ranged field's low and high bounds are excluded."""
    return f.metadata.get("open", (False, False)) if f.metadata else (False, False)


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def range_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``1..4096``, ``>= 0``, ``<= 1`` or ``> 0 and <= 10`` as shown in messages and listings."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {_bound(low)}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {_bound(high)}")
    if low is not None and high is not None and not (low_open or high_open):
        return f"{_bound(low)}..{_bound(high)}"
    return " and ".join(parts)


def in_range(value: Any, bounds: tuple[float | None, float | None],
             open_: tuple[bool, bool] = (False, False)) -> bool:
    """Whether a number (or every number of a tuple or list) lies in ``bounds``; NaN never does."""
    low, high = bounds
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if math.isnan(item):
            return False
        if low is not None and (item <= low if open_[0] else item < low):
            return False
        if high is not None and (item >= high if open_[1] else item > high):
            return False
    return True


def check_range(label: str, key: str, value: Any, bounds: tuple[float | None, float | None],
                open_: tuple[bool, bool] = (False, False)) -> None:
    """UsageError naming ``key``, ``value`` and the valid range when a number falls outside it."""
    if not in_range(value, bounds, open_):
        raise UsageError(f"{label} parameter '{key}' = {format_value(value)} is out of range; "
                         f"valid: {range_text(*bounds, *open_)}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def type_name(tp: Any) -> str:
    """A short human name of a parameter type."""
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in get_args(tp) if a is not type(None)]
        return type_name(args[0]) + "?" if len(args) == 1 else "|".join(type_name(a) for a in args)
    if origin is tuple:
        return f"tuple[{type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def parse_float(text: str) -> float:
    """Parse ``"0.1"``, ``"1e-3"`` or a fraction like ``"8/255"``."""
    s = text.strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(Fraction(num.strip())) / float(Fraction(den.strip()))
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number like 0.1 or 8/255, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` (a string from a spec or a TOML value) to type ``tp``; ValueError if not."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"expected one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is Union or (origin is not None and type(None) in get_args(tp)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        return coerce(value, args[0])
    if origin is tuple:
        inner = get_args(tp)[0]
        if isinstance(value, str):
            seps = value.replace(";", " ") if inner is str else value.replace(";", " ").replace(",", " ")
            parts = [p for p in seps.split() if p]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(coerce(p, inner) for p in parts)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError(f"expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):
            return parse_float(value)
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    return value


def format_value(value: Any) -> str:
    """A value as spec-string text that :func:`coerce` reads back (bools, floats, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return ";".join(format_value(v) for v in value)
    return str(value)


def eps_text(eps: float | None) -> str:
    """An eps for people (the display formatter; :func:`format_value` is the one the spec parser
    reads back): ``8/255`` when eps is a whole number of 1/255 steps (and no short decimal), else
    the number in at most 6 significant digits (``0.1``, never ``0.09999999999999999``)."""
    if eps is None:
        return "unbounded"
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and abs(round(eps, 4) - eps) > 1e-12:
        return f"{round(k)}/255"
    return f"{eps:.6g}"


def make_params(component: Component, values: dict[str, Any]) -> Any:
    """Build the component's params dataclass from ``values``, with one-line errors."""
    cls = component.params
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    label = f"{component.kind} '{component.name}'"
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in hints or key not in names:
            valid = ", ".join(names) if names else "(none)"
            raise UsageError(f"unknown parameter '{key}' for {label}; valid: {valid}")
        try:
            kwargs[key] = coerce(raw, hints[key])
        except ValueError as exc:
            raise UsageError(f"bad value for {label} parameter '{key}': {exc}") from None
    for f in dataclasses.fields(cls):
        bounds = value_range(f)
        if bounds is not None and f.name in kwargs:
            check_range(label, f.name, kwargs[f.name], bounds, open_ends(f))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad parameters for {label}: {exc}") from None


@dataclass(frozen=True)
class Spec:
    """A parsed spec string: a component name and its raw parameter values."""

    name: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_spec(spec: str) -> Spec:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` (``name`` may be ``plugin/name``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty component spec {spec!r}; expected 'name' or 'name:key=value,...'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"spec {spec!r} has no component name; expected 'name:key=value,...'")
    if not _NAME.fullmatch(name):
        raise UsageError(f"bad component name {name!r} in spec {spec!r}; names use letters, digits, '-', '_', '.', "
                         "and 'plugin/name' picks one plugin's component")
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise UsageError(
                    f"bad item {item.strip()!r} in spec {spec!r}; expected 'name:key=value,key=value'"
                )
            if key in params:
                raise UsageError(f"parameter '{key}' given twice in spec {spec!r}")
            params[key] = value.strip()
    return Spec(name, params)


def declared_norm(obj: Any) -> str | None:
    """The ``norm`` an attack object or its params class declares (``norm: ClassVar[str] = "L2"``)."""
    norm = getattr(obj, "norm", None)
    return norm if isinstance(norm, str) else None


def apply_defaults(spec: str, defaults: dict[str, Any] | None) -> str:
    """The attack spec with ``key=value`` added for each default it does not name, where the attack
    has that parameter and its default is not None (None means "derived", e.g. FGSM's step = eps).
    ``eps`` and ``step_size`` defaults only apply to Linf attacks."""
    from fsapp.plugins import get_registry  # lazy: fsapp.plugins imports this module

    parsed = parse_spec(spec)
    if not defaults:
        return str(parsed)
    component = get_registry().get("attack", parsed.name)
    fields = {f.name: f for f in dataclasses.fields(component.params)}
    declared = declared_norm(component.params)
    params = dict(parsed.params)
    for key, value in defaults.items():
        f = fields.get(key)
        if f is None or key in params or value is None:
            continue
        if f.default is None or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            continue
        if key in ("eps", "step_size") and declared not in (None, "Linf"):
            continue
        params[key] = format_value(value)
    return str(Spec(parsed.name, params))
