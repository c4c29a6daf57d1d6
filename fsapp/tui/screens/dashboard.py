"""The live dashboard of one run: a pinned header (status, progress, ETA, the epoch and the live
evaluation), then tabs: curves and robustness per epoch, flags explained, saved reports, the run.

It reads the run directory's ``metrics.jsonl`` on a timer, so every run looks the same whoever
trains it (this app, ``fsapp train`` in another terminal, a script). Its controls (pause/resume,
stop, checkpoint now, evaluate now) go to whichever process trains the run, through the run
directory's control channel; *paused* and *stopping* come from the run's own log. Controls that do
not apply to the run's state are hidden (``check_action``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, ProgressBar, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from fsapp.app.jobs import Job, Jobs
from fsapp.engine import events as ev
from fsapp.engine.rundir import CHECKPOINT, METRICS, MODEL, RunState, RunTracker, run_status
from fsapp.tui.fmt import duration, elide_middle, pct, value
from fsapp.tui.messages import ControlRun, JobsChanged, OpenEvaluate, OpenReport, ResumeRun
from fsapp.tui.reports import SavedReport, saved_reports
from fsapp.tui.widgets import Series, draw, fill_robustness, flag_lines, legend, series_colors

STATUS_COLOR = {"running": "green", "paused": "yellow", "stopping": "yellow", "starting": "cyan",
                "evaluating": "cyan", "interrupted": "yellow", "failed": "red", "killed": "red"}
LIVE = ("running", "paused", "stopping", "starting")
RESUMABLE = ("interrupted", "failed", "killed")
CONTROLS = {"pause", "stop", "checkpoint", "evaluate_now"}
TABS = ("curves", "flags", "reports", "run")


def eval_pending(s: RunState) -> bool:
    """Whether the last finished epoch still waits for its live evaluation."""
    if not s.epochs or not int(s.config.get("eval", {}).get("n", 0) or 0):
        return False
    last = s.epochs[-1].epoch
    if s.steps and s.steps[-1].epoch > last:
        return False
    return not any(r.epoch == last for r in s.evals)


def eta_seconds(s: RunState) -> float | None:
    """Time left: the engine's training ETA plus the live evaluations still to come, each as long
    as the mean so far (None before the first step)."""
    step = s.last_step
    if step is None:
        return None
    left = step.eta_sec
    n_eval = int(s.config.get("eval", {}).get("n", 0) or 0)
    if n_eval and s.evals:
        per_eval = sum(r.seconds for r in s.evals) / len(s.evals)
        evaluated = {r.epoch for r in s.evals}
        left += per_eval * sum(1 for e in range(s.epochs_total) if e not in evaluated)
    return left


class DashboardScreen(Screen[None]):
    """One run, live."""

    BINDINGS = [
        Binding("p", "pause", "Pause/resume", tooltip="pause the run between steps, or resume it"),
        Binding("s", "stop", "Stop", tooltip="stop after this step, saving a checkpoint"),
        Binding("c", "checkpoint", "Checkpoint", tooltip="save a checkpoint at the next step"),
        Binding("e", "evaluate_now", "Eval now", tooltip="robustness evaluation at the next step"),
        Binding("r", "resume", "Resume", tooltip="resume an interrupted or failed run from its checkpoint"),
        Binding("v", "evaluate_model", "Eval model", tooltip="evaluate the model file (Evaluate screen)"),
        Binding("1", "tab('curves')", "Curves", show=False, tooltip="tab: curves and robustness per epoch"),
        Binding("2", "tab('flags')", "Flags", show=False, tooltip="tab: the flags, explained"),
        Binding("3", "tab('reports')", "Reports", show=False, tooltip="tab: saved evaluation reports"),
        Binding("4", "tab('run')", "Run", show=False, tooltip="tab: configuration, time, checkpoint"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, path: Path, jobs: Jobs, poll_interval: float = 0.5) -> None:
        super().__init__()
        self.path = Path(path)
        self.jobs = jobs
        self.poll_interval = poll_interval
        self.tracker = RunTracker(self.path)
        self.n_evals = -1
        self.stopping = False
        self.sessions = 0
        self.reports: list[SavedReport] = []
        self.shown_status = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            yield Static(id="title")
            with Horizontal(id="progress-row"):
                yield ProgressBar(total=1, show_eta=False, id="progress")
                yield Static(id="rate")
            yield Static(id="detail")
            yield Static(id="phase")
        with TabbedContent(id="tabs", initial="curves"):
            with TabPane("1 curves", id="curves"):
                with Horizontal(id="plots"):
                    yield PlotextPlot(id="loss-plot")
                    yield PlotextPlot(id="acc-plot")
                yield Static(id="legend")
                yield DataTable(id="robust", zebra_stripes=True, cursor_type="row")
            with TabPane("2 flags", id="flags"):
                with VerticalScroll(id="flags-box"):
                    yield Static(id="flag-text")
            with TabPane("3 reports", id="reports"):
                yield DataTable(id="report-table", zebra_stripes=True, cursor_type="row")
                yield Static(id="report-hint", classes="hint")
            with TabPane("4 run", id="run"):
                with VerticalScroll(id="run-box"):
                    yield Static(id="run-text")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.path.name
        self.call_after_refresh(self.start)

    def start(self) -> None:
        """Fill the screen once its tabs are mounted, then follow the run."""
        if not self.query("#report-table"):
            self.call_after_refresh(self.start)
            return
        table = self.query_one("#report-table", DataTable)
        for label, key in (("what", "kind"), ("n", "n"), ("eps", "eps"), ("clean", "clean"), ("worst", "worst"),
                           ("AA", "aa"), ("flags", "flags"), ("file", "file")):
            table.add_column(label, key=key)
        self.read()
        self.render_state()
        self.load_reports()
        self.set_interval(self.poll_interval, self.poll)
        self.set_interval(max(self.poll_interval * 6, 2.0), self.load_reports)
        self.query_one("#robust", DataTable).focus()

    @property
    def job(self) -> Job | None:
        """The last training job of this run started by this app, if any."""
        return self.jobs.latest_for(self.path)

    @property
    def state(self) -> RunState:
        return self.tracker.state

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> bool:
        """Fold in what ``metrics.jsonl`` gained; True when anything did."""
        new = self.tracker.poll()
        if self.tracker.follower.restarted:
            self.stopping = False
            self.sessions = 0
        for event in new:
            if isinstance(event, ev.RunStarted):
                self.stopping = False
                self.sessions += 1
            elif isinstance(event, ev.ControlApplied) and event.action == "stop":
                self.stopping = True
        return bool(new) or self.tracker.follower.restarted

    def poll(self) -> None:
        """Redraw everything when the log grew, else only the header lines."""
        if not self.query("#report-table"):
            return
        if self.read():
            self.render_state()
        else:
            self.render_title()
            self.render_phase(self.state)

    def on_jobs_changed(self, message: JobsChanged) -> None:
        self.poll()

    def load_reports(self) -> None:
        """(Re)list ``eval/*.json``."""
        reports = saved_reports(self.path)
        if [(r.path, r.created) for r in reports] == [(r.path, r.created) for r in self.reports] and self.reports:
            return
        self.reports = reports
        table = self.query_one("#report-table", DataTable)
        table.clear()
        for r in reports:
            table.add_row(Text(r.kind), str(r.n), value(r.eps), pct(r.clean), Text(pct(r.worst), style="bold"),
                          pct(r.autoattack), Text(" ".join(r.flags) or "—", style="bold red" if r.flags else "dim"),
                          Text(r.path.stem), key=str(r.path))
        hint = ("enter opens the selected report · v evaluates the model file again" if reports else
                "No saved reports yet: press v to evaluate the model file (suites, AutoAttack, sweeps); "
                "the report is written to eval/ in this run's folder.")
        self.query_one("#report-hint", Static).update(Text(hint))
        tab = self.query_one("#tabs", TabbedContent).get_tab("reports")
        tab.label = f"3 reports ({len(reports)})" if reports else "3 reports"

    # -- state ---------------------------------------------------------------------------------
    def status(self) -> str:
        """starting, running, evaluating, paused, stopping, finished, interrupted, failed or killed."""
        s = self.state
        job = self.job
        if job is not None and job.running and not job.has_begun():
            return "starting"  # launched here, not writing yet
        status = run_status(self.path, s)
        if status == "running":
            if self.stopping or (job is not None and job.running and job.stop_requested):
                return "stopping"
            if s.paused:
                return "paused"
            return "evaluating" if eval_pending(s) else status
        if job is not None and job.status in ("failed", "killed") and status != "finished":
            return job.status
        return status

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide the controls that do not apply to the run as it is now."""
        if action in CONTROLS:
            return self.status() in LIVE + ("evaluating",)
        if action == "resume":
            return self.status() in RESUMABLE and (self.path / CHECKPOINT).is_file()
        if action == "evaluate_model":
            return (self.path / MODEL).is_file()
        return True

    # -- drawing -------------------------------------------------------------------------------
    def render_title(self) -> None:
        s = self.state
        cfg = s.config
        method = cfg.get("method", {})
        status = self.status()
        if status != self.shown_status:
            self.shown_status = status
            self.refresh_bindings()
        device = s.started.device if s.started else "?"
        what = (f"{method.get('perturbation', '?')}/{cfg.get('data', {}).get('name', '?')}/"
                f"{cfg.get('model', {}).get('name', '?')}")
        room = (self.size.width or self.app.size.width or 80) - 2 - len(f"● {status} ·  · {what} · {device}")
        name = elide_middle(self.path.name, max(room, 16))
        title = Text.assemble((f"● {status}", STATUS_COLOR.get(status, "blue")), " · ", (name, "bold"),
                              " · ", what, " · ", (str(device), "bold"))
        job = self.job
        if status in ("failed", "killed") and job is not None and job.error:
            title.append(" · ")
            title.append(job.error, style="red")
        self.query_one("#title", Static).update(title)

    def render_state(self) -> None:
        s = self.state
        self.render_title()
        self.render_progress(s)
        self.render_phase(s)
        self.render_curves(s)
        if len(s.evals) != self.n_evals:
            self.n_evals = len(s.evals)
            fill_robustness(self.query_one("#robust", DataTable), s.evals)
        self.render_flags(s)
        self.query_one("#run-text", Static).update(self.run_text(s))

    def render_progress(self, s: RunState) -> None:
        bar = self.query_one("#progress", ProgressBar)
        step = s.last_step
        spe = s.started.steps_per_epoch if s.started else 0
        total = max(s.epochs_total * spe, 1)
        done = step.global_step if step else (s.started.start_epoch * spe + s.started.start_step if s.started else 0)
        bar.update(total=total, progress=min(done, total))
        if step is None:
            self.query_one("#rate", Static).update(" waiting for the first steps…")
            self.query_one("#detail", Static).update(f"epoch —/{s.epochs_total or '?'}")
            return
        if s.finished:
            when = f"took {duration(self.training_seconds(s) + self.eval_seconds(s))}"
        elif self.status() in RESUMABLE:  # nothing is running: no ETA to promise
            when = f"ran {duration(self.training_seconds(s) + self.eval_seconds(s))}, not running"
        else:
            when = f"ETA {duration(eta_seconds(s))} (with evaluation)"
        self.query_one("#rate", Static).update(f" {step.images_per_sec:,.0f} img/s · {when}")
        self.query_one("#detail", Static).update(
            f"epoch {step.epoch + 1}/{s.epochs_total} · step {step.step + 1}/{spe} · "
            f"loss {step.loss:.4f} · train acc {pct(step.accuracy)} · lr {step.lr:.3g}")

    def render_phase(self, s: RunState) -> None:
        """The live evaluation while it runs, else the last one and its flags (one or two lines)."""
        phase = self.query_one("#phase", Static)
        status = self.status()
        attacks = [str(a) for a in s.config.get("eval", {}).get("attacks", [])]
        if status == "evaluating":
            try:
                since = time.time() - (self.path / METRICS).stat().st_mtime
            except OSError:
                since = 0.0
            last = f" (the last took {duration(s.evals[-1].seconds)})" if s.evals else ""
            epoch = s.epochs[-1].epoch + 1
            phase.update(Text.assemble(("◐ evaluating", "bold cyan"),
                                       f" epoch {epoch} (live: clean, {', '.join(attacks) or 'no attacks'}) · "
                                       f"{duration(max(since, 0.0))} elapsed{last}"))
            return
        last = s.last_eval
        if last is None:
            phase.update(Text("no live evaluation yet" if attacks else "live evaluation off (eval.n = 0)",
                              style="dim"))
            return
        split = getattr(last, "split", "")
        text = Text.assemble(f"eval ep {last.epoch + 1}{' ' + split if split else ''} n={last.n}: "
                             f"clean {pct(last.accuracy.get('clean'))} · worst ",
                             (pct(last.accuracy.get("worst_case")), "bold"))
        if last.gap is not None:
            text.append(f" · gap {last.gap * 100:+.1f}%")
        if last.flags:
            text.append(" ")
            text.append(" ".join(f"⚑ {f.get('id', '?')}" for f in last.flags), style="bold red")
        phase.update(text)

    def render_curves(self, s: RunState) -> None:
        xs = [float(p.global_step) for p in s.steps]
        losses = [p.loss for p in s.steps]
        positive = [v for v in losses if v > 0]
        log = bool(positive) and len(positive) == len(losses) and max(positive) / min(positive) >= 10
        draw(self.query_one("#loss-plot", PlotextPlot), "training loss" + (" (log)" if log else ""),
             series_colors([Series("loss", xs, losses)]), xlabel="step", integer_x=True, log_y=log)
        spe = s.started.steps_per_epoch if s.started else 1
        ex = [float((r.epoch + 1) * spe) for r in s.evals]
        keys = [k for r in s.evals for k in r.accuracy if k not in ("clean", "worst_case")]
        attacks = list(dict.fromkeys(keys))
        series = [Series("train", xs, [p.accuracy for p in s.steps]),
                  Series("clean", ex, [r.accuracy.get("clean", math.nan) for r in s.evals])]
        series += [Series(a, ex, [r.accuracy.get(a, math.nan) for r in s.evals]) for a in attacks]
        series.append(Series("worst case", ex, [r.accuracy.get("worst_case", math.nan) for r in s.evals]))
        gaps = [(x, r.gap) for x, r in zip(ex, s.evals, strict=True) if r.gap is not None]
        series.append(Series("gap", [g[0] for g in gaps], [g[1] for g in gaps]))
        colored = series_colors(series)
        draw(self.query_one("#acc-plot", PlotextPlot), "accuracy per attack", colored, xlabel="step",
             ylim=(min([0.0] + [g[1] for g in gaps]), 1.0), integer_x=True)
        self.query_one("#legend", Static).update(legend(colored))

    def render_flags(self, s: RunState) -> None:
        lines = flag_lines(s.last_eval.flags if s.last_eval is not None else [])
        for w in s.warnings[-3:]:
            lines.append(Text.assemble(("warning", "yellow"), f": {w.message}"))
        if not lines:
            lines = [Text("No flags: the last live evaluation raised none of docs/EVALUATION.md's checks.",
                          style="dim")]
        self.query_one("#flag-text", Static).update(Text("\n\n").join(lines))
        tab = self.query_one("#tabs", TabbedContent).get_tab("flags")
        n = len(s.last_eval.flags) if s.last_eval is not None else 0
        tab.label = Text.assemble("2 flags", (f" ⚑{n}", "bold red")) if n else "2 flags"

    @staticmethod
    def training_seconds(s: RunState) -> float:
        """Training time of the epochs that count (across resumes; epochs redone after a resume once)."""
        return sum(e.seconds for e in s.epochs)

    @staticmethod
    def eval_seconds(s: RunState) -> float:
        return sum(r.seconds for r in s.evals)

    def run_text(self, s: RunState) -> Text:
        """Time across sessions, the checkpoint and model, and the main settings."""
        cfg = s.config
        lines = [Text.assemble(("time ", "bold"), f"{duration(self.training_seconds(s))} training + "
                               f"{duration(self.eval_seconds(s))} live evaluation over {len(s.epochs)} epochs, "
                               f"{max(self.sessions, 1)} session(s)" + (" (resumed)" if self.sessions > 1 else ""))]
        lines.append(Text.assemble(("checkpoint ", "bold"), self.checkpoint_text(s)))
        for section in ("method", "optim", "schedule", "data", "model", "eval", "run"):
            table = cfg.get(section, {})
            if isinstance(table, dict) and table:
                items = " · ".join(f"{k} {value(v)}" for k, v in table.items())
                lines.append(Text.assemble((f"{section} ", "bold"), items))
        return Text("\n").join(lines)

    def checkpoint_text(self, s: RunState) -> str:
        """The last checkpoint (and model file), paths relative to the run directory."""
        ck = s.checkpoint
        if ck is None:
            return "none yet"
        where = f"{ck.epoch} epochs" + (f" + {ck.step} steps" if ck.step else "")
        text = f"after {where} (global step {ck.global_step}) → {self.relative(ck.path)}"
        if s.finished is not None and (self.path / MODEL).is_file():
            text += f" · model → {self.relative(s.finished.model_path)}"
        return text

    def relative(self, path: str) -> str:
        p = Path(path)
        return p.name if p.parent.name == self.path.name else str(p)

    # -- controls ------------------------------------------------------------------------------
    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [
            ("Pause / resume training", "Hold the run between steps", "pause"),
            ("Stop training", "Stop after this step and save a checkpoint", "stop"),
            ("Checkpoint now", "Save a resumable checkpoint at the next step", "checkpoint"),
            ("Evaluate now", "Run the live robustness evaluation at the next step", "evaluate_now"),
            ("Resume the run", "Continue from its checkpoint", "resume"),
            ("Evaluate the model file", "Open Evaluate on this run's model.safetensors", "evaluate_model"),
            ("Saved reports", "The run's eval/*.json reports", "tab('reports')"),
        ]

    def control(self, action: str) -> None:
        """Ask the process training this run (whoever started it) to ``action``."""
        status = self.status()
        if status not in LIVE + ("evaluating",):
            self.notify(f"The run is {status}; nothing to control.", severity="warning")
            return
        self.post_message(ControlRun(self.path, action))

    def action_pause(self) -> None:
        self.control("resume" if self.state.paused else "pause")

    def action_stop(self) -> None:
        self.control("stop")

    def action_checkpoint(self) -> None:
        self.control("checkpoint")

    def action_evaluate_now(self) -> None:
        self.control("evaluate")

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        focus = {"curves": "#robust", "reports": "#report-table", "flags": "#flags-box", "run": "#run-box"}[tab]
        self.query_one(focus).focus()

    def action_resume(self) -> None:
        status = self.status()
        if status not in RESUMABLE:
            self.notify(f"The run is {status}; only interrupted or failed runs resume.", severity="warning")
            return
        if not (self.path / CHECKPOINT).is_file():
            self.notify("This run has no checkpoint to resume from.", severity="warning")
            return
        self.post_message(ResumeRun(self.path, show=False))

    def action_evaluate_model(self) -> None:
        model = self.path / MODEL
        self.post_message(OpenEvaluate(str(model) if model.is_file() else ""))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "report-table" and event.row_key.value:
            self.post_message(OpenReport(Path(event.row_key.value)))
