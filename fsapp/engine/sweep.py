"""Accuracy curves over eps, steps or restarts (the paper's Figure 3): data, PNG and a text plot.

``eps=0:16/255:9`` sweeps 9 evenly spaced values from 0 to 16/255; ``steps=1,5,10,20,50,100``
lists them. Each value is one :func:`fsapp.engine.evaluate.evaluate` run of the given attacks
with that parameter set; in an eps sweep, attacks whose step size is not named explicitly use
step eps/4 (the paper's 2/255 at 8/255), so that large balls can be reached. matplotlib is
imported only to draw a PNG (Agg, no display needed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fsapp.checkpoint import atomic_write_bytes
from fsapp.engine.evaluate import evaluate
from fsapp.engine.flags import curve_flags
from fsapp.errors import UsageError
from fsapp.registry import Spec, parse_float, parse_spec

INT_KEYS = ("steps", "restarts", "queries", "targets")
MARKERS = "●■▲◆+x*o"


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``key=start:stop:count`` or ``key=v1,v2,...`` -> (key, values)."""
    key, eq, rest = text.partition("=")
    key, rest = key.strip(), rest.strip()
    if not eq or not key or not rest:
        raise UsageError(f"bad --sweep {text!r}; expected key=start:stop:count (eps=0:16/255:9) or key=v1,v2,... "
                         "(steps=1,5,10,20,50,100)")
    try:
        if ":" in rest and "," not in rest:
            parts = rest.split(":")
            if len(parts) != 3:
                raise ValueError("a range is start:stop:count")
            lo, hi = parse_float(parts[0]), parse_float(parts[1])
            count = int(parts[2])
            if count < 2:
                raise ValueError("a range needs count >= 2")
            values = [lo + (hi - lo) * i / (count - 1) for i in range(count)]
        else:
            values = [parse_float(v) for v in rest.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"bad --sweep {text!r}: {exc}") from None
    if not values:
        raise UsageError(f"bad --sweep {text!r}: no values")
    if key in INT_KEYS:
        if any(v != int(v) or v < 1 for v in values):
            raise UsageError(f"--sweep {key} needs whole numbers >= 1, got {rest}")
        values = [int(v) for v in values]
    elif any(v < 0 for v in values):
        raise UsageError(f"--sweep {key} needs values >= 0, got {rest}")
    return key, values


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def sweep_spec(spec: str, key: str, value: float) -> str | None:
    """``spec`` with ``key=value`` (and step eps/4 in an eps sweep); None if the attack lacks ``key``."""
    from fsapp.plugins import get_registry

    parsed = parse_spec(spec)
    comp = get_registry().get("attack", parsed.name)
    fields = {f.name: f for f in dataclasses.fields(comp.params)}
    if key not in fields:
        return None
    params = dict(parsed.params)
    params[key] = repr(value) if isinstance(value, float) else str(value)
    step = fields.get("step_size")
    if key == "eps" and step is not None and "step_size" not in parsed.params and step.default is not None:
        params["step_size"] = repr(value / 4)
    return str(Spec(parsed.name, params))


