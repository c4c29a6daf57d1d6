"""The ``screen`` tier: APGD-CE then APGD-T on the nearest boundaries (MALT order), cheap enough
for every epoch, and in agreement with the full ``autoattack``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fsapp
from fsapp.builtins.autoattack import malt_order
from fsapp.data import to_unit
from fsapp.engine.evaluate import SUITES, evaluate
from fsapp.errors import UsageError
from fsapp.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def test_malt_orders_classes_by_the_linearised_distance_to_their_boundary():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
    x = torch.rand(30, 1, 4, 4)
    y = torch.zeros(30, dtype=torch.long)
    order = malt_order(linear, x, y)
    assert order.shape == (30, 5) and not (order == 0).any()
    w, b = linear[1].weight.detach(), linear[1].bias.detach()
    z = x.flatten(1) @ w.T + b
    # for a linear model the linearised distance is exact: margin over the L1 norm of the weight gap
    dist = (z[:, :1] - z) / (w[:1] - w).abs().sum(1)
    dist[:, 0] = float("inf")
    assert torch.equal(order, dist.argsort(1)[:, :5])


def test_screen_is_apgd_ce_then_apgd_t_on_three_malt_targets():
    attack = fsapp.create("attack", "screen:eps=0.1")
    assert [name for name, _ in attack.stages] == ["apgd-ce", "apgd-t"]
    ce, t = (stage for _, stage in attack.stages)
    assert (ce.steps, ce.targets, t.steps, t.targets, t.order) == (100, 0, 100, 3, "malt")
    assert SUITES["screen"] == ("screen",)
    assert fsapp.create("attack", "apgd-t:order=malt").order == "malt"
    with pytest.raises(UsageError, match="order must be logits or malt"):
        fsapp.create("attack", "apgd-t:order=random")


@pytest.fixture(scope="module")
def robust_digits():
    reg = get_registry()
    d = reg.create("dataset", "digits")
    torch.manual_seed(0)
    model = reg.create("model", "mlp:hidden=32,layers=1", num_classes=10, channels=1, size=8, mean=tuple(d.mean),
                       std=tuple(d.std))
    x, y = to_unit(d.x_train), d.y_train
    pgd = reg.create("attack", "pgd:eps=0.1,step_size=0.03,steps=3")
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(30):
        model.eval()
        xa = pgd(model, x, y)
        loss = F.cross_entropy(model.train()(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), to_unit(d.x_test[:80]), d.y_test[:80]


def test_screen_finds_what_a_longer_apgd_t_finds(robust_digits):
    model, x, y = robust_digits
    report = evaluate(model, x, y, ["screen:eps=0.1,steps=30,seed=0", "autoattack-fast:eps=0.1,steps=30,targets=9,"
                                    "queries=0,seed=0"], batch_size=80)
    screen, nine = report.attacks
    assert 0 < report.accuracy[screen.key] < report.accuracy["clean"]
    # three MALT targets find (almost) everything nine logit-ranked targets find
    assert int((screen.robust & ~nine.robust).sum()) <= 1


def test_screen_agrees_with_the_full_autoattack(robust_digits):
    """Per-sample agreement with the standard AutoAttack, and the cost ratio."""
    model, x, y = robust_digits
    report = evaluate(model, x, y, ["screen:eps=0.1,seed=0", "autoattack:eps=0.1,seed=0"], batch_size=80)
    screen, full = report.attacks
    agreement = float((screen.robust == full.robust).float().mean())
    assert agreement >= 0.97 and int((~screen.robust & full.robust).sum()) <= 1
    assert screen.seconds * 3 < full.seconds
