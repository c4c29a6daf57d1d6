"""The eval job of the application layer (fsapp.app.evaljob) and ``fsapp eval`` as a front end: events,
the hash of the bytes loaded, the dataset parameters a model file records, output streams, write failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fsapp
from fsapp.app.evaljob import EvalRequest, load_test_split, run_eval
from fsapp.checkpoint import file_sha256, model_metadata
from fsapp.cli.main import app
from fsapp.data import to_unit
from fsapp.engine import events as ev
from fsapp.errors import UsageError
from fsapp.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")

SYNTH = {"n_train": 200, "n_test": 120, "classes": 4, "channels": 1, "size": 8, "seed": 5}


def _train(dataset_spec: str, hidden: int = 16, steps: int = 60):
    reg = get_registry()
    d = reg.create("dataset", dataset_spec)
    channels, size, _ = d.shape
    params = {"num_classes": d.num_classes, "channels": channels, "size": size, "mean": tuple(d.mean),
              "std": tuple(d.std), "hidden": hidden, "layers": 1}
    torch.manual_seed(0)
    model = reg.create("model", "mlp", **params)
    x, y = to_unit(d.x_train), d.y_train
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), params


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    model, params = _train("digits")
    meta = model_metadata("mlp", params, dataset="digits", extra={"eval_eps": 0.1, "eval_step_size": 0.025,
                                                                  "dataset_params": {}})
    root = tmp_path_factory.mktemp("digits")
    return fsapp.save_model(root / "model.safetensors", model, meta)


@pytest.fixture(scope="module")
def synthetic_model():
    spec = "synthetic:" + ",".join(f"{k}={v}" for k, v in SYNTH.items())
    return _train(spec)


def cli(*args: object):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def lines(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines()]


# --------------------------------------------------------------------------- events


def test_events_file_and_callback(digits_file, tmp_path):
    events, seen = tmp_path / "events.jsonl", []
    out = tmp_path / "r.json"
    data = run_eval(EvalRequest(digits_file, ["pgd:steps=2"], sweeps=["eps=0,0.1"], n=40, batch_size=20, out=out,
                                events=events), seen.append)
    written = lines(events)
    kinds = [e["event"] for e in written]
    assert kinds[0] == "EvalStarted" and kinds[-1] == "EvalFinished"
    assert set(kinds[1:-1]) == {"EvalProgress"}
    started, finished = written[0], written[-1]
    assert started["report"] == str(out) and started["attacks"] == ["pgd:steps=2"] and started["n"] == 40
    assert finished["report"] == str(out) and finished["accuracy"] == data["accuracy"]
    progress = [e for e in written if e["event"] == "EvalProgress"]
    assert {"key", "stage", "done", "total", "robust"} <= set(progress[0])
    assert any(e["key"].startswith("eps=0.1 ") for e in progress)  # sweep points are labelled
    assert [type(e).__name__ for e in seen] == kinds  # the callback sees the same stream
    assert json.loads(out.read_text())["accuracy"] == data["accuracy"]


def test_failed_job_writes_one_line(digits_file, tmp_path):
    events = tmp_path / "events.jsonl"
    result = cli(digits_file, "--attack", "nope", "--n", "10", "--events", events)
    assert result.exit_code == 2 and "unknown attack 'nope'" in result.stderr and "Traceback" not in result.output
    started, failed = lines(events)
    assert started["event"] == "EvalStarted"
    assert failed == {"event": "JobFailed", "message": "unknown attack 'nope'; available: " + ", ".join(
        sorted(fsapp.available("attack")))}
    missing = cli(tmp_path / "none.safetensors", "--events", events)
    assert missing.exit_code == 2 and lines(events)[-1]["event"] == "JobFailed"


# --------------------------------------------------------------------------- the model file


def test_hash_is_of_the_bytes_loaded(digits_file, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(digits_file.read_bytes())
    original = file_sha256(path)
    other, params = _train("digits", hidden=8, steps=5)
    replaced = {"done": False}

    def replace_during_evaluation(event):
        if isinstance(event, ev.EvalProgress) and not replaced["done"]:
            fsapp.save_model(path, other, model_metadata("mlp", params, dataset="digits"))
            replaced["done"] = True

    data = run_eval(EvalRequest(path, ["fgsm"], n=20, out=tmp_path / "r.json"), replace_during_evaluation)
    assert replaced["done"] and file_sha256(path) != original
    assert data["model_sha256"] == original


def test_dataset_parameters_come_from_the_model_file(synthetic_model, tmp_path):
    model, params = synthetic_model
    recorded = model_metadata("mlp", params, dataset="synthetic", extra={"dataset_params": SYNTH})
    path = fsapp.save_model(tmp_path / "synthetic.safetensors", model, recorded)
    result = cli(path, "--attack", "fgsm:eps=0.01", "--n", "100", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    x, y = load_test_split(fsapp.checkpoint.load_model_file(path)[1], 100, 0, None, path)
    test = get_registry().create("dataset", "synthetic", **SYNTH)
    idx = torch.randperm(SYNTH["n_test"], generator=torch.Generator().manual_seed(0))[:100].sort().values
    assert torch.equal(x, test.x_test[idx]) and torch.equal(y, test.y_test[idx])
    other = get_registry().create("dataset", "synthetic", **{**SYNTH, "seed": 0})  # what eval used before
    with torch.no_grad():
        expected = (model(to_unit(x)).argmax(1) == y).float().mean().item()
        wrong_data = (model(to_unit(other.x_test)).argmax(1) == other.y_test).float().mean().item()
    assert data["accuracy"]["clean"] == pytest.approx(expected) and expected > 0.9 > wrong_data + 0.3
    # a file that does not record them cannot say which synthetic data it was trained on
    old = fsapp.save_model(tmp_path / "old.safetensors", model, model_metadata("mlp", params, dataset="synthetic"))
    refused = cli(old, "--n", "10")
    assert refused.exit_code == 2 and "does not record the parameters of dataset 'synthetic'" in refused.stderr
    # parameters the installed dataset does not take are refused, bad values too
    for extra, message in (({**SYNTH, "bogus": 1}, "parameter(s) bogus"), ({**SYNTH, "classes": 1}, "classes"),
                           ("[1, 2]", "must be an object")):
        bad = fsapp.save_model(tmp_path / "bad.safetensors", model,
                               model_metadata("mlp", params, dataset="synthetic", extra={"dataset_params": extra}))
        result = cli(bad, "--n", "10")
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_recorded_root_and_data_root(tmp_path):
    from fsapp.app.evaljob import build_dataset

    meta = {"dataset": "cifar10", "dataset_params": json.dumps({"root": str(tmp_path / "recorded")})}
    with pytest.raises(UsageError, match="recorded"):
        build_dataset(meta, None, tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="given-root"):
        build_dataset(meta, str(tmp_path / "given-root"), tmp_path / "m.safetensors")


@pytest.mark.parametrize("field, value, message", [
    ("eval_eps", "abc", "metadata field 'eval_eps' is not valid JSON"),
    ("eval_step_size", "5", "metadata field 'eval_step_size' must be a number in 0..1"),
])
def test_bad_eval_metadata_is_one_line(digits_file, tmp_path, field, value, message):
    model = fsapp.checkpoint.load_model_file(digits_file)[0]
    params = fsapp.checkpoint.load_model_file(digits_file)[1]["model_params"]
    path = fsapp.save_model(tmp_path / "m.safetensors", model,
                            model_metadata("mlp", params, dataset="digits", extra={field: value}))
    result = cli(path, "--n", "5")
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- output


def test_streams_json_and_quiet(digits_file, tmp_path):
    out = tmp_path / "r[/x].json"
    human = cli(digits_file, "--attack", "pgd:steps=2", "--n", "20", "--out", out)
    assert human.exit_code == 0, human.output
    assert "worst case" in human.stdout and f"report: {out}" in human.stdout  # brackets printed literally
    assert "flag " not in human.stderr and "worst case" not in human.stderr
    as_json = cli(digits_file, "--attack", "pgd:steps=2", "--n", "20", "--out", out, "--json")
    assert json.loads(as_json.stdout)["n"] == 20  # only the JSON on stdout
    quiet = cli(digits_file, "--attack", "pgd:steps=2", "--attack", "cw:steps=2", "--n", "20", "--out", out, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    data = json.loads(out.read_text())
    acc = data["accuracy"]
    assert quiet.stdout == (f"clean {acc['clean']:.1%} | pgd:steps=2 {acc['pgd:steps=2']:.1%} | cw:steps=2 "
                            f"{acc['cw:steps=2']:.1%} | worst {acc['worst_case']:.1%} | report {out}\n")


def test_long_paths_are_not_wrapped_in_a_pipe(digits_file, tmp_path):
    out = tmp_path / ("a-rather-long-directory-name-" * 4) / "report.json"
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "fsapp", "eval", str(digits_file), "-a", "fgsm", "--n", "10",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out}\n" in proc.stdout


# --------------------------------------------------------------------------- write failures


def test_write_failures_say_what_was_kept(digits_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    state = tmp_path / "state.json"
    args = [digits_file, "--attack", "fgsm", "--n", "20", "--batch-size", "10"]
    report = cli(*args, "--out", blocker / "r.json", "--state", state)
    assert report.exit_code == 2 and "cannot write the report" in report.stderr
    assert f"kept in {state}" in report.stderr and state.exists()  # --resume can finish it
    done = cli(*args, "--out", tmp_path / "r.json", "--state", state, "--resume")
    assert done.exit_code == 0, done.output
    no_state = cli(*args, "--out", tmp_path / "r2.json", "--state", blocker / "state.json")
    assert no_state.exit_code == 2 and "cannot save the evaluation state" in no_state.stderr
    assert "no batch was saved yet" in no_state.stderr
    rb = cli(digits_file, "--suite", "autoattack", "--n", "4", "--out", tmp_path / "r3.json", "--robustbench-json",
             blocker / "rb.json")
    assert rb.exit_code == 2 and "cannot write the RobustBench entry" in rb.stderr
    assert f"the report was written to {tmp_path / 'r3.json'}" in rb.stderr and (tmp_path / "r3.json").exists()
    for result in (report, no_state, rb):  # progress bars, then one error line
        assert result.stderr.strip().splitlines()[-1].startswith("error: cannot ")
        assert result.stderr.count("error") == 1 and "Traceback" not in result.output
