"""The Runs screen: every run under the runs directory, newest first, with a filter.

Status: *running* (trained by this app, a live ``run.lock``, or a log that grew in the last few
minutes with no Finished event), *finished* (Finished, not stopped), else *interrupted*.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from fsapp.engine.rundir import MODEL, RunSummary
from fsapp.errors import FsappError
from fsapp.tui.fmt import pct

if TYPE_CHECKING:
    from fsapp.tui.app import FsappApp

STATUS_STYLE = {"running": "bold green", "finished": "", "interrupted": "yellow"}
WIDE = 110
NAME_WIDTH = 30


class HomeScreen(Screen[None]):
    """The runs table."""

    app: FsappApp
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

    def __init__(self) -> None:
        super().__init__()
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
        self.sub_title = f"runs in {self.app.runs_dir}"
        self.refresh_runs()
        self.query_one("#runs", DataTable).focus()
        self.set_interval(max(self.app.poll_interval * 2, 0.5), self.refresh_runs)

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
        self.rows = self.app.index.scan(self.app.live_paths())
        self.redraw()

    def run_changed(self, path: Path) -> None:
        self.refresh_runs()

    def visible(self) -> list[RunSummary]:
        text = self.query_one("#filter", Input).value
        return [r for r in self.rows if r.matches(text)] if text.strip() else list(self.rows)

    def redraw(self, force: bool = False) -> None:
        table = self.query_one("#runs", DataTable)
        rows = self.visible()
        wide = self.size.width >= WIDE
        marks = frozenset(self.app.marked)
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
            cells: list[object] = [mark + row.name, row.method]
            if wide:
                cells += [row.dataset, row.model]
            when = row.when if wide else row.when[5:]
            cells += [Text(row.status, style=STATUS_STYLE.get(row.status, "")),
                      f"{row.epochs_done}/{row.epochs_total}", pct(row.best_robust), when]
            table.add_row(*cells, key=str(row.path))
        if current is not None and any(r.path == current.path for r in rows):
            table.move_cursor(row=[r.path for r in rows].index(current.path))
        hint = self.query_one("#hint", Static)
        if not self.rows:
            hint.update(f"No runs in {self.app.runs_dir} yet. Press n to start one, or run `fsapp train "
                        f"--set run.runs_dir={self.app.runs_dir}` in a terminal.")
        elif not rows:
            hint.update("No run matches the filter.")
        else:
            hint.update(f"{len(rows)} of {len(self.rows)} runs · enter opens · space marks for compare")

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
            self.app.open_run(row.path)

    def action_resume(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.status != "interrupted":
            self.notify(f"{row.name} is {row.status}; only interrupted runs resume.", severity="warning",
                        markup=False)
            return
        try:
            self.app.resume_run(row.path)
        except FsappError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.refresh_runs()
        self.app.open_run(row.path)

    def action_mark(self) -> None:
        row = self.selected()
        if row is not None:
            self.app.marked ^= {row.path}
            self.redraw()

    def action_evaluate(self) -> None:
        row = self.selected()
        model = row.path / MODEL if row is not None and (row.path / MODEL).is_file() else ""
        self.app.action_evaluate(str(model))

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.query_one("#runs", DataTable).focus()
