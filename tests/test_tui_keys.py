"""Every key binding of the app and of every screen, pressed with the Textual pilot in a state where
it applies, with its effect checked (a screen pushed or popped, a request file in the run's control
folder, a mark, a theme, an export file, a notification); bindings hidden in a state (the
dashboard's ``check_action``) are checked to be hidden and to do nothing there. No process is
started: the job launcher's start methods are replaced by recorders, and the live run's lock is held
by this test process so the control channel addresses it."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from test_tui import fake_run, fake_runs, run_app, wait_for
from test_tui_cockpit import fake_report
from textual.screen import Screen
from textual.widgets import DataTable, Input

from fsapp.app.jobs import Jobs
from fsapp.engine.rundir import CONTROL_DIR, MODEL, RunLock
from fsapp.errors import UsageError
from fsapp.tui.app import CONTROL_WORDS, DARK, LIGHT, FsappApp
from fsapp.tui.screens.compare import CompareScreen
from fsapp.tui.screens.confirm import ConfirmScreen
from fsapp.tui.screens.dashboard import DashboardScreen
from fsapp.tui.screens.evaluate import EvaluateScreen
from fsapp.tui.screens.help import HelpScreen
from fsapp.tui.screens.newrun import NewRunScreen
from fsapp.tui.screens.plugins import PluginsScreen
from fsapp.tui.screens.report import ReportScreen
from fsapp.tui.screens.runs import RunsScreen

OWNERS = [FsappApp, RunsScreen, DashboardScreen, NewRunScreen, EvaluateScreen, CompareScreen, PluginsScreen,
          HelpScreen, ConfirmScreen, ReportScreen]
Script = Callable[..., Awaitable[None]]
CASES: dict[str, Script] = {}


def all_bindings() -> list[str]:
    """``Owner:key`` for every key of every binding (a binding may list several keys)."""
    return [f"{owner.__name__}:{key.strip()}" for owner in OWNERS for b in owner.BINDINGS
            for key in b.key.split(",")]


def case(*ids: str) -> Callable[[Script], Script]:
    def register(fn: Script) -> Script:
        for i in ids:
            CASES[i] = fn
        return fn
    return register


def notes(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


def recorder(calls: list, error: str) -> Callable[..., None]:
    """A stand-in for a job launcher's start method: records its argument, then refuses."""
    def start(arg) -> None:
        calls.append(arg)
        raise UsageError(error)
    return start


async def show(app, pilot, screen: Screen, ready: str | None = None) -> Screen:
    app.push_screen(screen)
    await wait_for(pilot, lambda: app.screen is screen and (ready is None or screen.query(ready))
                   and getattr(screen, "n_evals", 0) >= 0, type(screen).__name__, timeout=20)
    await pilot.pause()
    return screen


def shown_keys(app) -> set[str]:
    return {b.binding.key for b in app.active_bindings.values() if b.enabled}


def live_run(runs: Path) -> Path:
    """A run mid-epoch: no Finished line, its metrics file just written."""
    path = fake_run(runs, "live", epochs=4, done=2, finished=False, day=9)
    now = time.time()
    os.utime(path / "metrics.jsonl", (now, now))
    return path


# -- the app -----------------------------------------------------------------------------------

@case("FsappApp:q")
async def quit_without_jobs(app, pilot, runs):
    exited = []
    app.exit = lambda *a, **k: exited.append(True)
    await pilot.press("q")
    await pilot.pause()
    assert exited == [True]


@case("FsappApp:question_mark")
async def help_opens(app, pilot, runs):
    await pilot.press("question_mark")
    await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help", timeout=10)


@case("FsappApp:ctrl+t")
async def theme_toggles(app, pilot, runs):
    app.theme = DARK
    await pilot.press("ctrl+t")
    assert app.theme == LIGHT
    await pilot.press("ctrl+t")
    assert app.theme == DARK


# -- runs list ---------------------------------------------------------------------------------

@case("RunsScreen:n")
async def runs_new(app, pilot, runs):
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), "the form", timeout=20)


@case("RunsScreen:r")
async def runs_resume(app, pilot, runs):
    calls: list[Path] = []
    app.jobs.resume_train = recorder(calls, "recorded")
    table = app.screen.query_one("#runs", DataTable)
    names = [table.get_row_at(i)[0].plain.strip() for i in range(table.row_count)]
    table.move_cursor(row=names.index("fs-digits"))  # finished: refused with a word, nothing started
    await pilot.press("r")
    await pilot.pause()
    assert not calls and any("only interrupted or failed runs resume" in n for n in notes(app))
    table.move_cursor(row=names.index("cut-short"))
    await pilot.press("r")
    await wait_for(pilot, lambda: calls, "the resume request", timeout=10)
    assert calls == [runs / "cut-short"]


@case("RunsScreen:space")
async def runs_mark(app, pilot, runs):
    await pilot.press("space")
    await pilot.pause()
    assert len(app.marked) == 1
    await pilot.press("space")
    await pilot.pause()
    assert app.marked == frozenset()


