"""The Evaluate screen: a model file, attacks, n; per-attack progress and a table that fills in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Footer, Header, Input, ProgressBar, Static
from textual_plotext import PlotextPlot

from fsapp.errors import FsappError
from fsapp.tui.evaljob import EvalRequest, expand_specs, run, suites
from fsapp.tui.fmt import pct
from fsapp.tui.widgets import Field, draw, flags_text, gap_text

if TYPE_CHECKING:
    from fsapp.tui.app import FsappApp


class EvalProgress(Message):
    """``done`` of ``total`` samples attacked by ``key`` at ``eps``; ``robust`` of them held."""

    def __init__(self, eps: float, key: str, done: int, total: int, robust: int) -> None:
        super().__init__()
        self.eps, self.key, self.done, self.total, self.robust = eps, key, done, total, robust


class EvalFinished(Message):
    """All reports (or the error that stopped the evaluation)."""

    def __init__(self, reports: list[dict[str, Any]], error: str = "") -> None:
        super().__init__()
        self.reports, self.error = reports, error


class EvaluateScreen(Screen[None]):
    """Evaluate a saved model on its dataset's test split."""

    app: FsappApp
    BINDINGS = [
        Binding("ctrl+r", "run", "Run", tooltip="run the attacks (several eps values: a sweep)"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, model: str = "") -> None:
        super().__init__()
        self.model = model
        self.done_samples = 0
        self.busy = False
        self.specs: list[str] = []
        self.n_eps = 1

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="eval-form"):
            models = sorted(str(p) for p in self.app.runs_dir.glob("*/model.safetensors"))
            yield Field("model file", Input(self.model, placeholder="runs/<name>/model.safetensors",
                                            suggester=SuggestFromList(models), compact=True, id="model"))
            yield Field("attacks", Input("pgd:steps=20 cw:steps=20", compact=True, id="attacks",
                                         placeholder="specs or suite names separated by spaces",
                                         tooltip="attack specs (pgd:steps=20) or suites: " + ", ".join(suites())))
            yield Field("samples (n)", Input("1000", compact=True, id="n"))
            yield Field("eps", Input("", placeholder="empty: the model's eval eps; several values: a sweep",
                                     compact=True, id="eps"))
            yield Field("device", Input("auto", compact=True, id="device"))
            with Horizontal(id="eval-actions"):
                yield Button("Run (ctrl+r)", variant="success", id="run", compact=True)
                yield ProgressBar(total=1, show_eta=False, id="eval-progress")
            yield Static(id="eval-status")
            yield DataTable(id="eval-table", zebra_stripes=True, cursor_type="row")
            yield Static(id="eval-flags")
            yield PlotextPlot(id="sweep-plot")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "evaluate a model file"
        table = self.query_one("#eval-table", DataTable)
        for label, key in (("eps", "eps"), ("attack", "attack"), ("progress", "progress"),
                           ("accuracy", "accuracy"), ("seconds", "seconds"), ("invalid", "invalid")):
            table.add_column(label, key=key)
        self.query_one("#sweep-plot").display = False
        self.query_one("#eval-flags").display = False
        self.query_one("#model" if not self.model else "#attacks", Input).focus()

    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [("Run the evaluation", "Attack the model file with the chosen specs", "run")]

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "run":
            self.action_run()

    def request(self) -> EvalRequest:
        def text(wid: str) -> str:
            return self.query_one(f"#{wid}", Input).value.strip()

        try:
            n = int(text("n"))
        except ValueError:
            raise FsappError(f"samples must be a whole number, got {text('n')!r}") from None
        return EvalRequest(model=Path(text("model")), attacks=text("attacks").split(), n=n,
                           device=text("device") or "auto", eps=text("eps").split() or None)

    def action_run(self) -> None:
        if self.busy:
            self.notify("An evaluation is already running.", severity="warning")
            return
        try:
            request = self.request()
        except FsappError as exc:
            self.show_status(str(exc), error=True)
            return
        self.query_one("#eval-table", DataTable).clear()
        self.specs = expand_specs(request.attacks)
        self.n_eps = len(request.eps or [0])
        self.query_one("#eval-progress", ProgressBar).update(total=None, progress=0)
        self.done_samples = 0
        self.busy = True
        self.query_one("#sweep-plot").display = False
        self.query_one("#eval-flags").display = False
        self.show_status(f"evaluating {request.model} on up to {request.n} test samples…")
        self.evaluate(request)

    @work(thread=True, exclusive=True, group="evaluate", exit_on_error=False)
    def evaluate(self, request: EvalRequest) -> None:
        """The worker: run the attacks, posting progress."""
        try:
            reports = run(request, lambda *progress: self.post_message(EvalProgress(*progress)))
        except FsappError as exc:
            self.post_message(EvalFinished([], str(exc)))
        except Exception as exc:  # keep the UI alive
            self.post_message(EvalFinished([], f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(EvalFinished(reports))

    # -- messages from the worker --------------------------------------------------------------
    def _key(self, eps: float, spec: str) -> str:
        return f"{eps!r}|{spec}"

    def add_rows(self, eps: float) -> None:
        """Rows for one threat model: clean, each attack, worst case (filled in as results come)."""
        table = self.query_one("#eval-table", DataTable)
        e = f"{eps:.4g}"
        table.add_row(e, Text("clean", style="bold"), "", "…", "", "", key=self._key(eps, "clean"))
        for spec in self.specs:
            table.add_row(e, spec, "waiting", "", "", "", key=self._key(eps, spec))
        table.add_row(e, Text("worst case", style="bold"), "", "", "", "", key=self._key(eps, "worst"))

    def on_eval_progress(self, message: EvalProgress) -> None:
        table = self.query_one("#eval-table", DataTable)
        key = self._key(message.eps, message.key)
        if self._key(message.eps, "clean") not in table.rows:
            self.add_rows(message.eps)
        if key not in table.rows:
            return
        bar = self.query_one("#eval-progress", ProgressBar)
        if bar.total is None:
            bar.update(total=self.n_eps * len(self.specs) * max(message.total, 1))
        table.update_cell(key, "progress", f"{message.done}/{message.total}")
        if message.done:
            estimate = pct(message.robust / message.done)
            final = message.done == message.total
            table.update_cell(key, "accuracy", Text(estimate, style="" if final else "dim italic"))
        bar.update(progress=self.done_samples + message.done)
        if message.done == message.total:
            self.done_samples += message.total

    def on_eval_finished(self, message: EvalFinished) -> None:
        self.busy = False
        if message.error:
            self.show_status(message.error, error=True)
            return
        table = self.query_one("#eval-table", DataTable)
        flags: list[Text] = []
        for report in message.reports:
            eps = report["eps"]
            if self._key(eps, "clean") not in table.rows:
                self.add_rows(eps)
            acc = report["accuracy"]
            table.update_cell(self._key(eps, "clean"), "accuracy", Text(pct(acc["clean"]), style="bold"))
            for attack in report.get("attacks", []):
                key = self._key(eps, attack.get("key", attack["spec"]))
                if key in table.rows:
                    table.update_cell(key, "accuracy", pct(attack["accuracy"]))
                    table.update_cell(key, "seconds", f"{attack['seconds']:.1f}")
                    table.update_cell(key, "invalid", str(attack.get("invalid_examples", 0)))
            worst = self._key(eps, "worst")
            table.update_cell(worst, "progress", Text.assemble("gap ", gap_text(report.get("gap_ce_minus_margin"))))
            table.update_cell(worst, "accuracy", Text(pct(acc["worst_case"]), style="bold"))
            table.update_cell(worst, "seconds", f"{report['seconds']:.1f}")
            if report.get("flags"):
                label = f"eps {eps:.4g}: " if len(message.reports) > 1 else ""
                flags.append(Text.assemble(label, flags_text(report["flags"])))
        bar = self.query_one("#eval-progress", ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.total or 1)
        flag_box = self.query_one("#eval-flags", Static)
        flag_box.update(Text("\n").join(flags) if flags else "")
        flag_box.display = bool(flags)
        paths = ", ".join(r["path"] for r in message.reports)
        self.show_status(f"done · report: {paths}")
        if len(message.reports) > 1:
            self.draw_sweep(message.reports)

    def draw_sweep(self, reports: list[dict[str, Any]]) -> None:
        """Accuracy against eps for each attack and the worst case."""
        plot = self.query_one("#sweep-plot", PlotextPlot)
        plot.display = True
        xs = [r["eps"] for r in reports]
        keys = [k for k in reports[0]["accuracy"] if k != "clean"]
        draw(plot, "accuracy vs eps", [(k, xs, [r["accuracy"][k] for r in reports]) for k in keys],
             xlabel="eps", ylim=(0.0, 1.0))

    def show_status(self, text: str, error: bool = False) -> None:
        status = self.query_one("#eval-status", Static)
        status.update(Text(("✗ " if error else "") + text))
        status.set_class(error, "-error")
