from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fsapp import config as C
from fsapp.errors import UsageError


def test_presets_resolve_and_paper_preset_is_faithful():
    for name in C.PRESETS:
        C.preset(name)
    cfg = C.preset("paper-cifar10")
    t = C.resolved_tables(cfg)
    assert t["model"]["name"] == "wrn" and t["model"]["depth"] == 28 and t["model"]["widen"] == 10
    assert t["data"]["batch_size"] == 60 and t["data"]["augment"] == "crop-flip"
    assert t["method"]["epsilon"] == pytest.approx(8 / 255) and t["method"]["step_size"] == pytest.approx(8 / 255)
    assert t["method"]["steps"] == 1 and t["method"]["label_smoothing"] == 0.5
    assert t["solver"] == {"reg": 0.01, "max_iter": 100, "tol": 0.1, "mode": "faithful", "detach": False,
                           "device_stop": None}
    assert t["optim"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "nesterov": False,
                          "weight_decay_on": "all"}
    assert t["schedule"]["epochs"] == 200 and list(t["schedule"]["milestones"]) == [60, 90]
    assert C.resolved_tables(C.preset("paper-svhn"))["optim"]["lr"] == 0.01
    madry = C.resolved_tables(C.preset("madry-cifar10"))
    assert madry["method"]["perturbation"] == "supervised" and madry["method"]["steps"] == 7
    assert madry["method"]["step_size"] == pytest.approx(2 / 255) and madry["method"]["loss"] == "ce"


def test_overrides_and_fractions():
    cfg = C.load("demo", ["optim.lr=0.05", "method.epsilon=8/255", "schedule.milestones=[3, 5]",
                          "model.name=wrn", "model.depth=10", "solver.mode=converged", "run.device=cpu"])
    assert cfg.optim.lr == 0.05 and cfg.method.epsilon == pytest.approx(8 / 255)
    assert cfg.schedule.milestones == (3, 5)
    assert cfg.model_params() == {"depth": 10}
    assert cfg.solver_spec() == ("sinkhorn", {"mode": "converged"})
    assert "solver=sinkhorn:mode=converged" in ",".join(f"{k}={v}" for k, v in cfg.perturbation_params().items())


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; valid: lr, momentum, nesterov, weight_decay"),
    ("optim.lr=abc", "bad value for optim.lr"),
    ("optim.lr=-1", "optim.lr = -1.0 is out of range; valid: > 0 and <= 10"),
    ("model.name=resnet9000", "unknown model 'resnet9000'; available:"),
    ("model.depth=7", "unknown key 'model.depth' for model 'small-cnn'"),
    ("bogus.key=1", "unknown section 'bogus'"),
    ("run.device=gpu", "run.device: unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N"),
    ("run.device=mps", "run.device: unknown device 'mps'; valid: auto, cpu, cuda, cuda:N"),
    ("method.loss=mse", "expected one of soft-ce, ce"),
    ("solver.reg=x", "bad value for solver.reg"),
    ("nodot", "expected section.key=value"),
])
def test_bad_overrides_are_one_clear_line(override, message):
    with pytest.raises(UsageError) as info:
        C.load("demo", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_toml_round_trip(tmp_path):
    cfg = C.load("paper-cifar100", ["schedule.epochs=3"])
    text = C.to_toml(C.resolved_tables(cfg))
    path = tmp_path / "run.toml"
    path.write_text(text)
    again = C.load(path)
    assert C.resolved_tables(again) == C.resolved_tables(cfg)
    assert tomllib.loads(text)["data"]["name"] == "cifar100"


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        C.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(UsageError, match="invalid TOML"):
        C.load(bad)
    with pytest.raises(UsageError, match="neither a preset"):
        C.load("no-such-preset")


def test_config_show_cli_prints_resolved_toml():
    out = subprocess.run([sys.executable, "-m", "fsapp", "config", "show", "--preset", "paper-cifar10",
                          "--set", "optim.lr=0.2"], capture_output=True, text=True, check=True).stdout
    data = tomllib.loads(out)
    assert data["optim"]["lr"] == 0.2 and data["model"]["depth"] == 28 and data["solver"]["mode"] == "faithful"


def test_cli_bad_key_exit_2_one_line():
    proc = subprocess.run([sys.executable, "-m", "fsapp", "train", "--set", "optim.lrr=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.lrr" in lines[0] and "valid:" in lines[0]
    assert "Traceback" not in proc.stderr
