"""The Evaluate screen: the ``fsapp eval`` command line as a form, run as its own process.

The form builds the command a CLI user would type (suites, attacks, sweeps, transfer source, n,
seed, batch size, eps, device, RobustBench entry) and shows it; Run asks the app to launch it. An n
larger than the test split is capped by the job; the screen says so from the first progress event. The table fills from the
job's progress events (one row per attack, and per attack and point of a sweep); the result is read
from the report file the job names when it finishes, the same JSON the CLI writes. A failure (a
refused start, a JobFailed event, a nonzero exit) is one line, and the screen is ready to run again.
"""

from __future__ import annotations

import json
import shlex
from itertools import count
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Footer, Header, Input, ProgressBar, Static
from textual_plotext import PlotextPlot

from fsapp.app.jobs import Job
from fsapp.app.request import EvalRequest
from fsapp.engine import events as ev
from fsapp.errors import UsageError
from fsapp.registry import eps_text
from fsapp.tui.fmt import pct
from fsapp.tui.form import to_text
from fsapp.tui.messages import EvalJobEvents, EvalJobRefused, EvalJobStarted, JobsChanged, StartEval
from fsapp.tui.widgets import Field, Series, draw, gap_text, legend, series_colors

COLUMNS = (("attack", "attack"), ("progress", "progress"), ("accuracy", "accuracy"), ("seconds", "seconds"),
           ("invalid", "invalid"))
_tickets = count(1)


def suite_names() -> list[str]:
    """The evaluation suites the engine defines (``paper``, ``autoattack``, ``default``)."""
    from fsapp.engine.evaluate import SUITES

    return list(SUITES)


def point_text(key: str, value: float) -> str:
    """A sweep point as ``eps=8/255`` or ``steps=20``."""
    return f"{key}={eps_text(value) if key == 'eps' else to_text(value)}"


