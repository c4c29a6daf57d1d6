"""Built-in models: parameter counts, shapes, normalisation inside, registry integration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsapp.errors import UsageError
from fsapp.plugins import load_registry

SMALL_SPECS = ["wrn:depth=10,widen=1", "preact-resnet18", "small-cnn", "mlp"]


@pytest.fixture(scope="module")
def reg():
    return load_registry()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_builtin_models_registered_with_descriptions(reg):
    for name in ("wrn", "preact-resnet18", "small-cnn", "mlp"):
        comp = reg.get("model", name)
        assert comp.plugin == "fsapp"
        assert comp.description
        fields = {row["name"] for row in comp.param_table()}
        assert {"num_classes", "channels", "size", "mean", "std"} <= fields
    wrn_rows = {r["name"]: r["default"] for r in reg.get("model", "wrn").param_table()}
    assert (wrn_rows["depth"], wrn_rows["widen"], wrn_rows["dropout"]) == (28, 10, 0.0)


def test_wrn_28_10_has_the_papers_36_5m_parameters(reg):
    model = reg.create("model", "wrn", num_classes=10, channels=3, size=32)  # count only
    assert n_params(model) == 36_479_194
    assert len(model.block1) == len(model.block2) == len(model.block3) == 4


def test_preact_resnet18_has_11_2m_parameters(reg):
    model = reg.create("model", "preact-resnet18", num_classes=10, channels=3, size=32)
    assert round(n_params(model) / 1e6, 1) == 11.2


@pytest.mark.parametrize("spec", SMALL_SPECS)
@pytest.mark.parametrize("shape", [(1, 8), (3, 32)])
def test_forward_shapes_and_finite_logits(reg, spec, shape):
    channels, size = shape
    torch.manual_seed(0)
    model = reg.create("model", spec, num_classes=7, channels=channels, size=size,
                       mean=(0.4,) * channels, std=(0.2,) * channels)
    x = torch.rand(2, channels, size, size, requires_grad=True)
    model.train()
    out = model(x)
    assert out.shape == (2, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        z = model(torch.cat([x, x.flip(0)]))
    assert torch.allclose(z[:2].flip(0), z[2:], atol=1e-5)  # eval mode: samples independent
    assert not torch.allclose(z[0], z[1])


def test_wrn_accepts_other_sizes_and_dropout(reg):
    model = reg.create("model", "wrn:depth=10,widen=2,dropout=0.3", num_classes=4, channels=3,
                       size=12)
    assert model(torch.rand(2, 3, 12, 12)).shape == (2, 4)


@pytest.mark.parametrize("spec", SMALL_SPECS)
def test_normalisation_buffers_are_not_in_state_dict(reg, spec):
    model = reg.create("model", spec, num_classes=10, channels=3, size=8,
                       mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    keys = set(model.state_dict())
    assert "mean" not in keys and "std" not in keys
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert model.mean.shape == (1, 3, 1, 1)
    # a model built with other statistics loads the same weights (strict keys)
    other = reg.create("model", spec, num_classes=10, channels=3, size=8)
    other.load_state_dict(model.state_dict())
    assert other.std.flatten().tolist() == [0.5]


def test_normalisation_happens_inside():
    from fsapp.builtins.models import MLP, MLPParams

    torch.manual_seed(0)
    model = MLP(MLPParams(num_classes=3, channels=2, size=4, layers=0, mean=(0.3, 0.6),
                          std=(0.25, 0.5)))
    linear = model.net[-1]
    x = torch.rand(5, 2, 4, 4)
    mean = torch.tensor([0.3, 0.6]).view(1, 2, 1, 1)
    std = torch.tensor([0.25, 0.5]).view(1, 2, 1, 1)
    expected = linear(((x - mean) / std).flatten(1))
    assert torch.allclose(model(x), expected, atol=1e-6)
    # buffers follow dtype and device moves
    assert model.double().mean.dtype == torch.float64


def test_small_cnn_has_batchnorm_and_is_small(reg):
    model = reg.create("model", "small-cnn", num_classes=10, channels=1, size=8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_params(model) < 150_000
    model.train()
    x = torch.rand(6, 1, 8, 8)
    model(x)
    assert model.features[1].num_batches_tracked.item() == 1


def test_mlp_layers_and_hidden(reg):
    model = reg.create("model", "mlp:hidden=16,layers=3", num_classes=5, channels=1, size=8)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [16, 16, 16, 5]
    assert linears[0].in_features == 64


@pytest.mark.parametrize(
    ("spec", "params", "needle"),
    [
        ("wrn:depth=27", {}, "6n+4"),
        ("wrn:depth=4", {}, "'depth' = 4 is out of range; valid: 10..1000"),
        ("wrn:depth=1000000", {}, "'depth' = 1000000 is out of range; valid: 10..1000"),
        ("wrn:widen=1000000000", {}, "'widen' = 1000000000 is out of range; valid: 1..64"),
        ("small-cnn:width=1000000000", {}, "'width' = 1000000000 is out of range; valid: 1..4096"),
        ("mlp:layers=10000000", {}, "'layers' = 10000000 is out of range; valid: 0..1000"),
        ("mlp:hidden=1000000000", {}, "'hidden' = 1000000000 is out of range; valid: 1..65536"),
        ("mlp", {"num_classes": 10**12}, "'num_classes' = 1000000000000 is out of range; valid: 1..100000"),
        ("mlp", {"size": 100000}, "'size' = 100000 is out of range; valid: 1..1024"),
        ("wrn:widen=0", {}, "widen"),
        ("wrn:dropout=1.5", {}, "dropout"),
        ("small-cnn", {"channels": 3, "mean": (0.1, 0.2)}, "mean needs 1 or 3"),
        ("mlp", {"std": (0.0,)}, "positive"),
        ("mlp:layers=-1", {}, "layers"),
        ("small-cnn:depth=3", {}, "valid:"),
    ],
)
def test_bad_parameters_are_one_line_usage_errors(reg, spec, params, needle):
    with pytest.raises(UsageError) as info:
        reg.create("model", spec, **params)
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize(("name", "params"), [
    ("wrn", {"depth": 16, "widen": 2, "num_classes": 7, "channels": 1, "size": 8}),
    ("wrn", {"depth": 10, "widen": 1, "dropout": 0.3}),
    ("preact-resnet18", {"num_classes": 100}),
    ("small-cnn", {"width": 8, "hidden": 5, "channels": 1, "size": 8}),
    ("mlp", {"layers": 0, "channels": 1, "size": 8}),
    ("mlp", {"layers": 3, "hidden": 7, "num_classes": 4}),
])
def test_parameter_count_formula_is_exact(reg, name, params):
    from fsapp.builtins.models import parameter_count
    from fsapp.registry import make_params

    component = reg.get("model", name)
    instance = make_params(component, params)
    with torch.device("meta"):
        model = component.factory(instance)
    assert parameter_count(instance) == sum(p.numel() for p in model.parameters())


def test_real_sizes_fit_and_absurd_ones_are_refused_with_the_estimate(reg):
    from fsapp.checkpoint import check_model_fits, estimate_parameters

    assert estimate_parameters("wrn", {"depth": 28, "widen": 10}) == 36_479_194
    imagenet = {"num_classes": 1000, "channels": 3, "size": 224}
    assert check_model_fits("preact-resnet18", imagenet, limit_bytes=1 << 32) > 11_000_000
    assert estimate_parameters("wrn", {"depth": 28, "widen": 10, "num_classes": 100}) > 36_000_000
    with pytest.raises(UsageError, match=r"model 'mlp' would have about .* parameters, needing about .*B"):
        check_model_fits("mlp", {"hidden": 65536, "layers": 1000})
    with pytest.raises(UsageError, match="valid: 0..1000"):
        estimate_parameters("mlp", {"layers": 10**7})
