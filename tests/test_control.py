"""Any front end controls any run: ``fsapp ctl`` steers a training started by ``fsapp train`` in
another process, through the run directory's control channel (docs/control.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fsapp.config import to_toml
from fsapp.engine.rundir import CONTROL_DIR, ControlChannel, RunLock, load_state

ENV = os.environ | {"OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def fsapp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsapp", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def events(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_until(cond, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_request(run: Path, name: str, action: str, pid: int) -> Path:
    folder = run / CONTROL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"action": action, "target_pid": pid, "from_pid": 1, "time": 0.0}))
    return path


def test_ctl_refuses_unknown_actions_and_runs_not_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    for args, words in ((("jump",), "unknown action 'jump'; valid: pause, resume, stop, checkpoint, evaluate"),
                        (("pause",), "is not training now"),
                        (("pause", "--wait", "1"), "is not training now")):
        done = fsapp("ctl", str(run), *args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr
    done = fsapp("ctl", str(tmp_path / "nothing"), "stop")
    assert done.returncode == 2 and "is not a run directory" in done.stderr
    assert not (run / CONTROL_DIR).exists()  # nothing was written


def test_stale_requests_are_dropped_unread(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    before = write_request(run, "1-old", "stop", os.getpid())
    channel = ControlChannel(run, interval=0.0)
    assert channel.discard_stale() == 1 and not before.exists()  # present when the writer starts
    other = write_request(run, "2-other", "pause", os.getpid() + 1)
    mine = write_request(run, "3-mine", "checkpoint", os.getpid())
    assert channel.poll(force=True) == ["checkpoint"]  # the one addressed to another pid is not acted on
    assert not other.exists() and not mine.exists()


@pytest.mark.slow
def test_a_cli_run_paused_checkpointed_evaluated_and_stopped_from_another_process(tmp_path):
    tables = {
        "run": {"seed": 3, "log_every": 1, "device": "cpu"},
        "data": {"name": "digits", "batch_size": 30, "train_limit": 120},
        "model": {"name": "small-cnn", "width": 8, "hidden": 32},
        "method": {"perturbation": "feature-scatter", "epsilon": 0.2, "step_size": 0.2},
        "schedule": {"epochs": 40, "milestones": [30]},
        "eval": {"n": 10, "every": 20, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=2"]},
    }
    config = tmp_path / "run.toml"
    config.write_text(to_toml(tables))
    run, whole = tmp_path / "steered", tmp_path / "whole"
    proc = subprocess.Popen([sys.executable, "-m", "fsapp", "train", str(config), "--run-dir", str(run), "-q"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(e["event"] == "StepEnd" for e in events(run)), "the first step")
        done = fsapp("ctl", str(run), "pause", "--wait", "60")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"pause taken by {run} (pid {proc.pid})")
        wait_until(lambda: load_state(run).paused, "the pause in the log")
        paused_at = load_state(run).last_step.global_step
        # requests are served while paused: checkpoint, evaluate
        n_evals = len(load_state(run).evals)
        assert fsapp("ctl", str(run), "checkpoint", "--wait", "60").returncode == 0
        wait_until(lambda: (c := load_state(run).checkpoint) is not None and c.global_step == paused_at,
                   "the checkpoint")
        assert fsapp("ctl", str(run), "evaluate", "--wait", "60").returncode == 0
        wait_until(lambda: len(load_state(run).evals) == n_evals + 1, "the evaluation")
        assert load_state(run).evals[-1].global_step == paused_at
        # a request addressed to another process is not acted on
        write_request(run, "0-other", "resume", proc.pid + 1)
        time.sleep(0.5)
        assert load_state(run).paused and load_state(run).last_step.global_step == paused_at
        done = fsapp("ctl", str(run), "stop", "--wait", "60")
        assert done.returncode == 0 and "stopping" in done.stdout
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_state(run)
    assert state.finished is not None and state.finished.stopped and not RunLock.is_held(run)
    applied = [e["action"] for e in events(run) if e["event"] == "ControlApplied"]
    assert applied == ["pause", "checkpoint", "evaluate", "stop"]
    # the run is not training any more: ctl says so in one line
    done = fsapp("ctl", str(run), "resume")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is not training now" in done.stderr
    # requests left from before (a dead requester, the previous writer) are discarded by the next writer
    write_request(run, "1-stale", "pause", proc.pid)
    write_request(run, "2-stale", "stop", 0)
    assert fsapp("train", "--resume", str(run), "-q").returncode == 0
    state = load_state(run)
    assert state.finished is not None and not state.finished.stopped and state.epochs_done == 40
    assert not list((run / CONTROL_DIR).glob("*.json"))
    # the steered run ends with the weights of an uninterrupted one
    assert fsapp("train", str(config), "--run-dir", str(whole), "-q").returncode == 0
    a, b = load_file(run / "model.safetensors"), load_file(whole / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
