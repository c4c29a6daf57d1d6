"""The Textual interface: run directories as data, the New-run form, and pilot-driven sessions that
train for real in ``fsapp train`` processes (start from the form, watch epochs and robustness
arrive, pause, stop, resume, compare) and evaluate in ``fsapp eval`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fsapp.app.jobs import Jobs
from fsapp.app.request import EvalRequest
from fsapp.config import load, to_toml
from fsapp.engine import events as ev
from fsapp.engine.rundir import (
    CONTROL_DIR,
    Follower,
    RunIndex,
    RunState,
    config_diff,
    load_state,
    send_request,
)
from fsapp.errors import UsageError
from fsapp.tui import form

OLD = 1714557600.0  # 2024-05-01 10:00 UTC: fake runs are long idle, hence never "running"
TINY = {  # form id -> text: a seconds-long Feature Scattering run on digits
    "attacks": "pgd:steps=2 cw:steps=2", "epsilon": "0.2", "eval_eps": "0.2", "eval_n": "20",
    "batch_size": "30", "train_limit": "120", "device": "cpu",
}


# -- fake run directories (also used by the snapshot tests) -----------------------------------

def fake_run(
    root: Path,
    name: str,
    *,
    perturbation: str = "feature-scatter",
    lr: float = 0.1,
    epochs: int = 4,
    done: int = 4,
    finished: bool = True,
    stopped: bool = False,
    day: int = 1,
    gap: float = 0.08,
) -> Path:
    """A run directory with fixed content and timestamps, as the engine would leave it."""
    path = root / name
    path.mkdir(parents=True)
    own = {"feature-scatter": {"clamp_start": False}, "supervised": {"random_start": True}}
    tables = {  # written out by hand (not resolved from the registry) so snapshots stay put
        "run": {"name": name, "runs_dir": "runs", "seed": 0, "device": "auto"},
        "data": {"name": "digits", "batch_size": 60, "train_limit": 0},
        "model": {"name": "small-cnn", "width": 32, "hidden": 128},
        "method": {"perturbation": perturbation, "solver": "sinkhorn", "epsilon": 0.2, "step_size": 0.2,
                   "steps": 1, "loss": "soft-ce", "label_smoothing": 0.5},
        "optim": {"lr": lr, "momentum": 0.9, "weight_decay": 0.0002},
        "schedule": {"epochs": epochs, "milestones": [10, 13], "gamma": 0.1},
        "eval": {"n": 200, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=20", "cw:steps=20"]},
        "perturbation": own.get(perturbation, {}),
    }
    (path / "config.toml").write_text(to_toml(tables))
    created = f"2024-05-{day:02d}T10:00:00+0000"
    (path / "manifest.json").write_text(json.dumps({"created": created, "device": "cpu"}))
    spe, events = 4, []
    events.append(ev.RunStarted(f"runs/{name}", "cpu", epochs, spe, 0, 0, False, tables))
    g = 0
    for epoch in range(done):
        for step in range(spe):
            g += 1
            loss = round(2.3 - 0.9 * g / (epochs * spe) + 0.05 * (step % 2), 4)
            acc = round(0.1 + 0.7 * g / (epochs * spe), 4)
            events.append(ev.StepEnd(epoch, step, g, epochs * spe, loss, acc, lr, 1200.0,
                                     float(10 * (epochs * spe - g))))
        events.append(ev.EpochEnd(epoch, loss, acc, lr, 12.5))
        clean = round(min(0.5 + 0.1 * epoch, 0.9), 3)
        cw = round(min(0.2 + 0.05 * epoch, 0.45), 3)
        pgd = round(cw + gap, 3)
        flags = [{"id": "ce-margin-gap", "message": f"cross-entropy PGD is {gap:.1%} above the margin-loss"
                  " attack: CE gradients look masked"}] if gap > 0.05 else []
        events.append(ev.EvalResult(epoch, 200, {"clean": clean, "pgd:steps=20": pgd, "cw:steps=20": cw,
                                                 "worst_case": round(cw - 0.01, 3)}, round(pgd - cw, 3),
                                    flags, 3.0))
        events.append(ev.CheckpointSaved(f"runs/{name}/checkpoint.safetensors", epoch + 1, 0, g))
    if finished:
        events.append(ev.Finished(f"runs/{name}/model.safetensors", f"runs/{name}", 60.0 * done, stopped))
    (path / "metrics.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
    (path / "checkpoint.safetensors").write_bytes(b"")
    for file in path.iterdir():
        os.utime(file, (OLD, OLD))
    return path


def fake_runs(root: Path) -> list[Path]:
    """Three runs: finished Feature Scattering, interrupted Madry, finished standard."""
    return [
        fake_run(root, "fs-digits", day=3),
        fake_run(root, "madry-digits", perturbation="supervised", lr=0.05, done=2, finished=True,
                 stopped=True, day=2, gap=0.01),
        fake_run(root, "standard-digits", perturbation="none", epochs=3, done=3, day=1, gap=0.0),
    ]


# -- run directories as data ------------------------------------------------------------------

def test_follower_reads_only_complete_appended_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    line = json.dumps(ev.Warning("hello", 3).to_dict())
    path.write_text(line + "\n" + line[:10])
    f = Follower(path)
    assert [e.message for e in f.read()] == ["hello"]
    assert f.read() == []
    with open(path, "a") as fh:
        fh.write(line[10:] + "\nnot json\n")
    assert [e.message for e in f.read()] == ["hello"]
    path.write_text(line + "\n")  # rewritten: shorter than what was read
    assert len(f.read()) == 1 and f.restarted


def test_statuses_and_summaries(tmp_path):
    runs = fake_runs(tmp_path)
    rows = RunIndex(tmp_path).scan()
    assert [r.name for r in rows] == ["fs-digits", "madry-digits", "standard-digits"]  # newest first
    fs, madry, std = rows
    assert (fs.status, fs.epochs_done, fs.epochs_total, fs.when) == ("finished", 4, 4, "2024-05-03 10:00")
    assert fs.best_robust == pytest.approx(0.34) and fs.method == "feature-scatter"
    assert (madry.status, madry.epochs_done, madry.resumable) == ("interrupted", 2, True)
    assert std.status == "finished" and std.model == "small-cnn" and std.dataset == "digits"
    # a log without Finished that grew just now is running; stale, it is interrupted
    partial = fake_run(tmp_path, "live", finished=False, done=1, day=4)
    assert RunIndex(tmp_path).scan(now=OLD + 10)[0].status == "running"
    assert RunIndex(tmp_path).scan()[0].status == "interrupted"
    assert RunIndex(tmp_path).scan(live={partial})[0].status == "running"
    # with the engine's lock file, the lock decides: held is running, released is interrupted
    from fsapp.engine.rundir import RunLock

    lock = RunLock.acquire(partial)
    assert RunIndex(tmp_path).scan()[0].status == "running"
    lock.release()
    assert RunIndex(tmp_path).scan(now=OLD + 10)[0].status == "interrupted"
    assert [r.name for r in rows if r.matches("supervised interr")] == ["madry-digits"]
    assert runs[0].name == "fs-digits"


def test_resumed_run_state_drops_steps_after_the_checkpoint():
    state = RunState()
    state.add(ev.RunStarted("r", "cpu", 3, 4, 0, 0, False, {}))
    for g in range(1, 7):
        state.add(ev.StepEnd((g - 1) // 4, (g - 1) % 4, g, 12, 1.0, 0.5, 0.1, 10.0, 1.0))
    state.add(ev.EpochEnd(0, 1.0, 0.5, 0.1, 1.0))
    state.add(ev.RunStarted("r", "cpu", 3, 4, 1, 0, True, {}))  # crashed after step 6; checkpoint at 4
    assert [s.global_step for s in state.steps] == [1, 2, 3, 4] and state.epochs_done == 1
    assert state.finished is None


def test_config_diff_names_only_differing_keys(tmp_path):
    a, b, _ = fake_runs(tmp_path)
    rows = dict(config_diff([load_state(a).config, load_state(b).config]))
    assert rows["method.perturbation"] == ["feature-scatter", "supervised"]
    assert rows["optim.lr"] == [0.1, 0.05]
    assert "run.name" not in rows and "data.name" not in rows


# -- the New-run form is the CLI ----------------------------------------------------------------

def test_form_overrides_validate_with_the_cli_messages(tmp_path):
    values = form.initial_values("demo") | TINY
    rows = [(r, r.initial) for fid in ("model", "perturbation", "solver")
            for r in form.param_rows(fid, values[fid], "demo")]
    cfg = form.validate("demo", form.overrides(values, rows, "run.log_every=1", runs_dir=tmp_path))
    assert (cfg.data.train_limit, cfg.eval.attacks, cfg.run.runs_dir) == (120, ("pgd:steps=2", "cw:steps=2"),
                                                                         str(tmp_path))
    assert cfg.run.log_every == 1
    changed = [(r, "8" if r.key == "width" else r.initial) for r, _ in rows]
    assert form.validate("demo", form.overrides(values, changed)).extras["model"] == {"width": 8}
    bad = form.overrides(values | {"epochs": "x"}, rows)
    with pytest.raises(UsageError) as got:
        form.validate("demo", bad)
    with pytest.raises(UsageError) as cli:
        load("demo", ["schedule.epochs=x"])
    assert str(got.value) == str(cli.value) == "preset demo: bad value for schedule.epochs: expected an integer, got 'x'"
    assert form.to_text(8 / 255) == "8/255" and form.to_text(0.2) == "0.2"


def test_evaluate_requests_are_the_cli_command_line(tmp_path):
    request = EvalRequest(model=Path("runs/a b/model.safetensors"), suites=["paper"], attacks=["pgd:steps=2"],
                          sweeps=["eps=0:16/255:3"], source=Path("src.safetensors"), n=24, seed=5, batch_size=8,
                          eps="8/255", device="cpu")
    assert request.args() == ["eval", "runs/a b/model.safetensors", "--suite", "paper", "--attack", "pgd:steps=2",
                              "--sweep", "eps=0:16/255:3", "--source", "src.safetensors", "--n", "24", "--seed", "5",
                              "--batch-size", "8", "--eps", "8/255", "--device", "cpu"]
    assert EvalRequest(model=Path("m.safetensors")).args() == [
        "eval", "m.safetensors", "--n", "1000", "--seed", "0", "--batch-size", "250"]


# -- pilot sessions ---------------------------------------------------------------------------

async def wait_for(pilot, cond: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    """Let the app run until ``cond()`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def stop_everything(app) -> None:
    """Stop whatever the session left running (training through the control channel) and wait."""
    deadline = time.monotonic() + 90
    while app.jobs.active() and time.monotonic() < deadline:
        for job in app.jobs.active():
            if not job.stop_requested:
                app.jobs.request_stop(job)
        await asyncio.sleep(0.1)
    for job in app.jobs.active():
        job.proc.kill()
        job.wait(10)


def one_thread_jobs(**env: str) -> Jobs:
    """Jobs whose processes use one thread each (the test machine is small and shared)."""
    return Jobs(env={"OMP_NUM_THREADS": "1", **env})


def run_app(runs_dir: Path, script, size: tuple[int, int] = (120, 40)) -> None:
    """Run ``script(app, pilot)`` against a headless app on ``runs_dir``."""
    from fsapp.tui.app import FsappApp

    async def main() -> None:
        app = FsappApp(runs_dir, poll_interval=0.1, jobs=one_thread_jobs())
        async with app.run_test(size=size) as pilot:
            try:
                await script(app, pilot)
            finally:
                await stop_everything(app)
                app.jobs.close()

    asyncio.run(main())


def test_new_run_form_checks_as_you_type(tmp_path):
    async def script(app, pilot):
        from fsapp.tui.screens.newrun import NewRunScreen

        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), "the form")
        screen = app.screen
        status = screen.query_one("#status")
        assert "✓ valid" in str(status.render())
        screen.query_one("#epochs").focus()
        await pilot.press("end", "backspace", "backspace", "x")
        await wait_for(pilot, lambda: screen.config is None, "the error")
        assert "bad value for schedule.epochs: expected an integer, got 'x'" in str(status.render())
        assert screen.query_one("#epochs").has_class("-invalid") and not screen.query_one("#eval_n").has_class("-invalid")
        await pilot.press("backspace", "3")
        await wait_for(pilot, lambda: screen.config is not None, "valid again")
        assert not screen.query_one("#epochs").has_class("-invalid")
        # choosing another component swaps its parameter inputs
        screen.query_one("#solver").value = "ipot"
        await wait_for(pilot, lambda: screen.query("#param-solver-beta"), "ipot's parameters")
        assert not screen.query("#param-solver-reg")
        screen.query_one("#param-solver-iters").value = "0.5"
        await wait_for(pilot, lambda: screen.config is None, "a parameter error")
        assert "bad value for solver.iters: expected an integer, got 0.5" in str(status.render())
        assert screen.query_one("#param-solver-iters").has_class("-invalid")
        screen.query_one("#param-solver-iters").value = "7"
        await pilot.pause()
        assert screen.config is not None and screen.config.extras["solver"] == {"iters": 7}
        # presets reset the form
        screen.query_one("#preset").value = "paper-cifar10"
        await wait_for(pilot, lambda: screen.query_one("#model").value == "wrn", "the preset")
        await wait_for(pilot, lambda: screen.query("#param-model-widen") and screen.query("#param-solver-max_iter"),
                       "wrn's and sinkhorn's parameters")
        assert screen.query_one("#param-solver-max_iter").value == "100"
        # save the resolved config as TOML, loadable by the CLI
        screen.query_one("#save-path").value = str(tmp_path / "saved.toml")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert load(tmp_path / "saved.toml").model.name == "wrn"

    run_app(tmp_path / "runs", script)


@pytest.mark.slow
def test_train_from_the_form_pause_stop_resume_and_compare(tmp_path):
    """The whole loop on a real (tiny) run in an ``fsapp train`` process; the UI keeps up."""
    runs = tmp_path / "runs"
    other = fake_run(runs, "earlier-run", day=1)

    async def script(app, pilot):
        from fsapp.tui.screens.compare import CompareScreen
        from fsapp.tui.screens.dashboard import DashboardScreen
        from fsapp.tui.screens.newrun import NewRunScreen
        from fsapp.tui.screens.runs import RunsScreen

        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), "the form")
        form_screen = app.screen
        for fid, text in (TINY | {"epochs": "200"}).items():
            form_screen.query_one(f"#{fid}").value = text
        form_screen.query_one("#extra").value = "run.log_every=1 schedule.milestones=[100]"
        form_screen.query_one("#name").focus()
        await pilot.press(*"tui-run")
        await wait_for(pilot, lambda: form_screen.config is not None and form_screen.config.run.name == "tui-run",
                       "a valid form")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
        dash = app.screen
        path = runs / "tui-run"
        job = app.jobs.active_for(path)
        assert dash.path == path and job is not None and job.command.startswith("fsapp train ")
        assert job.args[-3:] == ["--run-dir", str(path), "-q"]
        table = dash.query_one("#robust")
        await wait_for(pilot, lambda: len(dash.state.epochs) >= 2 and table.row_count >= 2,
                       "two epochs and two robustness rows")
        assert [c.label.plain for c in table.columns.values()][:5] == [
            "epoch", "clean", "pgd:steps=2", "cw:steps=2", "worst"]
        assert dash.state.started.device == "cpu" and "img/s" in str(dash.query_one("#rate").render())
        # pause holds the run between steps (the run's own log says so); stop saves a checkpoint
        await pilot.press("p")
        await wait_for(pilot, lambda: dash.state.paused and dash.status() == "paused", "the pause")
        assert "paused" in str(dash.query_one("#title").render())
        await pilot.press("s")
        await wait_for(pilot, lambda: not job.running, "the stop")
        assert job.status == "finished" and job.stop_requested
        await wait_for(pilot, lambda: dash.state.finished is not None, "Finished in metrics.jsonl")
        assert dash.state.finished.stopped and (path / "checkpoint.safetensors").is_file()
        stopped_at = dash.state.checkpoint.global_step
        await wait_for(pilot, lambda: "interrupted" in str(dash.query_one("#title").render()), "interrupted")
        # back home: the run is interrupted; resume it with r
        await pilot.press("escape")
        home = app.screen
        assert isinstance(home, RunsScreen)
        home.refresh_runs()
        row = next(r for r in home.rows if r.path == path)
        assert row.status == "interrupted" and row.resumable
        home.query_one("#runs").move_cursor(row=home.rows.index(row))
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the resumed dashboard")
        dash = app.screen
        resumed = app.jobs.active_for(path)
        assert resumed is not None and resumed.args == ["train", "--resume", str(path), "-q"]
        await wait_for(pilot, lambda: dash.state.started is not None and dash.state.started.resumed
                       and dash.state.last_step is not None
                       and dash.state.last_step.global_step > stopped_at + 2, "steps after the resume")
        assert dash.state.started.start_epoch * 4 + dash.state.started.start_step == stopped_at
        await pilot.press("c")  # checkpoint now
        await wait_for(pilot, lambda: dash.state.checkpoint.global_step > stopped_at, "a new checkpoint")
        await pilot.press("s")
        await wait_for(pilot, lambda: not resumed.running, "the second stop")
        # compare it with another run: mark both with space
        await pilot.press("escape")
        home.refresh_runs()
        for i in range(2):
            home.query_one("#runs").move_cursor(row=i)
            await pilot.press("space")
        assert app.marked == {path, other}
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), "compare")
        summary = app.screen.query_one("#summary")
        assert [c.label.plain for c in summary.columns.values()] == ["", "earlier-run", "tui-run"]
        diff_keys = [str(k.value) for k in app.screen.query_one("#diff").rows]
        assert "schedule.epochs" in diff_keys and "eval.n" in diff_keys

    run_app(runs, script)
    lines = (runs / "tui-run" / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["event"] for line in lines]
    assert kinds.count("RunStarted") == 2 and kinds.count("Finished") == 2


def test_quitting_mid_run_asks_then_leaves_a_checkpoint(tmp_path):
    runs = tmp_path / "runs"

    async def script(app, pilot):
        from fsapp.tui.screens.confirm import ConfirmScreen

        values = form.initial_values("demo") | TINY | {"epochs": "200", "name": "quitter"}
        job = app.jobs.start_train(form.validate("demo", form.overrides(values, [], "run.log_every=1",
                                                                         runs_dir=runs)))
        path = job.run_dir
        await wait_for(pilot, lambda: (path / "metrics.jsonl").is_file()
                       and "StepEnd" in (path / "metrics.jsonl").read_text(), "the first steps")
        send_request(path, "pause")  # quitting works on a paused run too
        await wait_for(pilot, lambda: load_state(path).paused, "the pause")
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
        assert "quitter" in str(app.screen.query_one("#question").render())
        await pilot.press("n")
        await pilot.pause()
        assert job.running and not job.stop_requested
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question again")
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running, "the exit", timeout=60)
        assert not job.running and job.returncode == 0

    run_app(runs, script)
    last = json.loads((runs / "quitter" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "Finished" and last["stopped"] is True
    assert (runs / "quitter" / "checkpoint.safetensors").is_file()


def test_a_failing_run_is_one_line_and_the_ui_lives_on(tmp_path):
    runs = tmp_path / "runs"

    async def script(app, pilot):
        from fsapp.tui.messages import StartRun
        from fsapp.tui.screens.dashboard import DashboardScreen

        cfg = load("demo", ["data.name=cifar10", f"data.root={tmp_path / 'none'}", f"run.runs_dir={runs}",
                            "run.name=nodata"])
        app.post_message(StartRun(cfg))
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
        dash = app.screen
        job = app.jobs.latest_for(runs / "nodata")
        await wait_for(pilot, lambda: job is not None and not job.running, "the failure")
        assert job.status == "failed" and "CIFAR-10 not found" in job.error and "\n" not in job.error
        await wait_for(pilot, lambda: "CIFAR-10 not found" in str(dash.query_one("#title").render()), "the title")
        assert "failed" in str(dash.query_one("#title").render())
        await pilot.press("escape", "l")  # still responsive
        await wait_for(pilot, lambda: type(app.screen).__name__ == "PluginsScreen", "plugins")

    run_app(runs, script)


def test_dashboard_follows_a_run_written_by_another_process(tmp_path):
    runs = tmp_path / "runs"
    path = fake_run(runs, "elsewhere", finished=False, done=1, epochs=3)
    os.utime(path / "metrics.jsonl")  # it just grew: running
    more = fake_run(tmp_path / "src", "elsewhere", finished=True, done=3, epochs=3)
    extra = (more / "metrics.jsonl").read_text().splitlines()[len((path / "metrics.jsonl").read_text()
                                                                 .splitlines()):]

    async def script(app, pilot):
        from fsapp.tui.screens.dashboard import DashboardScreen

        await pilot.pause()
        assert app.screen.rows[0].status == "running"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
        dash = app.screen
        assert dash.query_one("#robust").row_count == 1
        await pilot.press("s")  # no process holds its lock: nothing to send the request to
        await pilot.pause()
        assert app.jobs.jobs == [] and not (path / CONTROL_DIR).exists()
        with open(path / "metrics.jsonl", "a") as fh:
            fh.write("\n".join(extra[:7]) + "\n" + extra[7][:20])  # epoch 2 and half a line
        await wait_for(pilot, lambda: dash.query_one("#robust").row_count == 2, "epoch 2's row")
        with open(path / "metrics.jsonl", "a") as fh:
            fh.write(extra[7][20:] + "\n" + "\n".join(extra[8:]) + "\n")
        await wait_for(pilot, lambda: dash.state.finished is not None, "the end of the run")
        assert dash.query_one("#robust").row_count == 3 and "finished" in str(dash.query_one("#title").render())

    run_app(runs, script)


def _tiny_model_file(path: Path) -> Path:
    from fsapp.checkpoint import model_metadata, save_model
    from fsapp.plugins import get_registry

    torch.manual_seed(0)
    params = {"num_classes": 10, "channels": 1, "size": 8, "mean": [0.5], "std": [0.5], "width": 8, "hidden": 16}
    model = get_registry().create("model", "small-cnn", **params)
    meta = model_metadata("small-cnn", params, dataset="digits", method="test", extra={"eval_eps": 0.2})
    return save_model(path, model, meta)


def comparable(report: dict) -> dict:
    """A report without what differs between two runs of the same evaluation (times, file names)."""
    if isinstance(report, dict):
        return {k: comparable(v) for k, v in report.items() if k not in ("created", "seconds", "timings", "png", "file")}
    if isinstance(report, list):
        return [comparable(v) for v in report]
    return report


def test_evaluate_screen_runs_fsapp_eval_and_writes_the_cli_report(tmp_path):
    model = _tiny_model_file(tmp_path / "m" / "model.safetensors")

    async def script(app, pilot):
        from fsapp.tui.screens.evaluate import EvaluateScreen

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EvaluateScreen), "evaluate")
        screen = app.screen
        for wid, text in (("model", str(model)), ("attacks", "fgsm pgd:steps=2"), ("n", "24"),
                          ("sweep", "eps=0:0.3:3"), ("device", "cpu")):
            screen.query_one(f"#{wid}").value = text
        await pilot.pause()
        assert str(screen.query_one("#eval-command").render()) == (
            f"$ fsapp eval {model} --attack fgsm --attack pgd:steps=2 --sweep eps=0:0.3:3 --n 24 --seed 0 "
            "--batch-size 250 --device cpu")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.job is not None, "the job")
        await wait_for(pilot, lambda: screen.query_one("#eval-table").row_count >= 3, "rows from progress events")
        await wait_for(pilot, lambda: not screen.busy, "the evaluation")
        assert screen.report is not None, str(screen.query_one("#eval-status").render())
        table = screen.query_one("#eval-table")
        assert table.row_count == 4 + 3 * 3  # clean, fgsm, pgd, worst case; 3 eps x (fgsm, pgd, worst case)
        assert table.get_cell("pgd:steps=2", "progress") == "24/24"
        assert table.get_cell("worst", "accuracy").plain.endswith("%")
        assert screen.query_one("#sweep-plot").display
        assert str(screen.query_one("#eval-command").render()).endswith(f"--out {screen.job.report}")
        ours = json.loads(screen.job.report.read_text())
        assert len(ours["sweeps"]) == 1 and ours["sweeps"][0]["values"] == [0.0, 0.15, 0.3]
        # the CLI, typed by hand, writes the same report
        out = tmp_path / "cli.json"
        done = subprocess.run([sys.executable, "-m", "fsapp", "eval", str(model), "--attack", "fgsm", "--attack",
                               "pgd:steps=2", "--sweep", "eps=0:0.3:3", "--n", "24", "--device", "cpu", "--out",
                               str(out)], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True)
        assert done.returncode == 0, done.stderr
        assert comparable(ours) == comparable(json.loads(out.read_text()))
        # a bad spec is one line, and the screen is ready again (no endless progress)
        screen.query_one("#attacks").value = "pgd:stepz=2"
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not screen.busy, "the failure")
        status = str(screen.query_one("#eval-status").render())
        assert "unknown parameter 'stepz'" in status and "\n" not in status.strip()
        assert screen.query_one("#eval-progress").total == 1
        screen.query_one("#n").value = "many"
        await pilot.press("ctrl+r")
        assert "samples must be a whole number, got 'many'" in str(screen.query_one("#eval-status").render())

    run_app(tmp_path / "runs", script)


def test_plugins_screen_shows_components_and_failures(tmp_path, install_plugin, fresh_registry):
    install_plugin("broken-import", "broken_import_mod", "raise ImportError('no such thing')")
    fresh_registry()

    async def script(app, pilot):
        from fsapp.tui.screens.plugins import PluginsScreen

        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, PluginsScreen), "plugins")
        table = app.screen.query_one("#components")
        keys = {str(k.value) for k in table.rows}
        assert {"attack:pgd", "model:wrn", "solver:sinkhorn", "perturbation:feature-scatter"} <= keys
        failures = str(app.screen.query_one("#failures").render())
        assert "broken-import" in failures and "no such thing" in failures
        await pilot.press("down")
        assert "model mlp from fsapp" in str(app.screen.query_one("#component-detail").render())

    run_app(tmp_path / "runs", script)


def test_keyboard_help_palette_and_themes(tmp_path):
    fake_runs(tmp_path / "runs")

    async def script(app, pilot):
        from fsapp.tui.screens.help import HelpScreen
        from fsapp.tui.screens.newrun import NewRunScreen
        from fsapp.tui.screens.plugins import PluginsScreen

        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        await pilot.press("escape")
        theme = app.theme
        await pilot.press("ctrl+t")
        assert app.theme != theme and app.theme in ("textual-light", "textual-dark")
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"plugins", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PluginsScreen), "plugins via the palette")
        await pilot.press("escape", "ctrl+p")
        await pilot.pause()
        await pilot.press(*"new run", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), "new run via the palette")
        await pilot.press("escape")
        # filter and marks on the home screen
        home = app.screen
        await pilot.press("slash", *"madry")
        await pilot.pause()
        assert home.query_one("#runs").row_count == 1
        await pilot.press("escape", "space")
        assert app.marked == {tmp_path / "runs" / "madry-digits"}
        await pilot.press("c")  # one run only: a warning, no screen
        await pilot.pause()
        assert app.screen is home

    run_app(tmp_path / "runs", script, size=(80, 24))


def test_names_paths_and_errors_are_never_markup(tmp_path):
    """A run named like markup shows as typed in the list, the dashboard, compare and the question."""
    runs = tmp_path / "runs"
    odd = fake_run(runs, "[b]odd[i] [red", day=5)
    plain = fake_run(runs, "plain", day=4)

    async def script(app, pilot):
        from fsapp.tui.screens.compare import CompareScreen
        from fsapp.tui.screens.confirm import ConfirmScreen
        from fsapp.tui.screens.dashboard import DashboardScreen

        await pilot.pause()
        table = app.screen.query_one("#runs")
        assert table.get_row_at(0)[0].plain == "  [b]odd[i] [red"
        await pilot.press("space", "down", "space", "c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), "compare")
        labels = [c.label.plain for c in app.screen.query_one("#summary").columns.values()]
        assert "[b]odd[i] [red" in labels and "plain" in labels
        await pilot.press("escape", "up", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
        assert " · [b]odd[i] [red · " in str(app.screen.query_one("#title").render())
        app.push_screen(ConfirmScreen("Stop [b]odd[i] [red?"))
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen.query("#question"),
                       "the question")
        assert str(app.screen.query_one("#question").render()) == "Stop [b]odd[i] [red?"

    run_app(runs, script)
    assert odd.is_dir() and plain.is_dir()


def test_tui_refuses_a_file_as_runs_dir(tmp_path):
    runs = tmp_path / "runs.txt"
    runs.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "fsapp", "tui", "--runs-dir", str(runs)], capture_output=True,
                          text=True, env=os.environ | {"NO_COLOR": "1"}, timeout=60)
    assert done.returncode == 2 and done.stderr == f"error: --runs-dir {runs} is a file; give a folder " \
                                                   "(it is created when the first run starts)\n"
