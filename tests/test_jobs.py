"""Every job is a process: runs and evaluations started together from the TUI give the numbers the
same jobs give alone from the CLI, and a killed job leaves the app alive and can be resumed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_tui import TINY, _tiny_model_file, comparable, one_thread_jobs, stop_everything, wait_for

from fsapp.engine.rundir import load_state
from fsapp.tui import form

ENV = os.environ | {"OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
RUNS = {  # run name -> form fields beyond TINY
    "run-a": {"epochs": "2"},
    "run-b": {"epochs": "2", "batch_size": "40"},
}
EXTRA = {"run-a": "run.seed=11 run.log_every=1", "run-b": "run.seed=12 run.log_every=2"}
EVALS = [  # Evaluate-screen fields -> the same options typed on the CLI
    ({"attacks": "fgsm pgd:steps=2", "n": "24"}, ["--attack", "fgsm", "--attack", "pgd:steps=2", "--n", "24"]),
    ({"suites": "default", "attacks": "", "n": "16", "seed": "3", "batch_size": "8"},
     ["--suite", "default", "--n", "16", "--seed", "3", "--batch-size", "8"]),
    ({"attacks": "pgd:steps=2", "sweep": "eps=0:0.3:3", "n": "16", "eps": "0.1"},
     ["--attack", "pgd:steps=2", "--sweep", "eps=0:0.3:3", "--n", "16", "--eps", "0.1"]),
]
NUMBERS = {  # the fields of each event that must not depend on what else runs (times left out)
    "StepEnd": ("epoch", "step", "global_step", "loss", "accuracy", "lr"),
    "EpochEnd": ("epoch", "loss", "accuracy", "lr", "bad_steps"),
    "EvalResult": ("epoch", "n", "accuracy", "gap", "flags", "global_step"),
}


def numbers(run: Path) -> list[tuple]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        fields = NUMBERS.get(event["event"])
        if fields:
            out.append((event["event"], *[json.dumps(event[f], sort_keys=True) for f in fields]))
    return out


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def form_sets(name: str, runs: Path) -> list[str]:
    values = form.initial_values("demo") | TINY | RUNS[name] | {"name": name}
    return form.overrides(values, [], EXTRA[name], runs_dir=runs)


def run_app(runs_dir: Path, script) -> None:
    from fsapp.tui.app import FsappApp

    async def main() -> None:
        app = FsappApp(runs_dir, poll_interval=0.1, jobs=one_thread_jobs())
        async with app.run_test(size=(120, 40)) as pilot:
            try:
                await script(app, pilot)
            finally:
                await stop_everything(app)
                app.jobs.close()

    asyncio.run(main())


async def start_run_from_form(app, pilot, name: str, fields: dict[str, str], extra: str) -> None:
    from fsapp.tui.screens.dashboard import DashboardScreen
    from fsapp.tui.screens.newrun import NewRunScreen

    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), "the form")
    screen = app.screen
    for fid, text in (TINY | fields | {"name": name}).items():
        screen.query_one(f"#{fid}").value = text
    screen.query_one("#extra").value = extra
    await wait_for(pilot, lambda: screen.config is not None and screen.config.run.name == name, "a valid form")
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
    await pilot.press("escape")


async def start_eval_from_screen(app, pilot, model: Path, fields: dict[str, str]):
    from fsapp.tui.screens.evaluate import EvaluateScreen
    from fsapp.tui.screens.runs import RunsScreen

    await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), "the runs list")
    await pilot.press("e")
    await wait_for(pilot, lambda: isinstance(app.screen, EvaluateScreen), "evaluate")
    screen = app.screen
    for wid, text in ({"model": str(model), "device": "cpu"} | fields).items():
        screen.query_one(f"#{wid}").value = text
    await pilot.press("ctrl+r")
    await wait_for(pilot, lambda: screen.job is not None, "the job")
    await pilot.press("escape")  # the evaluation goes on without its screen
    return screen.job


@pytest.mark.slow
def test_two_runs_and_three_evaluations_together_equal_the_cli_alone(tmp_path):
    runs, alone = tmp_path / "runs", tmp_path / "alone"
    model = _tiny_model_file(tmp_path / "m" / "model.safetensors")
    eval_jobs = []

    async def script(app, pilot):
        for name in RUNS:
            await start_run_from_form(app, pilot, name, RUNS[name], EXTRA[name])
        for fields, _ in EVALS:
            eval_jobs.append(await start_eval_from_screen(app, pilot, model, fields))
        assert len(app.jobs.active()) >= 3  # they run side by side
        await wait_for(pilot, lambda: not app.jobs.active(), "every job", timeout=300)
        assert [j.status for j in app.jobs.jobs] == ["finished"] * 5, [j.error for j in app.jobs.jobs]

    run_app(runs, script)
    # the same jobs, one at a time, as a user types them
    for name in RUNS:
        done = subprocess.run([sys.executable, "-m", "fsapp", "train", "--preset", "demo",
                               *[a for s in form_sets(name, runs) for a in ("--set", s)],
                               "--run-dir", str(alone / name), "-q"], env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert numbers(runs / name) == numbers(alone / name)
        assert len(numbers(runs / name)) >= 8  # steps, epochs, evaluations
        assert same_weights(runs / name / "model.safetensors", alone / name / "model.safetensors")
    for job, (_, args) in zip(eval_jobs, EVALS, strict=True):
        out = alone / f"{job.id}.json"
        done = subprocess.run([sys.executable, "-m", "fsapp", "eval", str(model), *args, "--device", "cpu",
                               "--out", str(out)], env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        ours, theirs = json.loads(job.report.read_text()), json.loads(out.read_text())
        assert comparable(ours) == comparable(theirs)


def test_a_killed_run_leaves_the_app_alive_and_resumes_from_the_tui(tmp_path):
    runs = tmp_path / "runs"

    async def script(app, pilot):
        from fsapp.tui.screens.dashboard import DashboardScreen

        await start_run_from_form(app, pilot, "killed", {"epochs": "30", "train_limit": "1000"},  # ~10 s: room to pause
                                  "run.seed=5 run.log_every=1 eval.every=10 schedule.milestones=[20]")
        path = runs / "killed"
        job = app.jobs.active_for(path)
        home = app.screen
        await wait_for(pilot, lambda: any(r.path == path for r in home.rows), "the run in the list")
        home.query_one("#runs").move_cursor(row=[r.path for r in home.rows].index(path))
        await pilot.press("enter")  # its dashboard, from the runs list
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
        dash = app.screen
        await wait_for(pilot, lambda: dash.state.steps, "the first steps")
        await pilot.press("p")  # hold it early (a tiny run could otherwise finish first), so the kill lands mid-run
        await wait_for(pilot, lambda: dash.state.paused, "the pause")
        await pilot.press("c")  # a checkpoint taken while paused: what the resume continues from
        await wait_for(pilot, lambda: dash.state.checkpoint is not None, "the checkpoint")
        os.kill(job.pid, signal.SIGKILL)
        await wait_for(pilot, lambda: "● killed · " in str(dash.query_one("#title").render()), "the kill shown")
        assert "killed by SIGKILL" in str(dash.query_one("#title").render())
        assert app.is_running and job.status == "killed"
        home.refresh_runs()
        row = next(r for r in home.rows if r.path == path)
        assert row.status == "failed"  # the list says so too (its files alone say interrupted)
        await pilot.press("r")  # resume from the dashboard
        await wait_for(pilot, lambda: app.jobs.active_for(path) is not None, "the resumed job")
        resumed = app.jobs.active_for(path)
        await wait_for(pilot, lambda: not resumed.running, "the resumed run to finish", timeout=120)
        assert resumed.status == "finished"
        await wait_for(pilot, lambda: dash.status() == "finished", "finished on the dashboard")

    run_app(runs, script)
    state = load_state(runs / "killed")
    assert state.finished is not None and not state.finished.stopped and state.epochs_done == 30
    assert (runs / "killed" / "model.safetensors").is_file()


def test_jobs_report_failures_in_one_line_and_refuse_taken_run_directories(tmp_path):
    from fsapp.app.request import EvalRequest
    from fsapp.config import load
    from fsapp.errors import UsageError

    jobs = one_thread_jobs()
    try:
        job = jobs.start_eval(EvalRequest(model=tmp_path / "none.safetensors", n=4, device="cpu"))
        assert job.command.startswith(f"fsapp eval {tmp_path / 'none.safetensors'} --n 4 ")
        assert job.wait(60) == 2 and job.status == "failed"
        assert "none.safetensors" in job.error and "\n" not in job.error and not job.error.startswith("error:")
        assert [j.id for j in jobs.poll()] == [job.id] and jobs.poll() == []
        other = jobs.start_eval(EvalRequest(model=tmp_path / "none.safetensors", n=4, device="cpu"))
        assert other.report != job.report and other.report.parent == tmp_path / "eval"
        other.wait(60)
        taken = tmp_path / "runs" / "taken"
        taken.mkdir(parents=True)
        (taken / "config.toml").write_text("")
        with pytest.raises(UsageError, match="already holds a run"):
            jobs.start_train(load("demo", [f"run.runs_dir={tmp_path / 'runs'}", "run.name=taken"]))
        with pytest.raises(UsageError, match="no checkpoint to resume from"):
            jobs.resume_train(taken)
        folder = jobs.folder
        assert (folder / f"{job.id}.stderr").is_file()
    finally:
        jobs.close()
    assert not folder.exists()
