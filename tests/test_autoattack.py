"""Native AutoAttack: each component equals torchattacks' step for step, the ensemble matches the
reference composition (APGD-CE, APGD-T, FAB-T, Square run in turn on the points still robust),
and the name ``autoattack`` means the standard version."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fsapp
from fsapp.data import to_unit
from fsapp.errors import UsageError
from fsapp.plugins import get_registry

torchattacks = pytest.importorskip("torchattacks")

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def robust_mlp():
    """A one-hidden-layer MLP adversarially trained on the digits (2 s): robust accuracy ~70% at 0.1."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    reg = get_registry()
    d = reg.create("dataset", "digits")
    torch.manual_seed(0)
    model = reg.create("model", "mlp:hidden=64,layers=1", num_classes=10, channels=1, size=8,
                       mean=tuple(d.mean), std=tuple(d.std))
    x, y = to_unit(d.x_train), d.y_train
    pgd = reg.create("attack", f"pgd:eps={EPS},step_size=0.03,steps=5")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        model.eval()
        xa = pgd(model, x, y)
        model.train()
        loss = F.cross_entropy(model(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(old)
    return model, to_unit(d.x_test), d.y_test


def reference_autoattack(model, x, y, eps, batch_size):
    """The reference: torchattacks' classes at the standard settings, each on the points still robust."""
    attacks = [
        torchattacks.APGD(model, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        torchattacks.APGDT(model, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
        torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, n_restarts=1, seed=0),
        torchattacks.Square(model, eps=eps, n_queries=5000, n_restarts=1, seed=0, resc_schedule=False),
    ]
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for start in range(0, len(y), batch_size):
        for attack in attacks:
            idx = torch.arange(start, min(start + batch_size, len(y)))[robust[start:start + batch_size]]
            if len(idx) == 0:
                continue
            adv = attack(x[idx], y[idx])
            assert (adv - x[idx]).abs().max() <= eps + 1e-6
            with torch.no_grad():
                robust[idx] &= model(adv).argmax(1) == y[idx]
    return robust


CASES = [
    ("apgd-ce:steps=25,restarts=2,seed=0",
     lambda m: torchattacks.APGD(m, eps=EPS, steps=25, n_restarts=2, loss="ce", seed=0)),
    ("apgd-dlr:steps=25,seed=0", lambda m: torchattacks.APGD(m, eps=EPS, steps=25, n_restarts=1, loss="dlr", seed=0)),
    ("apgd-t:steps=25,seed=0", lambda m: torchattacks.APGDT(m, eps=EPS, steps=25, n_restarts=1, n_classes=10, seed=0)),
    ("fab-t:steps=20,restarts=2,seed=0",
     lambda m: torchattacks.FAB(m, eps=EPS, steps=20, n_restarts=2, multi_targeted=True, n_classes=10, seed=0)),
    ("square:queries=300,seed=0",
     lambda m: torchattacks.Square(m, eps=EPS, n_queries=300, n_restarts=1, seed=0, resc_schedule=False)),
    ("square:queries=200,rescale_schedule=true,seed=0",
     lambda m: torchattacks.Square(m, eps=EPS, n_queries=200, n_restarts=1, seed=0, resc_schedule=True)),
]


@pytest.mark.parametrize("spec, reference", CASES, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(CASES)])
def test_component_equals_torchattacks_step_for_step(robust_mlp, spec, reference):
    model, x, y = robust_mlp
    x, y = x[:64], y[:64]
    expected = reference(model)(x, y)
    got = fsapp.create("attack", f"{spec},eps={EPS}")(model, x, y)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert (got - x).abs().max() <= EPS + 1e-6 and got.min() >= 0 and got.max() <= 1
    with torch.no_grad():
        assert (model(got).argmax(1) == y).sum() < (model(x).argmax(1) == y).sum()


@pytest.mark.slow
def test_autoattack_matches_the_reference_within_one_point(robust_mlp):
    """fsapp.evaluate(..., ["autoattack:eps=0.1"]) against torchattacks' APGD, APGDT, FAB, Square (standard
    settings, still-robust points); with seed=0 the per-sample results are identical."""
    model, x, y = robust_mlp
    x, y = x[:120], y[:120]
    report = fsapp.evaluate(model, x, y, attacks=["autoattack:eps=0.1", "autoattack:eps=0.1,seed=0"], batch_size=120)
    reference = reference_autoattack(model, x, y, EPS, 120)
    ref_acc = reference.float().mean().item()
    assert 0.3 < ref_acc < report.accuracy["clean"]  # a model where the attack has work to do
    assert abs(report.accuracy["autoattack:eps=0.1"] - ref_acc) <= 0.01
    seeded = next(r for r in report.attacks if r.spec == "autoattack:eps=0.1,seed=0")
    assert torch.equal(seeded.robust.cpu(), reference)
    assert list(report.stage_accuracy(seeded)) == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_autoattack_name_means_the_standard_version():
    attack = fsapp.create("attack", "autoattack:eps=8/255")
    names = [name for name, _ in attack.stages]
    assert names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    apgd_ce, apgd_t, fab_t, square = (stage for _, stage in attack.stages)
    assert (apgd_ce.steps, apgd_ce.restarts, apgd_ce.loss, apgd_ce.targets) == (100, 1, "ce", 0)
    assert (apgd_t.steps, apgd_t.restarts, apgd_t.targets, apgd_t.dlr) == (100, 1, 9, True)
    assert (fab_t.p.steps, fab_t.p.targets, fab_t.p.restarts) == (100, 9, 1)
    assert (square.p.queries, square.p.restarts, square.p.p_init, square.p.rescale_schedule) == (5000, 1, 0.8, False)
    assert all(stage.eps == 8 / 255 for _, stage in attack.stages)
    # no knob can turn it into something else
    with pytest.raises(UsageError, match="valid: eps, seed"):
        fsapp.create("attack", "autoattack:steps=10")
    fast = fsapp.create("attack", "autoattack-fast")
    assert fast.stages[0][1].steps == 20 and [n for n, _ in fast.stages] == ["apgd-ce", "apgd-t", "square"]


def test_direct_call_and_evaluator_cascade_agree(robust_mlp):
    model, x, y = robust_mlp
    x, y = x[:60], y[:60]
    spec = "autoattack-fast:eps=0.1,steps=10,targets=2,queries=100,fab=true,seed=0"
    adv = fsapp.create("attack", spec)(model, x, y)
    with torch.no_grad():
        direct = model(adv).argmax(1) == y
    report = fsapp.evaluate(model, x, y, [spec], batch_size=60)
    assert torch.equal(report.attacks[0].robust, direct)
    stages = report.stage_accuracy(report.attacks[0])
    assert list(stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(stages.values()) == sorted(stages.values(), reverse=True)  # each stage can only remove points


def test_too_few_classes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    x = torch.rand(20, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    # the ensemble skips APGD-T (needs 4 classes); APGD-T alone says why it cannot run
    report = fsapp.evaluate(model, x, y, ["autoattack-fast:eps=0.05,steps=5,queries=20"], batch_size=20)
    assert report.accuracy["clean"] == 1.0
    with pytest.raises(UsageError, match="at least 4 classes"):
        fsapp.evaluate(model, x, y, ["apgd-t:eps=0.05,steps=5"])
