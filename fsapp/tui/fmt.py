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


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def elide_keeping(text: str, width: int, keep: int) -> str:
    """``text`` cut to ``width`` in the middle, keeping at least its first ``keep`` characters
    (and a few of its last) where the width allows."""
    if len(text) <= width:
        return text
    if width < 2:
        return "…"[:width]
    head = max((width - 1 + 1) // 2, min(keep, width - 4))
    tail = width - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail > 0 else "")


def distinct_names(names: list[str], width: int) -> list[str]:
    """Names shortened to ``width`` so that they stay told apart: each keeps the place where it
    first differs from the most similar other name (``…1-10002-…gits`` for
    ``20240501-10002-feature-scatter-digits`` beside ``20240501-10001-...``), and its end."""
    out = []
    for i, name in enumerate(names):
        if len(name) <= width:
            out.append(name)
            continue
        d = max((_common(name, o) for j, o in enumerate(names) if j != i), default=0)
        lead = 6 if width >= 18 else 2  # context kept before the first difference
        start = d - lead if d > lead + 2 else 0
        text = "…" + name[start:] if start else name
        out.append(elide_keeping(text, width, d - start + (1 if start else 0) + 2))
    return out
