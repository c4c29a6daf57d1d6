"""Training-time perturbations: the lean feature scattering step vs a hand-written reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from _shared import TinyNet, reference_sinkhorn

from fsapp.builtins.perturbations import (
    FeatureScatter,
    FeatureScatterParams,
    eval_mode,
    feature_scatter_step,
    scatter_loss,
)
from fsapp.builtins.solvers import sinkhorn_faithful
from fsapp.errors import UsageError
from fsapp.method import as_adversarial
from fsapp.plugins import load_registry

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    model.train()
    with torch.no_grad():  # give BN running statistics that differ from batch statistics
        model(torch.rand(64, 3, 8, 8, dtype=dtype) * 0.5 + 0.3)
    return model


def make_batch(n: int = 24, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    x[0, 0] = 0.0  # pixels on the box boundary
    x[1, 1] = 1.0
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def registry():
    return load_registry()




def reference_feature_scatter(model, x, eps, step, seed):
    """REFERENCE.md steps 1-6, written out by hand (one step, unclamped random start)."""
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        z = model(x)
    x0 = x + torch.empty_like(x).uniform_(-eps, eps)
    x0.requires_grad_(True)
    z_adv = model(x0)
    C = torch.clamp(1 - F.cosine_similarity(z[:, None, :], z_adv[None, :, :], dim=2), min=0)
    T = reference_sinkhorn(C)
    D = (T * C).sum()
    (g,) = torch.autograd.grad(D, x0)
    x_adv = x0.detach() + step * g.sign()
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return x_adv.clamp(0, 1)


# --------------------------------------------------------------------------- feature scattering


def test_feature_scatter_equals_reference_float64(registry):
    model = make_model(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    perturb = registry.create("perturbation", "feature-scatter")
    for seed in (0, 1, 2):
        expected = reference_feature_scatter(model, x, EPS, EPS, seed)
        model.train()
        torch.manual_seed(seed)
        got = perturb(model, x, y)
        assert got.dtype == torch.float64
        assert torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_feature_scatter_matches_reference_float32(registry):
    model = make_model()
    x, y = make_batch()
    perturb = registry.create("perturbation", "feature-scatter")
    expected = reference_feature_scatter(model, x, EPS, EPS, 7)
    torch.manual_seed(7)
    got = perturb(model, x, y)
    mismatch = ((got - expected).abs() > 1e-6).float().mean().item()
    assert mismatch < 0.01  # a rounding-level gradient may flip a rare sign in float32


def test_feature_scatter_random_start_is_one_default_generator_draw():
    model = make_model()
    x, y = make_batch()
    perturb = FeatureScatter(FeatureScatterParams(), sinkhorn_faithful)
    torch.manual_seed(3)
    perturb(model, x, y)
    after = torch.rand(5)
    torch.manual_seed(3)
    torch.empty_like(x).uniform_(-EPS, EPS)
    assert torch.equal(after, torch.rand(5))


def test_feature_scatter_forward_count_and_no_copy():
    model = make_model()
    x, y = make_batch()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].requires_grad))
    for steps in (1, 3):
        calls.clear()
        FeatureScatter(FeatureScatterParams(steps=steps), sinkhorn_faithful)(model, x, y)
        # one clean forward without grad, then one input-grad forward per step
        assert calls == [False] + [True] * steps


def test_feature_scatter_step_pieces_compose():
    model = make_model().eval()
    x, _ = make_batch()
    torch.manual_seed(11)
    a = feature_scatter_step(model, x, sinkhorn_faithful, EPS, EPS, 1)
    torch.manual_seed(11)
    with torch.no_grad():
        z = model(x)
    x0 = (x + torch.empty_like(x).uniform_(-EPS, EPS)).requires_grad_(True)
    (g,) = torch.autograd.grad(scatter_loss(z, model(x0), sinkhorn_faithful), x0)
    b = torch.clamp(x + torch.clamp(x0.detach() + EPS * g.sign() - x, -EPS, EPS), 0, 1)
    assert torch.equal(a, b)


def test_feature_scatter_clamp_start_and_solvers(registry):
    model = make_model()
    x, y = make_batch()
    specs = [
        "sinkhorn",
        "sinkhorn:detach=true",
        "sinkhorn:mode=converged;max_iter=30",
        "ipot",
        "uniform",
        "identity",
    ]
    results = {}
    for spec in specs:
        for clamp in (False, True):
            perturb = registry.create(
                "perturbation", f"feature-scatter:solver={spec},clamp_start={clamp}"
            )
            torch.manual_seed(0)
            out = perturb(model, x, y)
            assert_valid(out, x, EPS)
            results[spec, clamp] = out
    assert (
        registry.create(
            "perturbation", "feature-scatter:solver=sinkhorn:mode=converged;max_iter=30"
        ).solver.params.max_iter
        == 30
    )
    # keyword parameters take a plain nested spec
    kw = registry.create(
        "perturbation", "feature-scatter", solver="sinkhorn:mode=converged,max_iter=30"
    )
    torch.manual_seed(0)
    assert torch.equal(kw(model, x, y), results["sinkhorn:mode=converged;max_iter=30", False])
    # the attack direction depends on the plan: faithful vs detached differ somewhere
    assert not torch.equal(results["sinkhorn", False], results["sinkhorn:detach=true", False])
    assert not torch.equal(results["uniform", False], results["identity", False])


def test_feature_scatter_bad_parameters(registry):
    with pytest.raises(UsageError, match="epsilon"):
        registry.create("perturbation", "feature-scatter:epsilon=-1")
    with pytest.raises(UsageError, match="steps"):
        registry.create("perturbation", "feature-scatter:steps=0")
    with pytest.raises(UsageError, match="unknown solver"):
        registry.create("perturbation", "feature-scatter:solver=nope")


# --------------------------------------------------------------------------- baselines


def test_supervised_equals_torchattacks_pgd():
    model = make_model()
    x, y = make_batch()
    model.eval()
    torch.manual_seed(5)
    expected = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=7, random_start=True)(x, y)
    model.train()
    perturb = load_registry().create("perturbation", "supervised")
    torch.manual_seed(5)
    got = perturb(model, x, y)
    assert torch.allclose(got, expected, atol=1e-6)
    assert model.training


def test_random_and_none(registry):
    model = make_model()
    x, y = make_batch()
    out = registry.create("perturbation", "random:epsilon=0.1")(model, x, y)
    assert_valid(out, x, 0.1)
    assert (out - x).abs().max() > 0.05
    assert torch.equal(registry.create("perturbation", "none")(model, x, y), x)


# --------------------------------------------------------------------------- contract, all of them


def assert_valid(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def builtin_registry(monkeypatch):
    monkeypatch.setenv("FSAPP_LOAD_PLUGINS", "")
    return load_registry()


def test_every_perturbation_keeps_the_contract(monkeypatch):
    reg = builtin_registry(monkeypatch)
    names = reg.names("perturbation")
    assert {"feature-scatter", "supervised", "random", "none"} <= set(names)
    model = make_model()
    x, y = make_batch()
    for name in names:
        fields = {row["name"] for row in reg.get("perturbation", name).param_table()}
        params = {"epsilon": 0.05} if "epsilon" in fields else {}
        if "steps" in fields:
            params["steps"] = 2
        perturb = reg.create("perturbation", name, **params)
        model.train()
        model.bn.training = False  # a mixed mode must come back as it was
        stats = model.bn.running_mean.clone()
        for p in model.parameters():
            p.grad = None
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
        out = as_adversarial(perturb(model, x, y)).x  # the contract of fsapp.method
        assert_valid(out, x, params.get("epsilon", 0.0) if name != "none" else 0.0)
        assert model.training and model.conv.training and not model.bn.training, name
        assert torch.equal(model.bn.running_mean, stats), name  # eval mode: BN stats untouched
        assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight)), name
        assert model.conv.weight.grad is None, name
        with torch.no_grad():  # callers under no_grad still get a real attack
            out = as_adversarial(perturb(model, x, y)).x
        assert_valid(out, x, params.get("epsilon", 0.0) if name != "none" else 0.0)


def test_mode_restored_on_exception():
    class Broken(TinyNet):
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return super().forward(x)

    model = Broken().train()
    x, y = make_batch()
    with pytest.raises(RuntimeError, match="boom"):
        FeatureScatter(FeatureScatterParams(), sinkhorn_faithful)(model, x, y)
    assert all(m.training for m in model.modules())
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
