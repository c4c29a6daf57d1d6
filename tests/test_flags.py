"""Every flag of EVALUATION.md: a deliberately broken toy model raises it, a healthy model does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fsapp
from fsapp.data import to_unit
from fsapp.engine.flags import FLAG_IDS, curve_flags
from fsapp.engine.sweep import run_sweep
from fsapp.plugins import get_registry

EPS = 0.1
N = 200


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    d = get_registry().create("dataset", "digits")
    return d, to_unit(d.x_test[:N]), d.y_test[:N]


@pytest.fixture(scope="module")
def linear(digits):
    """The healthy model: a linear classifier on the digits (clean ~95%)."""
    d = digits[0]
    torch.manual_seed(0)
    model = get_registry().create("model", "mlp:layers=0", num_classes=10, channels=1, size=8,
                                  mean=tuple(d.mean), std=tuple(d.std))
    x, y = to_unit(d.x_train), d.y_train
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class Wrapped(nn.Module):
    """The linear model behind a broken input or output stage."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "threshold":  # non-differentiable first layer: zero input gradient everywhere
            return self.inner((x > 0.5).float())
        if self.kind == "round":  # quantisation: torch.round has a zero gradient
            return self.inner(torch.round(x * 4) / 4)
        z = self.inner(x)
        if self.kind == "dropout":  # random in eval mode
            return F.dropout(z, 0.5, training=True)
        if self.kind == "softmax":  # probabilities, not logits
            return z.softmax(1)
        if self.kind == "scaled":  # saturated softmax: CE gradients vanish, margins do not
            return 1e4 * z
        if self.kind == "nan-class0":  # overflows on the class-0 samples: their rows are NaN
            return torch.where((z.argmax(1) == 0)[:, None], torch.full_like(z, float("nan")), z)
        raise ValueError(self.kind)


class GradientTrap(nn.Module):
    """Two classes on the mean pixel u (in 1/255 steps from 0.5): the margin has a local trap.

    The loss rises up to u=1, falls up to u=3, then rises and misclassifies beyond u~5.3: PGD with
    2/255 steps oscillates between ~0 and ~2, while FGSM (random start U(-8, 8), then a step of 8,
    projected) lands at u~6, misclassified.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.flatten(1).mean(1) - 0.5) * 255
        m = 10 - (u ** 3 / 3 - 2 * u ** 2 + 3 * u) + self.dummy
        return torch.stack([m / 2, -m / 2], 1)


class Bump(nn.Module):
    """Two classes; class 1 wins only for a mean pixel in (0.39, 0.45): big steps overshoot it."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1).mean(1)
        h = 1.0 - 1000.0 * (t - 0.42) ** 2 + self.dummy
        return torch.stack([torch.zeros_like(h), h], dim=1)


def ids(report_or_flags) -> set[str]:
    flags = report_or_flags if isinstance(report_or_flags, list) else report_or_flags.flags
    return {f["id"] for f in flags}


def evaluate(model, x, y, attacks, **kw):
    kw.setdefault("defaults", {"eps": EPS, "step_size": EPS / 4})
    return fsapp.evaluate(model, x, y, attacks, batch_size=100, **kw)


# --------------------------------------------------------------------------- healthy


def test_healthy_model_raises_no_flag(linear, digits):
    _, x, y = digits
    attacks = ["fgsm:random_start=true", "pgd:steps=10", "pgd:steps=20", "pgd:steps=20,restarts=2",
               "cw:steps=20", "square:queries=300", "pgd:eps=0.4,step_size=0.1", "apgd-ce:steps=20"]
    report = evaluate(linear, x, y, attacks)
    assert report.flags == [], report.flags
    assert report.accuracy["clean"] > 0.9 and report.accuracy["worst_case"] < report.accuracy["clean"]
    assert report.accuracy["pgd:eps=0.4,step_size=0.1"] == 0.0
    assert report.checks == {"random_forward": 0, "probability_rows": 0, "zero_gradient": 0, "checked": N, "non_finite": 0,
                             "checked_correct": round(report.accuracy["clean"] * N)}
    sweep = run_sweep(linear, x, y, ["pgd:steps=10"], "eps", [0.0, 0.05, 0.1, 0.3], batch_size=100)
    assert sweep["flags"] == [] and sweep["curves"]["pgd:steps=10"][-1] == 0.0
    sweep = run_sweep(linear, x, y, ["pgd:steps=1"], "steps", [1, 5, 20], batch_size=100,
                      defaults={"eps": EPS, "step_size": EPS / 4})
    assert sweep["flags"] == []


