"""Small text formatters shared by the screens."""

from __future__ import annotations

from typing import Any


def pct(value: float | None, digits: int = 1) -> str:
    """``0.4567`` -> ``45.7%``; None -> an em dash."""
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def signed_pct(value: float | None) -> str:
    """A signed percentage for gaps: ``+12.0%``."""
    return "—" if value is None else f"{value * 100:+.1f}%"


def duration(seconds: float | None) -> str:
    """``3725`` -> ``1:02:05``; ``65`` -> ``1:05``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def value(v: Any) -> str:
    """A config value as short text (floats to 4 significant digits, lists joined)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return str(v)
