"""The adversary vocabulary (fsapp.adversary): threat models, the random start, preserved model state, the
attack base and the cascade; and evaluation leaving the caller's random streams exactly as it found them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fsapp
from fsapp.adversary import (
    Attack,
    ThreatModel,
    cascade,
    eval_mode,
    predict,
    preserved_state,
    random_start,
)
from fsapp.builtins.perturbations import random_start as exported_random_start

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linf_contains_and_project():
    ball = ThreatModel("Linf", 0.1)
    x = torch.full((4, 1, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[1] += 0.1  # on the boundary: inside
    x_adv[2, 0, 0, 0] = 0.7  # outside the ball
    x_adv[3, 0, 0, 0] = float("nan")
    assert ball.contains(x_adv, x).tolist() == [True, True, False, False]
    projected = ball.project(x_adv, x)
    assert torch.equal(projected[:2], x_adv[:2])  # points inside come back bit for bit
    assert projected[2, 0, 0, 0] == pytest.approx(0.6) and projected[3, 0, 0, 0] == 0.5
    edge = torch.zeros(1, 1, 1, 2)
    assert ball.project(edge - 0.05, edge).min() == 0  # and into [0, 1]
    assert not ball.contains(edge - 0.05, edge).item()


def test_project_step_is_the_reference_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=g)
    moved = x + 0.2 * torch.randn(8, 3, 4, 4, generator=g)
    eps = 8 / 255
    expected = torch.clamp(x + torch.clamp(moved - x, min=-eps, max=eps), min=0.0, max=1.0)
    assert torch.equal(ThreatModel("Linf", eps).project_step(moved, x), expected)


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_other_norms(norm):
    ball = ThreatModel(norm, 0.5)
    x = torch.full((2, 1, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] += 0.4
    x_adv[1] += 0.2  # L2 0.4, L1 0.8
    inside = ball.contains(x_adv, x).tolist()
    assert inside == ([True, True] if norm == "L2" else [True, False])
    assert ball.distance(ball.project(x_adv, x), x).max() <= 0.5 + 1e-6
    assert ThreatModel("L2", 0.1).within(ThreatModel("L2", 0.2)) and not ball.within(ThreatModel("Linf", 1.0))


def test_random_start_is_one_default_generator_draw():
    x = torch.rand(4, 3, 5, 5)
    torch.manual_seed(3)
    got = random_start(x, 0.1, clamp=False)
    torch.manual_seed(3)
    expected = x + torch.empty_like(x).uniform_(-0.1, 0.1)
    assert torch.equal(got, expected)
    assert exported_random_start is random_start  # the perturbations module exports the same function
    g = torch.Generator().manual_seed(3)
    state = torch.get_rng_state()
    assert torch.equal(random_start(x, 0.1, clamp=False, generator=g), expected)
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator leaves the default one alone


def test_preserved_state_restores_modes_and_buffers_after_an_exception():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.1)).eval()
    model[2].train()  # a module with its own mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    running_mean = model[1].running_mean
    with pytest.raises(RuntimeError, match="boom"), preserved_state(model):
        model.train()
        model(torch.randn(16, 3) + 3)
        model[1].running_var = torch.full((4,), 9.0)
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [False, False, False, True]
    assert model[1].running_mean is running_mean
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_predict_never_maps_a_non_finite_row_to_a_class():
    class Half(nn.Module):
        def forward(self, x):
            z = torch.stack([x.sum(1), -x.sum(1)], 1)
            return torch.where(x[:, :1] > 0, z, torch.full_like(z, float("nan")))

    x = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    assert predict(Half(), x, batch_size=2).tolist() == [0, -1, 0]


class Shift(Attack):
    """Moves the first feature by ``by``: fools the samples whose margin is smaller."""

    def __init__(self, by: float) -> None:
        self.eps = abs(by)
        self.by = by

    def __call__(self, model, x, y):
        out = x.clone()
        out[:, 0] += self.by
        return out


class Two(Attack):
    loss = "mixed"

    def __init__(self) -> None:
        self.eps = 0.5
        self.stages = [("small", Shift(-0.2)), ("large", Shift(-0.5))]


def test_attack_base_and_cascade():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # class 0 when x0 > 0
    x = torch.tensor([[0.1, 0.0], [0.3, 0.0], [0.9, 0.0], [-0.1, 0.0]])
    y = torch.zeros(4, dtype=torch.long)
    seen = []
    adv, robust = cascade(model, x, y, Two().stages, on_stage=lambda name, mask: seen.append((name, mask.tolist())))
    assert seen == [("small", [False, True, True, False]), ("large", [False, False, True, False])]
    assert robust.tolist() == [False, False, True, False]
    assert adv[0, 0] == pytest.approx(-0.1) and adv[1, 0] == pytest.approx(-0.2)  # each point's first fooling stage
    assert adv[2, 0] == pytest.approx(0.9)  # robust points keep the clean input
    model.train()
    assert torch.equal(Two()(model, x, y), adv) and model.training  # the base class runs the cascade in eval mode
    assert Two().threat == ThreatModel("Linf", 0.5)
    with pytest.raises(TypeError, match="must define stages"):
        Attack()(model, x, y)


def test_eval_mode_restores_each_module():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]


# --------------------------------------------------------------------------- randomness


def _steps(model, opt, x, y, k):
    for _ in range(k):
        noise = torch.rand_like(x) * 0.05  # training draws from the default generator
        loss = F.cross_entropy(model(x + noise), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_evaluating_between_training_steps_leaves_the_stream_alone():
    x = torch.rand(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))

    def run(evaluate_between: bool):
        torch.manual_seed(7)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), 0.1)
        _steps(model, opt, x, y, 3)
        reports = []
        if evaluate_between:
            state = torch.get_rng_state()
            reports.append(fsapp.evaluate(model, x, y, ["pgd:steps=2", "fgsm:random_start=true",
                                                        "autoattack-fast:steps=2,targets=1,queries=5,seed=1"],
                                          batch_size=16, seed=3, defaults={"eps": 0.1}))
            assert torch.equal(torch.get_rng_state(), state)
        _steps(model, opt, x, y, 3)
        return [p.detach().clone() for p in model.parameters()], reports

    alone, _ = run(False)
    interleaved, (report,) = run(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved, strict=True))
    # and the evaluation's own numbers depend only on its seed, not on the stream it found
    torch.manual_seed(12345)
    again = fsapp.evaluate(report_model := nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), x, y, ["pgd:steps=2"],
                           batch_size=16, seed=3, defaults={"eps": 0.1})
    torch.manual_seed(54321)
    other = fsapp.evaluate(report_model, x, y, ["pgd:steps=2"], batch_size=16, seed=3, defaults={"eps": 0.1})
    assert torch.equal(again.attacks[0].robust, other.attacks[0].robust)