def test_every_flag_has_a_test():
    tested = {"single-step-beats-iterative", "more-steps-raise-accuracy", "accuracy-rises-with-eps",
              "no-decay-at-large-eps", "unbounded-attack-fails", "black-box-beats-white-box", "ce-margin-gap",
              "random-forward", "output-probabilities", "zero-gradient", "invalid-examples", "non-finite-output"}
    assert tested == set(FLAG_IDS)


def test_every_message_says_where_to_read_more(linear, digits):
    _, x, y = digits
    report = evaluate(Wrapped(linear, "softmax").eval(), x, y, ["pgd:steps=2", "cw:steps=2"])
    sweep = run_sweep(Wrapped(linear, "softmax").eval(), x, y, ["pgd:steps=2"], "eps", [0.0, 0.4], batch_size=100)
    flags = (report.flags + sweep["flags"] + curve_flags("eps", [0.0, 0.1, 0.4], {"a": [0.1, 0.5, 0.5]})
             + curve_flags("steps", [1, 5], {"a": [0.1, 0.5]}))
    assert {"output-probabilities", "accuracy-rises-with-eps", "no-decay-at-large-eps",
            "more-steps-raise-accuracy"} <= ids(flags)
    for flag in flags:
        assert flag["message"].endswith(f" (docs/EVALUATION.md#{flag['id']})"), flag


# --------------------------------------------------------------------------- broken models


def test_single_step_beats_iterative():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(50, 1, 8, 8, generator=g) * 0.2 - 0.1
    x = 0.5 + noise - noise.mean(dim=(1, 2, 3), keepdim=True)
    y = torch.zeros(50, dtype=torch.long)
    model = GradientTrap().eval()
    report = fsapp.evaluate(model, x, y, ["fgsm:random_start=true", "pgd:steps=20"],
                            defaults={"eps": 8 / 255, "step_size": 2 / 255})
    assert report.accuracy["fgsm:random_start=true"] < 0.2 and report.accuracy["pgd:steps=20"] == 1.0
    assert "single-step-beats-iterative" in ids(report)


def test_more_steps_raise_accuracy():
    x = torch.full((10, 1, 4, 4), 0.3)
    y = torch.zeros(10, dtype=torch.long)
    specs = ["pgd:steps=1,keep=last,random_start=false", "pgd:steps=2,keep=last,random_start=false"]
    report = fsapp.evaluate(Bump().eval(), x, y, specs, defaults={"eps": 0.3, "step_size": 0.1})
    assert report.accuracy[specs[0]] == 0.0 and report.accuracy[specs[1]] == 1.0
    assert "more-steps-raise-accuracy" in ids(report)
    # the same from a steps curve
    assert ids(curve_flags("steps", [1, 5, 10], {"pgd": [0.2, 0.3, 0.1]})) == {"more-steps-raise-accuracy"}


def test_accuracy_rises_with_eps():
    x = torch.full((10, 1, 4, 4), 0.3)
    y = torch.zeros(10, dtype=torch.long)
    sweep = run_sweep(Bump().eval(), x, y, ["fgsm:keep=last"], "eps", [0.1, 0.2])  # FGSM steps by eps
    assert sweep["curves"]["fgsm:keep=last"] == [0.0, 1.0]
    assert "accuracy-rises-with-eps" in ids(sweep["flags"])


def test_no_decay_at_large_eps(linear, digits):
    _, x, y = digits
    masked = Wrapped(linear, "threshold").eval()
    spec = "pgd:eps=0.35,step_size=0.1,random_start=false"
    report = evaluate(masked, x, y, [spec])
    assert report.accuracy[spec] > 0.5
    assert "no-decay-at-large-eps" in ids(report)
    sweep = run_sweep(masked, x, y, ["pgd:random_start=false"], "eps", [0.0, 0.2, 0.4], batch_size=100)
    assert "no-decay-at-large-eps" in ids(sweep["flags"])


