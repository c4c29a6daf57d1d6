"""Broken attack and perturbation plugins, installed through real entry points: each one either gives the
correct counted result (its examples checked against the evaluator's private copy, the model's modes and
BatchNorm buffers restored) or one clear line naming the component and its plugin."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import fsapp
from fsapp.checkpoint import model_metadata
from fsapp.cli.main import app
from fsapp.engine.evaluate import evaluate
from fsapp.engine.guard import GuardedPerturbation
from fsapp.errors import PluginError, UsageError
from fsapp.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = "fsapp-hostile"

SOURCE = '''
from dataclasses import dataclass
import torch
from fsapp import hookimpl

@dataclass
class P:
    eps: float = 0.2

@dataclass
class Free:
    scale: float = 1.0

def up(x, by):
    out = x.clone()
    out[:, 0, 0, 1] += by
    return out

def inplace(model, x, y):
    x.add_(0.5)  # every pixel 0.5 up, in place, at eps 0.2
    return x

def inplace_copy(model, x, y):
    clean = x.clone()
    x.fill_(1.0)  # vandalises its input, returns the clean points
    return clean

def train_leak(model, x, y):
    model.train()
    return x.clone()

def bn_edit(model, x, y):
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.ones_like(x))  # running statistics of a bright batch
    return x.clone()

def bn_replace(model, x, y):
    model.bn.running_mean = torch.full_like(model.bn.running_mean, 5.0)
    model.bn.num_batches_tracked += 7
    return x.clone()

def y_edit(model, x, y):
    y.fill_(1)  # the labels now say "fooled" for the unchanged points
    return x.clone()

def raises(kind):
    def attack(model, x, y):
        raise kind("broken inside")
    return attack

def system_exit(model, x, y):
    raise SystemExit(3)

BAD = {
    "inplace": inplace,
    "inplace-copy": inplace_copy,
    "train-leak": train_leak,
    "bn-edit": bn_edit,
    "bn-replace": bn_replace,
    "y-edit": y_edit,
    "nan": lambda m, x, y: torch.full_like(x, float("nan")),
    "inf": lambda m, x, y: torch.full_like(x, float("inf")),
    "eps-violation": lambda m, x, y: up(x, 0.3),
    "float64": lambda m, x, y: up(x, 0.2).double(),
    "int-output": lambda m, x, y: torch.zeros_like(x, dtype=torch.long),
    "with-graph": lambda m, x, y: up(x, 0.2).requires_grad_(True) * 1.0,
    "shape": lambda m, x, y: x[:1].clone(),
    "none": lambda m, x, y: None,
    "tuple": lambda m, x, y: (x.clone(), y),
    "list": lambda m, x, y: [x.clone()],
    "complex": lambda m, x, y: x.to(torch.complex64),
    "meta-device": lambda m, x, y: torch.empty_like(x, device="meta"),
    "type-error": raises(TypeError),
    "key-error": raises(KeyError),
    "index-error": raises(IndexError),
    "attribute-error": raises(AttributeError),
    "runtime-error": raises(RuntimeError),
    "value-error": raises(ValueError),
    "system-exit": system_exit,
}

@hookimpl
def register_attacks(register):
    for name, fn in BAD.items():
        register("hostile-" + name, lambda p, fn=fn: fn, params=P)
    register("hostile-outbox", lambda p: (lambda m, x, y: x + 0.6), params=Free)  # unbounded, off [0, 1]

@hookimpl
def register_perturbations(register):
    for name in ("inplace", "bn-edit", "nan", "shape", "key-error", "y-edit"):
        register("hostile-" + name, lambda p, fn=BAD[name]: fn, params=P)
'''


class PixelBN(nn.Module):
    """Class 1 when pixel (0, 0, 1) > 0.5, else class 0, through a BatchNorm whose statistics matter."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.bn(x[:, 0, 0, 1:2] - 0.5)
        return torch.cat([-v, v], 1)


def data(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 1, 2, 2), 0.45), torch.zeros(n, dtype=torch.long)


@pytest.fixture
def hostile(install_plugin, fresh_registry, monkeypatch):
    install_plugin(PLUGIN, "fsapp_hostile", SOURCE)
    fresh_registry()
    yield
    monkeypatch.undo()  # take the plugin off sys.path before the registry reloads
    fresh_registry()


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# (attack, accuracy under it, invalid examples): the correct count for a 30-point batch whose points are
# fooled exactly when pixel 1 moves above 0.5
COUNTED = [
    ("inplace", 0.0, 30),  # seen against the private copy: all outside, projected to +0.2, fooled
    ("inplace-copy", 1.0, 0),  # the vandalised input is not what is measured
    ("train-leak", 1.0, 0),
    ("bn-edit", 1.0, 0),
    ("bn-replace", 1.0, 0),
    ("y-edit", 1.0, 0),  # labels are private too
    ("nan", 1.0, 30),  # non-finite values fall back to the clean input
    ("inf", 1.0, 30),
    ("eps-violation", 0.0, 30),
    ("float64", 0.0, 0),  # any float dtype is accepted and converted
    ("int-output", 1.0, 30),  # zeros: outside the ball, projected to -0.2, not fooled
    ("with-graph", 0.0, 0),  # detached
    ("outbox", 0.0, 30),  # unbounded but off [0, 1]: clamped to 1, fooled
]


