"""The ``adaptive`` suite: BPDA through a declared non-differentiable preprocessing, EOT for a
randomised forward, transfer from a source or a surrogate, each escalation's reason and
contribution reported; a healthy model gets nothing added."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fsapp.data import to_unit
from fsapp.engine.adaptive import BPDA, EOT
from fsapp.engine.evaluate import SUITES, evaluate
from fsapp.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1
AA = "autoattack-fast:eps=0.1,steps=20,targets=3,queries=200,seed=0"


@pytest.fixture(scope="module")
def digits():
    reg = get_registry()
    d = reg.create("dataset", "digits")
    torch.manual_seed(0)
    net = reg.create("model", "mlp:hidden=32,layers=1", num_classes=10, channels=1, size=8, mean=tuple(d.mean),
                     std=tuple(d.std))
    x, y = to_unit(d.x_train), d.y_train
    pgd = reg.create("attack", "pgd:eps=0.1,step_size=0.03,steps=3")
    opt = torch.optim.Adam(net.parameters(), 0.02)
    for _ in range(40):  # a little adversarial training: robust accuracy well above 0
        net.eval()
        xa = pgd(net, x, y)
        loss = F.cross_entropy(net.train()(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), to_unit(d.x_test[:100]), d.y_test[:100]


class Quantise(nn.Module):
    """8-bit rounding: the value barely changes, the gradient is zero almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 255) / 255


class Quantised(nn.Module):
    """A network behind a declared non-differentiable input preprocessing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.input_transform = Quantise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_transform(x))


class Noisy(nn.Module):
    """A randomised forward: Gaussian noise on the input at every pass."""

    randomized = True

    def __init__(self, net: nn.Module, sigma: float) -> None:
        super().__init__()
        self.net = net
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.sigma * torch.randn_like(x))


def acc(report, key: str = "worst_case") -> float:
    return report.accuracy[key]


def test_adaptive_suite_is_autoattack_then_the_escalations():
    assert SUITES["adaptive"] == ("autoattack", "adaptive")


def test_bpda_scores_through_the_model_and_differentiates_through_the_approximation(digits):
    net, x, y = digits
    model = Quantised(net)
    bpda = BPDA(model)
    with torch.no_grad():
        assert torch.equal(bpda(x), model(x))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    assert not g.any()  # what plain attacks see
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(bpda(xg), y), xg)
    assert g.abs().sum() > 0
    assert isinstance(model.input_transform, Quantise)  # swapped back


def test_bpda_closes_the_gap_of_a_quantised_input(digits):
    net, x, y = digits
    model = Quantised(net)
    plain = evaluate(model, x, y, [AA], batch_size=100, seed=0)
    honest = evaluate(net, x, y, [AA], batch_size=100, seed=0)
    adaptive = evaluate(model, x, y, [AA, "adaptive:eps=0.1,steps=30,square_queries=300,surrogate_steps=50,seed=0"],
                        batch_size=100, seed=0)
    assert "zero-gradient" in {f["id"] for f in plain.flags}
    assert acc(plain) > acc(honest) + 0.05  # plain AutoAttack overstates robustness
    assert acc(adaptive) <= acc(honest) + 0.01  # within a point of the same network without the rounding
    run = next(r for r in adaptive.to_dict()["attacks"] if r["key"].startswith("adaptive"))
    assert run["escalations"]["bpda"]["fooled"] > 0
    assert "declares input_transform" in run["escalations"]["bpda"]["reason"]
    assert "transfer" in run["escalations"]  # a masking flag fired, no source: fsapp trained a surrogate
    assert "trained a surrogate" in run["escalations"]["transfer"]["reason"]


def test_eot_closes_the_gap_of_a_randomised_forward(digits):
    net, x, y = digits
    model = Noisy(net, sigma=0.2)
    spec = "adaptive:eps=0.1,steps=30,eot_samples=16,square_queries=300,surrogate_steps=50,seed=0"
    plain = evaluate(model, x, y, [AA], batch_size=100, seed=0)
    adaptive = evaluate(model, x, y, [AA, spec], batch_size=100, seed=0)
    run = next(r for r in adaptive.to_dict()["attacks"] if r["key"].startswith("adaptive"))
    assert run["escalations"]["eot"]["fooled"] >= 3
    assert acc(adaptive) <= acc(plain) - 0.03  # plain AutoAttack overstated the randomised model


def test_a_healthy_model_gets_nothing_added(digits):
    net, x, y = digits
    spec = "adaptive:eps=0.1,seed=0"
    report = evaluate(net, x, y, [AA, spec], batch_size=100, seed=0)
    plain, adaptive = report.attacks
    assert not adaptive.stages and adaptive.robust.equal(report.worst_case)
    assert acc(report) == acc(report, AA)
    assert adaptive.seconds <= 0.05 * plain.seconds + 0.5  # the documented overhead: the flag pass only


def test_transfer_from_a_given_source(digits):
    net, x, y = digits
    report = evaluate(net, x, y, [AA, "adaptive:eps=0.1,steps=20,seed=0"], batch_size=100, seed=0, source=net)
    run = report.to_dict()["attacks"][1]
    assert list(run["escalations"]) == ["transfer"]
    assert run["escalations"]["transfer"]["reason"] == "crafted on the given source model"


def test_eot_is_the_mean_of_forwards(digits):
    net, x, _ = digits
    torch.manual_seed(0)
    a = EOT(Noisy(net, 0.1), 8)(x)
    torch.manual_seed(0)
    b = torch.stack([Noisy(net, 0.1)(x) for _ in range(8)]).mean(0)
    assert torch.allclose(a, b)
