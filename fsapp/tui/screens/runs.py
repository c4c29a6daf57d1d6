"""The Runs screen: every run under the runs directory, newest first, with a filter.

Status: *running* (a process holds the run's ``.lock``, or, for runs without a lock file, a log that
grew in the last few minutes with no Finished event), *finished* (Finished, not stopped), *failed*
(its last training job started here ended with an error), else *interrupted*.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from fsapp.app.jobs import Jobs
from fsapp.engine.rundir import MODEL, RunIndex, RunSummary
from fsapp.tui.fmt import pct
from fsapp.tui.messages import JobsChanged, MarksChanged, OpenEvaluate, OpenRun, ResumeRun

STATUS_STYLE = {"running": "bold green", "finished": "", "interrupted": "yellow", "failed": "bold red"}
WIDE = 110
NAME_WIDTH = 30


class RunsScreen(Screen[None]):
    """The runs table (the app's first screen)."""

    BINDINGS = [
        Binding("n", "app.new_run", "New run"),
        Binding("r", "resume", "Resume", tooltip="resume an interrupted run from its checkpoint"),
        Binding("space", "mark", "Mark", tooltip="mark / unmark for Compare"),
        Binding("c", "app.compare", "Compare", tooltip="compare the marked runs"),
        Binding("e", "evaluate", "Evaluate", tooltip="evaluate the selected run's model file"),
        Binding("l", "app.plugins", "Plugins"),
        Binding("slash", "filter", "Filter", key_display="/", tooltip="filter (escape: back to the table)"),
        Binding("escape", "leave_filter", "Table", show=False),
    ]

    def __init__(self, runs_dir: Path, index: RunIndex, jobs: Jobs, poll_interval: float = 0.5) -> None:
        super().__init__()
        self.runs_dir = runs_dir
        self.index = index
        self.jobs = jobs
        self.poll_interval = poll_interval
        self.marked: frozenset[Path] = frozenset()
        self.rows: list[RunSummary] = []
        self.shown: tuple[object, ...] = ()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter runs: name, method, dataset, model, status  (/)", id="filter",
                    compact=True)
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static(id="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"runs in {self.runs_dir}"
        self.refresh_runs()
        self.query_one("#runs", DataTable).focus()
        self.set_interval(max(self.poll_interval * 2, 0.5), self.refresh_runs)

    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [
            ("Open the selected run", "Its dashboard", "open"),
            ("Resume the selected run", "Continue an interrupted run from its checkpoint", "resume"),
            ("Mark / unmark the selected run", "For Compare", "mark"),
            ("Evaluate the selected run's model", "Open Evaluate with its model.safetensors", "evaluate"),
            ("Filter runs", "Type to narrow the table", "filter"),
        ]

    # -- data ----------------------------------------------------------------------------------
    def refresh_runs(self) -> None:
        """Rescan the runs directory (incrementally) and redraw when something changed."""
        rows = self.index.scan()
        self.rows = [self.with_job(row) for row in rows]
        self.redraw()

    def with_job(self, row: RunSummary) -> RunSummary:
        """A row whose last training job started here failed shows as failed (resumable if it can)."""
        job = self.jobs.latest_for(row.path)
        if row.status == "interrupted" and job is not None and job.status in ("failed", "killed"):
            return replace(row, status="failed")
        return row

    def on_jobs_changed(self, message: JobsChanged) -> None:
        self.refresh_runs()

    def visible(self) -> list[RunSummary]:
        text = self.query_one("#filter", Input).value
        return [r for r in self.rows if r.matches(text)] if text.strip() else list(self.rows)

    def redraw(self, force: bool = False) -> None:
        table = self.query_one("#runs", DataTable)
        rows = self.visible()
        wide = self.size.width >= WIDE
        marks = self.marked
        key = (wide, marks, tuple(rows))
        if key == self.shown and not force:
            return
        self.shown = key
        current = self.selected()
        table.clear(columns=True)
        longest = max((len(r.name) + 2 for r in rows), default=4)
        table.add_column("  name", key="name", width=None if wide or longest <= NAME_WIDTH else NAME_WIDTH)
        table.add_column("method", key="method")
        if wide:
            table.add_column("dataset", key="dataset")
            table.add_column("model", key="model")
        table.add_column("status", key="status")
        table.add_column("epochs", key="epochs")
        table.add_column("best robust" if wide else "robust", key="best")
        table.add_column("started", key="when")
        for row in rows:
            mark = "✓ " if row.path in marks else "  "
            cells: list[object] = [Text(mark + row.name), Text(row.method)]
            if wide:
                cells += [Text(row.dataset), Text(row.model)]
            when = row.when if wide else row.when[5:]
            cells += [Text(row.status, style=STATUS_STYLE.get(row.status, "")),
                      f"{row.epochs_done}/{row.epochs_total}", pct(row.best_robust), when]
            table.add_row(*cells, key=str(row.path))
        if current is not None and any(r.path == current.path for r in rows):
            table.move_cursor(row=[r.path for r in rows].index(current.path))
        hint = self.query_one("#hint", Static)
        hint.update(Text(self.hint_text(rows)))

    def hint_text(self, rows: list[RunSummary]) -> str:
        jobs = self.jobs.active()
        busy = ""
        if jobs:
            training = sum(j.kind == "train" for j in jobs)
            busy = f" · jobs here: {training} training, {len(jobs) - training} evaluating"
        if not self.rows:
            return (f"No runs in {self.runs_dir} yet. Press n to start one, or run `fsapp train "
                    f"--set run.runs_dir={self.runs_dir}` in a terminal.{busy}")
        if not rows:
            return "No run matches the filter." + busy
        return f"{len(rows)} of {len(self.rows)} runs · enter opens · space marks for compare{busy}"

    def on_resize(self) -> None:
        self.redraw()

    def selected(self) -> RunSummary | None:
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((r for r in self.rows if str(r.path) == key), None)

    # -- events and actions --------------------------------------------------------------------
    def on_input_changed(self, event: Input.Changed) -> None:
        self.redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#runs", DataTable).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        row = self.selected()
        if row is not None:
            self.post_message(OpenRun(row.path))

    def action_resume(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.status not in ("interrupted", "failed"):
            self.notify(f"{row.name} is {row.status}; only interrupted or failed runs resume.",
                        severity="warning", markup=False)
            return
        self.post_message(ResumeRun(row.path))

    def action_mark(self) -> None:
        row = self.selected()
        if row is not None:
            self.marked = self.marked ^ {row.path}
            self.post_message(MarksChanged(self.marked))
            self.redraw()

    def action_evaluate(self) -> None:
        row = self.selected()
        model = row.path / MODEL if row is not None and (row.path / MODEL).is_file() else ""
        self.post_message(OpenEvaluate(str(model)))

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.query_one("#runs", DataTable).focus()