def run_sweep(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[str],
    key: str,
    values: list[float],
    *,
    defaults: dict[str, Any] | None = None,
    state: str | Path | None = None,
    resume: bool = False,
    on_point: Callable[[int, float], Any] | None = None,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``specs`` at each value of ``key``; returns the curves (JSON-ready) with their flags.

    ``on_point(i, value)`` is called before each point (the CLI uses it to label progress).
    """

    t0 = time.perf_counter()
    applicable = [s for s in specs if sweep_spec(s, key, values[0]) is not None]
    if not applicable:
        raise UsageError(f"--sweep {key}: none of the attacks ({', '.join(specs)}) has a '{key}' parameter")
    curves: dict[str, list[float]] = {s: [] for s in applicable}
    worst: list[float] = []
    clean = None
    flags: list[dict[str, str]] = []
    for i, value in enumerate(values):
        if on_point is not None:
            on_point(i, value)
        point_specs = [sweep_spec(s, key, value) for s in applicable]
        point_defaults = dict(defaults or {})
        if key == "eps":
            point_defaults.update(eps=float(value), step_size=float(value) / 4)
        point_state = None
        if state is not None:
            point_state = Path(state).with_name(f"{Path(state).name}.{key}{i}")
        kwargs = dict(evaluate_kwargs)
        if kwargs.get("on_batch") is not None:
            names = dict(zip(point_specs, applicable, strict=True))
            outer = kwargs["on_batch"]
            kwargs["on_batch"] = lambda p, names=names, outer=outer: outer(dataclasses.replace(
                p, key=names.get(p.key, p.key)))
        report = evaluate(model, x, y, [s for s in point_specs if s], defaults=point_defaults, state=point_state,
                          resume=resume and point_state is not None and point_state.exists(),
                          checks=i == 0, **kwargs)
        for spec, resolved in zip(applicable, point_specs, strict=True):
            curves[spec].append(report.accuracy[resolved])
        worst.append(report.accuracy["worst_case"])
        clean = report.accuracy["clean"]
        for flag in report.flags:
            if flag["id"] not in {f["id"] for f in flags}:
                shown = _fmt(value * 255) + "/255" if key == "eps" else _fmt(value)
                flags.append({"id": flag["id"], "message": f"[{key}={shown}] {flag['message']}"})
    skipped = [s for s in specs if s not in applicable]
    for flag in curve_flags(key, values, curves):
        if flag not in flags:
            flags.append(flag)
    return {"key": key, "values": list(values), "curves": curves, "worst_case": worst, "clean": clean,
            "n": len(y), "skipped": skipped, "flags": flags, "seconds": time.perf_counter() - t0}


def save_png(sweep: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Draw the curves as a PNG (matplotlib, Agg canvas; imported here only)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("the PNG needs matplotlib: pip install 'fsapp[plots]'") from None

    values = sweep["values"]
    xs = [v * 255 for v in values] if sweep["key"] == "eps" else values
    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, accs in sweep["curves"].items():
        ax.plot(xs, [100 * a for a in accs], marker="o", label=label)
    if len(sweep["curves"]) > 1:
        ax.plot(xs, [100 * a for a in sweep["worst_case"]], linestyle="--", color="black", label="worst case")
    ax.set_xlabel("eps (x 1/255)" if sweep["key"] == "eps" else sweep["key"])
    if sweep["key"] in ("steps", "restarts") and min(values) > 0 and max(values) / min(values) >= 20:
        ax.set_xscale("log")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"accuracy vs {sweep['key']} (n={sweep['n']})", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def text_plot(sweep: dict[str, Any], width: int = 56, height: int = 12) -> str:
    """A plain-text chart of the curves (accuracy 0-100% against the swept values)."""
    values = sweep["values"]
    key = sweep["key"]
    xs = [v * 255 for v in values] if key == "eps" else [float(v) for v in values]
    log = key in ("steps", "restarts") and min(xs) > 0 and max(xs) / min(xs) >= 20
    tx = [math.log10(v) for v in xs] if log else xs
    lo, hi = min(tx), max(tx)
    span = hi - lo or 1.0
    grid = [[" "] * width for _ in range(height)]
    labels = list(sweep["curves"])
    for k, label in enumerate(labels):
        mark = MARKERS[k % len(MARKERS)]
        for xv, acc in zip(tx, sweep["curves"][label], strict=True):
            col = round((xv - lo) / span * (width - 1))
            row = height - 1 - round(acc * (height - 1))
            grid[row][col] = mark
    lines = []
    for r, row in enumerate(grid):
        pct = 100 * (height - 1 - r) / (height - 1)
        axis = f"{pct:5.0f}% |" if r % 3 == 0 or r == height - 1 else "       |"
        lines.append(axis + "".join(row))
    lines.append("       +" + "-" * width)
    left, right = _fmt(values[0] * 255 if key == "eps" else values[0]), _fmt(values[-1] * 255 if key == "eps" else
                                                                                values[-1])
    unit = f"{key} (x 1/255)" if key == "eps" else key + (" (log)" if log else "")
    lines.append("        " + left + unit.center(max(1, width - len(left) - len(right))) + right)
    for k, label in enumerate(labels):
        accs = ", ".join(f"{100 * a:.1f}" for a in sweep["curves"][label])
        lines.append(f"  {MARKERS[k % len(MARKERS)]} {label}: {accs}")
    return "\n".join(lines)
