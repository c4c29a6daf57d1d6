"""The Compare screen: two or more runs side by side as a research table.

Last and best live evaluation (with its split), the newest saved report of each run, warnings when
the numbers were measured differently (samples, budget, attacks), the configuration differences,
worst-case and gap curves, and an export of the table through :mod:`fsapp.app.tables` (the
``fsapp report`` exporter) as Markdown, LaTeX or CSV.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from fsapp.app.jobs import Jobs
from fsapp.engine.rundir import RunState, RunTracker, config_diff, run_status
from fsapp.errors import UsageError
from fsapp.tui.fmt import distinct_names, duration, pct, value
from fsapp.tui.messages import JobsChanged
from fsapp.tui.reports import SavedReport, saved_reports
from fsapp.tui.widgets import (
    Series,
    attack_columns,
    draw,
    fill_table,
    flags_text,
    gap_text,
    legend,
    series_colors,
)

EXPORTS = {"md": "Markdown", "tex": "LaTeX", "csv": "CSV"}


def short(name: str, width: int = 24) -> str:
    """One run name cut in the middle to ``width`` characters."""
    return distinct_names([name], width)[0]


def settings_warnings(states: list[RunState], reports: list[SavedReport | None], names: list[str]) -> list[str]:
    """One line per setting that differs between the runs' last evaluations or saved reports."""
    out = []

    def differ(what: str, values: list[str | None]) -> None:
        shown = [(n, v) for n, v in zip(names, values, strict=True) if v is not None]
        if len({v for _, v in shown}) > 1:
            out.append(f"{what} differ: " + "; ".join(f"{n} {v}" for n, v in shown))

    lasts = [s.last_eval for s in states]
    differ("live evaluations' samples", [f"n={e.n}" if e else None for e in lasts])
    differ("live evaluations' eps", [value(s.config.get("eval", {}).get("eps")) if e else None
                                     for s, e in zip(states, lasts, strict=True)])
    differ("live evaluations' attacks", [" ".join(k for k in e.accuracy if k not in ("clean", "worst_case"))
                                         if e else None for e in lasts])
    differ("saved reports' samples", [f"n={r.n}" if r else None for r in reports])
    differ("saved reports' eps", [value(r.eps) if r else None for r in reports])
    differ("saved reports' evaluations", [r.kind if r else None for r in reports])
    return out


