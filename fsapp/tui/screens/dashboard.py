"""The live dashboard of one run: progress, curves, robustness per epoch, checkpoint, controls.

It reads the run directory's ``metrics.jsonl`` on a timer, so every run looks the same whoever
trains it (this app, ``fsapp train`` in another terminal, a script). Its controls (pause/resume,
stop, checkpoint now, evaluate now) go to whichever process trains the run, through the run
directory's control channel; *paused* and *stopping* come from the run's own log.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static
from textual_plotext import PlotextPlot

from fsapp.app.jobs import Job, Jobs
from fsapp.engine import events as ev
from fsapp.engine.rundir import CHECKPOINT, MODEL, RunState, RunTracker, run_status
from fsapp.tui.fmt import duration, pct
from fsapp.tui.messages import ControlRun, JobsChanged, OpenEvaluate, ResumeRun
from fsapp.tui.widgets import draw, fill_robustness

STATUS_COLOR = {"running": "green", "paused": "yellow", "stopping": "yellow", "starting": "cyan",
                "interrupted": "yellow", "failed": "red", "killed": "red"}


class DashboardScreen(Screen[None]):
    """One run, live."""

    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("s", "stop", "Stop", tooltip="stop after this step, saving a checkpoint"),
        Binding("c", "checkpoint", "Checkpoint", tooltip="save a checkpoint at the next step"),
        Binding("e", "evaluate_now", "Evaluate now", tooltip="robustness evaluation at the next step"),
        Binding("r", "resume", "Resume", tooltip="resume an interrupted or failed run from its checkpoint"),
        Binding("v", "evaluate_model", "Eval model", tooltip="evaluate the model file on the test split"),
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

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="top"):
            yield Static(id="title")
            with Horizontal(id="progress-row"):
                yield ProgressBar(total=1, show_eta=False, id="progress")
                yield Static(id="rate")
            yield Static(id="detail")
        with Horizontal(id="plots"):
            yield PlotextPlot(id="loss-plot")
            yield PlotextPlot(id="acc-plot")
        yield DataTable(id="robust", zebra_stripes=True, cursor_type="row")
        yield Static(id="flags")
        yield Static(id="checkpoint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.path.name
        self.read()
        self.render_state()
        self.set_interval(self.poll_interval, self.poll)

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
        for event in new:
            if isinstance(event, ev.RunStarted):
                self.stopping = False
            elif isinstance(event, ev.ControlApplied) and event.action == "stop":
                self.stopping = True
        return bool(new) or self.tracker.follower.restarted

    def poll(self) -> None:
        """Redraw everything when the log grew, else only the title line."""
        if self.read():
            self.render_state()
        else:
            self.render_title()

    def on_jobs_changed(self, message: JobsChanged) -> None:
        self.poll()

    # -- drawing -------------------------------------------------------------------------------
    def status(self) -> str:
        """starting, running, paused, stopping, finished, interrupted, failed or killed."""
        s = self.state
        job = self.job
        if job is not None and job.running and not job.has_begun():
            return "starting"  # launched here, not writing yet
        status = run_status(self.path, s)
        if status == "running":
            if self.stopping or (job is not None and job.running and job.stop_requested):
                return "stopping"
            return "paused" if s.paused else status
        if job is not None and job.status in ("failed", "killed") and status != "finished":
            return job.status
        return status

    def render_title(self) -> None:
        s = self.state
        cfg = s.config
        method = cfg.get("method", {})
        status = self.status()
        device = s.started.device if s.started else "?"
        title = Text.assemble((self.path.name, "bold"), " · ", (f"● {status}", STATUS_COLOR.get(status, "blue")),
                              " · device ", (str(device), "bold"), " · ",
                              f"{method.get('perturbation', '?')}/{cfg.get('data', {}).get('name', '?')}/"
                              f"{cfg.get('model', {}).get('name', '?')}")
        job = self.job
        if status in ("failed", "killed") and job is not None and job.error:
            title.append(" · ")
            title.append(job.error, style="red")
        self.query_one("#title", Static).update(title)

    def render_state(self) -> None:
        s = self.state
        self.render_title()
        self.render_progress(s)
        self.render_curves(s)
        if len(s.evals) != self.n_evals:
            self.n_evals = len(s.evals)
            fill_robustness(self.query_one("#robust", DataTable), s.evals)
        self.render_flags(s)
        self.query_one("#checkpoint", Static).update(self.checkpoint_text(s))

    def checkpoint_text(self, s: RunState) -> Text:
        """The last checkpoint (and model file), paths relative to the run directory."""
        ck = s.checkpoint
        if ck is None:
            return Text("last checkpoint: none yet")
        where = f"{ck.epoch} epochs" + (f" + {ck.step} steps" if ck.step else "")
        text = f"last checkpoint: after {where} (global step {ck.global_step}) → {self.relative(ck.path)}"
        if s.finished is not None and (self.path / MODEL).is_file():
            text += f"  ·  model → {self.relative(s.finished.model_path)}"
        return Text(text)

    def relative(self, path: str) -> str:
        p = Path(path)
        return p.name if p.parent.name == self.path.name else str(p)

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
        when = f"took {duration(s.finished.seconds)}" if s.finished else f"ETA {duration(step.eta_sec)}"
        self.query_one("#rate", Static).update(f" {step.images_per_sec:,.0f} img/s  {when}")
        self.query_one("#detail", Static).update(
            f"epoch {step.epoch + 1}/{s.epochs_total} · step {step.step + 1}/{spe} · "
            f"global {step.global_step}/{step.total_steps} · loss {step.loss:.4f} · "
            f"train acc {pct(step.accuracy)} · lr {step.lr:.3g}")

    def render_curves(self, s: RunState) -> None:
        xs = [float(p.global_step) for p in s.steps]
        draw(self.query_one("#loss-plot", PlotextPlot), "training loss",
             [("loss", xs, [p.loss for p in s.steps])], xlabel="step", integer_x=True)
        spe = s.started.steps_per_epoch if s.started else 1
        ex = [float((r.epoch + 1) * spe) for r in s.evals]
        draw(self.query_one("#acc-plot", PlotextPlot), "accuracy",
             [("train", xs, [p.accuracy for p in s.steps]),
              ("clean", ex, [r.accuracy.get("clean", 0.0) for r in s.evals]),
              ("worst case", ex, [r.accuracy.get("worst_case", 0.0) for r in s.evals])],
             xlabel="step", ylim=(0.0, 1.0), integer_x=True)

    def render_flags(self, s: RunState) -> None:
        widget = self.query_one("#flags", Static)
        last = s.last_eval
        lines = []
        if last is not None and last.flags:
            lines += [Text.assemble((f"⚑ {f.get('id')}", "bold red"), f": {f.get('message', '')}")
                      for f in last.flags]
        if s.warnings:
            lines.append(Text.assemble(("warning", "yellow"), f": {s.warnings[-1].message}"))
        widget.update(Text("\n").join(lines))
        widget.display = bool(lines)

    # -- controls ------------------------------------------------------------------------------
    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [
            ("Pause / resume training", "Hold the run between steps", "pause"),
            ("Stop training", "Stop after this step and save a checkpoint", "stop"),
            ("Checkpoint now", "Save a resumable checkpoint at the next step", "checkpoint"),
            ("Evaluate now", "Run the live robustness evaluation at the next step", "evaluate_now"),
            ("Evaluate the model file", "Open Evaluate on this run's model.safetensors", "evaluate_model"),
        ]

    def control(self, action: str) -> None:
        """Ask the process training this run (whoever started it) to ``action``."""
        status = self.status()
        if status not in ("running", "paused", "stopping", "starting"):
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

    def action_resume(self) -> None:
        status = self.status()
        if status not in ("interrupted", "failed", "killed"):
            self.notify(f"The run is {status}; only interrupted or failed runs resume.", severity="warning")
            return
        if not (self.path / CHECKPOINT).is_file():
            self.notify("This run has no checkpoint to resume from.", severity="warning")
            return
        self.post_message(ResumeRun(self.path, show=False))

    def action_evaluate_model(self) -> None:
        model = self.path / MODEL
        self.post_message(OpenEvaluate(str(model) if model.is_file() else ""))
