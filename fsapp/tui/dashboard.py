"""The live dashboard of one run: progress, curves, robustness per epoch, checkpoint, controls.

It always reads the run directory's ``metrics.jsonl`` (polled on a timer), so a run trained by
``fsapp train`` elsewhere looks the same as one trained here; for runs trained here, each event
message from the worker triggers an immediate read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static
from textual_plotext import PlotextPlot

from fsapp.engine.rundir import MODEL, RunState, RunTracker, run_status
from fsapp.tui.fmt import duration, pct
from fsapp.tui.live import LiveRun
from fsapp.tui.widgets import draw, fill_robustness

if TYPE_CHECKING:
    from fsapp.tui.app import FsappApp

RENDER_EVERY = 0.2
"""Seconds between redraws while events stream in (plots are the costly part)."""


class DashboardScreen(Screen[None]):
    """One run, live."""

    app: FsappApp
    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("s", "stop", "Stop", tooltip="stop after this step, saving a checkpoint"),
        Binding("c", "checkpoint", "Checkpoint", tooltip="save a checkpoint at the next step"),
        Binding("e", "evaluate_now", "Evaluate now", tooltip="robustness evaluation at the next step"),
        Binding("v", "evaluate_model", "Eval model", tooltip="evaluate the model file on the test split"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.tracker = RunTracker(self.path)
        self.n_evals = -1
        self.pending = False

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
        self.tracker.poll()
        self.render_state()
        self.set_interval(self.app.poll_interval, self.poll)

    @property
    def live(self) -> LiveRun | None:
        return self.app.live.get(self.path)

    @property
    def state(self) -> RunState:
        return self.tracker.state

    # -- reading -------------------------------------------------------------------------------
    def poll(self) -> None:
        """Read what ``metrics.jsonl`` gained; redraw if anything did."""
        if self.tracker.poll() or self.follower_restarted() or self.pending:
            self.pending = False
            self.render_state()
        else:
            self.render_title()

    def follower_restarted(self) -> bool:
        return self.tracker.follower.restarted

    def run_changed(self, path: Path) -> None:
        """A worker event for ``path``: read the log now, redraw soon (at most every RENDER_EVERY)."""
        if path != self.path:
            return
        if self.tracker.poll() or self.follower_restarted():
            if not self.pending:
                self.pending = True
                self.set_timer(RENDER_EVERY, self._flush)
        else:
            self.render_title()

    def _flush(self) -> None:
        self.pending = False
        self.render_state()

    # -- drawing -------------------------------------------------------------------------------
    def status(self) -> str:
        live = self.live
        if live is not None and live.active:
            return live.describe()
        if live is not None and live.phase == "failed":
            return "failed"
        return run_status(self.path, self.state)

    def render_title(self) -> None:
        s = self.state
        cfg = s.config
        method = cfg.get("method", {})
        status = self.status()
        color = {"running": "green", "paused": "yellow", "stopping": "yellow", "starting": "cyan",
                 "interrupted": "yellow", "failed": "red"}.get(status, "blue")
        device = s.started.device if s.started else "?"
        parts = [f"[b]{escape(self.path.name)}[/b]", f"[{color}]● {status}[/]", f"device [b]{device}[/b]",
                 f"{method.get('perturbation', '?')}/{cfg.get('data', {}).get('name', '?')}/"
                 f"{cfg.get('model', {}).get('name', '?')}"]
        live = self.live
        if live is not None and live.phase == "failed":
            parts.append(f"[red]{escape(live.error)}[/]")
        self.query_one("#title", Static).update(" · ".join(parts))

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
            lines += [f"[b red]⚑ {escape(str(f.get('id')))}[/]: {escape(f.get('message', ''))}" for f in last.flags]
        if s.warnings:
            lines.append(f"[yellow]warning[/]: {escape(s.warnings[-1].message)}")
        widget.update("\n".join(lines))
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

    def _controlled(self) -> LiveRun | None:
        live = self.live
        if live is not None and live.active:
            return live
        if self.status() == "running":
            self.notify("This run is trained by another process; control it there (Ctrl-C stops it "
                        "with a checkpoint).", severity="warning")
        else:
            self.notify(f"The run is {self.status()}; nothing to control.", severity="warning")
        return None

    def action_pause(self) -> None:
        live = self._controlled()
        if live is None:
            return
        if live.control.pause.is_set():
            live.control.pause.clear()
            self.notify("resumed")
        else:
            live.control.pause.set()
            self.notify("pausing after this step")
        self.render_title()

    def action_stop(self) -> None:
        live = self._controlled()
        if live is not None:
            live.phase = "stopping"
            live.control.stop.set()
            self.notify("stopping after this step; a checkpoint will be saved")
            self.render_title()

    def action_checkpoint(self) -> None:
        live = self._controlled()
        if live is not None:
            live.control.checkpoint_now.set()
            self.notify("checkpoint requested")

    def action_evaluate_now(self) -> None:
        live = self._controlled()
        if live is not None:
            live.control.evaluate_now.set()
            self.notify("evaluation requested")

    def action_evaluate_model(self) -> None:
        model = self.path / MODEL
        self.app.action_evaluate(str(model) if model.is_file() else "")
