"""Snapshots of the states issue 10 names beyond the basic screens (pytest-textual-snapshot): an
empty runs list, an interrupted run, a one-epoch run, a run while its live evaluation runs (the
clock frozen), two runs compared whose reports used different samples, and the New-run form with a
bad value typed. Same fixtures and conventions as ``test_tui_snapshots``; regenerate with
``--snapshot-update`` and look at the SVGs before committing them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_tui import OLD, fake_run
from test_tui_cockpit import fake_report
from test_tui_snapshots import SIZES, runs, showing  # noqa: F401  (runs is a fixture)
from textual.widgets import Input

from fsapp.app.jobs import Jobs
from fsapp.tui.app import FsappApp

FROZEN = OLD + 75.0  # "now" for the evaluating dashboard: the metrics file is 1 min 15 s old


class FrozenClock:
    """The ``time`` module with ``time()`` stopped at ``FROZEN`` (everything else passes through)."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return FROZEN


def no_blink(pilot) -> None:
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False


@pytest.mark.parametrize("size", SIZES)
def test_runs_screen_empty(snap_compare, tmp_path, monkeypatch, size):
    """No runs yet: the empty table and the hint to start one."""
    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()

    async def settle(pilot) -> None:
        no_blink(pilot)
        await pilot.pause()

    assert snap_compare(FsappApp(Path("runs")), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_interrupted(snap_compare, runs, size):  # noqa: F811
    """A run cut short after 2 of 4 epochs (no Finished, no lock, long idle): interrupted, resumable."""
    from fsapp.tui.screens.dashboard import DashboardScreen

    fake_run(runs, "cut-short", done=2, finished=False, day=5)
    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: DashboardScreen(runs / "cut-short", Jobs()), "#robust"))


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_one_epoch(snap_compare, runs, size):  # noqa: F811
    """A finished one-epoch run: one point per curve, one robustness row."""
    from fsapp.tui.screens.dashboard import DashboardScreen

    fake_run(runs, "one-epoch", epochs=1, done=1, day=5)
    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: DashboardScreen(runs / "one-epoch", Jobs()), "#robust"))


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_evaluating(snap_compare, runs, monkeypatch, size):  # noqa: F811
    """Epoch 2 of 3 ended and its live evaluation runs (no EvalResult yet); the clock is frozen
    75 s after the last line, so the elapsed time reads the same every time."""
    from fsapp.engine import rundir
    from fsapp.tui.screens import dashboard
    from fsapp.tui.screens.dashboard import DashboardScreen

    live = fake_run(runs, "live", epochs=3, done=2, finished=False, day=5)
    lines = (live / "metrics.jsonl").read_text().splitlines()
    last_eval = max(i for i, line in enumerate(lines) if '"EvalResult"' in line)
    (live / "metrics.jsonl").write_text("\n".join(lines[:last_eval]) + "\n")
    os.utime(live / "metrics.jsonl", (OLD, OLD))
    monkeypatch.setattr(dashboard, "time", FrozenClock())
    monkeypatch.setattr(rundir, "time", FrozenClock())
    assert snap_compare(FsappApp(runs), terminal_size=size,
                        run_before=showing(lambda: DashboardScreen(live, Jobs()), "#robust"))


@pytest.mark.parametrize("size", SIZES)
def test_compare_different_samples(snap_compare, runs, size):  # noqa: F811
    """Two runs whose saved reports used n=300 and n=1000: the warning line says so."""
    from fsapp.tui.screens.compare import CompareScreen

    fake_report(runs / "fs-digits", n=300)
    fake_report(runs / "madry-digits", n=1000)
    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=showing(
        lambda: CompareScreen([runs / "fs-digits", runs / "madry-digits"], Jobs()), "#compare-warnings"))


@pytest.mark.parametrize("size", SIZES)
def test_new_run_bad_value(snap_compare, runs, size):  # noqa: F811
    """'x' typed as the number of epochs: the field marked, the one-line error in the status."""
    from fsapp.tui.screens.newrun import NewRunScreen

    async def run_before(pilot) -> None:
        await showing(lambda: NewRunScreen(runs), "#param-solver-detach")(pilot)
        screen = pilot.app.screen
        screen.query_one("#epochs").focus()
        await pilot.press("end", "backspace", "backspace", "x")
        for _ in range(100):
            if screen.config is None:
                break
            await pilot.pause(0.02)
        no_blink(pilot)
        await pilot.pause()

    assert snap_compare(FsappApp(runs), terminal_size=size, run_before=run_before)
