"""Widgets and fillers shared by screens: robustness tables, curve plots, a labelled row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import DataTable, Label
from textual_plotext import PlotextPlot

from fsapp.engine import events as ev
from fsapp.engine.flags import GAP_THRESHOLD
from fsapp.tui.flagdocs import explanation
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
    columns: list[tuple[object, str]] = [("epoch", "epoch"), ("clean", "clean")]
    columns += [(Text(spec), spec) for spec in attacks]
    columns += [("worst", "worst_case"), ("gap", "gap"), ("flags", "flags")]
    rows = []
    for i, result in enumerate(results):
        later = results[i + 1].epoch if i + 1 < len(results) else None
        mid = later == result.epoch  # an "evaluate now" before the epoch's own evaluation
        split = getattr(result, "split", "test")
        label = f"{result.epoch + 1}{'*' if mid else ''}{' val' if split == 'validation' else ''}"
        cells: list[object] = [label, pct(result.accuracy.get("clean"))]
        cells += [pct(result.accuracy.get(spec)) for spec in attacks]
        cells += [Text(pct(result.accuracy.get("worst_case")), style="bold"), gap_text(result.gap),
                  flags_text(result.flags)]
        rows.append(cells)
    fill_table(table, columns, rows, keys=[str(i) for i in range(len(results))], cap=60)
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


# RGB colours, given to plotext and to Rich alike (named ANSI colours are mapped differently by
# the two), readable on the dark and the light theme; legends are drawn beside the plot, not on it
RGB = ((128, 128, 128), (60, 180, 75), (70, 130, 255), (230, 60, 60), (170, 90, 230), (235, 140, 0),
       (220, 0, 150), (0, 170, 170), (150, 110, 40), (90, 90, 200), (200, 170, 0))
PALETTE = tuple((rgb, "rgb({},{},{})".format(*rgb)) for rgb in RGB)
FIXED = {"train": 0, "clean": 1, "worst case": 5, "worst": 5, "gap": 6}


@dataclass(frozen=True)
class Series:
    """One line of a plot: its label, points and (plotext, Rich) colours."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: tuple[int, int, int] | None = None
    rich: str = ""


def series_colors(series: Sequence[Series]) -> list[Series]:
    """The series with fixed colours for the usual lines (train, clean, worst case, gap) and the
    rest of the palette, in order, for the attacks."""
    free = [i for i in range(len(PALETTE)) if i not in FIXED.values()]
    out = []
    for s in series:
        i = FIXED.get(s.label)
        if i is None:
            i = free.pop(0) if free else 0
        out.append(replace(s, color=PALETTE[i][0], rich=PALETTE[i][1]))
    return out


def legend(series: Sequence[Series]) -> Text:
    """``━ label`` for each drawn series, in its colour (one line under the plots, wrapping)."""
    parts = [Text.assemble(("━━ ", s.rich or "default"), s.label) for s in series if s.xs]
    return Text("  ").join(parts)


def draw(
    plot: PlotextPlot,
    title: str,
    series: Sequence[Series | tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str = "",
    ylim: tuple[float, float] | None = None,
    integer_x: bool = False,
    log_y: bool = False,
    labels: bool = False,
) -> None:
    """Redraw ``plot`` with line series (series with no points are skipped; NaN points dropped);
    ``integer_x`` puts ticks on whole numbers (epochs), ``log_y`` uses a log axis, ``labels`` draws
    plotext's own legend (else the caller shows :func:`legend` beside the plot)."""
    plt = plot.plt
    plt.clear_figure()
    plt.title(title)
    if xlabel:
        plt.xlabel(xlabel)
    drawn: list[float] = []
    for item in series:
        s = item if isinstance(item, Series) else Series(*item)
        points = [(x, y) for x, y in zip(s.xs, s.ys, strict=False) if y == y]
        if not points:
            continue
        x, y = thin([p[0] for p in points], [p[1] for p in points])
        options: dict[str, object] = {"marker": "braille" if len(x) > 1 else "dot"}
        if s.color:
            options["color"] = s.color
        if labels or not s.color:
            options["label"] = s.label
        plt.plot(x, y, **options)
        drawn += x
    if log_y and drawn:
        plt.yscale("log")
    if ylim is not None and drawn and not log_y:
        plt.ylim(*ylim)
    if integer_x and drawn:
        plt.xticks(nice_ticks(int(max(drawn))))
    plot.refresh()


def flag_lines(flags: Sequence[dict[str, str]]) -> list[Text]:
    """Each flag: its id and message, then what docs/EVALUATION.md says about it."""
    out = []
    for f in flags:
        fid = str(f.get("id", "?"))
        out.append(Text.assemble((f"⚑ {fid}", "bold red"), f": {f.get('message', '')}\n",
                                 (explanation(fid), "dim")))
    return out


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


def cell_width(cell: object) -> int:
    """Terminal cells a table cell's text takes (its longest line)."""
    text = cell if isinstance(cell, Text) else Text(str(cell))
    return max((line.cell_len for line in text.split("\n")), default=0)


def fill_table(table: DataTable, columns: Sequence[tuple[object, str]], rows: Sequence[Sequence[object]],
               keys: Sequence[str] | None = None, cap: int | Sequence[int] = 40) -> None:
    """Refill ``table`` with columns of fixed widths measured from their labels and cells (at most
    ``cap``, one for all or one per column): the table never falls back to widths measured while
    its screen was hidden."""
    table.clear(columns=True)
    caps = [cap] * len(columns) if isinstance(cap, int) else list(cap)
    for i, (label, key) in enumerate(columns):
        width = max([cell_width(label)] + [cell_width(r[i]) for r in rows if i < len(r)])
        table.add_column(label if isinstance(label, Text) else Text(str(label)), key=key, width=min(width, caps[i]))
    for j, row in enumerate(rows):
        table.add_row(*row, key=keys[j] if keys is not None else None)
