"""Evaluation attacks: equality with torchattacks, worst-case tracking, the eps-ball contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchattacks
from _shared import TinyNet

from fsapp.builtins.attacks import linf_attack
from fsapp.errors import UsageError
from fsapp.losses import cw_margin_loss
from fsapp.plugins import load_registry

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


class Bump(nn.Module):
    """Two classes; class 1 wins only in a narrow band of the mean pixel value around 0.42.

    A signed-gradient step of 0.1 from mean 0.3 lands in the band (misclassified), the next one
    overshoots it (correct again): the last iterate is correct, an intermediate one is not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        t = x.flatten(1).mean(1)
        h = 1.0 - 1000.0 * (t - 0.42) ** 2 + self.dummy
        return torch.stack([torch.zeros_like(h), h], dim=1)


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 3, 8, 8) * 0.5 + 0.3)
    return model.eval()


def make_batch(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[0, 0] = 0.0
    x[1, 1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def assert_valid(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


# --------------------------------------------------------------------------- torchattacks equality


def test_fgsm_equals_torchattacks(registry):
    model = make_model()
    x, y = make_batch()
    expected = torchattacks.FGSM(model, eps=EPS)(x, y)
    got = registry.create("attack", "fgsm:keep=last")(model, x, y)
    assert (got - expected).abs().max().item() <= 1e-6
    assert (got - x).abs().max().item() > EPS / 2


@pytest.mark.parametrize("steps, alpha", [(1, 2 / 255), (10, 2 / 255), (20, 1 / 255)])
def test_pgd_equals_torchattacks(registry, steps, alpha):
    model = make_model()
    x, y = make_batch()
    expected = torchattacks.PGD(model, eps=EPS, alpha=alpha, steps=steps, random_start=False)(x, y)
    spec = f"pgd:random_start=false,keep=last,steps={steps},step_size={alpha}"
    got = registry.create("attack", spec)(model, x, y)
    assert (got - expected).abs().max().item() <= 1e-6


def test_pgd_random_start_equals_torchattacks_with_same_seed(registry):
    model = make_model()
    x, y = make_batch()
    torch.manual_seed(4)
    expected = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=5, random_start=True)(x, y)
    torch.manual_seed(4)
    got = registry.create("attack", "pgd:steps=5,keep=last")(model, x, y)
    assert (got - expected).abs().max().item() <= 1e-6


def test_cw_is_pgd_on_the_margin_loss(registry):
    model = make_model()
    x, y = make_batch()
    adv = x.clone()
    for _ in range(5):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(cw_margin_loss(model(adv), y, 50.0), adv)
        adv = torch.clamp(x + torch.clamp(adv.detach() + 2 / 255 * g.sign() - x, -EPS, EPS), 0, 1)
    got = registry.create("attack", "cw:steps=5,random_start=false,keep=last")(model, x, y)
    assert (got - adv).abs().max().item() <= 1e-6
    with torch.no_grad():
        assert (model(got).argmax(1) == y).sum() <= (model(x).argmax(1) == y).sum()


# --------------------------------------------------------------------------- worst-case tracking


@pytest.mark.parametrize("name", ["pgd", "cw"])
def test_sample_fooled_at_an_intermediate_iterate_counts(registry, name):
    model = Bump()
    start = torch.tensor([0.3, 0.1, 0.3]).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    y = torch.zeros(3, dtype=torch.long)
    spec = f"{name}:eps=0.25,step_size=0.1,steps=2,random_start=false"
    last = registry.create("attack", spec + ",keep=last")(model, start, y)
    worst = registry.create("attack", spec + ",keep=worst")(model, start, y)
    with torch.no_grad():
        assert (model(last).argmax(1) == 0).all()  # the final iterates are all correct again
        fooled = model(worst).argmax(1) != 0
    assert fooled.tolist() == [True, False, True]
    assert torch.allclose(worst[0].mean(), torch.tensor(0.4), atol=1e-6)  # the iterate in the band
    assert torch.equal(worst[1], last[1])  # never fooled: the last iterate
    assert_valid(worst, start, 0.25)


def test_fgsm_keeps_a_misclassified_start(registry):
    model = Bump()
    x = torch.full((2, 1, 2, 2), 0.41)
    x[1] = 0.2
    y = torch.zeros(2, dtype=torch.long)
    last = registry.create("attack", "fgsm:eps=0.1,keep=last")(model, x, y)
    worst = registry.create("attack", "fgsm:eps=0.1")(model, x, y)
    assert torch.equal(worst[0], x[0]) and not torch.equal(last[0], x[0])
    assert torch.equal(worst[1], last[1])


def test_worst_is_never_weaker_than_last(registry):
    model = make_model()
    x, y = make_batch(64)
    for name in ("pgd:steps=5", "cw:steps=5", "fgsm:random_start=true"):
        torch.manual_seed(0)
        last = registry.create("attack", name + ",keep=last")(model, x, y)
        torch.manual_seed(0)
        worst = registry.create("attack", name)(model, x, y)
        with torch.no_grad():
            fooled_last = model(last).argmax(1) != y
            fooled_worst = model(worst).argmax(1) != y
        assert (fooled_worst | ~fooled_last).all(), name  # fooled by last => fooled by worst


def test_restarts_stop_once_every_sample_is_fooled():
    model = Bump()
    x = torch.full((4, 1, 2, 2), 0.42)  # misclassified everywhere near the start
    y = torch.zeros(4, dtype=torch.long)
    out = linf_attack(model, x, y, eps=0.001, step_size=0.0005, steps=3, restarts=5)
    assert model.forwards == 3 + 1  # one restart (3 steps + the tracking forward), no more
    assert_valid(out, x, 0.001)
    model.forwards = 0
    linf_attack(model, x, y, eps=0.001, step_size=0.0005, steps=3, restarts=5, keep="last")
    assert model.forwards == 15


# --------------------------------------------------------------------------- contract


def builtin_registry(monkeypatch):
    monkeypatch.setenv("FSAPP_LOAD_PLUGINS", "")
    return load_registry()


def test_every_attack_keeps_the_contract(monkeypatch):
    reg = builtin_registry(monkeypatch)
    names = reg.names("attack")
    assert {"fgsm", "pgd", "cw"} <= set(names)
    model = make_model()
    x, y = make_batch()
    for name in names:
        fields = {row["name"] for row in reg.get("attack", name).param_table()}
        params = {"eps": 0.05} if "eps" in fields else {}
        for key, small in (("steps", 3), ("restarts", 2)):
            if key in fields:
                params[key] = small
        attack = reg.create("attack", name, **params)
        model.train()
        model.bn.training = False  # a mixed mode must come back as it was
        stats = model.bn.running_mean.clone()
        for p in model.parameters():
            p.grad = None
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
        for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with context():
                out = attack(model, x, y)
            assert_valid(out, x, params.get("eps", 8 / 255))
        assert model.training and model.conv.training and not model.bn.training, name
        assert torch.equal(model.bn.running_mean, stats), name
        assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight)), name
        assert model.conv.weight.grad is None, name


def test_attack_under_no_grad_equals_normal_call(registry):
    model = make_model()
    x, y = make_batch()
    attack = registry.create("attack", "pgd:steps=3")
    torch.manual_seed(1)
    a = attack(model, x, y)
    torch.manual_seed(1)
    with torch.inference_mode():
        b = attack(model, x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("pgd:eps=-1", "eps"),
        ("pgd:steps=0", "steps"),
        ("pgd:restarts=0", "restarts"),
        ("pgd:keep=best", "keep"),
        ("cw:kappa=-1", "kappa"),
        ("fgsm:step_size=-0.1", "step_size"),
    ],
)
def test_bad_parameters_are_clear_errors(registry, spec, match):
    with pytest.raises(UsageError, match=match):
        registry.create("attack", spec)


def test_fgsm_step_size_defaults_to_eps(registry):
    assert registry.create("attack", "fgsm:eps=0.1").step_size == 0.1
    assert registry.create("attack", "fgsm:eps=0.1,step_size=0.05").step_size == 0.05
