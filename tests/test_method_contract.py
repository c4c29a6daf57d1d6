"""The training-method contract: a perturbation returns ``x_adv`` or ``(x_adv, targets)``; the
outer loss runs the forwards it needs; a plugin's targets are checked; weight decay on weights only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _shared import TinyNet

import fsapp
from fsapp.checkpoint import read_safetensors
from fsapp.config import load
from fsapp.engine import events as ev
from fsapp.engine.guard import GuardedPerturbation
from fsapp.engine.plan import make_optimizer, plan_run
from fsapp.engine.rundir import Control
from fsapp.engine.step import training_step
from fsapp.engine.train import train
from fsapp.errors import PluginError, UsageError
from fsapp.losses import OuterLoss, smoothed_targets, soft_label_cross_entropy
from fsapp.method import Adversarial, as_adversarial

SCALER = torch.amp.GradScaler("cpu", enabled=False)


def batch(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def shift(model, x, y):
    return (x + 0.05).clamp(0, 1)


def test_as_adversarial_reads_both_forms():
    x, t = torch.zeros(2, 3), torch.full((2, 4), 0.25)
    assert as_adversarial(x) == Adversarial(x, None)
    assert as_adversarial((x, t)).targets is t
    assert as_adversarial(Adversarial(x, t)) == (x, t)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = TinyNet(channels=1, classes=4).train()
    return a, copy.deepcopy(a)


def test_targets_replace_the_labels_in_the_update():
    a, b = models()
    x, y = batch()
    targets = torch.softmax(torch.randn(len(y), 4, generator=torch.Generator().manual_seed(1)), 1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.5), torch.optim.SGD(b.parameters(), lr=0.5)
    loss, logits, applied = training_step(a, lambda m, x, y: (shift(m, x, y), targets), opt_a, SCALER, x, y,
                                          OuterLoss("ce"))
    expected = soft_label_cross_entropy(b(shift(b, x, y)), targets)  # by hand on the copy
    expected.backward()
    opt_b.step()
    assert applied and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)  # the labels were not used


def test_x_adv_alone_and_smoothed_targets_give_the_same_step():
    a, b = models()
    x, y = batch()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.5), torch.optim.SGD(b.parameters(), lr=0.5)
    la, _, _ = training_step(a, shift, opt_a, SCALER, x, y, OuterLoss("soft-ce", 0.5))
    lb, _, _ = training_step(b, lambda m, x, y: Adversarial(shift(m, x, y), smoothed_targets(y, 4, 0.5)),
                             opt_b, SCALER, x, y, OuterLoss("soft-ce", 0.0))
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_outer_loss_names_are_checked():
    with pytest.raises(ValueError, match="soft-ce, ce, trades"):
        OuterLoss("kl")
    with pytest.raises(ValueError, match="clean logits"):
        OuterLoss("trades")(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UsageError, match="method.loss"):
        load("demo", ["method.loss=kl"])
    assert plan_run(load("demo", ["method.loss=trades", "method.trades_beta=2"])).loss == OuterLoss("trades", 0.5, 2.0)


# --------------------------------------------------------------------------- the guard


def guard(fn, num_classes: int | None = 4) -> GuardedPerturbation:
    return GuardedPerturbation(fn, 0.1, "soft", "fsapp-soft", num_classes)


def test_guard_passes_valid_targets_and_keeps_a_plain_tensor_plain():
    model = TinyNet(channels=1, classes=4).train()
    x, y = batch()
    t = torch.full((len(y), 4), 0.25)
    out = guard(lambda m, x, y: (x + 0.05, t))(model, x, y)
    assert isinstance(out, Adversarial) and torch.equal(out.targets, t)
    plain = guard(lambda m, x, y: x + 0.05)(model, x, y)
    assert isinstance(plain, torch.Tensor)


def test_guard_replaces_invalid_target_rows_and_counts_them():
    model = TinyNet(channels=1, classes=4).train()
    x, y = batch()
    t = torch.full((len(y), 4), 0.25)
    t[0, 0] = float("nan")
    t[1] = torch.tensor([1.5, -0.5, 0.0, 0.0])  # sums to 1, negative entry
    t[2] = 0.3  # sums to 1.2
    g = guard(lambda m, x, y: ((x + 0.05).clamp(0, 1), t.clone()))
    out = g(model, x, y)
    assert g.take_violations() == 3
    onehot = F.one_hot(y, 4).float()
    assert torch.equal(out.targets[:3], onehot[:3]) and torch.equal(out.targets[3:], t[3:])


@pytest.mark.parametrize("targets, message", [
    (lambda y: y, "returned targets (10,), expected soft labels of shape (10, 4)"),
    (lambda y: torch.full((len(y), 3), 1 / 3), "returned targets (10, 3)"),
    (lambda y: "soft", "returned targets str"),
    (lambda y: F.one_hot(y, 4), "dtype torch.int64"),
])
def test_guard_names_the_plugin_for_malformed_targets(targets, message):
    x, y = batch()
    with pytest.raises(PluginError, match="perturbation 'soft' from plugin 'fsapp-soft'") as caught:
        guard(lambda m, x, y: (x, targets(y)))(TinyNet(channels=1, classes=4), x, y)
    assert message in str(caught.value)


SOFT_PLUGIN = """
import torch
from fsapp import hookimpl

