from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

import fsapp
from fsapp.errors import UsageError
from fsapp.registry import Component, Spec, coerce, make_params, parse_float, parse_spec, range_text, ranged


@dataclass
class P:
    eps: float = 0.1
    steps: int = 10
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    size: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


COMP = Component("attack", "toy", lambda p: p, P, "test")


def test_parse_spec_and_fractions():
    spec = parse_spec("pgd:eps=8/255, steps=20 ,random_start=false")
    assert spec.name == "pgd"
    assert spec.params == {"eps": "8/255", "steps": "20", "random_start": "false"}
    assert parse_float("8/255") == pytest.approx(8 / 255)
    assert parse_float("1e-3") == 0.001
    assert str(parse_spec("fgsm")) == "fgsm"


@pytest.mark.parametrize("bad", ["", ":eps=1", "pgd:eps", "pgd:=3", "pgd:steps=1,steps=2"])
def test_bad_specs_are_one_line_usage_errors(bad):
    with pytest.raises(UsageError) as info:
        parse_spec(bad)
    assert "\n" not in str(info.value)


def test_make_params_coerces_and_names_valid_keys():
    p = make_params(COMP, {"eps": "8/255", "steps": "3", "flag": "true", "mode": "b", "size": "none"})
    assert (p.eps, p.steps, p.flag, p.mode, p.size) == (pytest.approx(8 / 255), 3, True, "b", None)
    with pytest.raises(UsageError, match="unknown parameter 'epz'.*valid: eps, steps, flag, mode, size"):
        make_params(COMP, {"epz": 1})
    with pytest.raises(UsageError, match="parameter 'steps'.*integer"):
        make_params(COMP, {"steps": "1.5"})
    with pytest.raises(UsageError, match="one of a, b"):
        make_params(COMP, {"mode": "c"})
    with pytest.raises(UsageError, match="steps must be >= 1"):
        make_params(COMP, {"steps": 0})


def test_coerce_rejects_non_finite_and_bool_for_numbers():
    with pytest.raises(ValueError):
        coerce("nan", float)
    with pytest.raises(ValueError):
        coerce(True, int)
    assert coerce("60,90", tuple[int, ...]) == (60, 90)
    assert coerce(["a", "b"], tuple[str, ...]) == ("a", "b")


def test_public_api_available_and_create():
    for kind in ("model", "dataset", "solver", "perturbation", "attack"):
        assert fsapp.available(kind)
    assert {"wrn", "preact-resnet18", "small-cnn", "mlp"} <= set(fsapp.available("model"))
    assert {"digits", "cifar10", "cifar100", "svhn", "synthetic"} <= set(fsapp.available("dataset"))
    assert {"sinkhorn", "ipot", "uniform", "identity"} <= set(fsapp.available("solver"))
    assert {"feature-scatter", "supervised", "random", "none"} <= set(fsapp.available("perturbation"))
    assert {"fgsm", "pgd", "cw"} <= set(fsapp.available("attack"))
    a = fsapp.create("attack", "pgd:eps=8/255,steps=2")
    b = fsapp.create("attack", "pgd", eps=8 / 255, steps=2)
    assert callable(a) and callable(b)
    with pytest.raises(UsageError, match="unknown attack 'pgdd'; available: .*pgd"):
        fsapp.create("attack", "pgdd")
    with pytest.raises(UsageError, match="unknown component kind"):
        fsapp.available("optimizer")


@dataclass
class Ranged:
    lr: float = ranged(0.1, 0, 10, low_open=True)
    keep: float = ranged(0.5, 0, 1, high_open=True)
    width: int = ranged(16, 1, 4096)


def test_ranged_bounds_open_and_closed():
    comp = Component("solver", "ranged", lambda p: p, Ranged, "test")
    assert make_params(comp, {"lr": "10", "keep": "0", "width": "4096"}).lr == 10.0
    for key, value, valid in (("lr", "0", "> 0 and <= 10"), ("lr", "10.5", "> 0 and <= 10"),
                              ("keep", "1", ">= 0 and < 1"), ("width", "0", "1..4096")):
        with pytest.raises(UsageError, match=f"solver 'ranged' parameter '{key}' = .* is out of range; "
                                             f"valid: {valid}$"):
            make_params(comp, {key: value})
    assert [row["range"] for row in comp.param_table()] == ["> 0 and <= 10", ">= 0 and < 1", "1..4096"]
    assert range_text(0, 2**63 - 1) == "0..9223372036854775807" and range_text(None, 1) == "<= 1"


def test_qualified_component_names_parse():
    assert parse_spec("my-plugin/pgd:steps=3") == Spec("my-plugin/pgd", {"steps": "3"})
    for bad in ("a/b/c", "/pgd", "pgd/"):
        with pytest.raises(UsageError, match="plugin/name"):
            parse_spec(bad)