class CompareScreen(Screen[None]):
    """Runs side by side; follows them while they train."""

    BINDINGS = [
        Binding("m", "export('md')", "Export .md", tooltip="write the table as Markdown beside the runs"),
        Binding("t", "export('tex')", "Export .tex", tooltip="write the table as LaTeX beside the runs"),
        Binding("x", "export('csv')", "Export .csv", tooltip="write the table as CSV beside the runs"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, paths: list[Path], jobs: Jobs, poll_interval: float = 0.5) -> None:
        super().__init__()
        self.trackers = [RunTracker(Path(p)) for p in paths]
        self.jobs = jobs
        self.poll_interval = poll_interval
        self.reports: list[SavedReport | None] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="compare-warnings")
        with VerticalScroll(id="compare"):
            yield DataTable(id="summary", zebra_stripes=True, cursor_type="row")
            with Horizontal(id="compare-plots"):
                yield PlotextPlot(id="robust-curves")
                yield PlotextPlot(id="gap-curves")
            yield Static(id="compare-legend", classes="legend")
            yield Static("config differences", classes="section")
            yield DataTable(id="diff", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"compare {len(self.trackers)} runs"
        for t in self.trackers:
            t.poll()
        self.render_all()
        self.set_interval(max(self.poll_interval * 4, 1.0), self.poll)
        self.query_one("#summary", DataTable).focus()

    def poll(self) -> None:
        if any([t.poll() for t in self.trackers]):
            self.render_all()

    def on_jobs_changed(self, message: JobsChanged) -> None:
        self.render_all()

    def names(self) -> list[str]:
        """Run names that stay told apart in columns as wide as the screen allows."""
        width = self.size.width or self.app.size.width or 80
        per = max(10, min(28, (width - 22) // max(len(self.trackers), 1) - 2))
        return distinct_names([t.path.name for t in self.trackers], per)

    def render_all(self) -> None:
        states = [t.state for t in self.trackers]
        self.reports = [next(iter(saved_reports(t.path)), None) for t in self.trackers]
        names = self.names()
        self.fill_summary(states, names)
        self.fill_diff(states, names)
        self.draw_curves(states, names)
        warnings = settings_warnings(states, self.reports, names)
        box = self.query_one("#compare-warnings", Static)
        box.update(Text("\n").join(Text.assemble(("⚠ ", "bold yellow"), w) for w in warnings))
        box.display = bool(warnings)

    def on_resize(self) -> None:
        if self.query("#compare-warnings"):
            self.render_all()

    def status(self, tracker: RunTracker) -> Text:
        """The run's status; failed when its last training job started here failed."""
        status = run_status(tracker.path, tracker.state)
        job = self.jobs.latest_for(tracker.path)
        if status == "interrupted" and job is not None and job.status in ("failed", "killed"):
            status = "failed"
        return Text(status)

    @staticmethod
    def best(s: RunState) -> str:
        """Best live worst case, its epoch, and its split (validation when the run has one)."""
        splits = {getattr(r, "split", "test") for r in s.evals}
        split = "validation" if "validation" in splits else "test"
        best: tuple[float, int] | None = None
        for r in s.evals:
            v = r.accuracy.get("worst_case")
            if getattr(r, "split", "test") == split and v is not None and (best is None or v > best[0]):
                best = (v, r.epoch)
        return "—" if best is None else f"{pct(best[0])} ep{best[1] + 1} {'val' if split == 'validation' else split}"

    def fill_summary(self, states: list[RunState], names: list[str]) -> None:
        lasts = [s.last_eval for s in states]
        attacks = attack_columns([e for e in lasts if e is not None])
        reports = self.reports
        rows: list[tuple[str, list[object]]] = [
            ("status", [self.status(t) for t in self.trackers]),
            ("epochs", [f"{s.epochs_done}/{s.epochs_total}" for s in states]),
            ("best worst (split)", [Text(self.best(s), style="bold") for s in states]),
            ("last n", [str(e.n) if e else "—" for e in lasts]),
            ("last clean", [pct(e.accuracy.get("clean")) if e else "—" for e in lasts]),
        ]
        rows += [(f"last {spec}", [pct(e.accuracy.get(spec)) if e else "—" for e in lasts]) for spec in attacks]
        rows += [
            ("last worst", [Text(pct(e.accuracy.get("worst_case")), style="bold") if e else "—" for e in lasts]),
            ("last gap", [gap_text(e.gap) if e else "—" for e in lasts]),
            ("last flags", [flags_text(e.flags) if e else "—" for e in lasts]),
            ("report", [Text(f"{r.kind} n={r.n}") if r else Text("none", style="dim") for r in reports]),
            ("report clean", [pct(r.clean) if r else "—" for r in reports]),
            ("report worst", [Text(pct(r.worst), style="bold") if r else "—" for r in reports]),
            ("report AutoAttack", [pct(r.autoattack) if r else "—" for r in reports]),
            ("final train loss", [f"{s.epochs[-1].loss:.4f}" if s.epochs else "—" for s in states]),
            ("training time", [duration(sum(e.seconds for e in s.epochs)) for s in states]),
        ]
        columns = [("", "metric")] + [(Text(n), str(i)) for i, n in enumerate(names)]
        fill_table(self.query_one("#summary", DataTable), columns, [[Text(label), *cells] for label, cells in rows],
                   keys=[label for label, _ in rows], cap=[20] + [max(len(n) for n in names) + 4] * len(names))

    def fill_diff(self, states: list[RunState], names: list[str]) -> None:
        diff = config_diff([s.config for s in states])
        rows: list[list[object]] = [[Text(key), *[Text(value(v)) for v in values]] for key, values in diff]
        if not diff:
            rows = [[Text("(same configuration)"), *["" for _ in names]]]
        columns = [("key", "key")] + [(Text(n), str(i)) for i, n in enumerate(names)]
        keys = [key for key, _ in diff] or ["(same configuration)"]
        fill_table(self.query_one("#diff", DataTable), columns, rows, keys=keys,
                   cap=[24] + [max(len(n) for n in names) + 4] * len(names))

    def draw_curves(self, states: list[RunState], names: list[str]) -> None:
        worst = series_colors([Series(n, [float(r.epoch + 1) for r in s.evals],
                                      [r.accuracy.get("worst_case", float("nan")) for r in s.evals])
                               for n, s in zip(names, states, strict=True)])
        gaps = [Series(w.label, [float(r.epoch + 1) for r in s.evals if r.gap is not None],
                       [r.gap for r in s.evals if r.gap is not None], w.color, w.rich)
                for w, s in zip(worst, states, strict=True)]
        draw(self.query_one("#robust-curves", PlotextPlot), "worst-case accuracy", worst, xlabel="epoch",
             ylim=(0.0, 1.0), integer_x=True)
        draw(self.query_one("#gap-curves", PlotextPlot), "gap CE−margin", gaps, xlabel="epoch", integer_x=True)
        self.query_one("#compare-legend", Static).update(legend(worst))

    # -- export ----------------------------------------------------------------------------------
    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [(f"Export the comparison as {label}", f"runs/compare-<time>.{fmt} via fsapp's table exporter",
                 f"export('{fmt}')") for fmt, label in EXPORTS.items()]

    def action_export(self, fmt: str) -> None:
        """Write the runs' table (newest report on the current model, else the last live evaluation,
        as ``fsapp report`` tabulates them) beside the runs; notify the path."""
        from fsapp.app.tables import build_table, render

        paths = [t.path for t in self.trackers]
        try:
            table = build_table(paths)
            text = render(table, fmt)
        except UsageError as exc:
            self.notify(str(exc), title="not exported", severity="error", markup=False)
            return
        target = paths[0].parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
        try:
            target.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.notify(f"cannot write {target}: {exc.strerror or exc}", severity="error", markup=False)
            return
        notes = f" ({len(table.notes)} note(s): {table.notes[0]})" if table.notes else ""
        self.notify(f"{EXPORTS[fmt]} table written to {target}{notes}", markup=False, timeout=8)