def test_unbounded_attack_fails(linear, digits):
    pytest.importorskip("torchattacks")
    if "ta-deepfool" not in fsapp.available("attack"):
        pytest.skip("the fsapp-torchattacks plugin is not installed")
    d = digits[0]
    # pixels in [0.25, 0.75], so that DeepFool's clipping to [0, 1] never binds on the healthy model
    x_train, x = 0.25 + 0.5 * to_unit(d.x_train), 0.25 + 0.5 * digits[1][:40]
    y = digits[2][:40]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(150):
        loss = F.cross_entropy(model(x_train), d.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    healthy = evaluate(model, x, y, ["ta-deepfool:steps=20"])
    assert healthy.accuracy["ta-deepfool:steps=20"] == 0.0 and "unbounded-attack-fails" not in ids(healthy)
    broken = evaluate(Wrapped(model, "threshold").eval(), x, y, ["ta-deepfool:steps=20"])
    assert "unbounded-attack-fails" in ids(broken)
    assert not broken.attacks[0].in_worst_case and broken.attacks[0].threat.eps is None


def test_black_box_beats_white_box(linear, digits):
    _, x, y = digits
    masked = Wrapped(linear, "threshold").eval()
    report = evaluate(masked, x, y, ["pgd:steps=10,random_start=false", "square:queries=300"])
    assert report.accuracy["square:queries=300"] < report.accuracy["pgd:steps=10,random_start=false"] - 0.05
    assert "black-box-beats-white-box" in ids(report)
    # inside an ensemble: Square after the white-box stages
    staged = evaluate(masked, x[:100], y[:100], ["autoattack-fast:steps=5,targets=1,queries=300"])
    assert "black-box-beats-white-box" in ids(staged)
    # a transfer attack crafted on the healthy twin
    transfer = evaluate(masked, x, y, ["pgd:steps=10,random_start=false"], source=linear,
                        transfer=["pgd:steps=10"])
    assert "black-box-beats-white-box" in ids(transfer)
    assert transfer.accuracy["transfer/pgd:steps=10"] < transfer.accuracy["pgd:steps=10,random_start=false"]


def test_ce_margin_gap(linear, digits):
    _, x, y = digits
    report = evaluate(Wrapped(linear, "scaled").eval(), x, y, ["pgd:steps=20", "cw:steps=20"])
    assert report.gap > 0.05
    assert "ce-margin-gap" in ids(report)


def test_random_forward(linear, digits):
    _, x, y = digits
    report = evaluate(Wrapped(linear, "dropout").eval(), x, y, ["pgd:steps=2"])
    assert "random-forward" in ids(report) and report.checks["random_forward"] > 0


def test_output_probabilities(linear, digits):
    _, x, y = digits
    report = evaluate(Wrapped(linear, "softmax").eval(), x, y, ["pgd:steps=2"])
    assert "output-probabilities" in ids(report)


@pytest.mark.parametrize("kind", ["threshold", "round"])
def test_zero_gradient(linear, digits, kind):
    _, x, y = digits
    report = evaluate(Wrapped(linear, kind).eval(), x, y, ["pgd:steps=2"])
    assert "zero-gradient" in ids(report)
    assert report.checks["zero_gradient"] == report.checks["checked_correct"] > 0


def test_non_finite_output_is_never_a_class(linear, digits):
    _, x, y = digits
    model = Wrapped(linear, "nan-class0").eval()
    report = evaluate(model, x, y, ["pgd:steps=2"])
    with torch.no_grad():
        pred = linear(x).argmax(1)
    nan_rows = int((pred == 0).sum())
    assert nan_rows > 0 and int((y == 0).sum()) > 0
    # argmax of a NaN row is 0: counted as class 0 these samples would be "correct"; they are not
    expected_clean = int(((pred == y) & (pred != 0)).sum()) / N
    assert report.accuracy["clean"] == expected_clean
    assert report.checks["non_finite"] == nan_rows
    assert "non-finite-output" in ids(report)
    assert not (report.attacks[0].robust & (pred == 0)).any()


def test_invalid_examples(linear, digits, install_plugin, monkeypatch):
    install_plugin("fsapp-cheat", "fsapp_cheat", """
        from dataclasses import dataclass
        from fsapp import hookimpl

        @dataclass
        class P:
            eps: float = 0.1

        @hookimpl
        def register_attacks(register):
            register("cheat", lambda p: (lambda model, x, y: x + 1.0), params=P)
    """)
    from fsapp.plugins import reset_registry

    reset_registry()
    _, x, y = digits
    report = evaluate(linear, x, y, ["cheat"])
    assert "invalid-examples" in ids(report)
    assert report.attacks[0].invalid == report.checks["checked_correct"]  # every attacked point was outside
    # the examples were projected into the ball and [0, 1] before counting: x + eps, clipped
    with torch.no_grad():
        projected = (linear((x + EPS).clamp(0, 1)).argmax(1) == y) & (linear(x).argmax(1) == y)
    assert report.accuracy["cheat"] == int(projected.sum()) / N
    monkeypatch.undo()  # take the plugin off sys.path before the registry reloads
    reset_registry()
    assert "cheat" not in fsapp.available("attack")
