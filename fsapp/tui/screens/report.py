"""The Report screen: one saved evaluation report (``eval/*.json``) as tables, curves and, when the
report saved them, its adversarial examples beside their clean images as half-block pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from fsapp.errors import UsageError
from fsapp.tui.fmt import pct, value
from fsapp.tui.pixels import half_blocks, pair_lines, tile
from fsapp.tui.reports import read_report, report_kind
from fsapp.tui.widgets import Series, draw, flag_lines, gap_text, legend, series_colors


def numbers(values: Any) -> list[float] | None:
    """A list of numbers, or None when ``values`` is not one."""
    if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values]
    return None


def landscape_series(landscape: Any) -> tuple[str, list[Series]]:
    """A landscape report's curves: the x axis (the first list of numbers named like a step or
    coordinate) against every other list of numbers of the same length."""
    if not isinstance(landscape, dict):
        return "", []
    lists = {str(k): v for k, v in landscape.items() if numbers(v) is not None}
    for nested in landscape.values():
        if isinstance(nested, dict):
            lists.update({str(k): v for k, v in nested.items() if numbers(v) is not None})
    xkey = next((k for k in lists if k in ("alphas", "alpha", "eps", "steps", "t", "x", "radii", "distances")),
                next(iter(lists), ""))
    if not xkey:
        return "", []
    xs = numbers(lists[xkey]) or []
    ys = [Series(k, xs, numbers(v) or []) for k, v in lists.items() if k != xkey and len(v) == len(xs)]
    return xkey, series_colors(ys)


class ReportScreen(Screen[None]):
    """A report: what was evaluated and how, accuracy per attack, sweeps, landscape, flags."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.data: dict[str, Any] = {}
        self.error = ""
        try:
            self.data = read_report(self.path)
        except ValueError as exc:
            self.error = str(exc)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="report-head")
        with VerticalScroll(id="report-body"):
            yield DataTable(id="report-acc", zebra_stripes=True, cursor_type="row")
            for i, _ in enumerate(self.data.get("sweeps") or []):
                yield PlotextPlot(id=f"sweep-{i}", classes="report-plot")
                yield Static(id=f"sweep-legend-{i}", classes="legend")
            if "landscape" in self.data:
                yield PlotextPlot(id="landscape", classes="report-plot")
                yield Static(id="landscape-legend", classes="legend")
            yield Static(id="report-examples")
            yield Static(id="report-flags")
            yield Static(id="report-notes", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.path)
        head = self.query_one("#report-head", Static)
        if self.error:
            head.update(Text(f"✗ {self.error}", style="red"))
            return
        d = self.data
        threat = d.get("threat_model") if isinstance(d.get("threat_model"), dict) else {}
        settings = d.get("settings") if isinstance(d.get("settings"), dict) else {}
        head.update(Text.assemble(
            (report_kind(d), "bold"), f" · {d.get('model', '?')} · {d.get('dataset') or '?'} "
            f"({d.get('split', 'test')} split) · n={d.get('n', '?')} · {threat.get('norm', 'Linf')} "
            f"eps {value(threat.get('eps'))} · seed {d.get('seed', '?')} · batch {settings.get('batch_size', '?')}"
            f" · {str(d.get('created', ''))[:16].replace('T', ' ')} · {value(d.get('seconds'))} s"))
        self.fill_table(d)
        lines = flag_lines([f for f in d.get("flags") or [] if isinstance(f, dict)])
        flags = self.query_one("#report-flags", Static)
        flags.update(Text("\n\n").join(lines))
        flags.display = bool(lines)
        for i, sweep in enumerate(d.get("sweeps") or []):
            self.draw_sweep(i, sweep)
        if "landscape" in d:
            xkey, series = landscape_series(d["landscape"])
            draw(self.query_one("#landscape", PlotextPlot), "loss landscape", series, xlabel=xkey)
            self.query_one("#landscape-legend", Static).update(
                legend(series) if series else Text("the landscape holds no curve to draw", style="dim"))
        self.show_examples(d)
        notes = [str(n) for n in d.get("notes") or []]
        if settings.get("source"):
            notes.insert(0, f"transfer attacks crafted on {settings['source']}")
        self.query_one("#report-notes", Static).update(Text("\n".join(notes)))
        self.query_one("#report-acc", DataTable).focus()

    def show_examples(self, d: dict[str, Any]) -> None:
        """The saved clean/adversarial pairs as half-block pixels, "y=3 → 8" under each pair."""
        box = self.query_one("#report-examples", Static)
        box.display = False
        entry = d.get("examples")
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            return
        name = entry["file"]
        if Path(name).name != name:  # a report names a file beside it, never a path elsewhere
            box.update(Text(f"examples: {name!r} is not a file name beside the report", style="red"))
            box.display = True
            return
        from fsapp.app.examples import load_examples

        try:
            t = load_examples(self.path.with_name(name))
        except UsageError as exc:
            box.update(Text(f"examples: {exc}", style="red"))
            box.display = True
            return
        blocks = []
        for i in range(t["clean"].shape[0]):
            y, pred = int(t["labels"][i]), int(t["adv_pred"][i])
            caption = Text.assemble(f"y={y} → ", (str(pred) if pred >= 0 else "?",
                                                  "bold red" if pred != y else "green"))
            blocks.append(pair_lines(half_blocks(t["clean"][i].tolist()), half_blocks(t["adversarial"][i].tolist()),
                                     caption))
        head = Text.assemble(("examples", "bold"), f" · clean left, {entry.get('attack', '?')} right",
                             (f" · picture: {entry['png']}" if isinstance(entry.get("png"), str) else "", "dim"))
        box.update(Text("\n").join([head, tile(blocks, max(20, self.app.size.width - 4))]))
        box.display = True

    def fill_table(self, d: dict[str, Any]) -> None:
        table = self.query_one("#report-acc", DataTable)
        for label, key in (("", "what"), ("accuracy", "acc"), ("robust", "count"), ("seconds", "s"),
                           ("invalid", "inv"), ("access / loss", "how")):
            table.add_column(label, key=key)
        acc = d["accuracy"]
        counts = d.get("robust_count") if isinstance(d.get("robust_count"), dict) else {}
        n = d.get("n", "?")
        table.add_row(Text("clean", style="bold"), Text(pct(acc.get("clean")), style="bold"),
                      f"{counts.get('clean', '?')}/{n}", "", "", "")
        timings = d.get("timings") if isinstance(d.get("timings"), dict) else {}
        for a in d.get("attacks") or []:
            if not isinstance(a, dict):
                continue
            key = str(a.get("key", "?"))
            seconds = a.get("seconds", timings.get(key))
            table.add_row(Text(key), pct(acc.get(key)), f"{counts.get(key, '?')}/{n}",
                          f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "—",
                          str(a.get("invalid_examples", 0)), Text(f"{a.get('access', '')} / {a.get('loss', '')}"))
        if d.get("attacks"):
            table.add_row(Text("worst case", style="bold"), Text(pct(acc.get("worst_case")), style="bold"),
                          f"{counts.get('worst_case', '?')}/{n}", "", "", Text.assemble(
                              "gap ", gap_text(d.get("gap_ce_minus_margin"))))

    def draw_sweep(self, i: int, sweep: dict[str, Any]) -> None:
        """Accuracy against the swept value: each attack and the worst case."""
        xs = numbers(sweep.get("values")) or []
        curves = sweep.get("curves") if isinstance(sweep.get("curves"), dict) else {}
        series = [Series(str(k), xs, numbers(v) or []) for k, v in curves.items()]
        series.append(Series("worst case", xs, numbers(sweep.get("worst_case")) or []))
        colored = series_colors(series)
        key = str(sweep.get("key", "?"))
        draw(self.query_one(f"#sweep-{i}", PlotextPlot), f"accuracy vs {key} (n={sweep.get('n', '?')})",
             colored, xlabel=key, ylim=(0.0, 1.0))
        text = legend(colored)
        if sweep.get("png"):
            text.append(f"  · picture: {sweep['png']}", style="dim")
        self.query_one(f"#sweep-legend-{i}", Static).update(text)
