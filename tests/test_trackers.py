"""Trackers: a short real training through with_trackers, read back with TensorBoard's own reader
and as CSV; a failing or missing tracker costs one warning and never the run."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from fsapp.engine import events as ev
from fsapp.engine.trackers import Trackers, with_trackers
from fsapp.errors import UsageError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def tiny(tmp: Path, name: str) -> dict:
    return {
        "run": {"runs_dir": str(tmp / "runs"), "name": name, "seed": 3, "log_every": 1},
        "data": {"name": "digits", "batch_size": 30, "train_limit": 90},
        "model": {"name": "mlp", "hidden": 32},
        "schedule": {"epochs": 2, "milestones": [1]},
        "eval": {"n": 20, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=2"]},
    }


def train_with(tmp: Path, name: str, specs: list[str]) -> list[ev.Event]:
    from fsapp.engine.train import train

    return list(with_trackers(train(tiny(tmp, name)), specs))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    events = train_with(tmp, "tb", ["tensorboard", "csv"])
    return tmp / "runs" / "tb", events


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(s.step, s.value) for s in acc.Scalars(tag)]


def test_tensorboard_scalars_read_back_equal_the_events(tracked_run, one_thread):
    run_dir, events = tracked_run
    assert not [e for e in events if isinstance(e, ev.Warning)]
    assert isinstance(events[-1], ev.Finished)
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "train/epoch_loss", "val/clean",
            "val/pgd:steps=2", "val/worst_case"} <= tags, tags

    steps = [e for e in events if isinstance(e, ev.StepEnd)]
    assert len(steps) == 6  # 90 samples / 30 per batch x 2 epochs, logged every step
    for field in ("loss", "accuracy", "lr"):
        got = scalars(acc, f"train/{field}")
        want = [(s.global_step, getattr(s, field)) for s in steps]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-6)
    assert scalars(acc, "train/lr")[-1][1] == pytest.approx(0.01)  # the milestone after epoch 1

    evals = [e for e in events if isinstance(e, ev.EvalResult)]
    assert len(evals) == 2
    for key in evals[0].accuracy:
        got = scalars(acc, f"val/{key}")
        assert got == [(e.global_step, pytest.approx(e.accuracy[key], rel=1e-6)) for e in evals]

    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "mlp"' in config_text and "[eval]" in config_text and "seed = 3" in config_text


def test_csv_files_hold_every_event(tracked_run):
    run_dir, events = tracked_run
    folder = run_dir / "csv"
    with open(folder / "step_end.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [e for e in events if isinstance(e, ev.StepEnd)]
    assert [int(r["global_step"]) for r in rows] == [s.global_step for s in steps]
    assert [float(r["loss"]) for r in rows] == [s.loss for s in steps]
    with open(folder / "eval_result.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    evals = [e for e in events if isinstance(e, ev.EvalResult)]
    assert [float(r["accuracy.pgd:steps=2"]) for r in rows] == [e.accuracy["pgd:steps=2"] for e in evals]
    assert {p.name for p in folder.iterdir()} >= {"run_started.csv", "epoch_end.csv", "finished.csv"}


BOOM = """
from dataclasses import dataclass
from fsapp import hookimpl

@dataclass
class BoomParams:
    when: str = "on_event"

class Boom:
    def __init__(self, p):
        if p.when == "factory":
            raise RuntimeError("cannot build")
        self.when = p.when
        self.seen = 0

    def open(self, run_dir, config):
        if self.when == "open":
            raise OSError("no disk")

    def on_event(self, event):
        self.seen += 1
        if self.when == "exit":
            raise SystemExit(3)
        if self.when == "on_event" and type(event).__name__ == "StepEnd":
            raise ValueError("tracker server unreachable")

    def close(self):
        if self.when == "close":
            raise RuntimeError("flush failed")

@hookimpl
def register_trackers(register):
    register("boom", Boom, params=BoomParams, description="raises")
