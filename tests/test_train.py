"""Training end to end on tiny digits runs: run directory, events, checkpoints, resume."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

import fsapp
from fsapp.checkpoint import read_safetensors
from fsapp.engine import events as ev
from fsapp.engine.rundir import Control
from fsapp.engine.train import train
from fsapp.errors import UsageError


def _weights(path):
    tensors, _ = read_safetensors(path)
    return tensors


def test_run_directory_and_events(tmp_path, tiny_digits_config):
    events = list(fsapp.train(tiny_digits_config(tmp_path), run_dir=tmp_path / "run"))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "Finished"
    assert kinds.count("EpochEnd") == 2 and kinds.count("EvalResult") == 2
    run = tmp_path / "run"
    for name in ("config.toml", "manifest.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors"):
        assert (run / name).is_file(), name
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["solver"]["mode"] == "faithful" and cfg["model"]["name"] == "small-cnn"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["torch_version"] == torch.__version__ and len(manifest["data_fingerprint"]) == 16
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [d["event"] for d in lines] == kinds
    step = next(e for e in events if isinstance(e, ev.StepEnd))
    assert step.images_per_sec > 0 and step.lr == 0.1
    evals = [e for e in events if isinstance(e, ev.EvalResult)]
    assert set(evals[-1].accuracy) == {"clean", "pgd:steps=3", "cw:steps=3", "worst_case"}
    assert evals[-1].gap is not None
    assert ev.from_dict(lines[-1]) == events[-1]
    # the learning-rate schedule: x0.1 from epoch 1 on
    assert [e.lr for e in events if isinstance(e, ev.EpochEnd)] == [0.1, pytest.approx(0.01)]


def test_model_file_round_trip(tmp_path, tiny_digits_config):
    list(train(tiny_digits_config(tmp_path, schedule__epochs=1, eval__n=0), run_dir=tmp_path / "r"))
    path = tmp_path / "r" / "model.safetensors"
    model = fsapp.load_model(path)
    _, meta = read_safetensors(path)
    assert meta["model"] == "small-cnn" and meta["dataset"] == "digits" and meta["format_version"] == "1"
    # rebuild by name from metadata alone and compare logits with a second save/load
    x = torch.rand(7, 1, 8, 8)
    fsapp.save_model(tmp_path / "copy.safetensors", model, {k: json.loads(v) if k in (
        "model_params", "num_classes", "input_shape") else v for k, v in meta.items()})
    again = fsapp.load_model(tmp_path / "copy.safetensors")
    assert torch.equal(model(x), again(x))
    assert not model.training


def _run_with_stop(cfg_tables, run_dir, stop_after_steps):
    control = Control.new()
    steps = 0
    for event in train(cfg_tables, run_dir=run_dir, control=control):
        if isinstance(event, ev.StepEnd):
            steps += 1
            if steps >= stop_after_steps:
                control.stop.set()
    return control


@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_interrupted_run_resumes_bit_identical(tmp_path, tiny_digits_config, stop_after):
    tables = tiny_digits_config(tmp_path, run__log_every=1, run__checkpoint_every=2)
    list(train(tables, run_dir=tmp_path / "full"))
    _run_with_stop(tables, tmp_path / "part", stop_after)
    state = json.loads(read_safetensors(tmp_path / "part" / "checkpoint.safetensors")[1]["state"])
    assert state["global_step"] < 12
    events = list(train(resume=tmp_path / "part"))
    assert events[0].resumed and events[-1].stopped is False
    a = _weights(tmp_path / "full" / "model.safetensors")
    b = _weights(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_digits_config):
    tables = tiny_digits_config(tmp_path, schedule__epochs=1, eval__n=0)
    list(train(tables, run_dir=tmp_path / "r"))
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a run; resume it with --resume"):
        list(train(tables, run_dir=tmp_path / "r"))
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    with pytest.raises(UsageError, match="not a run directory"):
        list(train(resume=tmp_path / "nothing"))


@pytest.mark.parametrize("perturbation, loss", [("none", "ce"), ("supervised", "ce"), ("random", "soft-ce")])
def test_baselines_train(tmp_path, tiny_digits_config, perturbation, loss):
    tables = tiny_digits_config(tmp_path, schedule__epochs=1, eval__n=0, method__perturbation=perturbation,
                                method__loss=loss, method__steps=2, method__step_size=0.1)
    events = list(train(tables, run_dir=tmp_path / perturbation))
    assert isinstance(events[-1], ev.Finished)
