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

from fsapp.errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
KINDS: tuple[str, ...] = ("model", "dataset", "solver", "perturbation", "attack", "tracker")


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
                row["range"] = range_text(*bounds)
            rows.append(row)
        return rows

    def build(self, params: dict[str, Any] | None = None) -> Any:
        """Validate ``params`` against the dataclass and call the factory."""
        instance = make_params(self, params or {})
        return self.factory(instance)


def ranged(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A parameter field with an inclusive valid range, checked wherever the parameter is set
    (config files, ``--set``, spec strings, model-file metadata): ``width: int = ranged(16, 1, 4096)``.

    Tuples and lists are checked element by element. The range shows in ``fsapp plugins list``.
    """
    return field(default=default, metadata={"range": (low, high)})


def value_range(f: dataclasses.Field) -> tuple[float | None, float | None] | None:
    """A field's declared ``(low, high)`` range, or None."""
    return f.metadata.get("range") if f.metadata else None


def range_text(low: float | None, high: float | None) -> str:
    """``1..4096``, ``>= 0`` or ``<= 1`` as shown in messages and listings."""
    if low is not None and high is not None:
        return f"{low:g}..{high:g}"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


def check_range(label: str, key: str, value: Any, bounds: tuple[float | None, float | None]) -> None:
    """UsageError naming ``key``, ``value`` and the valid range when a number falls outside it."""
    low, high = bounds
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if math.isnan(item) or (low is not None and item < low) or (high is not None and item > high):
            raise UsageError(f"{label} parameter '{key}' = {format_value(value)} is out of range; "
                             f"valid: {range_text(low, high)}")


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
            check_range(label, f.name, kwargs[f.name], bounds)
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
    """Parse ``"name"`` or ``"name:key=value,key=value"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty component spec {spec!r}; expected 'name' or 'name:key=value,...'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"spec {spec!r} has no component name; expected 'name:key=value,...'")
    if not _NAME.fullmatch(name):
        raise UsageError(f"bad component name {name!r} in spec {spec!r}; names use letters, digits, '-', '_', '.'")
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
