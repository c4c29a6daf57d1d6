"""TRADES: the loss against its formula, gradients through both branches, the KL-PGD adversary,
the preset and a digits learning test."""

from __future__ import annotations

import pytest
import torch
from _shared import TinyNet

import fsapp
from fsapp.builtins.methods import Trades, TradesParams, kl_pgd
from fsapp.config import preset
from fsapp.engine.plan import plan_run
from fsapp.engine.step import training_step
from fsapp.losses import OuterLoss
from fsapp.method import Adversarial


def batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def formula(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + beta * (1/B) sum_i sum_k p_ik (log p_ik - log q_ik), written out."""
    p = clean.exp() / clean.exp().sum(1, keepdim=True)
    q = adv.exp() / adv.exp().sum(1, keepdim=True)
    ce = -(p.log().gather(1, y[:, None])).mean()
    kl = (p * (p.log() - q.log())).sum() / len(y)
    return ce + beta * kl


def test_trades_loss_equals_the_formula_on_a_fixed_batch():
    torch.manual_seed(0)
    model = TinyNet(channels=1, classes=4).double().train()
    x, y = batch()
    x, x_adv = x.double(), (x + 0.05 * torch.randn_like(x)).clamp(0, 1).double()
    loss = OuterLoss("trades", beta=6.0)
    value, logits = loss.on_batch(model, x, Adversarial(x_adv), y)
    model.train()
    expected = formula(model(x), model(x_adv), y, 6.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.equal(logits, model(x_adv))
    assert value.item() > torch.nn.functional.cross_entropy(model(x), y).item()  # the KL term counts


def test_gradient_flows_through_both_branches():
    torch.manual_seed(1)
    model = TinyNet(channels=1, classes=4).train()
    x, y = batch()
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    loss = OuterLoss("trades", beta=6.0)

    def grad_of(clean_graph: bool, adv_graph: bool) -> torch.Tensor:
        model.zero_grad()
        clean, adv = model(x), model(x_adv)
        value = loss(adv if adv_graph else adv.detach(), y, clean=clean if clean_graph else clean.detach())
        value.backward()
        return model.fc.weight.grad.clone()

    both, clean_only, adv_only = grad_of(True, True), grad_of(True, False), grad_of(False, True)
    assert adv_only.abs().sum() > 0 and (clean_only - adv_only).abs().sum() > 0
    assert torch.allclose(both, clean_only + adv_only, atol=1e-6)  # both branches contribute
    model.zero_grad()
    value, _ = loss.on_batch(model, x, Adversarial(x_adv), y)
    value.backward()
    assert torch.allclose(model.fc.weight.grad, both, atol=1e-6)


def test_the_clean_branch_uses_soft_targets_when_given():
    model = TinyNet(channels=1, classes=4).train()
    x, y = batch()
    targets = torch.full((len(y), 4), 0.25)
    value, logits = OuterLoss("trades", beta=0.0).on_batch(model, x, Adversarial(x, targets), y)
    expected = -(torch.log_softmax(model(x), 1) * 0.25).sum(1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_pgd_follows_the_reference_arithmetic():
    torch.manual_seed(2)
    model = TinyNet(channels=1, classes=4).eval()
    x, _ = batch()
    torch.manual_seed(9)
    got = kl_pgd(model, x, epsilon=0.1, step_size=0.03, steps=3)
    torch.manual_seed(9)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    x_cur = x + 0.001 * torch.randn_like(x)
    for _ in range(3):
        x_cur.requires_grad_(True)
        kl = torch.nn.functional.kl_div(torch.log_softmax(model(x_cur), 1), p, reduction="sum")
        (g,) = torch.autograd.grad(kl, x_cur)
        x_cur = torch.min(torch.max(x_cur.detach() + 0.03 * g.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.equal(got, x_cur)
    with torch.no_grad():  # the adversary increased the divergence it ascends
        moved = torch.nn.functional.kl_div(torch.log_softmax(model(got), 1), p, reduction="sum")
        noise = torch.nn.functional.kl_div(torch.log_softmax(model((x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)), 1),
                                           p, reduction="sum")
    assert moved > noise


def test_trades_perturbation_restores_train_mode_and_runs_a_step():
    torch.manual_seed(3)
    model = TinyNet(channels=1, classes=4).train()
    x, y = batch()
    perturb = Trades(TradesParams(epsilon=0.1, step_size=0.03, steps=2))
    before = model.bn.running_mean.clone()
    x_adv = perturb(model, x, y)
    assert model.training and torch.equal(model.bn.running_mean, before)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = model.fc.weight.detach().clone()
    loss, logits, applied = training_step(model, perturb, opt, torch.amp.GradScaler("cpu", enabled=False), x, y,
                                          OuterLoss("trades", beta=6.0))
    assert applied and torch.isfinite(loss) and logits.shape == (len(y), 4)
    assert not torch.equal(model.fc.weight, w)


def test_trades_preset_follows_the_official_script():
    cfg = preset("trades-cifar10")
    plan = plan_run(cfg)
    assert (cfg.model.name, cfg.extras["model"]["depth"], cfg.extras["model"]["widen"]) == ("wrn", 34, 10)
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (128, 0.1, 0.9, 2e-4)
    assert cfg.optim.weight_decay_on == "all"
    assert (cfg.schedule.epochs, cfg.schedule.milestones) == (76, (74,))
    p = plan.perturbation.params
    assert (p.epsilon, p.step_size, p.steps, p.start_std) == (0.031, 0.007, 10, 0.001)
    assert plan.loss == OuterLoss("trades", 0.0, 6.0)
    # the reference's 1-based epoch 75 (index 74) is the first at lr 0.01
    assert plan.lr_at(73) == 0.1 and plan.lr_at(74) == pytest.approx(0.01)


ATTACK = "pgd:eps=0.2,step_size=0.05,steps=10"


def train_and_attack(tmp_path, method: dict) -> dict[str, float]:
    """small-cnn on the digits train split, 4 epochs; PGD-10 at eps 0.2 on 200 test images."""
    tables = {"run": {"runs_dir": str(tmp_path), "seed": 0}, "schedule": {"epochs": 4, "milestones": [3]},
              "eval": {"n": 0}, "method": method}
    events = list(fsapp.train(tables))
    model = fsapp.load_model(events[-1].model_path)
    data = fsapp.create("dataset", "digits")
    torch.manual_seed(0)
    return fsapp.evaluate(model, data.x_test[:200], data.y_test[:200], attacks=[ATTACK]).accuracy


@pytest.mark.slow
def test_trades_is_robust_where_standard_training_is_not(tmp_path):
    standard = train_and_attack(tmp_path / "std", {"perturbation": "none", "loss": "ce"})
    trades = train_and_attack(tmp_path / "trades", {"perturbation": "trades", "loss": "trades", "epsilon": 0.2,
                                                    "step_size": 0.05, "steps": 10, "trades_beta": 6.0})
    print(f"\nstandard: {standard}\ntrades: {trades}")
    assert standard["clean"] > 0.9 and trades["clean"] > 0.9
    assert standard[ATTACK] < 0.15
    assert trades[ATTACK] > standard[ATTACK] + 0.25
