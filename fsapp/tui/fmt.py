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


def elide_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing its middle with ``…`` (both ends are kept:
    run names differ at the start, the time, and at the end, the method and dataset)."""
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    if width == 1:
        return "…"
    head = (width - 1 + 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


def distinct_names(names: list[str], width: int) -> list[str]:
    """Names shortened to ``width`` in the middle, dropping the part they all share first, so
    that ``20240501-100000-feature-scatter-digits`` and ``20240501-100500-feature-scatter-digits``
    stay told apart."""
    if len(names) < 2 or all(len(n) <= width for n in names):
        return [elide_middle(n, width) for n in names]
    prefix = 0
    shortest = min(len(n) for n in names)
    while prefix < shortest and len({n[prefix] for n in names}) == 1:
        prefix += 1
    cut = max(0, prefix - 4)  # keep a little context before the first difference
    trimmed = [("…" + n[cut:]) if cut > 1 else n for n in names]
    return [elide_middle(n, width) for n in trimmed]
