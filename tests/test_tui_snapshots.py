"""Snapshots of every screen at 80x24 and 120x40 (pytest-textual-snapshot).

The runs are fixed fake run directories with fixed timestamps (see ``test_tui.fake_runs``), paths
are relative (the test runs in its tmp directory), entry-point plugins are limited to the example
plugin, and text cursors do not blink, so the pictures change only when the interface (or the
built-in components the New-run and Plugins screens list) does. Regenerate with ``pytest tests/test_tui_snapshots.py
--snapshot-update`` and look at the SVGs before committing them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_tui import fake_run, fake_runs
from test_tui_cockpit import fake_report
from textual.screen import Screen
from textual.widgets import Input

from fsapp.app.jobs import Jobs
from fsapp.tui.app import FsappApp

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
RUNS = Path("runs")


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Iterator[Path]:
    """Fake runs under ./runs; only the example plugin among the installed ones (a stable registry)."""
    from fsapp.plugins import reset_registry

    monkeypatch.chdir(tmp_path)
    fake_runs(RUNS)
    before = os.environ.get("FSAPP_LOAD_PLUGINS")
    os.environ["FSAPP_LOAD_PLUGINS"] = "example"
    reset_registry()
    try:
        yield RUNS
    finally:
        if before is None:
            os.environ.pop("FSAPP_LOAD_PLUGINS", None)
        else:
            os.environ["FSAPP_LOAD_PLUGINS"] = before
        reset_registry()


def showing(make: Callable[[], Screen], ready: str | None = None, theme: str | None = None):
    """A ``run_before`` that pushes a screen, waits for ``ready`` to exist, and stops cursor blinking."""

    async def run_before(pilot) -> None:
        app = pilot.app
        if theme:
            app.theme = theme
        await app.push_screen(make())
        await pilot.pause()
        for _ in range(100):
            if ready is None or app.screen.query(ready):
                break
            await pilot.pause(0.02)
        for widget in app.screen.query(Input):
            widget.cursor_blink = False
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", SIZES)
def test_runs_screen(snap_compare, runs, size):
    """Runs newest first: finished, interrupted and finished, with best robust accuracy."""

    async def settle(pilot) -> None:
        for widget in pilot.app.screen.query(Input):
            widget.cursor_blink = False

    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_new_run_screen(snap_compare, runs, size):
    """The form from the demo preset, its components' parameters, and the validation line."""
    from fsapp.tui.screens.newrun import NewRunScreen

    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: NewRunScreen(runs), "#param-solver-detach"))


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_screen(snap_compare, runs, size):
    """A finished Feature Scattering run: curves, robustness rows with the gap flagged."""
    from fsapp.tui.screens.dashboard import DashboardScreen

    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: DashboardScreen(runs / "fs-digits", Jobs())))


def test_dashboard_screen_light(snap_compare, runs):
    """The same in the light theme."""
    from fsapp.tui.screens.dashboard import DashboardScreen

    assert snap_compare(FsappApp(runs), terminal_size=(120, 40),
                        run_before=showing(lambda: DashboardScreen(runs / "fs-digits", Jobs()), theme="textual-light"))


@pytest.mark.parametrize("size", SIZES)
def test_evaluate_screen(snap_compare, runs, size):
    """The Evaluate form for a run's model file."""
    from fsapp.tui.screens.evaluate import EvaluateScreen

    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: EvaluateScreen(runs, str(runs / "fs-digits" / "model.safetensors"))))


@pytest.mark.parametrize("size", SIZES)
def test_compare_screen(snap_compare, runs, size):
    """Two runs side by side: robustness, config differences, overlaid curves."""
    from fsapp.tui.screens.compare import CompareScreen

    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: CompareScreen([runs / "fs-digits", runs / "madry-digits"], Jobs())))


@pytest.mark.parametrize("size", SIZES)
def test_plugins_screen(snap_compare, runs, size):
    """Components by kind with their plugin and parameters."""
    from fsapp.tui.screens.plugins import PluginsScreen

    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=showing(PluginsScreen))


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare, runs, size):
    """Keys of every screen."""
    from fsapp.tui.screens.help import HelpScreen

    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=showing(HelpScreen))


def six_runs(runs: Path) -> list[Path]:
    """The three fake runs and three 30-epoch runs whose default names differ only in the middle."""
    extra = [fake_run(runs, f"20240501-10000{i}-feature-scatter-digits", day=4 + i, epochs=30, done=30)
             for i in range(3)]
    return sorted(runs.iterdir()) if extra else []


def test_runs_screen_six_runs(snap_compare, runs):
    """Six runs at 80x24: names cut in the middle keep what tells them apart; the details pane."""
    six_runs(runs)

    async def settle(pilot) -> None:
        for widget in pilot.app.screen.query(Input):
            widget.cursor_blink = False
        await pilot.pause()

    assert snap_compare(FsappApp(runs), terminal_size=(80, 24), run_before=settle)


def test_dashboard_thirty_epochs(snap_compare, runs):
    """A 30-epoch run at 80x24: the pinned header, per-attack curves, the table scrolled to its end."""
    from fsapp.tui.screens.dashboard import DashboardScreen

    six_runs(runs)
    assert snap_compare(FsappApp(runs), terminal_size=(80, 24), run_before=showing(
        lambda: DashboardScreen(runs / "20240501-100002-feature-scatter-digits", Jobs()), "#robust"))


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_reports_tab(snap_compare, runs, size):
    """The saved reports tab lists eval/*.json with their headline numbers."""
    from fsapp.tui.screens.dashboard import DashboardScreen

    fake_report(runs / "fs-digits", "20240501-120000.json")
    fake_report(runs / "fs-digits", "20240502-120000.json", autoattack=True, sweep=False)

    async def run_before(pilot) -> None:
        await showing(lambda: DashboardScreen(runs / "fs-digits", Jobs()), "#report-table")(pilot)
        await pilot.press("3")
        await pilot.pause()

    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_report_screen(snap_compare, runs, size):
    """A saved report: accuracy per attack, the sweep's curves, the flag explained."""
    from fsapp.tui.screens.report import ReportScreen

    path = fake_report(runs / "fs-digits")
    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=showing(lambda: ReportScreen(path)))


def test_compare_six_runs(snap_compare, runs):
    """Six runs compared at 80x24: names told apart, last/best/report rows."""
    from fsapp.tui.screens.compare import CompareScreen

    paths = six_runs(runs)
    assert snap_compare(FsappApp(runs), terminal_size=(80, 24),
                        run_before=showing(lambda: CompareScreen(paths, Jobs())))


def test_new_run_missing_data(snap_compare, runs):
    """paper-cifar10 without the CIFAR files: the loader's message in the form, the dataset marked."""
    from fsapp.tui.screens.newrun import NewRunScreen

    async def run_before(pilot) -> None:
        await showing(lambda: NewRunScreen(runs, preset="paper-cifar10"), "#param-solver-max_iter")(pilot)
        for _ in range(200):
            if pilot.app.screen.data_error:
                break
            await pilot.pause(0.02)
        await pilot.pause()

    assert snap_compare(FsappApp(runs), terminal_size=(80, 24), run_before=run_before)