def soft(model, x, y):
    t = torch.full((len(y), 10), 0.5 / 9).scatter(1, y[:, None], 0.5)
    t[0] = float("nan")  # one bad row per batch: replaced by the one-hot label and reported
    return (x + 0.1).clamp(0, 1), t

@hookimpl
def register_perturbations(register):
    register("soft-labels", lambda p: soft)
"""


@pytest.fixture
def soft_plugin(install_plugin, fresh_registry, monkeypatch):
    install_plugin("fsapp-soft", "fsapp_soft", SOFT_PLUGIN)
    fresh_registry()
    yield
    monkeypatch.undo()  # take the plugin off sys.path before the registry reloads
    fresh_registry()


def test_a_plugin_perturbation_with_targets_trains_end_to_end(soft_plugin, tiny_digits_config, tmp_path):
    tables = tiny_digits_config(tmp_path, method__perturbation="soft-labels", eval__n=0)
    events = list(train(tables))
    run = Path(events[-1].model_path).parent
    warnings = [json.loads(line)["message"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "Warning"]
    assert any("plugin 'fsapp-soft'" in w and "invalid soft labels" in w for w in warnings)
    assert fsapp.load_model(events[-1].model_path) is not None


# --------------------------------------------------------------------------- weight decay


def test_weight_decay_on_weights_leaves_biases_and_batchnorm_alone():
    model = TinyNet(channels=1, classes=4)
    cfg = load("demo", ["optim.weight_decay_on=weights", "optim.weight_decay=0.1", "optim.momentum=0"]).optim
    opt = make_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if p.dim() > 1:  # conv and linear weights: w - lr * wd * w
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.1)), name
        else:  # biases, BatchNorm scale and shift
            assert torch.equal(p, before[name]), name
    everything = make_optimizer(model, load("demo").optim)
    assert len(everything.param_groups) == 1 and everything.param_groups[0]["weight_decay"] == 2e-4


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", [
    {"method__perturbation": "bilateral", "optim__weight_decay_on": "weights"},
    {"method__perturbation": "trades", "method__loss": "trades", "method__steps": 2, "method__step_size": 0.1},
])
def test_new_methods_resume_bit_identical(tmp_path, tiny_digits_config, method):
    tables = tiny_digits_config(tmp_path, run__log_every=1, run__checkpoint_every=2, eval__n=0, **method)
    list(train(tables, run_dir=tmp_path / "full"))
    control = Control.new()
    for event in train(tables, run_dir=tmp_path / "part", control=control):
        if isinstance(event, ev.StepEnd) and event.global_step >= 3:
            control.stop.set()
    events = list(train(resume=tmp_path / "part"))
    assert events[0].resumed and events[-1].stopped is False
    a = read_safetensors(tmp_path / "full" / "model.safetensors")[0]
    b = read_safetensors(tmp_path / "part" / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