@case("RunsScreen:c")
async def runs_compare(app, pilot, runs):
    await pilot.press("c")
    await pilot.pause()
    assert any("Mark two or more runs" in n for n in notes(app)) and isinstance(app.screen, RunsScreen)
    await pilot.press("space", "down", "space", "c")
    await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), "compare", timeout=10)
    assert len(app.marked) == 2


@case("RunsScreen:e")
async def runs_evaluate(app, pilot, runs):
    await pilot.press("e")
    await wait_for(pilot, lambda: isinstance(app.screen, EvaluateScreen), "evaluate", timeout=10)


@case("RunsScreen:l")
async def runs_plugins(app, pilot, runs):
    await pilot.press("l")
    await wait_for(pilot, lambda: isinstance(app.screen, PluginsScreen), "plugins", timeout=20)


@case("RunsScreen:slash", "RunsScreen:escape")
async def runs_filter(app, pilot, runs):
    screen = app.screen
    await pilot.press("slash")
    await pilot.pause()
    assert app.focused is screen.query_one("#filter", Input)
    await pilot.press("c", "u", "t")
    await wait_for(pilot, lambda: screen.query_one("#runs", DataTable).row_count == 1, "the filter", timeout=10)
    await pilot.press("escape")
    await pilot.pause()
    assert app.focused is screen.query_one("#runs", DataTable) and app.screen is screen


# -- dashboard ---------------------------------------------------------------------------------

CONTROL_KEYS = {"p": "pause", "s": "stop", "c": "checkpoint", "e": "evaluate"}


@case(*(f"DashboardScreen:{k}" for k in CONTROL_KEYS))
async def dashboard_control(app, pilot, runs, key):
    action = CONTROL_KEYS[key]
    finished = await show(app, pilot, DashboardScreen(runs / "fs-digits", app.jobs), "#robust")
    assert key not in shown_keys(app)  # hidden on a finished run, and pressing it does nothing
    await pilot.press(key)
    await pilot.pause()
    assert app.screen is finished and not (runs / "fs-digits" / CONTROL_DIR).exists()
    app.pop_screen()
    live = live_run(runs)
    lock = RunLock.acquire(live)
    try:
        await show(app, pilot, DashboardScreen(live, app.jobs), "#robust")
        assert key in shown_keys(app)
        await pilot.press(key)
        await wait_for(pilot, lambda: list((live / CONTROL_DIR).glob("*.json")), "the request file", timeout=10)
        request = next((live / CONTROL_DIR).glob("*.json"))
        assert request.name.endswith(f"-{action}.json") and f'"target_pid": {os.getpid()}' in request.read_text()
        assert f"live: {CONTROL_WORDS[action]}" in notes(app)
    finally:
        lock.release()


@case("DashboardScreen:r")
async def dashboard_resume(app, pilot, runs):
    calls: list[Path] = []
    app.jobs.resume_train = recorder(calls, "recorded")
    await show(app, pilot, DashboardScreen(runs / "fs-digits", app.jobs), "#robust")
    assert "r" not in shown_keys(app)
    app.pop_screen()
    await show(app, pilot, DashboardScreen(runs / "cut-short", app.jobs), "#robust")
    assert "r" in shown_keys(app)
    await pilot.press("r")
    await wait_for(pilot, lambda: calls, "the resume request", timeout=10)
    assert calls == [runs / "cut-short"] and isinstance(app.screen, DashboardScreen)


@case("DashboardScreen:v")
async def dashboard_evaluate_model(app, pilot, runs):
    await show(app, pilot, DashboardScreen(runs / "cut-short", app.jobs), "#robust")
    assert "v" not in shown_keys(app)  # no model file yet
    app.pop_screen()
    (runs / "fs-digits" / MODEL).write_bytes(b"")
    await show(app, pilot, DashboardScreen(runs / "fs-digits", app.jobs), "#robust")
    await pilot.press("v")
    await wait_for(pilot, lambda: isinstance(app.screen, EvaluateScreen), "evaluate", timeout=10)
    await pilot.pause()
    assert app.screen.query_one("#model", Input).value == str(runs / "fs-digits" / MODEL)


TABS = {"1": ("curves", "#robust"), "2": ("flags", "#flags-box"), "3": ("reports", "#report-table"),
        "4": ("run", "#run-box")}


@case(*(f"DashboardScreen:{k}" for k in TABS))
async def dashboard_tab(app, pilot, runs, key):
    tab, focus = TABS[key]
    screen = await show(app, pilot, DashboardScreen(runs / "fs-digits", app.jobs), "#robust")
    other = "2" if key == "1" else "1"
    await pilot.press(other, key)
    await pilot.pause()
    assert screen.query_one("#tabs").active == tab and app.focused is screen.query_one(focus)


# -- forms -------------------------------------------------------------------------------------

