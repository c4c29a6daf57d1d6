"""``fsapp eval``: suites, JSON and saved reports, RobustBench file, sweeps, transfer, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fsapp
from fsapp.checkpoint import file_sha256, model_metadata
from fsapp.cli import evalcmd
from fsapp.cli.main import app
from fsapp.data import to_unit
from fsapp.engine import events as ev
from fsapp.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_mlp(hidden: int, seed: int):
    reg = get_registry()
    d = reg.create("dataset", "digits")
    params = {"num_classes": 10, "channels": 1, "size": 8, "mean": tuple(d.mean), "std": tuple(d.std),
              "hidden": hidden, "layers": 1}
    torch.manual_seed(seed)
    model = reg.create("model", "mlp", **params)
    x, y = to_unit(d.x_train), d.y_train
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(80):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), params


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, hidden, seed in (("target", 32, 0), ("source", 24, 1)):
        model, params = _train_mlp(hidden, seed)
        meta = model_metadata("mlp", params, dataset="digits", extra={"eval_eps": 0.1, "eval_step_size": 0.025,
                                                                      "run": name})
        (root / name).mkdir()
        paths[name] = fsapp.save_model(root / name / "model.safetensors", model, meta)
    return paths


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_paper_suite_json_and_saved_report(models):
    result = run(models["target"], "--suite", "paper", "--n", "60", "--batch-size", "25", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["accuracy"]) == ["clean", "fgsm:random_start=true", "pgd:steps=20", "pgd:steps=100",
                                      "cw:steps=20", "cw:steps=100", "worst_case"]
    assert data["threat_model"] == {"norm": "Linf", "eps": 0.1} and data["n"] == 60 and data["seed"] == 0
    assert data["model_sha256"] == file_sha256(models["target"]) and data["dataset"] == "digits"
    assert data["settings"]["step_size"] == 0.025 and data["settings"]["suites"] == ["paper"]
    fgsm = data["attacks"][0]
    assert fgsm["params"]["random_start"] is True and fgsm["params"]["step_size"] is None  # FGSM steps by eps
    assert {"flags", "timings", "per_sample", "checks", "gap_ce_minus_margin"} <= set(data)
    saved = list((models["target"].parent / "eval").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["accuracy"] == data["accuracy"]
    assert not list((models["target"].parent / "eval").glob(".state-*"))  # removed once the report is written
    human = run(models["target"], "--attack", "pgd:steps=3", "--n", "30", "--eps", "8/255")
    assert human.exit_code == 0 and "worst case" in human.output and "report:" in human.output
    assert "Linf 8/255" in human.output


def test_autoattack_suite_and_robustbench_file(models, tmp_path):
    out, rb = tmp_path / "r.json", tmp_path / "rb.json"
    result = run(models["target"], "--suite", "autoattack", "--n", "24", "--eps", "0.05", "--out", out,
                 "--robustbench-json", rb, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["attacks"][0]["stages"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    entry = json.loads(rb.read_text())
    assert entry["clean_acc"] == f"{100 * data['accuracy']['clean']:.2f}"
    assert entry["autoattack_acc"] == f"{100 * data['accuracy']['autoattack']:.2f}"
    assert entry["eps"] == "0.05" and entry["dataset"] == "digits" and entry["architecture"] == "mlp(hidden=32, layers=1)"
    assert {"name", "additional_data", "number_forward_passes", "venue", "reported", "unreliable"} <= set(entry)


def test_sweeps_write_curves(models, tmp_path):
    out = tmp_path / "sweep.json"
    result = run(models["target"], "--sweep", "eps=0:16/255:3", "--sweep", "steps=1,4", "--attack", "pgd:steps=3",
                 "--n", "40", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    eps, steps = data["sweeps"]
    assert eps["key"] == "eps" and eps["values"] == [0.0, 8 / 255, 16 / 255]
    assert eps["curves"]["pgd:steps=3"][0] == data["accuracy"]["clean"]
    assert steps["values"] == [1, 4] and len(steps["curves"]["pgd:steps=3"]) == 2
    for key in ("eps", "steps"):
        assert (tmp_path / f"sweep-sweep-{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy vs eps" in result.output and "100% |" in result.output


def test_transfer_from_a_source_model(models, tmp_path):
    out = tmp_path / "t.json"
    result = run(models["target"], "--source", models["source"], "--attack", "pgd:steps=5", "--suite", "default",
                 "--n", "40", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["accuracy"]) == {"clean", "pgd:steps=20", "cw:steps=20", "transfer/pgd:steps=5", "worst_case"}
    assert data["settings"]["source_sha256"] == file_sha256(models["source"])
    assert data["accuracy"]["transfer/pgd:steps=5"] >= data["accuracy"]["pgd:steps=20"]  # transfer is weaker


def test_interrupted_eval_resumes(models, tmp_path, monkeypatch):
    args = [models["target"], "--attack", "pgd:steps=3", "--attack", "cw:steps=3", "--n", "60", "--batch-size", "10",
            "--json"]
    full = json.loads(run(*args, "--out", tmp_path / "full.json").stdout)
    original = evalcmd.EvalProgressView.on_event
    calls = {"n": 0}

    def interrupt(self, event):
        if isinstance(event, ev.EvalProgress) and event.done:
            calls["n"] += 1
            if calls["n"] == 8:
                raise KeyboardInterrupt
        original(self, event)

    monkeypatch.setattr(evalcmd.EvalProgressView, "on_event", interrupt)
    out = tmp_path / "part.json"
    stopped = run(*args, "--out", out)
    assert stopped.exit_code == 1 and "--resume" in stopped.output and not out.exists()
    states = list(tmp_path.glob(".state-*.json"))
    assert len(states) == 1
    monkeypatch.setattr(evalcmd.EvalProgressView, "on_event", original)
    resumed = run(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    data = json.loads(resumed.stdout)
    assert data["accuracy"] == full["accuracy"] and data["per_sample"] == full["per_sample"]
    assert not states[0].exists()
    again = run(*args, "--out", out, "--resume")
    assert again.exit_code == 2 and "no interrupted evaluation" in again.output


@pytest.mark.parametrize("args, message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--sweep", "eps=1"], None),
    (["--sweep", "eps"], "bad --sweep"),
    (["--n", "0"], "--n must be >= 1"),
    (["--attack", "pgd:bogus=1"], "unknown parameter 'bogus'"),
    (["--eps", "x/2"], "bad --eps"),
])
def test_usage_errors_exit_2(models, args, message):
    result = run(models["target"], "--n", "5", *args)
    if message is None:  # a one-value sweep is fine
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert message in result.output
