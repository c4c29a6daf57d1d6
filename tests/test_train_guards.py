"""Training refuses what would silently give a wrong model, and never loses what it wrote:
edited configs on resume, non-finite updates, all-skipped runs, finished runs, foreign
directories, other people's files, failed writes."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fsapp.checkpoint import read_safetensors
from fsapp.cli.main import app
from fsapp.engine import events as ev
from fsapp.engine.rundir import Control
from fsapp.engine.train import train
from fsapp.errors import TrainingAborted, UsageError


def _tables(tmp: Path, **over) -> dict:
    tables = {
        "run": {"runs_dir": str(tmp / "runs"), "seed": 3, "log_every": 1},
        "data": {"name": "digits", "batch_size": 30, "train_limit": 120},
        "model": {"name": "mlp", "hidden": 32, "layers": 1},
        "method": {"perturbation": "feature-scatter", "epsilon": 0.1, "step_size": 0.1},
        "schedule": {"epochs": 1, "milestones": [1]},
        "eval": {"n": 0},
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        tables.setdefault(section, {})[name] = value
    return tables


def _stopped_run(tables: dict, path: Path, after_steps: int = 1) -> Path:
    """A run stopped (with its checkpoint) after ``after_steps`` steps: resumable, not finished."""
    control = Control.new()
    for event in train(tables, run_dir=path, control=control):
        if isinstance(event, ev.StepEnd) and event.global_step >= after_steps:
            control.stop.set()
    last = json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (path / "checkpoint.safetensors").is_file() and last["event"] == "Finished" and last["stopped"]
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return _stopped_run(_tables(root), root / "stopped")


EDITS = [
    ("lr = 0.1", "lr = 0.05", "optim.lr"),
    ("batch_size = 30", "batch_size = 20", "data.batch_size"),
    ("seed = 3", "seed = 4", "run.seed"),
    ("epochs = 1", "epochs = 3", "schedule.epochs"),
    ('perturbation = "feature-scatter"', 'perturbation = "supervised"', "method.perturbation"),
    ("epsilon = 0.1", "epsilon = 0.2", "method.epsilon"),
    ("momentum = 0.9", "momentum = 0.5", "optim.momentum"),
    ("weight_decay = 0.0002", "weight_decay = 0.001", "optim.weight_decay"),
    ("hidden = 32", "hidden = 64", "model.hidden"),
    ("reg = 0.01", "reg = 0.1", "solver.reg"),
    ("nesterov = false", "", "optim.nesterov"),  # a key removed
    ("[optim]", "[optim]\ndampening = 0.1", "optim.dampening"),  # a key added
]


@pytest.mark.parametrize(("old", "new", "key"), EDITS, ids=[e[2] + ("-removed" if not e[1] else "") for e in EDITS])
def test_resume_refuses_an_edited_config_naming_the_key(stopped, tmp_path, old, new, key):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    text = (run / "config.toml").read_text()
    assert old in text
    (run / "config.toml").write_text(text.replace(old, new, 1))
    before = _snapshot(run)
    with pytest.raises(UsageError, match=key.replace(".", r"\.")) as info:
        list(train(resume=run))
    assert "\n" not in str(info.value)
    assert _snapshot(run) == before  # refused before anything was written


def test_resume_refuses_an_emptied_config(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / "config.toml").write_text("")
    with pytest.raises(UsageError, match=r"optim\.lr: 0\.1 -> missing"):
        list(train(resume=run))


def test_extending_a_run_equals_training_longer_from_the_start(tmp_path):
    tables = _tables(tmp_path, schedule__epochs=1, schedule__milestones=[1])
    list(train(tables, run_dir=tmp_path / "short"))
    events = list(train(resume=tmp_path / "short", extend_epochs=2))
    assert isinstance(events[0], ev.RunStarted) and events[0].start_epoch == 1 and events[0].epochs == 2
    list(train(_tables(tmp_path, schedule__epochs=2, schedule__milestones=[1]), run_dir=tmp_path / "long"))
    short, long = _weights(tmp_path / "short" / "model.safetensors"), _weights(tmp_path / "long" / "model.safetensors")
    assert all(torch.equal(short[k], long[k]) for k in long)
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    assert manifest["extended"][0]["from_epochs"] == 1 and manifest["extended"][0]["to_epochs"] == 2
    assert "epochs = 2" in (tmp_path / "short" / "config.toml").read_text()
    with pytest.raises(UsageError, match="can only grow"):
        list(train(resume=tmp_path / "short", extend_epochs=1))


def _poison_momentum(run: Path) -> None:
    tensors, meta = read_safetensors(run / "checkpoint.safetensors")
    keys = [k for k in tensors if k.startswith("optim.") and k.endswith("momentum_buffer")]
    assert keys
    for k in keys:
        tensors[k] = torch.full_like(tensors[k], float("nan"))
    save_file(tensors, str(run / "checkpoint.safetensors"), metadata=meta)


def test_nan_momentum_skips_every_update_and_aborts(stopped, tmp_path, monkeypatch):
    """The second line of defence: a poisoned optimizer state that got past the checkpoint's
    validation (patched out here; tests/test_hostile_checkpoints.py shows it refused there) makes
    every update non-finite while the loss stays finite; each update is taken back and the run aborts."""
    import fsapp.checkpoint

    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    _poison_momentum(run)
    with pytest.raises(UsageError, match="momentum_buffer' holds NaN"):
        next(iter(train(resume=run)))
    monkeypatch.setattr(fsapp.checkpoint, "_check_finite", lambda *args, **kwargs: None)
    checkpoint = (run / "checkpoint.safetensors").read_bytes()
    seen: list[ev.Event] = []
    with pytest.raises(TrainingAborted, match="run.max_bad_fraction") as info:
        for event in train(resume=run):
            seen.append(event)
    assert "checkpoint" in str(info.value) and "\n" not in str(info.value)
    steps = [e for e in seen if isinstance(e, ev.StepEnd)]
    assert steps and all(math.isfinite(e.loss) for e in steps)  # the loss was finite: the update was not
    assert sum("non-finite loss or update" in e.message for e in seen if isinstance(e, ev.Warning)) == 3
    assert (run / "checkpoint.safetensors").read_bytes() == checkpoint  # the last checkpoint is intact
    assert (run / "model.safetensors").read_bytes() == (stopped / "model.safetensors").read_bytes()


NAN_PLUGIN = """
from dataclasses import dataclass