"""


def test_a_raising_tracker_plugin_costs_one_warning_and_the_run_completes(tmp_path, install_plugin, one_thread):
    install_plugin("fsapp-boom", "fsapp_boom", BOOM)
    from fsapp.plugins import reset_registry

    assert reset_registry().get("tracker", "boom").plugin == "fsapp-boom"
    events = train_with(tmp_path, "boom", ["boom", "csv"])
    warnings = [e for e in events if isinstance(e, ev.Warning)]
    assert len(warnings) == 1, warnings
    assert "tracker 'boom'" in warnings[0].message and "tracker server unreachable" in warnings[0].message
    assert isinstance(events[-1], ev.Finished) and not events[-1].stopped
    # the warning follows the event that caused it: the first StepEnd
    first_step = next(i for i, e in enumerate(events) if isinstance(e, ev.StepEnd))
    assert events[first_step + 1] is warnings[0]
    # the run and the other tracker are untouched
    assert (tmp_path / "runs" / "boom" / "model.safetensors").is_file()
    with open(tmp_path / "runs" / "boom" / "csv" / "step_end.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == sum(isinstance(e, ev.StepEnd) for e in events)


@pytest.mark.parametrize("when", ["factory", "open", "close", "exit"])
def test_a_tracker_failing_anywhere_costs_one_warning(tmp_path, install_plugin, when):
    install_plugin("fsapp-boom", "fsapp_boom", BOOM)
    from fsapp.plugins import reset_registry

    reset_registry()
    stream = [ev.RunStarted(str(tmp_path), "cpu", 1, 1, 0, 0, False, {}),
              ev.StepEnd(0, 0, 1, 1, 0.5, 0.5, 0.1, 10.0, 0.0),
              ev.Finished(str(tmp_path / "m"), str(tmp_path), 1.0)]
    out = list(with_trackers(iter(stream), [f"boom:when={when}"]))
    warnings = [e for e in out if isinstance(e, ev.Warning)]
    assert [e for e in out if not isinstance(e, ev.Warning)] == stream
    assert len(warnings) == 1 and "boom" in warnings[0].message, warnings


def test_missing_tensorboard_package_is_one_warning_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    stream = [ev.RunStarted(str(tmp_path), "cpu", 1, 1, 0, 0, False, {"run": {"seed": 0}}),
              ev.StepEnd(0, 0, 1, 1, 0.5, 0.5, 0.1, 10.0, 0.0),
              ev.Finished(str(tmp_path / "m"), str(tmp_path), 1.0)]
    out = list(with_trackers(iter(stream), ["tensorboard", "csv"]))
    warnings = [e for e in out if isinstance(e, ev.Warning)]
    assert len(warnings) == 1 and "pip install 'fsapp[tensorboard]'" in warnings[0].message
    assert out[0] is stream[0] and out[1] is warnings[0]
    assert (tmp_path / "csv" / "step_end.csv").is_file() and not (tmp_path / "tb").exists()


def test_unknown_tracker_or_bad_parameter_is_refused_before_the_first_event():
    with pytest.raises(UsageError, match="unknown tracker 'tensorbord'; available: .*csv.*tensorboard"):
        with_trackers(iter(()), ["tensorbord"])
    with pytest.raises(UsageError, match="flush_secs"):
        Trackers(["tensorboard:flush_secs=0"])


def test_no_trackers_passes_the_stream_through_untouched():
    stream = [ev.Warning("w")]
    assert list(with_trackers(iter(stream), [])) == stream


def test_evaluation_events_go_to_eval_scalars_and_csv_widens_its_header(tmp_path):
    report = tmp_path / "eval" / "r.json"
    first = {"clean": 0.9, "pgd:steps=20": 0.5, "worst_case": 0.5}
    second = dict(first, autoattack=0.4)
    stream = [ev.EvalStarted(str(tmp_path / "model.safetensors"), 20, ["pgd:steps=20"], [], str(report)),
              ev.EvalProgress("pgd:steps=20", "", 20, 20, 10),
              ev.EvalFinished(str(report), first, [{"id": "x", "message": "[red]kept as text[/]"}], 1.0),
              ev.EvalFinished(str(report), second, [], 1.0)]
    out = list(with_trackers(iter(stream), ["tensorboard", "csv"]))
    assert out == stream
    acc = EventAccumulator(str(tmp_path / "eval" / "tb"))  # beside the report
    acc.Reload()
    assert [s.value for s in acc.Scalars("eval/clean")] == pytest.approx([0.9, 0.9])
    assert [s.value for s in acc.Scalars("eval/autoattack")] == pytest.approx([0.4])
    flags = acc.Tensors("flags/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[red]kept as text[/]" in flags
    with open(tmp_path / "eval" / "csv" / "eval_finished.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["accuracy.autoattack"] for r in rows] == ["", "0.4"]
    assert [r["accuracy.clean"] for r in rows] == ["0.9", "0.9"]


def test_the_example_plugin_tracker_writes_its_summary(tmp_path, one_thread):
    from fsapp.plugins import get_registry

    if "example-summary" not in get_registry().names("tracker"):
        pytest.skip("plugins/fsapp-example is not installed")
    events = train_with(tmp_path, "ex", ["example-summary"])
    lines = (tmp_path / "runs" / "ex" / "example-summary.txt").read_text().splitlines()
    evals = [e for e in events if isinstance(e, ev.EvalResult)]
    assert lines == [f"epoch {e.epoch + 1}: clean {e.accuracy['clean']:.4f} worst case "
                     f"{e.accuracy['worst_case']:.4f}" for e in evals]
