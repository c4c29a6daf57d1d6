"""The fsapp Textual application: screens, training workers, quitting safely, themes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from fsapp.config import Config
from fsapp.engine import events as ev
from fsapp.engine.rundir import CHECKPOINT, Control, RunIndex, new_run_dir
from fsapp.errors import FsappError, UsageError
from fsapp.tui.commands import FsappCommands
from fsapp.tui.live import LiveRun, TrainDone, TrainEvent

DARK, LIGHT = "textual-dark", "textual-light"


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

    def __init__(self, runs_dir: Path | str = "runs", *, poll_interval: float = 0.5) -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.poll_interval = poll_interval
        self.index = RunIndex(self.runs_dir)
        self.live: dict[Path, LiveRun] = {}
        self.marked: set[Path] = set()

    def on_mount(self) -> None:
        self._preload()

    @work(thread=True, group="preload", exit_on_error=False)
    def _preload(self) -> None:
        """Import the engine (and torch) off the UI thread, so Start does not stall the screen."""
        import fsapp.engine.train  # noqa: F401

    def get_default_screen(self) -> Screen[Any]:
        from fsapp.tui.home import HomeScreen

        return HomeScreen()

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
            ("Quit", "Quit (asks first while a run trains)", "app.quit"),
        ]

    # -- navigation ----------------------------------------------------------------------------
    def action_runs(self) -> None:
        """Back to the runs list."""
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def action_new_run(self) -> None:
        from fsapp.tui.newrun import NewRunScreen

        self.push_screen(NewRunScreen())

    def action_evaluate(self, model: str = "") -> None:
        from fsapp.tui.evalscreen import EvaluateScreen

        self.push_screen(EvaluateScreen(model))

    def action_compare(self) -> None:
        from fsapp.tui.compare import CompareScreen

        paths = sorted(self.marked)
        if len(paths) < 2:
            self.notify("Mark two or more runs with space on the Runs screen first.", severity="warning")
            return
        self.push_screen(CompareScreen(paths))

    def action_plugins(self) -> None:
        from fsapp.tui.pluginscreen import PluginsScreen

        self.push_screen(PluginsScreen())

    def action_help(self) -> None:
        from fsapp.tui.helpscreen import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    def open_run(self, path: Path) -> None:
        """Show the dashboard of the run at ``path``."""
        from fsapp.tui.dashboard import DashboardScreen

        self.push_screen(DashboardScreen(path))

    # -- training ------------------------------------------------------------------------------
    def start_run(self, cfg: Config) -> Path:
        """Start training ``cfg`` in a worker thread; returns its run directory."""
        taken = set(self.live)
        path = new_run_dir(cfg.run.runs_dir, cfg.run.name, cfg.method.perturbation, cfg.data.name, taken)
        if (path / CHECKPOINT).exists():
            raise UsageError(f"{path} already holds a run; resume it from the Runs screen (r)")
        if path in self.live and self.live[path].active:
            raise UsageError(f"{path} is already training")
        self._launch(LiveRun(path, _new_control()), cfg)
        return path

    def resume_run(self, path: Path) -> None:
        """Continue the run at ``path`` from its checkpoint in a worker thread."""
        if path in self.live and self.live[path].active:
            raise UsageError(f"{path.name} is already training here")
        if not (path / CHECKPOINT).is_file():
            raise UsageError(f"{path.name} has no checkpoint to resume from")
        self._launch(LiveRun(path, _new_control(), resumed=True), None)

    def _launch(self, live: LiveRun, cfg: Config | None) -> None:
        self.live[live.path] = live
        live.worker = self._train(live, cfg)

    @work(thread=True, group="train", exit_on_error=False)
    def _train(self, live: LiveRun, cfg: Config | None) -> None:
        """The worker: run the engine, turn its events into messages."""
        from fsapp.engine.train import train

        try:
            if cfg is None:
                events = train(resume=live.path, control=live.control)
            else:
                events = train(cfg, run_dir=live.path, control=live.control)
            for event in events:
                self.post_message(TrainEvent(live.path, event))
        except FsappError as exc:
            self.post_message(TrainDone(live.path, str(exc)))
        except Exception as exc:  # the UI must survive any engine failure
            self.post_message(TrainDone(live.path, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(TrainDone(live.path))

    def on_train_event(self, message: TrainEvent) -> None:
        live = self.live.get(message.path)
        if live is not None and live.phase == "starting" and isinstance(message.event, ev.RunStarted):
            live.phase = "running"
        self._poke(message.path)

    def on_train_done(self, message: TrainDone) -> None:
        live = self.live.get(message.path)
        if live is not None:
            live.phase = "failed" if message.error else "done"
            live.error = message.error
        if message.error:
            self.notify(f"{message.path.name}: {message.error}", title="training failed", severity="error",
                        timeout=10, markup=False)
        else:
            stopped = live is not None and live.control.stop.is_set()
            self.notify(f"{message.path.name}: " + ("stopped, checkpoint saved" if stopped else "finished"),
                        markup=False)
        self._poke(message.path)

    def _poke(self, path: Path) -> None:
        """Let the screens that show ``path`` read what the run directory gained."""
        for screen in self.screen_stack:
            refresh = getattr(screen, "run_changed", None)
            if refresh is not None:
                refresh(path)

    def live_paths(self) -> set[Path]:
        return {p for p, live in self.live.items() if live.active}

    # -- quitting --------------------------------------------------------------------------
    async def action_quit(self) -> None:
        """Quit; while runs train, ask, then stop them and wait for their checkpoints."""
        from fsapp.tui.confirm import ConfirmScreen

        if not self.live_paths():
            self.exit()
            return
        if isinstance(self.screen, ConfirmScreen):
            return

        names = ", ".join(p.name for p in self.live_paths())
        question = (f"Training is in progress ({names}).\n\nStop it, save a checkpoint so it can be "
                    "resumed, and quit?")
        self.push_screen(ConfirmScreen(question, yes="Stop and quit", no="Keep training"),
                         callback=self._quit_answer)

    def _quit_answer(self, yes: bool | None) -> None:
        if yes:
            self.stop_all_and_exit()

    @work(group="quit", exclusive=True)
    async def stop_all_and_exit(self) -> None:
        """Set every run's stop flag, wait for the workers (checkpoint written), then exit."""
        running = [live for live in self.live.values() if live.active]
        for live in running:
            live.phase = "stopping"
            live.control.stop.set()
        self.notify("Stopping: saving checkpoints so the runs can be resumed…", timeout=60)
        for live in running:
            if live.worker is not None:
                await live.worker.wait()
        self.exit()


def _new_control() -> Control:
    return Control.new()


def run_tui(runs_dir: Path) -> None:
    """Open the interface on ``runs_dir`` (the ``fsapp tui`` command)."""
    FsappApp(runs_dir).run()
