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
from fsapp.tui.fmt import distinct_names, pct
from fsapp.tui.messages import JobsChanged, MarksChanged, OpenEvaluate, OpenRun, ResumeRun
from fsapp.tui.reports import saved_reports

STATUS_STYLE = {"running": "bold green", "finished": "", "interrupted": "yellow", "failed": "bold red"}
WIDE = 110
MIN_NAME = 14


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
        yield Static(id="details")
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

    def widths(self, rows: list[RunSummary], wide: bool) -> dict[str, int]:
        """Every column's width, fixed from the content and the terminal's width (never left to the
        table: it measured columns as they were while the screen was hidden); the name takes the rest."""
        def fit(key: str, label: str, texts: list[str], cap: int) -> int:
            return min(max([len(label)] + [len(t) for t in texts]), cap)

        out = {"method": fit("method", "method", [r.method for r in rows], 16)}
        if wide:
            out["dataset"] = fit("dataset", "dataset", [r.dataset for r in rows], 14)
            out["model"] = fit("model", "model", [r.model for r in rows], 14)
        out |= {"status": fit("status", "status", [r.status for r in rows], 11),
                "epochs": fit("epochs", "epochs", [f"{r.epochs_done}/{r.epochs_total}" for r in rows], 11),
                "best": len("best robust") if wide else 6, "when": 16 if wide else 11}
        total = self.size.width or self.app.size.width or 80
        spare = total - 2 - sum(w + 2 for w in out.values()) - 2 - 1  # cell padding, scrollbar
        longest = max((len(r.name) + 2 for r in rows), default=6)
        out["name"] = max(MIN_NAME, min(longest, spare))
        return out

    def redraw(self, force: bool = False) -> None:
        table = self.query_one("#runs", DataTable)
        rows = self.visible()
        width = self.size.width or self.app.size.width
        wide = width >= WIDE
        marks = self.marked
        key = (width, marks, tuple(rows))
        if key == self.shown and not force:
            return
        self.shown = key
        current = self.selected()
        table.clear(columns=True)
        w = self.widths(rows, wide)
        table.add_column("  name", key="name", width=w["name"])
        table.add_column("method", key="method", width=w["method"])
        if wide:
            table.add_column("dataset", key="dataset", width=w["dataset"])
            table.add_column("model", key="model", width=w["model"])
        table.add_column("status", key="status", width=w["status"])
        table.add_column("epochs", key="epochs", width=w["epochs"])
        table.add_column("best robust" if wide else "robust", key="best", width=w["best"])
        table.add_column("started", key="when", width=w["when"])
        names = distinct_names([r.name for r in rows], w["name"] - 2)
        for row, name in zip(rows, names, strict=True):
            mark = "✓ " if row.path in marks else "  "
            cells: list[object] = [Text(mark + name), Text(row.method)]
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
        self.show_details()

    def show_details(self) -> None:
        """The selected run in full: its whole name and folder, what it trains, its evaluations."""
        box = self.query_one("#details", Static)
        row = self.selected()
        if row is None:
            box.display = False
            return
        box.display = True
        reports = saved_reports(row.path)
        best = f"best robust {pct(row.best_robust)}" if row.best_robust is not None else "no live evaluation"
        saved = f"{len(reports)} saved report(s), newest: {reports[0].kind}" if reports else "no saved reports"
        box.update(Text.assemble((str(row.path), "bold"), "\n",
                                 f"{row.method}/{row.dataset}/{row.model} · {best} · {saved}"))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_details()

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

    def on_screen_resume(self) -> None:
        self.redraw(force=True)

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
