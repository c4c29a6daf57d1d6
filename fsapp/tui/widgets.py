"""Widgets and fillers shared by screens: robustness tables, curve plots, a labelled row."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import DataTable, Label
from textual_plotext import PlotextPlot

from fsapp.engine import events as ev
from fsapp.engine.flags import GAP_THRESHOLD
from fsapp.tui.fmt import pct, signed_pct

MAX_POINTS = 400


def attack_columns(results: Sequence[ev.EvalResult]) -> list[str]:
    """Attack specs seen in ``results``, first-seen order (clean and worst case excluded)."""
    names: list[str] = []
    for result in results:
        names.extend(k for k in result.accuracy if k not in ("clean", "worst_case") and k not in names)
    return names


def gap_text(gap: float | None) -> Text:
    """The CE-minus-margin gap, highlighted when it crosses the EVALUATION.md threshold."""
    if gap is None:
        return Text("—", style="dim")
    style = "bold reverse red" if gap > GAP_THRESHOLD else ("yellow" if gap > 0 else "")
    return Text(signed_pct(gap), style=style)


def flags_text(flags: Sequence[dict[str, str]]) -> Text:
    """Flag ids, highlighted (empty: a dim dash)."""
    if not flags:
        return Text("—", style="dim")
    return Text(" ".join(f"⚑ {f.get('id', '?')}" for f in flags), style="bold red")


def fill_robustness(table: DataTable, results: Sequence[ev.EvalResult], steps_per_epoch: int = 0) -> None:
    """(Re)fill ``table`` with one row per evaluation: clean, each attack, worst case, gap, flags."""
    attacks = attack_columns(results)
    table.clear(columns=True)
    table.add_column("epoch", key="epoch")
    table.add_column("clean", key="clean")
    for spec in attacks:
        table.add_column(Text(spec), key=spec)
    table.add_column("worst case", key="worst_case")
    table.add_column("gap CE−margin", key="gap")
    table.add_column("flags", key="flags")
    for i, result in enumerate(results):
        later = results[i + 1].epoch if i + 1 < len(results) else None
        mid = later == result.epoch  # an "evaluate now" before the epoch's own evaluation
        label = f"{result.epoch + 1}{'*' if mid else ''}"
        cells: list[object] = [label, pct(result.accuracy.get("clean"))]
        cells += [pct(result.accuracy.get(spec)) for spec in attacks]
        cells += [Text(pct(result.accuracy.get("worst_case")), style="bold"), gap_text(result.gap),
                  flags_text(result.flags)]
        table.add_row(*cells, key=str(i))
    if results:
        table.move_cursor(row=len(results) - 1)


def nice_ticks(top: int, count: int = 6) -> list[int]:
    """About ``count`` whole-number ticks from 1 to ``top`` at a 1-2-5 spacing."""
    raw = max(top / count, 1e-9)
    mag = 10 ** math.floor(math.log10(raw))
    step = max(1, int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)))
    ticks = list(range(step, top + 1, step))
    return [1] + [t for t in ticks if t > 1] if step > 1 or not ticks else ticks


def thin(xs: Sequence[float], ys: Sequence[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most ``limit`` evenly spaced points, always keeping the last one."""
    if len(xs) <= limit:
        return list(xs), list(ys)
    step = len(xs) / limit
    idx = sorted({int(i * step) for i in range(limit)} | {len(xs) - 1})
    return [xs[i] for i in idx], [ys[i] for i in idx]


def draw(
    plot: PlotextPlot,
    title: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str = "",
    ylim: tuple[float, float] | None = None,
    integer_x: bool = False,
) -> None:
    """Redraw ``plot`` with labelled line series (series with no points are skipped);
    ``integer_x`` puts ticks on whole numbers (epochs)."""
    plt = plot.plt
    plt.clear_figure()
    plt.title(title)
    if xlabel:
        plt.xlabel(xlabel)
    drawn = False
    for label, xs, ys in series:
        if not xs:
            continue
        x, y = thin(xs, ys)
        plt.plot(x, y, label=label, marker="braille" if len(x) > 1 else "dot")
        drawn = True
    if ylim is not None and drawn:
        plt.ylim(*ylim)
    if integer_x and drawn:
        plt.xticks(nice_ticks(int(max(max(xs) for _, xs, _ in series if xs))))
    plot.refresh()


class Field(Horizontal):
    """A label and a widget on one line."""

    DEFAULT_CSS = """
    Field { height: auto; }
    Field > Label { width: 16; padding: 0 1 0 0; color: $text-muted; }
    Field > .field-widget { width: 1fr; }
    """

    def __init__(self, label: str, widget: Widget, *, id: str | None = None, classes: str = "") -> None:
        super().__init__(id=id, classes=classes)
        self.label = label
        self.widget = widget
        widget.add_class("field-widget")

    def compose(self) -> ComposeResult:
        yield Label(Text(self.label))
        yield self.widget
