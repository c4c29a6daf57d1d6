"""The fsapp Textual application: makes the screens, launches jobs as processes, quits safely.

Screens post requests up (:mod:`fsapp.tui.messages`); the app acts on them through
:class:`fsapp.app.jobs.Jobs` (every training and evaluation is an ``fsapp`` process) and the run
directory's control channel, and sends news down. Runs are followed through their run directories,
the same way whether this app, ``fsapp train`` in another terminal or a script started them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from fsapp.app.jobs import EVAL, TRAIN, Job, Jobs
from fsapp.engine.rundir import RunIndex, send_request
from fsapp.errors import FsappError, UsageError
from fsapp.tui import messages as msg
from fsapp.tui.commands import FsappCommands
from fsapp.tui.screens.compare import CompareScreen
from fsapp.tui.screens.confirm import ConfirmScreen
from fsapp.tui.screens.dashboard import DashboardScreen
from fsapp.tui.screens.evaluate import EvaluateScreen
from fsapp.tui.screens.help import HelpScreen
from fsapp.tui.screens.newrun import NewRunScreen
from fsapp.tui.screens.plugins import PluginsScreen
from fsapp.tui.screens.report import ReportScreen
from fsapp.tui.screens.runs import RunsScreen

DARK, LIGHT = "textual-dark", "textual-light"
CONTROL_WORDS = {"pause": "pause requested", "resume": "resume requested",
                 "stop": "stop requested: a checkpoint is saved at the next step",
                 "checkpoint": "checkpoint requested at the next step",
                 "evaluate": "evaluation requested at the next step"}


class FsappApp(App[None]):
    """Train, watch, evaluate and compare Feature Scattering runs under one runs directory."""

    CSS_PATH = "app.tcss"
    TITLE = "fsapp"
    COMMANDS = App.COMMANDS | {FsappCommands}
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+t", "toggle_theme", "Theme"),
    ]

    def __init__(self, runs_dir: Path | str = "runs", *, poll_interval: float = 0.5,
                 jobs: Jobs | None = None) -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.poll_interval = poll_interval
        self.index = RunIndex(self.runs_dir)
        self.jobs = jobs if jobs is not None else Jobs()
        self.marked: frozenset[Path] = frozenset()

    def on_mount(self) -> None:
        self._preload()
        self.set_interval(self.poll_interval, self.poll_jobs)

    @work(thread=True, group="preload", exit_on_error=False)
    def _preload(self) -> None:
        """Load the plugins (and torch) off the UI thread, so the New-run form opens at once."""
        from fsapp.plugins import get_registry

        get_registry()

    def get_default_screen(self) -> Screen[Any]:
        return RunsScreen(self.runs_dir, self.index, self.jobs, self.poll_interval)

    # -- palette -----------------------------------------------------------------------------
    def palette_commands(self) -> list[tuple[str, str, str]]:
        """(title, help, action) of the app-wide commands."""
        return [
            ("Runs", "List the runs under the runs directory", "app.runs"),
            ("New run", "Configure and start a training run", "app.new_run"),
            ("Evaluate a model file", "Run attacks on a .safetensors model", "app.evaluate"),
            ("Compare marked runs", "Configs, robustness and curves side by side", "app.compare"),
            ("Plugins", "Components by kind and the plugins that failed", "app.plugins"),
            ("Help", "Keys of every screen", "app.help"),
            ("Toggle light/dark theme", "Switch between the light and dark theme", "app.toggle_theme"),
            ("Quit", "Quit (asks first while a job runs)", "app.quit"),
        ]

    # -- navigation ----------------------------------------------------------------------------
    def action_runs(self) -> None:
        """Back to the runs list."""
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def action_new_run(self) -> None:
        self.push_screen(NewRunScreen(self.runs_dir))

    def action_evaluate(self, model: str = "") -> None:
        self.push_screen(EvaluateScreen(self.runs_dir, model))

    def action_compare(self) -> None:
        paths = sorted(self.marked)
        if len(paths) < 2:
            self.notify("Mark two or more runs with space on the Runs screen first.", severity="warning")
            return
        self.push_screen(CompareScreen(paths, self.jobs, self.poll_interval))

    def action_plugins(self) -> None:
        self.push_screen(PluginsScreen())

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    def dashboard(self, path: Path) -> DashboardScreen:
        return DashboardScreen(path, self.jobs, self.poll_interval)

    # -- requests from the screens -----------------------------------------------------------
    def on_open_run(self, message: msg.OpenRun) -> None:
        self.push_screen(self.dashboard(message.path))

    def on_open_report(self, message: msg.OpenReport) -> None:
        self.push_screen(ReportScreen(message.path))

    def on_open_evaluate(self, message: msg.OpenEvaluate) -> None:
        self.action_evaluate(message.model)

    def on_marks_changed(self, message: msg.MarksChanged) -> None:
        self.marked = message.paths

    def on_start_run(self, message: msg.StartRun) -> None:
        try:
            job = self.jobs.start_train(message.config)
        except FsappError as exc:
            self.notify(str(exc), title="not started", severity="error", markup=False)
            return
        assert job.run_dir is not None
        if isinstance(self.screen, NewRunScreen):  # the form gives way to the run's dashboard
            self.switch_screen(self.dashboard(job.run_dir))
        else:
            self.push_screen(self.dashboard(job.run_dir))
        self.jobs_changed()

    def on_resume_run(self, message: msg.ResumeRun) -> None:
        try:
            self.jobs.resume_train(message.path)
        except FsappError as exc:
            self.notify(str(exc), title="not resumed", severity="error", markup=False)
            return
        self.notify(f"{message.path.name}: resuming from its checkpoint", markup=False)
        if message.show:
            self.push_screen(self.dashboard(message.path))
        self.jobs_changed()

    def on_control_run(self, message: msg.ControlRun) -> None:
        """Any running run, whoever started it: a request file through the control channel."""
        try:
            send_request(message.path, message.action)
        except UsageError as exc:
            job = self.jobs.active_for(message.path)
            text = f"{message.path.name} is still starting; try again in a moment" if job else str(exc)
            self.notify(text, severity="warning", markup=False)
            return
        job = self.jobs.active_for(message.path)
        if job is not None and message.action == "stop":
            job.stop_requested = True
        self.notify(f"{message.path.name}: {CONTROL_WORDS[message.action]}", markup=False)

    def on_start_eval(self, message: msg.StartEval) -> None:
        try:
            job = self.jobs.start_eval(message.request)
        except FsappError as exc:
            error = str(exc)
            self.tell(lambda: msg.EvalJobRefused(message.ticket, error))
            return
        self.tell(lambda: msg.EvalJobStarted(message.ticket, job))

    # -- following the jobs ------------------------------------------------------------------------
    def tell(self, make: Callable[[], msg.Down]) -> None:
        """Send news down: a fresh message from ``make()`` to every screen on the stack."""
        for screen in self.screen_stack:
            screen.post_message(make())

    def jobs_changed(self) -> None:
        self.tell(msg.JobsChanged)

    def poll_jobs(self) -> None:
        """Forward evaluation events; announce jobs that ended."""
        for job in self.jobs.jobs:
            if job.kind == EVAL and (job.running or job.follower is not None):
                events = job.read_events()
                if events:
                    self.tell(lambda job=job, events=events: msg.EvalJobEvents(job.id, events))
        ended = self.jobs.poll()
        for job in ended:
            if job.kind == EVAL:
                events = job.read_events()
                if events:
                    self.tell(lambda job=job, events=events: msg.EvalJobEvents(job.id, events))
                job.follower = None
            self.announce(job)
        if ended:
            self.jobs_changed()

    def announce(self, job: Job) -> None:
        """A notification for a job that ended."""
        what = job.run_dir.name if job.kind == TRAIN and job.run_dir is not None else f"evaluation {job.id}"
        if job.status == "finished":
            if job.kind == TRAIN:
                text = f"{what}: stopped, checkpoint saved" if job.stop_requested else f"{what}: finished"
            else:
                text = f"{what}: report {job.report}"
            self.notify(text, markup=False)
        elif job.kind == EVAL and job.stop_requested:
            self.notify(f"{what}: interrupted", markup=False)
        else:
            title = "training failed" if job.kind == TRAIN else "evaluation failed"
            self.notify(f"{what}: {job.error}", title=title, severity="error", timeout=10, markup=False)

    # -- quitting --------------------------------------------------------------------------
    async def action_quit(self) -> None:
        """Quit; while jobs run, ask, then stop them cleanly and wait for them."""
        if not self.jobs.active():
            self.jobs.close()
            self.exit()
            return
        if isinstance(self.screen, ConfirmScreen):
            return
        names = ", ".join(j.run_dir.name if j.run_dir is not None else j.id for j in self.jobs.active())
        question = (f"Jobs are running ({names}).\n\nStop them (training saves a checkpoint so it can be "
                    "resumed; evaluations keep their finished batches) and quit?")
        self.push_screen(ConfirmScreen(question, yes="Stop and quit", no="Keep running"),
                         callback=self._quit_answer)

    def _quit_answer(self, yes: bool | None) -> None:
        if yes:
            self.stop_all_and_exit()

    @work(group="quit", exclusive=True)
    async def stop_all_and_exit(self) -> None:
        """Ask every job to stop (training through the control channel), wait for them, exit."""
        self.notify("Stopping: saving checkpoints so the runs can be resumed…", timeout=60)
        while self.jobs.active():
            for job in self.jobs.active():
                if not job.stop_requested:
                    self.jobs.request_stop(job)
            await asyncio.sleep(0.1)
        self.jobs.close()
        self.exit()


def run_tui(runs_dir: Path) -> None:
    """Open the interface on ``runs_dir`` (the ``fsapp tui`` command)."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f"--runs-dir {runs_dir} is a file; give a folder (it is created when the first run starts)")
    app = FsappApp(runs_dir)
    try:
        app.run()
    finally:
        app.jobs.close()
