"""OT solvers: faithful Sinkhorn quirks, converged Sinkhorn vs POT, IPOT vs exact OT."""

from __future__ import annotations

import warnings

import ot
import pytest
import torch
from _shared import reference_sinkhorn

from fsapp.builtins.solvers import (
    Sinkhorn,
    SinkhornParams,
    identity_plan,
    ipot,
    sinkhorn_converged,
    sinkhorn_faithful,
    uniform_plan,
)
from fsapp.errors import UsageError
from fsapp.losses import cost_matrix
from fsapp.plugins import load_registry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry():
    return load_registry()




def realistic_cost(seed: int, batch: int = 60, classes: int = 10) -> torch.Tensor:
    """Clean vs slightly perturbed logits of a batch with class structure."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, classes, generator=g) * 4
    y = torch.randint(0, classes, (batch,), generator=g)
    z = centers[y] + torch.randn(batch, classes, generator=g)
    z_adv = z + 0.5 * torch.randn(batch, classes, generator=g)
    return cost_matrix(z, z_adv)


# --------------------------------------------------------------------------- converged vs POT

# (reg, cost scale, B, seed): cases where POT's sinkhorn_log converges in < 1000 iterations
CASES = [
    (0.05, 2.0, 17, 0),
    (0.05, 2.0, 33, 1),
    (0.05, 2.0, 60, 0),
    (0.05, 2.0, 60, 1),
    (0.01, 0.2, 8, 0),
    (0.01, 0.2, 17, 0),
    (0.01, 0.2, 33, 1),
    (0.01, 0.2, 60, 2),
    (0.01, 0.5, 33, 1),
    (0.01, 0.5, 60, 2),
]


@pytest.mark.parametrize("reg, scale, batch, seed", CASES)
def test_converged_sinkhorn_equals_pot(reg, scale, batch, seed):
    g = torch.Generator().manual_seed(seed * 100 + batch)
    C = torch.rand(batch, batch, generator=g, dtype=torch.float64) * scale
    a = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P, log = ot.sinkhorn(
            a.numpy(),
            a.numpy(),
            C.numpy(),
            reg,
            method="sinkhorn_log",
            numItermax=5000,
            stopThr=1e-12,
            log=True,
        )
    assert log["niter"] < 4999, "POT did not converge on this case; pick another"
    P = torch.from_numpy(P)
    Q = sinkhorn_converged(C, reg, max_iter=5000, tol=1e-12)
    assert Q.dtype == torch.float64
    assert (P - Q).abs().max().item() < 1e-6
    assert torch.allclose(Q.sum(1), a, atol=1e-10) and torch.allclose(Q.sum(0), a, atol=1e-10)


def test_converged_mode_through_registry_uses_its_own_defaults(registry):
    C = torch.rand(60, 60, generator=torch.Generator().manual_seed(100), dtype=torch.float64) * 2
    solver = registry.create("solver", "sinkhorn:mode=converged,reg=0.05")
    assert solver.params.resolved_max_iter == 10000 and solver.params.resolved_tol == 1e-6
    T = solver(C)
    a = torch.full((60,), 1 / 60, dtype=torch.float64)
    assert (T.sum(1) - a).abs().sum() < 1e-6 and torch.allclose(T.sum(0), a, atol=1e-10)
    assert solver.last_iterations > 11  # further than the faithful early stop
    P = ot.sinkhorn(
        a.numpy(), a.numpy(), C.numpy(), 0.05, method="sinkhorn_log", numItermax=5000, stopThr=1e-12
    )
    assert (torch.from_numpy(P) - T).abs().max() < 1e-6


# --------------------------------------------------------------------------- IPOT


@pytest.mark.parametrize("batch", [8, 20, 40])
def test_ipot_approaches_exact_ot(batch):
    g = torch.Generator().manual_seed(batch)
    C = torch.rand(batch, batch, generator=g, dtype=torch.float64) * 2
    a = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
    G = torch.from_numpy(ot.emd(a.numpy(), a.numpy(), C.numpy()))
    T = ipot(C, beta=0.1, iters=1000)
    assert abs((T * C).sum() - (G * C).sum()) < 1e-4
    assert torch.allclose(T.sum(1), a, atol=1e-8) and torch.allclose(T.sum(0), a, atol=1e-8)
    # the paper's setting (beta 1, 50 iterations) is a rougher approximation, still close in cost
    T50 = ipot(C, beta=1.0, iters=50)
    assert abs((T50 * C).sum() - (G * C).sum()) < 2e-2


def test_ipot_float32_no_nan_and_marginals(registry):
    solver = registry.create("solver", "ipot")
    for C in (realistic_cost(0), torch.zeros(60, 60), torch.full((60, 60), 2.0)):
        T = solver(C)
        assert T.dtype == torch.float32 and torch.isfinite(T).all()
        assert torch.allclose(T.sum(1), torch.full((60,), 1 / 60), atol=1e-5)


# --------------------------------------------------------------------------- faithful Sinkhorn


def test_faithful_equals_reference_transcription():
    for seed in range(5):
        C = realistic_cost(seed)
        assert torch.equal(sinkhorn_faithful(C), reference_sinkhorn(C))
    C = torch.rand(60, 60, generator=torch.Generator().manual_seed(9)) * 2
    assert torch.allclose(sinkhorn_faithful(C), reference_sinkhorn(C), rtol=1e-6, atol=1e-9)


def test_faithful_never_nan_in_float32():
    g = torch.Generator().manual_seed(0)
    costs = []
    for batch in (1, 2, 8, 20, 60, 128):
        costs += [torch.rand(batch, batch, generator=g) * 2 for _ in range(10)]
        costs += [torch.zeros(batch, batch), torch.full((batch, batch), 2.0)]
        costs.append((torch.rand(batch, batch, generator=g) > 0.5).float() * 2)
        costs.append(2.0 - 2.0 * torch.eye(batch))
        costs.append(torch.rand(batch, batch, generator=g) * 1e-4)
    costs += [realistic_cost(s) for s in range(5)]
    for C in costs:
        C = C.requires_grad_(True)
        T = sinkhorn_faithful(C, reg=0.01)
        assert T.dtype == torch.float32
        assert torch.isfinite(T).all() and (T >= 0).all() and (T <= 1).all()
        (grad,) = torch.autograd.grad((T * C).sum(), C)
        assert torch.isfinite(grad).all()


def test_faithful_stops_early_far_from_convergence():
    for seed in range(5):
        C = realistic_cost(seed)
        T, iterations = sinkhorn_faithful(C, return_iterations=True)
        assert 1 <= iterations <= 11
        rows = T.sum(1) * 60
        assert (rows - 1).abs().max() > 0.05  # row sums off, as in the reference
        assert torch.allclose(T.sum(0) * 60, torch.ones(60), atol=1e-3)  # columns after v update


def test_faithful_plan_stays_in_graph_and_detach_cuts_it(registry):
    C = realistic_cost(1).requires_grad_(True)
    solver = registry.create("solver", "sinkhorn")
    T = solver(C)
    assert T.requires_grad
    (grad,) = torch.autograd.grad((T * C).sum(), C)
    assert (grad - T.detach()).abs().max() > 1e-3  # d/dC sum(T(C) * C) != T

    detached = registry.create("solver", "sinkhorn:detach=true")
    T2 = detached(C)
    assert not T2.requires_grad
    assert torch.equal(T2, T.detach())
    (grad2,) = torch.autograd.grad((T2 * C).sum(), C)
    assert torch.equal(grad2, T2)


def test_faithful_half_inputs_are_upcast_and_float64_kept():
    C = realistic_cost(2)
    assert sinkhorn_faithful(C.half()).dtype == torch.float32
    assert sinkhorn_faithful(C.bfloat16()).dtype == torch.float32
    assert sinkhorn_faithful(C.double()).dtype == torch.float64
    short = Sinkhorn(SinkhornParams(mode="converged", max_iter=20))
    for solver in (ipot, uniform_plan, identity_plan, short):
        assert solver(C.half()).dtype == torch.float32
        assert solver(C.double()).dtype == torch.float64


# --------------------------------------------------------------------------- degenerate + params


def test_uniform_and_identity_plans(registry):
    C = realistic_cost(0)
    U = registry.create("solver", "uniform")(C)
    I_ = registry.create("solver", "identity")(C)
    assert torch.allclose(U, torch.full((60, 60), 1 / 3600))
    assert torch.allclose(I_, torch.eye(60) / 60)
    for T in (U, I_):
        assert torch.allclose(T.sum(0), torch.full((60,), 1 / 60))
        assert torch.allclose(T.sum(1), torch.full((60,), 1 / 60))
    with pytest.raises(ValueError, match="square"):
        identity_plan(torch.zeros(3, 4))


def test_solver_rejects_bad_costs():
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_faithful(torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        ipot(torch.zeros(0, 0))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sinkhorn:reg=0", "reg"),
        ("sinkhorn:max_iter=0", "max_iter"),
        ("sinkhorn:tol=-1", "tol"),
        ("sinkhorn:mode=exact", "mode"),
        ("ipot:beta=-1", "beta"),
        ("ipot:iters=0", "iters"),
    ],
)
def test_bad_parameters_are_clear_errors(registry, spec, match):
    with pytest.raises(UsageError, match=match):
        registry.create("solver", spec)


def test_sinkhorn_defaults_resolve_per_mode():
    p = SinkhornParams()
    assert (p.resolved_max_iter, p.resolved_tol) == (100, 0.1)
    p = SinkhornParams(max_iter=5, tol=0.0)
    assert (p.resolved_max_iter, p.resolved_tol) == (5, 0.0)
    s = Sinkhorn(p)
    s(realistic_cost(0))
    assert s.last_iterations == 5


def test_device_stop_gives_the_same_plan_gradient_and_count_without_host_reads():
    """The sync-free faithful Sinkhorn (early stop decided on the device) equals the host one."""
    from fsapp.builtins.solvers import sinkhorn_faithful

    gen = torch.Generator().manual_seed(7)
    for b in (8, 60):
        z = torch.randn(b, 10, generator=gen)
        z_adv = (z + 0.3 * torch.randn(b, 10, generator=gen)).requires_grad_(True)
        plans, grads, counts = [], [], []
        for device_stop in (False, True):
            cost = torch.clamp(1 - torch.nn.functional.normalize(z, dim=1)
                               @ torch.nn.functional.normalize(z_adv, dim=1).t(), min=0)
            plan, its = sinkhorn_faithful(cost, return_iterations=True, device_stop=device_stop)
            (grad,) = torch.autograd.grad((plan * cost).sum(), z_adv)
            plans.append(plan.detach())
            grads.append(grad)
            counts.append(int(its))
        assert torch.equal(plans[0], plans[1])
        assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
        assert counts[0] == counts[1] < 100


def test_sinkhorn_solver_device_stop_option_keeps_the_plan():
    import fsapp

    cost = torch.rand(12, 12, generator=torch.Generator().manual_seed(3)) * 2
    specs = ("sinkhorn", "sinkhorn:device_stop=true", "sinkhorn:device_stop=false")
    plans = [fsapp.create("solver", spec)(cost) for spec in specs]
    assert torch.equal(plans[0], plans[1]) and torch.equal(plans[0], plans[2])
