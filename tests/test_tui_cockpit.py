"""The TUI as a researcher's cockpit (issue 10): keys per screen, controls that apply, the runs
list's columns, names told apart, the dashboard's story, saved reports, compare's export, and the
New-run form's data check. Pilot tests on fake run directories; no training."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_tui import fake_run, fake_runs, run_app, wait_for

from fsapp.config import load
from fsapp.engine import events as ev
from fsapp.engine.rundir import RunState
from fsapp.tui.datacheck import data_problem
from fsapp.tui.flagdocs import explanation
from fsapp.tui.fmt import distinct_names, elide_middle
from fsapp.tui.reports import saved_reports


def fake_report(run: Path, name: str = "20240501-120000.json", *, n: int = 300, eps: float = 0.2,
                sweep: bool = True, autoattack: bool = False) -> Path:
    """An eval report as ``fsapp eval`` writes it (the fields the TUI reads)."""
    acc = {"clean": 0.97, "pgd:steps=20": 0.52, "cw:steps=20": 0.45, "worst_case": 0.44}
    attacks = [{"key": k, "accuracy": v, "seconds": 2.5, "invalid_examples": 0, "access": "white-box",
                "loss": "ce" if k.startswith("pgd") else "margin"} for k, v in acc.items() if ":" in k]
    if autoattack:
        acc["autoattack:version=standard"] = 0.41
        acc["worst_case"] = 0.41
    data = {"model": str(run / "model.safetensors"), "dataset": "digits", "seed": 0, "n": n,
            "created": "2024-05-01T12:00:00+0000", "threat_model": {"norm": "Linf", "eps": eps},
            "settings": {"suites": ["autoattack"] if autoattack else [], "attacks": list(acc)[1:3], "source": None,
                         "batch_size": 250, "sweeps": ["eps=0:0.3:4"] if sweep else []},
            "accuracy": acc, "robust_count": {k: int(v * n) for k, v in acc.items()},
            "gap_ce_minus_margin": 0.07, "attacks": attacks, "seconds": 7.5,
            "flags": [{"id": "ce-margin-gap", "message": "cross-entropy attacks are 7.0% above margin-loss attacks"}],
            "sweeps": [{"key": "eps", "values": [0.0, 0.1, 0.2, 0.3], "n": n,
                        "curves": {"pgd:steps=20": [0.97, 0.88, 0.52, 0.03], "cw:steps=20": [0.97, 0.86, 0.45, 0.02]},
                        "worst_case": [0.97, 0.86, 0.44, 0.01]}] if sweep else [],
            "notes": []}
    (run / "eval").mkdir(exist_ok=True)
    path = run / "eval" / name
    path.write_text(json.dumps(data))
    return path


# -- text helpers ---------------------------------------------------------------------------

def test_names_are_cut_in_the_middle_and_stay_told_apart():
    assert elide_middle("abcdefghij", 5) == "ab…ij" and elide_middle("abc", 5) == "abc"
    names = [f"20240501-10000{i}-feature-scatter-digits" for i in range(3)] + ["fs-digits"]
    short = distinct_names(names, 14)
    assert len(set(short)) == 4 and all(len(s) <= 14 for s in short)
    assert all(f"00{i}-" in short[i] for i in range(3)) and short[3] == "fs-digits"


def test_flags_are_explained_from_the_evaluation_docs():
    text = explanation("ce-margin-gap")
    assert "Raised if" in text and "margin" in text and "**" not in text
    assert explanation("no-such-flag") == "see docs/EVALUATION.md#no-such-flag"


def test_saved_reports_are_listed_newest_first(tmp_path):
    run = fake_run(tmp_path, "r")
    fake_report(run, "a.json", sweep=False)
    fake_report(run, "b.json", autoattack=True)
    (run / "eval" / "broken.json").write_text("{not json")
    found = saved_reports(run)
    assert [r.path.name for r in found] == ["b.json", "a.json"]
    assert found[0].kind == "suite autoattack · sweep eps" and found[0].autoattack == 0.41
    assert found[1].kind == "pgd:steps=20 cw:steps=20" and found[1].flags == ("ce-margin-gap",)


def test_missing_dataset_files_are_the_loaders_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = data_problem(load("paper-cifar10"))
    assert problem is not None and problem.startswith("CIFAR-10 not found under data")
    assert data_problem(load("demo")) is None
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / f).write_bytes(b"x")
    assert data_problem(load("paper-cifar10")) is None  # present: checked in full when training starts


def test_eta_includes_the_evaluations_still_to_come():
    from fsapp.tui.screens.dashboard import eta_seconds, eval_pending

    s = RunState(config={"eval": {"n": 100}})
    s.add(ev.RunStarted("r", "cpu", 4, 10, 0, 0, False, {"eval": {"n": 100}}))
    s.add(ev.StepEnd(0, 9, 10, 40, 1.0, 0.5, 0.1, 100.0, 30.0))
    s.add(ev.EpochEnd(0, 1.0, 0.5, 0.1, 10.0))
    assert eval_pending(s) and eta_seconds(s) == 30.0  # no evaluation timed yet
    s.add(ev.EvalResult(0, 100, {"clean": 0.5, "worst_case": 0.2}, None, [], 5.0))
    assert not eval_pending(s) and eta_seconds(s) == 30.0 + 3 * 5.0


# -- pilot sessions -------------------------------------------------------------------------

def test_runs_list_columns_stay_sane_when_runs_appear_while_away(tmp_path):
    runs = tmp_path / "runs"
    fake_runs(runs)

    async def script(app, pilot):
        from fsapp.tui.screens.help import HelpScreen

        home = app.screen
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        for i in range(4):
            fake_run(runs, f"20240601-10000{i}-feature-scatter-digits", day=10 + i)
        await pilot.pause(0.6)
        await pilot.press("escape")
        await wait_for(pilot, lambda: home.query_one("#runs").row_count == 7, "the new runs")
        await pilot.pause()
        table = home.query_one("#runs")
        widths = {c.key.value: c.get_render_width(table) - 2 for c in table.columns.values()}
        assert widths["name"] >= 14 and widths["status"] >= len("interrupted") and widths["when"] >= 11
        assert all(w >= len(str(c.label)) for w, c in zip(widths.values(), table.columns.values(), strict=True))
        names = [table.get_row_at(i)[0].plain.strip() for i in range(4)]
        assert len(set(names)) == 4, names

    run_app(runs, script, size=(80, 24))


def test_form_with_missing_data_shows_the_error_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"

    async def script(app, pilot):
        from fsapp.tui.screens.newrun import NewRunScreen

        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen) and app.screen.config, "the form")
        screen = app.screen
        screen.query_one("#preset").value = "paper-cifar10"
        status = screen.query_one("#status")
        await wait_for(pilot, lambda: "CIFAR-10 not found" in str(status.render()), "the data error")
        assert "✓ valid" not in str(status.render()) and screen.query_one("#dataset").has_class("-invalid")
        await pilot.press("ctrl+r")
        await pilot.pause(0.3)
        assert app.screen is screen and not app.jobs.jobs and not runs.exists()

    run_app(runs, script, size=(80, 24))


def test_dashboard_shows_a_live_evaluation_and_hides_controls_that_do_not_apply(tmp_path):
    runs = tmp_path / "runs"
    live = fake_run(runs, "live", epochs=3, done=1, finished=False)
    lines = (live / "metrics.jsonl").read_text().splitlines()
    evals = [i for i, line in enumerate(lines) if '"EvalResult"' in line]
    (live / "metrics.jsonl").write_text("\n".join(lines[:evals[-1]]) + "\n")  # epoch 1 ends, its eval runs
    os.utime(live / "metrics.jsonl", (time.time() - 5, time.time() - 5))
    done = fake_run(runs, "done")

    async def script(app, pilot):
        from fsapp.tui.screens.dashboard import DashboardScreen

        app.push_screen(DashboardScreen(live, app.jobs))
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.n_evals >= 0,
                       "the dashboard")
        screen = app.screen
        await wait_for(pilot, lambda: "evaluating" in str(screen.query_one("#phase").render()), "evaluating")
        phase = str(screen.query_one("#phase").render())
        assert "live: clean, pgd:steps=20, cw:steps=20" in phase and "elapsed" in phase
        assert "● evaluating" in str(screen.query_one("#title").render())
        assert screen.check_action("pause", ()) and not screen.check_action("resume", ())
        app.pop_screen()
        app.push_screen(DashboardScreen(done, app.jobs))
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.path == done
                       and app.screen.n_evals >= 0, "done")
        screen = app.screen
        await pilot.pause()
        assert not any(screen.check_action(a, ()) for a in ("pause", "stop", "checkpoint", "evaluate_now"))
        shown = {b.binding.key for b in app.active_bindings.values() if b.enabled}
        assert "p" not in shown and "s" not in shown and "escape" in shown

    run_app(runs, script, size=(80, 24))


DASH_KEYS = [("1", "curves", "#robust"), ("2", "flags", "#flags-box"), ("3", "reports", "#report-table"),
             ("4", "run", "#run-box")]


@pytest.mark.parametrize(("key", "tab", "focus"), DASH_KEYS, ids=[k[1] for k in DASH_KEYS])
def test_dashboard_tab_keys(tmp_path, key, tab, focus):
    runs = tmp_path / "runs"
    run = fake_run(runs, "fs")
    fake_report(run)

    async def script(app, pilot):
        from fsapp.tui.screens.dashboard import DashboardScreen
        from fsapp.tui.screens.report import ReportScreen

        app.push_screen(DashboardScreen(run, app.jobs))
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.n_evals >= 0,
                       "the dashboard")
        await pilot.press(key)
        await pilot.pause()
        assert app.screen.query_one("#tabs").active == tab and app.focused is app.screen.query_one(focus)
        if tab == "reports":
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ReportScreen), "the report")
            assert "suite" not in str(app.screen.query_one("#report-head").render())
            assert app.screen.query_one("#report-acc").row_count == 4 and app.screen.query("#sweep-0")
        if tab == "flags":
            assert "Raised if" in str(app.screen.query_one("#flag-text").render())
        if tab == "run":
            assert "live evaluation over 4 epochs" in str(app.screen.query_one("#run-text").render())

    run_app(runs, script, size=(80, 24))


@pytest.mark.parametrize("fmt", ["md", "tex", "csv"])
def test_compare_exports_the_table(tmp_path, fmt):
    runs = tmp_path / "runs"
    paths = fake_runs(runs)
    key = {"md": "m", "tex": "t", "csv": "x"}[fmt]

    async def script(app, pilot):
        from fsapp.tui.screens.compare import CompareScreen

        app.push_screen(CompareScreen(paths, app.jobs))
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.reports, "compare")
        warnings = str(app.screen.query_one("#compare-warnings").render())
        assert "live evaluations' attacks" not in warnings
        await pilot.press(key)
        await wait_for(pilot, lambda: list(runs.glob(f"compare-*.{fmt}")), "the export")
        text = next(runs.glob(f"compare-*.{fmt}")).read_text()
        assert "fs-digits" in text.replace("\\_", "_") and "madry-digits" in text.replace("\\_", "_")

    run_app(runs, script, size=(80, 24))


def test_compare_warns_when_runs_were_evaluated_differently(tmp_path):
    from fsapp.tui.screens.compare import settings_warnings

    runs = tmp_path / "runs"
    a, b = fake_run(runs, "a"), fake_run(runs, "b")
    fake_report(a, n=300)
    fake_report(b, n=1000, eps=8 / 255)
    states = []
    for p in (a, b):
        s = RunState()
        for line in (p / "metrics.jsonl").read_text().splitlines():
            s.add(ev.from_dict(json.loads(line)))
        states.append(s)
    reports = [saved_reports(a)[0], saved_reports(b)[0]]
    warnings = settings_warnings(states, reports, ["a", "b"])
    assert any(w.startswith("saved reports' samples differ: a n=300; b n=1000") for w in warnings)
    assert any(w.startswith("saved reports' eps differ") for w in warnings)
    assert not any(w.startswith("live") for w in warnings)


RUNS_KEYS = [("n", "NewRunScreen"), ("l", "PluginsScreen"), ("e", "EvaluateScreen"), ("enter", "DashboardScreen"),
             ("question_mark", "HelpScreen")]


@pytest.mark.parametrize(("key", "screen"), RUNS_KEYS, ids=[k[0] for k in RUNS_KEYS])
def test_runs_screen_keys(tmp_path, key, screen):
    runs = tmp_path / "runs"
    fake_runs(runs)

    async def script(app, pilot):
        await pilot.pause()
        await pilot.press(key)
        await wait_for(pilot, lambda: type(app.screen).__name__ == screen, screen)

    run_app(runs, script, size=(80, 24))


def test_palette_lists_the_key_of_each_command(tmp_path):
    runs = tmp_path / "runs"
    fake_runs(runs)

    async def script(app, pilot):
        from fsapp.tui.commands import FsappCommands
        from fsapp.tui.screens.dashboard import DashboardScreen

        app.push_screen(DashboardScreen(runs / "fs-digits", app.jobs))
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.n_evals >= 0,
                       "the dashboard")
        provider = FsappCommands(app.screen)
        helps = {title: help_text for title, help_text, _ in provider._commands()}
        assert helps["Stop training"].endswith("· key s") and helps["Quit"].endswith("· key q")

    run_app(runs, script, size=(80, 24))