@case("NewRunScreen:ctrl+r")
async def newrun_start(app, pilot, runs):
    calls: list = []
    app.jobs.start_train = recorder(calls, "recorded")
    screen = await show(app, pilot, NewRunScreen(runs), "#param-solver-detach")
    await wait_for(pilot, lambda: screen.config is not None, "a valid form", timeout=20)
    screen.query_one("#epochs", Input).value = "x"
    await wait_for(pilot, lambda: screen.config is None, "the error", timeout=10)
    await pilot.press("ctrl+r")
    await pilot.pause()
    assert not calls and any("schedule.epochs" in n for n in notes(app))
    screen.query_one("#epochs", Input).value = "2"
    await wait_for(pilot, lambda: screen.config is not None, "valid again", timeout=10)
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: calls, "the start request", timeout=20)
    assert calls[0].schedule.epochs == 2 and any("recorded" in n for n in notes(app))


@case("NewRunScreen:ctrl+s")
async def newrun_save(app, pilot, runs):
    from fsapp.config import load

    screen = await show(app, pilot, NewRunScreen(runs), "#param-solver-detach")
    target = runs.parent / "saved.toml"
    screen.query_one("#save-path", Input).value = str(target)
    await pilot.press("ctrl+s")
    await wait_for(pilot, target.exists, "the saved config", timeout=10)
    assert load(target).data.name == "digits"


@case("EvaluateScreen:ctrl+r")
async def evaluate_run(app, pilot, runs):
    calls: list = []
    app.jobs.start_eval = recorder(calls, "recorded")
    model = str(runs / "fs-digits" / MODEL)
    screen = await show(app, pilot, EvaluateScreen(runs, model), "#model")
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: calls, "the eval request", timeout=10)
    assert str(calls[0].model) == model
    await wait_for(pilot, lambda: "recorded" in str(screen.query_one("#eval-status").render()), "the refusal",
                   timeout=10)


# -- going back --------------------------------------------------------------------------------

def _back_screens(runs: Path, jobs: Jobs) -> dict[str, Callable[[], Screen]]:
    return {
        "DashboardScreen": lambda: DashboardScreen(runs / "fs-digits", jobs),
        "NewRunScreen": lambda: NewRunScreen(runs),
        "EvaluateScreen": lambda: EvaluateScreen(runs, ""),
        "CompareScreen": lambda: CompareScreen([runs / "fs-digits", runs / "madry-digits"], jobs),
        "PluginsScreen": PluginsScreen,
        "HelpScreen": HelpScreen,
        "ReportScreen": lambda: ReportScreen(fake_report(runs / "fs-digits")),
    }


@case(*(f"{name}:escape" for name in ("DashboardScreen", "NewRunScreen", "EvaluateScreen", "CompareScreen",
                                      "PluginsScreen", "ReportScreen")),
      "HelpScreen:escape", "HelpScreen:q", "HelpScreen:question_mark")
async def back(app, pilot, runs, key, owner):
    home = app.screen
    screen = await show(app, pilot, _back_screens(runs, app.jobs)[owner]())
    assert app.screen is screen
    await pilot.press(key)
    await wait_for(pilot, lambda: app.screen is home, f"{owner} closed by {key}", timeout=10)


@case("ConfirmScreen:y", "ConfirmScreen:n", "ConfirmScreen:escape")
async def confirm(app, pilot, runs, key):
    answers: list[bool | None] = []
    app.push_screen(ConfirmScreen("Go on?", yes="Yes", no="No"), callback=answers.append)
    await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question", timeout=10)
    await pilot.press(key)
    await wait_for(pilot, lambda: answers, "the answer", timeout=10)
    assert answers == [key == "y"] and isinstance(app.screen, RunsScreen)


EXPORT_KEYS = {"m": "md", "t": "tex", "x": "csv"}


@case(*(f"CompareScreen:{k}" for k in EXPORT_KEYS))
async def compare_export(app, pilot, runs, key):
    fmt = EXPORT_KEYS[key]
    await show(app, pilot, CompareScreen([runs / "fs-digits", runs / "madry-digits"], app.jobs),
               "#compare-warnings")
    await pilot.press(key)
    await wait_for(pilot, lambda: list(runs.glob(f"compare-*.{fmt}")), "the export", timeout=10)
    assert "madry" in next(runs.glob(f"compare-*.{fmt}")).read_text()
    assert any(f"table written to {runs}" in n for n in notes(app))


# -- the test ----------------------------------------------------------------------------------

def test_every_binding_has_a_case():
    """A binding added to a screen without a pilot case here fails this test."""
    assert sorted(all_bindings()) == sorted(CASES)


@pytest.mark.parametrize("binding", all_bindings())
def test_binding(tmp_path, monkeypatch, binding):
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")
    fake_runs(runs)
    fake_run(runs, "cut-short", done=2, finished=False, day=8)  # interrupted, resumable
    owner, key = binding.split(":")
    script = CASES[binding]
    extra = {name: value for name, value in (("key", key), ("owner", owner))
             if name in script.__code__.co_varnames[:script.__code__.co_argcount]}

    async def drive(app, pilot):
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen)
                       and app.screen.query_one("#runs", DataTable).row_count == 4, "the runs", timeout=20)
        await script(app, pilot, runs, **extra)

    run_app(runs, drive, size=(100, 32))