class EvaluateScreen(Screen[None]):
    """Evaluate a saved model on its dataset's test split, as ``fsapp eval`` does."""

    BINDINGS = [
        Binding("ctrl+r", "run", "Run", tooltip="run the evaluation (fsapp eval) as its own process"),
        Binding("escape", "app.pop_screen", "Back", tooltip="back (a running evaluation goes on)"),
    ]

    def __init__(self, runs_dir: Path, model: str = "") -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.model = model
        self.ticket = ""
        self.job: Job | None = None
        self.busy = False
        self.done: dict[str, int] = {}
        self.n = 0
        self.capped = 0
        self.expected = 0
        self.report: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="eval-form"):
            models = sorted(str(p) for p in self.runs_dir.glob("*/model.safetensors"))
            yield Field("model file", Input(self.model, placeholder="runs/<name>/model.safetensors",
                                            suggester=SuggestFromList(models), compact=True, id="model"))
            yield Field("suites", Input("", compact=True, id="suites",
                                        placeholder="suite names: " + ", ".join(suite_names())))
            yield Field("attacks", Input("pgd:steps=20 cw:steps=20", compact=True, id="attacks",
                                         placeholder="attack specs separated by spaces (empty: pgd-20, cw-20)"))
            yield Field("sweep", Input("", compact=True, id="sweep",
                                       placeholder="e.g. eps=0:16/255:9 or steps=1,5,20 (one curve each)"))
            yield Field("transfer source", Input("", compact=True, id="source",
                                                 placeholder="a model file to craft the attacks on (black box)"))
            yield Field("samples (n)", Input("1000", compact=True, id="n"))
            yield Field("seed", Input("0", compact=True, id="seed"))
            yield Field("batch size", Input("250", compact=True, id="batch_size"))
            yield Field("eps", Input("", placeholder="empty: the model file's eval eps", compact=True, id="eps"))
            yield Field("device", Input("auto", compact=True, id="device"))
            yield Field("RobustBench", Input("", compact=True, id="robustbench",
                                                  placeholder="a .json path for a RobustBench entry (adds autoattack)"))
            yield Static(id="eval-command", classes="hint")
            with Horizontal(id="eval-actions"):
                yield Button("Run (ctrl+r)", variant="success", id="run", compact=True)
                yield ProgressBar(total=1, show_eta=False, id="eval-progress")
            yield Static(id="eval-status")
            yield DataTable(id="eval-table", zebra_stripes=True, cursor_type="row")
            yield Static(id="eval-flags")
            yield PlotextPlot(id="sweep-plot")
            yield Static(id="sweep-legend")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "evaluate a model file"
        table = self.query_one("#eval-table", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#sweep-plot").display = False
        self.query_one("#eval-flags").display = False
        self.show_command()
        self.query_one("#model" if not self.model else "#attacks", Input).focus()

    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [("Run the evaluation", "fsapp eval with the options in the form, as its own process", "run")]

    # -- the form ----------------------------------------------------------------------------
    def text(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def request(self) -> EvalRequest:
        """The form as an ``fsapp eval`` request; a UsageError names the field at fault."""
        numbers = {}
        for wid, label in (("n", "samples"), ("seed", "seed"), ("batch_size", "batch size")):
            try:
                numbers[wid] = int(self.text(wid))
            except ValueError:
                raise UsageError(f"{label} must be a whole number, got {self.text(wid)!r}") from None
        if not self.text("model"):
            raise UsageError("give a model file (a .safetensors file written by fsapp)")
        unknown = [s for s in self.text("suites").split() if s not in suite_names()]
        if unknown:
            raise UsageError(f"unknown suite '{unknown[0]}'; available: {', '.join(suite_names())}")
        if len(self.text("eps").split()) > 1:
            raise UsageError("eps takes one value; for a curve over eps use the sweep field (eps=0:16/255:9)")
        try:
            suites, attacks, sweeps = (shlex.split(self.text(w)) for w in ("suites", "attacks", "sweep"))
        except ValueError as exc:
            raise UsageError(f"cannot read the form: {exc}") from None
        return EvalRequest(model=Path(self.text("model")), suites=suites, attacks=attacks, sweeps=sweeps,
                           source=Path(self.text("source")) if self.text("source") else None,
                           eps=self.text("eps"), device=self.text("device") or "auto",
                           robustbench_json=Path(self.text("robustbench")) if self.text("robustbench") else None,
                           **numbers)

    def show_command(self, report: Path | None = None) -> None:
        """The command line the form stands for (with ``--out`` once the job has its report path)."""
        try:
            args = self.request().args()
        except UsageError:
            args = []
        if args and report is not None:
            args += ["--out", str(report)]
        line = Text("$ " + shlex.join(["fsapp", *args])) if args else Text("")
        self.query_one("#eval-command", Static).update(line)

    def on_input_changed(self, event: Input.Changed) -> None:
        if not self.busy:
            self.show_command()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "run":
            self.action_run()

    def action_run(self) -> None:
        if self.busy:
            self.notify("This evaluation is still running; open Evaluate again (e) for another.",
                        severity="warning")
            return
        try:
            request = self.request()
        except UsageError as exc:
            self.show_status(str(exc), error=True)
            return
        self.reset(request)
        self.ticket = f"evaluate-{next(_tickets)}"
        self.busy = True
        self.show_status(f"starting fsapp eval on {request.model}…")
        self.post_message(StartEval(request, self.ticket))

    def reset(self, request: EvalRequest) -> None:
        """Clear the last result; size the progress bar from the request."""
        from fsapp.engine.evaluate import SUITES
        from fsapp.engine.sweep import parse_sweep

        self.query_one("#eval-table", DataTable).clear()
        self.query_one("#sweep-plot").display = False
        self.query_one("#sweep-legend").display = False
        self.query_one("#eval-flags").display = False
        self.done, self.report, self.job, self.n, self.capped = {}, None, None, request.n, 0
        points = 0
        for text in request.sweeps:
            try:
                points += len(parse_sweep(text)[1]) * len(request.attacks or SUITES["default"])
            except UsageError:
                pass  # the job says what is wrong with it
        self.expected = points
        self.query_one("#eval-progress", ProgressBar).update(total=None, progress=0)

    # -- news from the app -------------------------------------------------------------------
    def on_eval_job_started(self, message: EvalJobStarted) -> None:
        if message.ticket == self.ticket:
            self.job = message.job
            self.show_command(message.job.report)

    def on_eval_job_refused(self, message: EvalJobRefused) -> None:
        if message.ticket == self.ticket:
            self.fail(message.error)

    def on_eval_job_events(self, message: EvalJobEvents) -> None:
        if self.job is None or message.job_id != self.job.id:
            return
        for event in message.events:
            if isinstance(event, ev.EvalStarted):
                self.started(event)
            elif isinstance(event, ev.EvalProgress):
                self.progress(event)
            elif isinstance(event, ev.EvalFinished):
                self.finished(event)
            elif isinstance(event, ev.JobFailed):
                self.fail(event.message)

    def on_jobs_changed(self, message: JobsChanged) -> None:
        """The job ended: without a report or an error event, its exit says what happened."""
        job = self.job
        if self.busy and job is not None and not job.running:
            if job.stop_requested:
                self.fail("interrupted; run the same command with --resume to continue")
            else:
                self.fail(job.error or "fsapp eval ended without a report")

    # -- drawing -------------------------------------------------------------------------------
    def started(self, event: ev.EvalStarted) -> None:
        self.n = event.n
        self.expected += len(event.attacks)
        table = self.query_one("#eval-table", DataTable)
        table.add_row(Text("clean", style="bold"), "", "…", "", "", key="clean")
        for spec in event.attacks:
            table.add_row(Text(spec), "waiting", "", "", "", key=spec)
        if event.attacks:
            table.add_row(Text("worst case", style="bold"), "", "", "", "", key="worst")
        bar = self.query_one("#eval-progress", ProgressBar)
        bar.update(total=max(self.expected, 1) * max(event.n, 1), progress=0)
        self.show_status(f"evaluating {event.model} on {event.n} test samples…")

    def progress(self, event: ev.EvalProgress) -> None:
        if 0 < event.total < self.n and not self.capped:
            self.capped = event.total  # the test split is smaller than the n asked for
            self.show_status(f"evaluating {event.total} test samples: n={self.n} asked, the test split has "
                             f"{event.total} (n is capped to the split)…")
            self.query_one("#eval-progress", ProgressBar).update(total=max(self.expected, 1) * event.total)
        table = self.query_one("#eval-table", DataTable)
        if event.key not in table.rows:
            table.add_row(Text(event.key), "", "", "", "", key=event.key)
        stage = f" {event.stage}" if event.stage else ""
        table.update_cell(event.key, "progress", Text(f"{event.done}/{event.total}{stage}"))
        if event.done and not event.stage:
            final = event.done == event.total
            table.update_cell(event.key, "accuracy",
                              Text(pct(event.robust / event.done), style="" if final else "dim italic"))
        if not event.stage:
            self.done[event.key] = event.done
        bar = self.query_one("#eval-progress", ProgressBar)
        if bar.total is not None:
            bar.update(total=max(bar.total, sum(self.done.values())), progress=sum(self.done.values()))

    def finished(self, event: ev.EvalFinished) -> None:
        """Show the report file the job wrote (the same file ``fsapp eval`` writes)."""
        try:
            report = json.loads(Path(event.report).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.fail(f"cannot read the report {event.report}: {exc}")
            return
        self.busy = False
        self.report = report
        self.fill_report(report)
        bar = self.query_one("#eval-progress", ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.total or 1)
        cap = (f" · n capped to the test split: {report.get('n')} of the {self.n} asked"
               if isinstance(report.get("n"), int) and report["n"] < self.n else "")
        examples = " · examples saved" if isinstance(report.get("examples"), dict) else ""
        self.show_status(f"done · report: {event.report}{cap}{examples}")

    def fill_report(self, report: dict[str, Any]) -> None:
        """The table from the report: clean, each attack, worst case, then each sweep point."""
        table = self.query_one("#eval-table", DataTable)
        table.clear()
        acc = report["accuracy"]
        table.add_row(Text("clean", style="bold"), "", Text(pct(acc["clean"]), style="bold"), "", "", key="clean")
        for attack in report.get("attacks", []):
            table.add_row(Text(attack["key"]), f"{report['n']}/{report['n']}", pct(attack["accuracy"]),
                          f"{attack['seconds']:.1f}", str(attack.get("invalid_examples", 0)), key=attack["key"])
        if report.get("attacks"):
            table.add_row(Text("worst case", style="bold"), Text.assemble("gap ", gap_text(report.get("gap_ce_minus_margin"))),
                          Text(pct(acc["worst_case"]), style="bold"), f"{report['seconds']:.1f}", "", key="worst")
        for sweep in report.get("sweeps", []):
            for i, value in enumerate(sweep["values"]):
                point = point_text(sweep["key"], value)
                for spec, curve in sweep["curves"].items():
                    table.add_row(Text(f"{point} {spec}"), "", pct(curve[i]), "", "", key=f"{point} {spec}")
                table.add_row(Text(f"{point} worst case", style="bold"), "", Text(pct(sweep["worst_case"][i]),
                              style="bold"), "", "", key=f"{point} worst")
        flag_box = self.query_one("#eval-flags", Static)
        flags = report.get("flags", [])
        lines = [Text.assemble((f"⚑ {f.get('id')}", "bold red"), f": {f.get('message', '')}") for f in flags]
        flag_box.update(Text("\n").join(lines))
        flag_box.display = bool(lines)
        if report.get("sweeps"):
            self.draw_sweep(report["sweeps"][0])

    def draw_sweep(self, sweep: dict[str, Any]) -> None:
        """Accuracy against the swept value for each attack and the worst case."""
        plot = self.query_one("#sweep-plot", PlotextPlot)
        plot.display = True
        xs = [float(v) for v in sweep["values"]]
        series = [Series(spec, xs, curve) for spec, curve in sweep["curves"].items()]
        if len(series) > 1:
            series.append(Series("worst case", xs, sweep["worst_case"]))
        colored = series_colors(series)  # the legend goes under the plot, never on the curves
        draw(plot, f"accuracy vs {sweep['key']}", colored, xlabel=sweep["key"], ylim=(0.0, 1.0))
        legend_box = self.query_one("#sweep-legend", Static)
        legend_box.update(legend(colored))
        legend_box.display = True

    def fail(self, error: str) -> None:
        """One line; the screen is ready for the next run."""
        self.busy = False
        bar = self.query_one("#eval-progress", ProgressBar)
        bar.update(total=1, progress=0)
        self.show_status(error, error=True)

    def show_status(self, text: str, error: bool = False) -> None:
        status = self.query_one("#eval-status", Static)
        status.update(Text(("✗ " if error else "") + text))
        status.set_class(error, "-error")
