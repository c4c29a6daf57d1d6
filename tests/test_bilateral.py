"""Bilateral adversarial training: the adversarial-label formula, the targeted step, the method
end to end, and a digits learning test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _shared import TinyNet
from typer.testing import CliRunner

import fsapp
from fsapp.builtins.methods import (
    Bilateral,
    BilateralParams,
    adversarial_labels,
    most_confusing,
    targeted_step,
)
from fsapp.cli.main import app
from fsapp.config import preset
from fsapp.engine.plan import plan_run
from fsapp.losses import smoothed_targets
from fsapp.method import Adversarial

EPS = 8 / 255


def hand_labels(logits: list[float], y: int, beta: float = 9.0, gamma: float = 0.01) -> list[float]:
    """The formula written out in plain Python, one example."""
    m = max(logits)
    exp = [math.exp(z - m) for z in logits]
    p = [e / sum(exp) for e in exp]
    v = [-math.log(q + 1e-8) for q in p]
    others = [v[k] for k in range(len(v)) if k != y]
    v_mc, v_ll = min(others), max(others)
    s = sum(vk - v_mc + gamma for vk in others)
    eps_y = 1.0 / (1.0 + beta * (v_ll - v_mc + gamma) / s)
    return [1.0 - eps_y if k == y else eps_y * (v[k] - v_mc + gamma) / s for k in range(len(v))]


def test_adversarial_labels_match_the_formula_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]],
                          dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    got = adversarial_labels(logits, y)
    for row, label, out in zip(logits.tolist(), y.tolist(), got, strict=True):
        assert out.tolist() == pytest.approx(hand_labels(row, label), rel=1e-12, abs=1e-15)
    # one value worked out on paper: uniform logits, K = 4, y = 3: v_k = log 4 for all k, so every
    # other class gets gamma / (3 gamma) = 1/3 of eps_y = 1 / (1 + 9 * gamma / (3 gamma)) = 1/4
    assert got[2].tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 12, 3 / 4], abs=1e-12)


def test_adversarial_labels_sum_to_one_with_ratio_beta():
    torch.manual_seed(0)
    logits = 4 * torch.randn(64, 10)
    y = torch.randint(0, 10, (64,))
    for beta in (9.0, 2.5):
        t = adversarial_labels(logits, y, beta=beta)
        assert t.shape == (64, 10) and (t > 0).all()
        assert torch.allclose(t.sum(1), torch.ones(64), atol=1e-6)
        true = t.gather(1, y[:, None]).squeeze(1)
        largest_other = t.scatter(1, y[:, None], 0.0).amax(1)
        assert torch.allclose(true / largest_other, torch.full((64,), beta), rtol=1e-5)
        # the largest other entry is the least likely class's (v_LL), the smallest the most confusing
        least_likely = F.softmax(logits, 1).scatter(1, y[:, None], 2.0).argmin(1)
        assert torch.equal(t.scatter(1, y[:, None], 0.0).argmax(1), least_likely)


def test_label_smoothing_variant_is_the_fs_convention():
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out = Bilateral(BilateralParams(labels="ls", epsilon=0.1, step_size=0.1))(TinyNet(channels=1, classes=4), x, y)
    expected = torch.full((6, 4), 0.5 / 3).scatter(1, y[:, None], 0.5)
    assert torch.allclose(out.targets, expected) and torch.equal(out.targets, smoothed_targets(y, 4, 0.5))


def test_most_confusing_skips_the_true_class():
    logits = torch.tensor([[5.0, 4.0, 1.0], [5.0, 4.0, 1.0], [0.0, 0.0, 9.0]])
    assert most_confusing(logits, torch.tensor([0, 1, 2])).tolist() == [1, 0, 0]


def trained_ish() -> torch.nn.Module:
    torch.manual_seed(3)
    model = TinyNet(channels=1, classes=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def test_targeted_step_moves_towards_the_target_inside_the_ball():
    model = trained_ish()
    torch.manual_seed(1)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 4, (16,))
    with torch.no_grad():
        target = most_confusing(model(x), y)
        before = F.cross_entropy(model(x), target, reduction="none")
    x_adv = targeted_step(model, x, target, EPS, EPS, steps=1, start=False)
    with torch.no_grad():
        after = F.cross_entropy(model(x_adv), target, reduction="none")
    assert (after < before).float().mean() >= 0.9 and after.mean() < before.mean()
    assert (x_adv - x).abs().max() <= EPS + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad


def test_targeted_step_is_one_signed_step_from_the_random_start():
    model = trained_ish()
    x = torch.rand(8, 1, 8, 8)
    target = torch.randint(0, 4, (8,))
    torch.manual_seed(7)
    got = targeted_step(model, x, target, 0.1, 0.05)
    torch.manual_seed(7)
    x0 = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).requires_grad_(True)  # not clamped
    (g,) = torch.autograd.grad(F.cross_entropy(model(x0), target, reduction="sum"), x0)
    expected = torch.min(torch.max(x0.detach() - 0.05 * g.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.equal(got, expected)


def test_bilateral_targets_come_from_the_clean_eval_mode_logits():
    model = TinyNet(channels=1, classes=4).train()
    x = torch.rand(12, 1, 8, 8)
    y = torch.randint(0, 4, (12,))
    with torch.no_grad():
        model.eval()
        clean = model(x)
        model.train()
    out = Bilateral(BilateralParams(epsilon=0.1, step_size=0.1))(model, x, y)
    assert isinstance(out, Adversarial) and model.training
    assert torch.equal(out.targets, adversarial_labels(clean, y))
    assert (out.x - x).abs().max() <= 0.1 + 1e-7


def test_bilateral_preset_follows_the_official_script():
    cfg = preset("bilateral-cifar10")
    plan = plan_run(cfg)
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (128, 0.1, 0.9, 2e-4)
    assert cfg.optim.weight_decay_on == "weights"
    assert (cfg.schedule.epochs, cfg.schedule.milestones) == (201, (100, 150))
    p = plan.perturbation.params
    assert (p.epsilon, p.step_size, p.steps, p.labels, p.beta, p.gamma) == (EPS, EPS, 1, "la", 9.0, 0.01)
    assert plan.lr_at(99) == 0.1 and plan.lr_at(100) == pytest.approx(0.01) and plan.lr_at(150) == pytest.approx(1e-3)


def test_bilateral_trains_from_the_cli(tmp_path):
    result = CliRunner().invoke(app, [
        "train", "demo", "--set", "method.perturbation=bilateral", "--set", "data.train_limit=120",
        "--set", "schedule.epochs=1", "--set", "schedule.milestones=[1]", "--set", "eval.n=0",
        "--set", "perturbation.labels=la", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    model = fsapp.load_model(tmp_path / "run" / "model.safetensors")
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


ATTACK = "pgd:eps=0.2,step_size=0.05,steps=10"


def train_and_attack(tmp_path, method: dict, perturbation: dict | None = None) -> dict[str, float]:
    """small-cnn on the digits train split, 4 epochs; PGD-10 at eps 0.2 on 200 test images."""
    tables = {"run": {"runs_dir": str(tmp_path), "seed": 0}, "schedule": {"epochs": 4, "milestones": [3]},
              "eval": {"n": 0}, "method": method, "perturbation": perturbation or {}}
    events = list(fsapp.train(tables))
    model = fsapp.load_model(events[-1].model_path)
    data = fsapp.create("dataset", "digits")
    torch.manual_seed(0)
    return fsapp.evaluate(model, data.x_test[:200], data.y_test[:200], attacks=[ATTACK]).accuracy


@pytest.mark.slow
def test_bilateral_is_robust_where_standard_training_is_not(tmp_path):
    standard = train_and_attack(tmp_path / "std", {"perturbation": "none", "loss": "ce"})
    bilateral = train_and_attack(tmp_path / "bat", {"perturbation": "bilateral", "loss": "soft-ce",
                                                    "epsilon": 0.2, "step_size": 0.2, "steps": 1})
    print(f"\nstandard: {standard}\nbilateral: {bilateral}")
    assert standard["clean"] > 0.9 and bilateral["clean"] > 0.9
    assert standard[ATTACK] < 0.15
    assert bilateral[ATTACK] > standard[ATTACK] + 0.25
