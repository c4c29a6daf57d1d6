"""The Compare screen: two or more runs side by side (robustness, config differences, curves)."""

from __future__ import annotations

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
from fsapp.tui.fmt import pct, value
from fsapp.tui.messages import JobsChanged
from fsapp.tui.widgets import attack_columns, draw, flags_text, gap_text


def short(name: str, width: int = 24) -> str:
    """A run name cut to ``width`` characters (keeping its end, which is the distinctive part)."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


class CompareScreen(Screen[None]):
    """Runs side by side; follows them while they train."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, paths: list[Path], jobs: Jobs, poll_interval: float = 0.5) -> None:
        super().__init__()
        self.trackers = [RunTracker(Path(p)) for p in paths]
        self.jobs = jobs
        self.poll_interval = poll_interval

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="compare"):
            yield Static("robustness (held-out subset, last and best evaluation)", classes="section")
            yield DataTable(id="summary", zebra_stripes=True, cursor_type="row")
            yield Static("config differences", classes="section")
            yield DataTable(id="diff", zebra_stripes=True, cursor_type="row")
            with Horizontal(id="compare-plots"):
                yield PlotextPlot(id="robust-curves")
                yield PlotextPlot(id="loss-curves")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "compare " + ", ".join(t.path.name for t in self.trackers)
        for t in self.trackers:
            t.poll()
        self.render_all()
        self.set_interval(max(self.poll_interval * 4, 1.0), self.poll)

    def poll(self) -> None:
        if any([t.poll() for t in self.trackers]):
            self.render_all()

    def on_jobs_changed(self, message: JobsChanged) -> None:
        self.render_all()

    def render_all(self) -> None:
        states = [t.state for t in self.trackers]
        names = [short(t.path.name) for t in self.trackers]
        self.fill_summary(states, names)
        self.fill_diff(states, names)
        self.draw_curves(states, names)

    def status(self, tracker: RunTracker) -> Text:
        """The run's status; failed when its last training job started here failed."""
        status = run_status(tracker.path, tracker.state)
        job = self.jobs.latest_for(tracker.path)
        if status == "interrupted" and job is not None and job.status in ("failed", "killed"):
            status = "failed"
        return Text(status)

    def fill_summary(self, states: list[RunState], names: list[str]) -> None:
        table = self.query_one("#summary", DataTable)
        table.clear(columns=True)
        table.add_column("", key="metric")
        for i, name in enumerate(names):
            table.add_column(Text(name), key=str(i))
        lasts = [s.last_eval for s in states]
        attacks = attack_columns([e for e in lasts if e is not None])

        def best(s: RunState) -> str:
            b = s.best_robust
            return "—" if b is None else f"{pct(b[0])} (ep {b[1] + 1})"

        rows: list[tuple[str, list[object]]] = [
            ("status", [self.status(t) for t in self.trackers]),
            ("epochs", [f"{s.epochs_done}/{s.epochs_total}" for s in states]),
            ("best worst case", [Text(best(s), style="bold") for s in states]),
            ("last clean", [pct(e.accuracy.get("clean")) if e else "—" for e in lasts]),
        ]
        rows += [(f"last {spec}", [pct(e.accuracy.get(spec)) if e else "—" for e in lasts]) for spec in attacks]
        rows += [
            ("last worst case", [Text(pct(e.accuracy.get("worst_case")), style="bold") if e else "—"
                                 for e in lasts]),
            ("gap CE−margin", [gap_text(e.gap) if e else "—" for e in lasts]),
            ("flags", [flags_text(e.flags) if e else "—" for e in lasts]),
            ("final train loss", [f"{s.epochs[-1].loss:.4f}" if s.epochs else "—" for s in states]),
        ]
        for label, cells in rows:
            table.add_row(Text(label), *cells, key=label)

    def fill_diff(self, states: list[RunState], names: list[str]) -> None:
        table = self.query_one("#diff", DataTable)
        table.clear(columns=True)
        table.add_column("key", key="key")
        for i, name in enumerate(names):
            table.add_column(Text(name), key=str(i))
        diff = config_diff([s.config for s in states])
        for key, values in diff:
            table.add_row(Text(key), *[Text(value(v)) for v in values], key=key)
        if not diff:
            table.add_row("(same configuration)", *["" for _ in names])

    def draw_curves(self, states: list[RunState], names: list[str]) -> None:
        draw(self.query_one("#robust-curves", PlotextPlot), "worst-case accuracy",
             [(n, [float(r.epoch + 1) for r in s.evals], [r.accuracy.get("worst_case", 0.0) for r in s.evals])
              for n, s in zip(names, states, strict=True)], xlabel="epoch", ylim=(0.0, 1.0), integer_x=True)
        draw(self.query_one("#loss-curves", PlotextPlot), "training loss",
             [(n, [float(e.epoch + 1) for e in s.epochs], [e.loss for e in s.epochs])
              for n, s in zip(names, states, strict=True)], xlabel="epoch", integer_x=True)