@pytest.mark.parametrize("name, accuracy, invalid", COUNTED, ids=[c[0] for c in COUNTED])
def test_counted_correctly(hostile, name, accuracy, invalid):
    model = PixelBN().eval()
    before = bn_state(model)
    x, y = data()
    x_before = x.clone()
    report = evaluate(model, x, y, [f"hostile-{name}", "fgsm:eps=0.2,step_size=0.2"], batch_size=10)
    run = report.attacks[0]
    assert (report.accuracy[f"hostile-{name}"], run.invalid) == (accuracy, invalid)
    assert report.accuracy["clean"] == 1.0
    # the model and the caller's data are as they were; the attack after it sees the same model
    assert not model.training and not model.bn.training
    for key, value in bn_state(model).items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(x, x_before)
    alone = evaluate(PixelBN().eval(), x, y, ["fgsm:eps=0.2,step_size=0.2"], batch_size=10)
    assert torch.equal(report.attacks[1].robust, alone.attacks[0].robust)
    flags = {f["id"] for f in report.flags}
    assert ("invalid-examples" in flags) == (invalid > 0)


ERRORS = [
    ("shape", PluginError, "returned (1, 1, 2, 2), expected a tensor of shape (10, 1, 2, 2)"),
    ("none", PluginError, "returned NoneType, expected a tensor"),
    ("tuple", PluginError, "returned tuple, expected a tensor"),
    ("list", PluginError, "returned list, expected a tensor"),
    ("complex", PluginError, "returned a complex tensor"),
    ("meta-device", PluginError, "returned a tensor on meta that cannot be moved to cpu"),
    ("type-error", PluginError, "failed: TypeError: broken inside"),
    ("key-error", PluginError, "failed: KeyError: 'broken inside'"),
    ("index-error", PluginError, "failed: IndexError: broken inside"),
    ("attribute-error", PluginError, "failed: AttributeError: broken inside"),
    ("runtime-error", PluginError, "failed: RuntimeError: broken inside"),
    ("system-exit", PluginError, "failed: SystemExit: 3"),
    ("value-error", UsageError, "failed: ValueError: broken inside"),
]


@pytest.mark.parametrize("name, error, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_one_clear_line(hostile, name, error, message):
    model = PixelBN().eval()
    before = bn_state(model)
    x, y = data()
    with pytest.raises(error) as caught:
        evaluate(model, x, y, [f"hostile-{name}"], batch_size=10)
    text = str(caught.value)
    assert message in text and "\n" not in text
    if error is PluginError:
        assert text.startswith(f"attack 'hostile-{name}' from plugin '{PLUGIN}'")
    for key, value in bn_state(model).items():
        assert torch.equal(value, before[key])


def test_in_place_attack_on_the_command_line(hostile, tmp_path):
    """The issue's demo: an in-place attack at eps 0.2 reported with every attacked example invalid."""
    reg = get_registry()
    d = reg.create("dataset", "digits")
    torch.manual_seed(0)
    params = {"num_classes": 10, "channels": 1, "size": 8, "mean": tuple(d.mean), "std": tuple(d.std),
              "hidden": 16, "layers": 1}
    model = reg.create("model", "mlp", **params).eval()
    path = fsapp.save_model(tmp_path / "m.safetensors", model,
                            model_metadata("mlp", params, dataset="digits", extra={"dataset_params": {}}))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(path), "-a", "hostile-inplace", "--n", "30",
                                                     "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["attacks"][0]["invalid_examples"] == report["robust_count"]["clean"] > 0
    assert "invalid-examples" in {f["id"] for f in report["flags"]}
    broken = CliRunner().invoke(app, ["eval", str(path), "-a", "hostile-key-error", "--n", "10"])
    assert broken.exit_code == 1 and "Traceback" not in broken.output
    assert broken.stderr.strip().splitlines()[-1] == (f"error: attack 'hostile-key-error' from plugin '{PLUGIN}' "
                                                      "failed: KeyError: 'broken inside'")


# --------------------------------------------------------------------------- training perturbations


def guarded(name: str) -> GuardedPerturbation:
    reg = get_registry()
    component = reg.get("perturbation", f"hostile-{name}")
    return GuardedPerturbation(reg.create("perturbation", f"hostile-{name}"), 0.2, component.name, component.plugin)


@pytest.mark.parametrize("name, violations", [("inplace", 30), ("bn-edit", 0), ("nan", 30), ("y-edit", 0)])
def test_guarded_perturbation_in_training(hostile, name, violations):
    model = PixelBN().train()  # the model under training
    before = bn_state(model)
    x, y = data()
    x_before, y_before = x.clone(), y.clone()
    guard = guarded(name)
    x_adv = guard(model, x, y)
    assert guard.take_violations() == violations
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # the clean batch the loss sees is intact
    assert model.training and model.bn.training
    for key, value in bn_state(model).items():
        assert torch.equal(value, before[key]), key
    assert ((x_adv - x).abs() <= 0.2 + 1e-7).all() and torch.isfinite(x_adv).all()
    if name == "inplace":
        assert torch.allclose(x_adv, x + 0.2)  # measured from the private copy, then projected


@pytest.mark.parametrize("name, message", [("shape", "returned (1, 1, 2, 2)"),
                                           ("key-error", "failed: KeyError: 'broken inside'")])
def test_guarded_perturbation_errors(hostile, name, message):
    with pytest.raises(PluginError, match=f"perturbation 'hostile-{name}' from plugin '{PLUGIN}'") as caught:
        guarded(name)(PixelBN().train(), *data())
    assert message in str(caught.value)