import torch

from fsapp import hookimpl
from fsapp.registry import ModelParams


@dataclass
class NanParams(ModelParams):
    pass


class NanNet(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.fc = torch.nn.Linear(p.channels * p.size * p.size, p.num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


@hookimpl
def register_models(register):
    register("nan-net", NanNet, params=NanParams, description="logits that are always NaN")
"""


def test_a_run_whose_every_step_is_skipped_fails(tmp_path, install_plugin, fresh_registry):
    install_plugin("nan-model", "nan_model_plugin", NAN_PLUGIN)
    fresh_registry()
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--set", "model.name=nan-net",
                                      "--set", "method.perturbation=none", "--set", "data.train_limit=120",
                                      "--set", "data.batch_size=30", "--set", "schedule.epochs=1",
                                      "--set", "eval.n=0", "-q"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "4 of 4 steps were skipped" in lines[0]
    assert not (run / "model.safetensors").exists() and not (run / "checkpoint.safetensors").exists()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "EpochEnd" and last["bad_steps"] == 4


def test_resume_of_a_finished_run_is_a_no_op(tmp_path):
    run = tmp_path / "run"
    list(train(_tables(tmp_path), run_dir=run))
    before = _snapshot(run)
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and "already finished" in result.output
    assert _snapshot(run) == before and {p: p.stat().st_mtime_ns for p in run.rglob("*")} == stamps


def test_only_fsapps_own_temp_files_are_removed(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / ".session.tmp").write_text("mine")
    (run / ".notes.toml.abcd1234.tmp").write_text("also mine")
    (run / ".checkpoint.safetensors.k2_x9q0a.tmp").write_bytes(b"a killed writer's")
    list(train(resume=run))
    assert (run / ".session.tmp").read_text() == "mine" and (run / ".notes.toml.abcd1234.tmp").exists()
    assert not (run / ".checkpoint.safetensors.k2_x9q0a.tmp").exists()


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    folder = tmp_path / "runs" / "photos"
    folder.mkdir(parents=True)
    (folder / "holiday.jpg").write_bytes(b"jpeg")
    for kwargs in ({"run_dir": folder}, {}):
        tables = _tables(tmp_path, run__name="photos")
        with pytest.raises(UsageError, match="not an fsapp run") as info:
            list(train(tables, **kwargs))
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


def test_failed_writes_are_one_line_saying_what_was_kept(tmp_path, monkeypatch):
    import fsapp.engine.train as loop

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(loop, "atomic_write_text", full_disk)
        with pytest.raises(TrainingAborted, match=r"config\.toml \(No space left on device\); nothing was trained"):
            list(train(_tables(tmp_path), run_dir=tmp_path / "fresh"))
    with monkeypatch.context() as m:
        m.setattr(loop, "save_model", full_disk)
        with pytest.raises(TrainingAborted, match=r"model\.safetensors .*the last checkpoint \(epoch 1, step 0\)"):
            list(train(_tables(tmp_path), run_dir=tmp_path / "full"))
    # the checkpoint was kept: resuming writes the model without training again
    events = list(train(resume=tmp_path / "full"))
    assert [type(e).__name__ for e in events] == ["RunStarted", "Finished"]
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_non_finite_weights_are_never_written_as_a_model(tmp_path, monkeypatch):
    import fsapp.engine.train as loop

    real = loop._end_epoch

    def poison(job, prog, epoch):  # a weight turns NaN after the last step (e.g. a buggy plugin)
        with torch.no_grad():
            next(job.model.parameters()).view(-1)[0] = float("nan")
        return real(job, prog, epoch)

    monkeypatch.setattr(loop, "_end_epoch", poison)
    with pytest.raises(TrainingAborted, match="non-finite") as info:
        list(train(_tables(tmp_path), run_dir=tmp_path / "run"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_cli_resume_takes_only_more_epochs(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = _snapshot(run)
    for bad in (["--set", "optim.lr=0.2"], ["--set", "schedule.epochs=two"], ["demo"]):
        result = CliRunner().invoke(app, ["train", "--resume", str(run), *bad])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert _snapshot(run) == before


def test_the_tui_runs_the_same_job_as_a_process(tmp_path):
    import sys

    from fsapp.app.trainjob import train_command

    assert train_command("demo", tmp_path / "r") == [sys.executable, "-m", "fsapp", "train", "demo", "--run-dir",
                                                     str(tmp_path / "r"), "-q"]
